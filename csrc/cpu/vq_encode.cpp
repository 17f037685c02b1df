// astra::vq_encode on the CPU: fused nearest-codeword search per group.
//
// Rows are cut into tiles of up to kRowTile; threads take whole row tiles and run
// every group on them (one pass over x). For row tile R and group g:
//   xT = x[R, g-th slice]^T                 fp32 [dg, kRowTile], zero-padded rows
//   for codeword tiles C of kCodeTile:      dot = cb[g, C] . xT (tile_gemm)
//     dist = ||c||^2 - 2 dot                vectorized over rows, running min/argmin
// so at most kCodeTile x kRowTile distances exist at a time. Codewords are scanned
// in increasing order and only a strictly smaller distance replaces the running
// min, so ties go to the lowest index. ||c||^2 is computed once per call.
// precision="bf16" rounds x and the codebooks to bf16 first and then computes in
// fp32: bf16 products are exact in fp32, only the accumulation rounds.
// The error output is recomputed directly as sum((x - c)^2) for the chosen c.
#include "astra.h"
#include "cpu/cpu_utils.h"

#include <torch/library.h>

#include <limits>
#include <vector>

namespace astra {
namespace {

using cpu::fVec;

constexpr int64_t kRowTile = 128;  // rows per tile; a multiple of fVec::size()
constexpr int64_t kCodeTile = 64;  // codewords per tile: dot is 64 x 128 fp32 = 32 KiB

// sum((a - b)^2) over n floats, fp32 with vector-lane partial sums; b = nullptr: sum(a^2).
inline float sq_dist(const float* a, const float* b, int64_t n) {
  constexpr int64_t kV = fVec::size();
  fVec acc(0.f);
  int64_t j = 0;
  for (; j + kV <= n; j += kV) {
    const fVec t = b ? fVec::loadu(a + j) - fVec::loadu(b + j) : fVec::loadu(a + j);
    acc = at::vec::fmadd(t, t, acc);
  }
  if (j < n) {
    const fVec aj = fVec::loadu(a + j, n - j);  // zero-filled tail
    const fVec t = b ? aj - fVec::loadu(b + j, n - j) : aj;
    acc = at::vec::fmadd(t, t, acc);
  }
  return at::vec::vec_reduce_all<float>([](fVec& u, fVec& v) { return u + v; }, acc);
}

// Running min/argmin over codewords c = 0..nb-1 (index k0 + c) for NR row vectors:
// dist[c, rows] = cn[c] - 2 dot[c * ld + rows]. Only a strictly smaller distance
// moves the argmin (ties keep the lower index); a NaN distance never wins.
template <int NR>
inline void argmin_rows(const float* dot, int64_t ld, const float* cn, int64_t nb, int64_t k0,
                        float* best, float* arg) {
  constexpr int64_t kV = fVec::size();
#if defined(CPU_CAPABILITY_AVX512)
  __m512 b[NR], a[NR];
  for (int i = 0; i < NR; ++i) {
    b[i] = _mm512_loadu_ps(best + i * kV);
    a[i] = _mm512_loadu_ps(arg + i * kV);
  }
  const __m512 minus_two = _mm512_set1_ps(-2.f);
  for (int64_t c = 0; c < nb; ++c) {
    const __m512 cnv = _mm512_set1_ps(cn[c]);
    const __m512 idx = _mm512_set1_ps(static_cast<float>(k0 + c));
    for (int i = 0; i < NR; ++i) {
      const __m512 d = _mm512_fmadd_ps(_mm512_loadu_ps(dot + c * ld + i * kV), minus_two, cnv);
      const __mmask16 lt = _mm512_cmp_ps_mask(d, b[i], _CMP_LT_OQ);
      a[i] = _mm512_mask_mov_ps(a[i], lt, idx);
      b[i] = _mm512_min_ps(d, b[i]);  // returns b[i] when d is NaN or equal
    }
  }
  for (int i = 0; i < NR; ++i) {
    _mm512_storeu_ps(best + i * kV, b[i]);
    _mm512_storeu_ps(arg + i * kV, a[i]);
  }
#else
  fVec b[NR], a[NR];
  for (int i = 0; i < NR; ++i) {
    b[i] = fVec::loadu(best + i * kV);
    a[i] = fVec::loadu(arg + i * kV);
  }
  const fVec minus_two(-2.f);
  for (int64_t c = 0; c < nb; ++c) {
    const fVec cnv(cn[c]), idx(static_cast<float>(k0 + c));
    for (int i = 0; i < NR; ++i) {
      const fVec d = at::vec::fmadd(fVec::loadu(dot + c * ld + i * kV), minus_two, cnv);
      const fVec lt = d < b[i];
      a[i] = fVec::blendv(a[i], idx, lt);
      b[i] = fVec::blendv(b[i], d, lt);
    }
  }
  for (int i = 0; i < NR; ++i) {
    b[i].store(best + i * kV);
    a[i].store(arg + i * kV);
  }
#endif
}

struct VqProblem {
  int64_t M, G, K, dg;
  const float* cb;  // [G, K, dg], bf16-rounded when precision="bf16"
  const float* cn;  // [G, K] squared norms of cb
  bool round_bf16;
  int32_t* codes;   // [M, G]
  float* err;       // [M] or nullptr
};

template <typename scalar_t>
void vq_encode_kernel(const scalar_t* x, const VqProblem& p, int64_t row_tile) {
  const int64_t D = p.G * p.dg, dg = p.dg, K = p.K;
  constexpr int64_t kV = fVec::size();
  const int64_t n_tiles = cpu::ceil_div(p.M, row_tile);

  at::parallel_for(0, n_tiles, 1, [&](int64_t t_begin, int64_t t_end) {
    at::Tensor buf = cpu::scratch_f32(row_tile * D + dg * row_tile + kCodeTile * row_tile +
                                      2 * row_tile);
    float* xf = buf.data_ptr<float>();       // [row_tile, D] x tile in fp32
    float* xT = xf + row_tile * D;           // [dg, row_tile] one group, transposed
    float* dot = xT + dg * row_tile;         // [kCodeTile, row_tile]
    float* best = dot + kCodeTile * row_tile;
    float* arg = best + row_tile;            // argmin as float: exact for K <= 2^24

    for (int64_t t = t_begin; t < t_end; ++t) {
      const int64_t r0 = t * row_tile;
      const int64_t mb = std::min(row_tile, p.M - r0);
      const int64_t nv = cpu::round_up(mb, kV);  // rows the vector loops cover
      cpu::to_f32(x + r0 * D, xf, mb * D);
      if (p.round_bf16) cpu::round_through<c10::BFloat16>(xf, mb * D);
      std::fill(xf + mb * D, xf + nv * D, 0.f);  // padding rows: finite, never written out

      for (int64_t g = 0; g < p.G; ++g) {
        at::vec::transpose_mxn<float>(xf + g * dg, D, xT, row_tile, static_cast<int>(nv),
                                      static_cast<int>(dg));
        std::fill(best, best + nv, std::numeric_limits<float>::infinity());
        std::fill(arg, arg + nv, 0.f);
        const float* cb_g = p.cb + g * K * dg;
        const float* cn_g = p.cn + g * K;

        for (int64_t k0 = 0; k0 < K; k0 += kCodeTile) {
          const int64_t nb = std::min(kCodeTile, K - k0);
          cpu::tile_gemm(nb, nv, dg, dg, row_tile, row_tile, false, cb_g + k0 * dg, xT, dot);
          int64_t r = 0;  // independent row vectors per pass hide the compare latency
          for (; r + 8 * kV <= nv; r += 8 * kV)
            argmin_rows<8>(dot + r, row_tile, cn_g + k0, nb, k0, best + r, arg + r);
          for (; r + 4 * kV <= nv; r += 4 * kV)
            argmin_rows<4>(dot + r, row_tile, cn_g + k0, nb, k0, best + r, arg + r);
          for (; r < nv; r += kV)
            argmin_rows<1>(dot + r, row_tile, cn_g + k0, nb, k0, best + r, arg + r);
        }

        for (int64_t r = 0; r < mb; ++r) {
          const int64_t code = static_cast<int64_t>(arg[r]);
          p.codes[(r0 + r) * p.G + g] = static_cast<int32_t>(code);
          if (p.err == nullptr) continue;
          const float e = sq_dist(xf + r * D + g * dg, cb_g + code * dg, dg);
          p.err[r0 + r] = (g == 0 ? 0.f : p.err[r0 + r]) + e;
        }
      }
    }
    cpu::tile_gemm_done();
  });
}

}  // namespace

std::tuple<Tensor, Tensor> vq_encode_cpu(const Tensor& x, const Tensor& codebooks,
                                         c10::string_view precision, bool return_error) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "vq_encode: x must be contiguous [M, D]");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kHalf ||
                  x.scalar_type() == at::kBFloat16,
              "vq_encode: x must be float32/float16/bfloat16, got ", x.scalar_type());
  TORCH_CHECK(codebooks.dim() == 3 && codebooks.is_contiguous() &&
                  codebooks.scalar_type() == at::kFloat,
              "vq_encode: codebooks must be contiguous float32 [G, K, D/G]");
  TORCH_CHECK(precision == "fp32" || precision == "bf16",
              "vq_encode: precision must be 'fp32' or 'bf16', got '", precision, "'");
  const int64_t M = x.size(0), D = x.size(1);
  const int64_t G = codebooks.size(0), K = codebooks.size(1), dg = codebooks.size(2);
  TORCH_CHECK(G >= 1 && K >= 1 && dg >= 1 && G * dg == D, "vq_encode: codebooks ",
              codebooks.sizes(), " do not match x's D=", D);
  TORCH_CHECK(K <= (int64_t{1} << 24), "vq_encode: at most 2^24 codewords, got K=", K);

  Tensor codes = at::empty({M, G}, x.options().dtype(at::kInt));
  Tensor err = at::empty({return_error ? M : 0}, x.options().dtype(at::kFloat));
  if (M == 0) return {codes, err};

  // Rounded codebook (precision="bf16") and squared norms, once per call.
  const bool bf16 = precision == "bf16";
  Tensor cb = bf16 ? at::empty_like(codebooks) : codebooks;
  Tensor cn = at::empty({G, K}, codebooks.options());
  {
    const float* src = codebooks.data_ptr<float>();
    float* dst = cb.data_ptr<float>();
    float* n = cn.data_ptr<float>();
    at::parallel_for(0, G * K, 64, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        if (bf16) {
          std::copy(src + i * dg, src + (i + 1) * dg, dst + i * dg);
          cpu::round_through<c10::BFloat16>(dst + i * dg, dg);
        }
        n[i] = sq_dist(dst + i * dg, nullptr, dg);
      }
    });
  }

  // Small M: shrink the row tile so both threads (or more) get work.
  const int64_t per_thread = cpu::ceil_div(M, at::get_num_threads());
  const int64_t row_tile = std::min(kRowTile, cpu::round_up(per_thread, fVec::size()));

  VqProblem p{M, G, K, dg, cb.data_ptr<float>(), cn.data_ptr<float>(), bf16,
              codes.data_ptr<int32_t>(), return_error ? err.data_ptr<float>() : nullptr};
  ASTRA_DISPATCH_FLOAT_TYPES(x.scalar_type(), "vq_encode_cpu", [&] {
    vq_encode_kernel<scalar_t>(x.data_ptr<scalar_t>(), p, row_tile);
  });
  return {codes, err};
}

TORCH_LIBRARY_IMPL(astra_C, CPU, m) { m.impl("vq_encode", &vq_encode_cpu); }

}  // namespace astra
