// astra::int8_linear on the CPU: y[m, n] = sum_k x[m, k] * (w[n, k] * scale[n, k / gs] +
// offset[n, k / gs]) + bias[n], w int8 (weight-only quantization): one scale (and
// offset) per output row (scale [N], gs = K) or per group of gs consecutive weights of a
// row (scale [N, K / gs], gs a multiple of 32). The offsets (asymmetric groups, e.g. a
// GGUF's Q4_1 blocks, which they hold exactly) add sum_g offset[n, g] * xsum[m, g], the
// sums of each token row's groups computed once per row.
//
// Decode multiplies one token (M = 1) by every weight matrix once: the time is the
// weight bytes read from memory, so int8 weights read 4x fewer bytes than fp32 ones,
// provided the arithmetic keeps up with the memory. Widening each int8 weight to fp32
// (two instructions per 16 weights before the FMA) does not: it ran at 6-7 GB/s where
// an fp32 GEMV streams 11-15 GB/s. So small M (<= kSmallM) rounds each token row to
// int16 (one scale per row, max|x| / 32767: a relative error below 2^-15 of the row's
// largest value, finer than bf16) and multiplies int8 by int16 in integer dot-product
// instructions (AVX-512 VNNI vpdpwssd: 32 products per instruction; vpmaddwd on
// AVX-512BW / AVX2), 32-bit sums flushed to fp32 every kKBlock columns, 8 weight rows
// at a time for M = 1 (8 independent chains; one row at a time, read in order, was
// slower: 5-8 GB/s against 8-11 for cold weights here). Larger M (prefill): blocks of rows are
// dequantized to fp32 and multiplied by ATen's GEMM, where the arithmetic, not the
// weight bytes, is the cost (x stays fp32 there).
#include "astra.h"
#include "cpu/cpu_utils.h"

#include <torch/library.h>

#include <cmath>
#include <vector>

namespace astra {
namespace {

constexpr int64_t kSmallM = 16;     // up to this many rows: the streaming kernel
constexpr int64_t kGemmRows = 512;  // weight rows dequantized per GEMM block
// int32 partial sums: |int8 * int16| <= 127 * 32767 < 2^22, so each 32-bit lane holds
// at least 2^9 products; a lane takes kKBlock / kW16 * 2 products per block. Each block's
// (or group's) int32 sums are widened to fp32 and accumulated with the group's scale.
constexpr int64_t kKBlock = 4096;
// software prefetch of the next block of weight rows (reads past the matrix's end are
// harmless: a prefetch never faults)
constexpr bool kPrefetch = true;

#if defined(__AVX512BW__)
constexpr int64_t kW16 = 32;  // int16 per vector
using vi = __m512i;
inline vi vzero() { return _mm512_setzero_si512(); }
inline vi vload_x(const int16_t* p) { return _mm512_loadu_si512(p); }
inline vi vload_w(const int8_t* p) {
  return _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
inline vi vdot(vi acc, vi w, vi x) {
#if defined(__AVX512VNNI__)
  return _mm512_dpwssd_epi32(acc, w, x);
#else
  return _mm512_add_epi32(acc, _mm512_madd_epi16(w, x));
#endif
}
inline int32_t vsum(vi a) { return _mm512_reduce_add_epi32(a); }
using vf = __m512;
inline vf vfzero() { return _mm512_setzero_ps(); }
inline vf vfacc(vf acc, vi s, float scale) {  // acc + float(s) * scale
  return _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), _mm512_set1_ps(scale), acc);
}
inline float vfsum(vf a) { return _mm512_reduce_add_ps(a); }
#elif defined(__AVX2__)
constexpr int64_t kW16 = 16;
using vi = __m256i;
inline vi vzero() { return _mm256_setzero_si256(); }
inline vi vload_x(const int16_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
inline vi vload_w(const int8_t* p) {
  return _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
inline vi vdot(vi acc, vi w, vi x) { return _mm256_add_epi32(acc, _mm256_madd_epi16(w, x)); }
inline int32_t vsum(vi a) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(a), _mm256_extracti128_si256(a, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
  return _mm_cvtsi128_si32(s);
}
using vf = __m256;
inline vf vfzero() { return _mm256_setzero_ps(); }
inline vf vfacc(vf acc, vi s, float scale) {
  return _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), _mm256_set1_ps(scale), acc);
}
inline float vfsum(vf a) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
#else
constexpr int64_t kW16 = 1;
using vi = int32_t;
inline vi vzero() { return 0; }
inline vi vload_x(const int16_t* p) { return *p; }
inline vi vload_w(const int8_t* p) { return *p; }
inline vi vdot(vi acc, vi w, vi x) { return acc + w * x; }
inline int32_t vsum(vi a) { return a; }
using vf = float;
inline vf vfzero() { return 0.f; }
inline vf vfacc(vf acc, vi s, float scale) { return acc + static_cast<float>(s) * scale; }
inline float vfsum(vf a) { return a; }
#endif

// A token row rounded to int16: xq = round(x / xs), xs = max|x| / 32767 (1 if x = 0).
// Returns xs; NaN when x holds a non-finite value (its outputs are then NaN).
float quantize_row(const float* x, int16_t* xq, int64_t K) {
  float amax = 0.f;
  bool finite = true;
  for (int64_t k = 0; k < K; ++k) {
    finite = finite && std::isfinite(x[k]);
    amax = std::max(amax, std::abs(x[k]));
  }
  if (!finite) {
    std::fill(xq, xq + K, int16_t(0));
    return std::nanf("");
  }
  const float xs = amax > 0.f ? amax / 32767.f : 1.f, inv = 1.f / xs;
  for (int64_t k = 0; k < K; ++k)
    xq[k] = static_cast<int16_t>(std::nearbyint(std::clamp(x[k] * inv, -32767.f, 32767.f)));
  return xs;
}

// The weights' scales (and offsets, or null): one per row (gs = K, ng = 1) or per group
// of gs weights; xsum [M, ng]: each quantized token row's group sums (with offsets).
struct Scales {
  const float* s;
  int64_t gs, ng;  // group size, groups per row
  const float* off = nullptr;
  const float* xsum = nullptr;
  bool per_row() const { return ng == 1; }
};

// out[m * ldo + n] for n in [n0, n0 + NB), m in [m0, m0 + MB): the dot products of
// NB weight rows with MB quantized token rows, times the scales, plus bias.
template <int NB, int MB>
inline void dot_block(const int16_t* xq, const float* xs, int64_t K, const int8_t* w,
                      const Scales& sc, const float* bias, float* out, int64_t ldo,
                      int64_t n0, int64_t m0) {
  const bool per_row = sc.per_row();
  const int64_t chunk = per_row ? kKBlock : sc.gs;
  const float* srow[NB];  // each row's scales (grouped)
  vf sum[NB][MB];
  float tail[NB][MB] = {};
  for (int i = 0; i < NB; ++i) {
    srow[i] = sc.s + (n0 + i) * sc.ng;
    for (int j = 0; j < MB; ++j) sum[i][j] = vfzero();
  }
  for (int64_t kb = 0, g = 0; kb < K; kb += chunk, ++g) {
    const int64_t ke = std::min(K, kb + chunk);
    vi acc[NB][MB];
    for (int i = 0; i < NB; ++i)
      for (int j = 0; j < MB; ++j) acc[i][j] = vzero();
    int64_t k = kb;
    for (; k + kW16 <= ke; k += kW16) {
      vi xv[MB];
      for (int j = 0; j < MB; ++j) xv[j] = vload_x(xq + (m0 + j) * K + k);
      for (int i = 0; i < NB; ++i) {
        // the rows NB further on, at this column: one block ahead of their use, which
        // the hardware prefetchers alone did not manage (cold weights ran at ~8 GB/s)
        if (kPrefetch) _mm_prefetch(reinterpret_cast<const char*>(w + (n0 + NB + i) * K + k),
                                    _MM_HINT_T0);
        const vi wv = vload_w(w + (n0 + i) * K + k);
        for (int j = 0; j < MB; ++j) acc[i][j] = vdot(acc[i][j], wv, xv[j]);
      }
    }
    for (int i = 0; i < NB; ++i) {
      const float gsc = per_row ? 1.f : srow[i][g];
      for (int j = 0; j < MB; ++j) sum[i][j] = vfacc(sum[i][j], acc[i][j], gsc);
      if (k < ke) {  // per-row scales only (groups are whole vectors)
        const int8_t* wr = w + (n0 + i) * K;
        for (int j = 0; j < MB; ++j) {
          const int16_t* xr = xq + (m0 + j) * K;
          int32_t t = 0;
          for (int64_t c = k; c < ke; ++c) t += int32_t(wr[c]) * int32_t(xr[c]);
          tail[i][j] += static_cast<float>(t) * gsc;
        }
      }
    }
  }
  for (int i = 0; i < NB; ++i)
    for (int j = 0; j < MB; ++j) {
      float y = vfsum(sum[i][j]) + tail[i][j];
      if (per_row) y *= srow[i][0];
      if (sc.off != nullptr) {  // sum_g offset[n, g] * xsum[m, g]
        const float* o = sc.off + (n0 + i) * sc.ng;
        const float* xg = sc.xsum + (m0 + j) * sc.ng;
        float t = 0.f;
        for (int64_t g = 0; g < sc.ng; ++g) t += o[g] * xg[g];
        y += t;
      }
      y *= xs[m0 + j];
      out[(m0 + j) * ldo + n0 + i] = bias != nullptr ? y + bias[n0 + i] : y;
    }
}

// NB weight rows starting at n0 against every token row: MB = 4 tokens at a time.
template <int NB>
inline void rows(const int16_t* xq, const float* xs, int64_t M, int64_t K, const int8_t* w,
                 const Scales& scale, const float* bias, float* out, int64_t N, int64_t n0) {
  int64_t m0 = 0;
  for (; m0 + 4 <= M; m0 += 4) dot_block<NB, 4>(xq, xs, K, w, scale, bias, out, N, n0, m0);
  switch (M - m0) {
    case 3: dot_block<NB, 3>(xq, xs, K, w, scale, bias, out, N, n0, m0); break;
    case 2: dot_block<NB, 2>(xq, xs, K, w, scale, bias, out, N, n0, m0); break;
    case 1: dot_block<NB, 1>(xq, xs, K, w, scale, bias, out, N, n0, m0); break;
    default: break;
  }
}

// out [M, N] fp32 for M <= kSmallM: the weights streamed once, 8 rows per block.
void small_m(const float* x, int64_t M, int64_t K, const int8_t* w, Scales scale,
             const float* bias, float* out, int64_t N) {
  std::vector<int16_t> xq(M * K);
  std::vector<float> xs(M), xsum;
  for (int64_t m = 0; m < M; ++m) xs[m] = quantize_row(x + m * K, xq.data() + m * K, K);
  if (scale.off != nullptr) {  // each quantized row's group sums, exact in int64
    xsum.resize(M * scale.ng);
    for (int64_t m = 0; m < M; ++m)
      for (int64_t g = 0; g < scale.ng; ++g) {
        int64_t t = 0;
        const int16_t* r = xq.data() + m * K + g * scale.gs;
        for (int64_t k = 0; k < scale.gs; ++k) t += r[k];
        xsum[m * scale.ng + g] = static_cast<float>(t);
      }
    scale.xsum = xsum.data();
  }
  constexpr int64_t kRows = 8;
  const int64_t blocks = cpu::ceil_div(N, kRows);
  // >= 64 KiB of weights per task, so that threads do not split tiny matrices
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(K * kRows, 1));
  at::parallel_for(0, blocks, grain, [&](int64_t begin, int64_t end) {
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t n0 = blk * kRows, n1 = std::min(N, n0 + kRows);
      int64_t n = n0;
      if (M == 1 && n1 - n0 == kRows) {
        dot_block<8, 1>(xq.data(), xs.data(), K, w, scale, bias, out, N, n0, 0);
        continue;
      }
      for (; n + 2 <= n1; n += 2) rows<2>(xq.data(), xs.data(), M, K, w, scale, bias, out, N, n);
      for (; n < n1; ++n) rows<1>(xq.data(), xs.data(), M, K, w, scale, bias, out, N, n);
    }
  });
}

}  // namespace

Tensor int8_linear_cpu(const Tensor& x, const Tensor& weight, const Tensor& scale,
                       const OptTensor& bias, const OptTensor& offset) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() &&
                  (x.scalar_type() == at::kFloat || x.scalar_type() == at::kHalf ||
                   x.scalar_type() == at::kBFloat16),
              "int8_linear: x must be contiguous float32/float16/bfloat16 [M, K]");
  TORCH_CHECK(weight.dim() == 2 && weight.is_contiguous() && weight.scalar_type() == at::kChar &&
                  weight.size(1) == x.size(1),
              "int8_linear: weight must be contiguous int8 [N, K] with K = ", x.size(1));
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  TORCH_CHECK((scale.dim() == 1 || scale.dim() == 2) && scale.is_contiguous() &&
                  scale.scalar_type() == at::kFloat && scale.size(0) == N,
              "int8_linear: scale must be contiguous float32 [N] or [N, groups]");
  const int64_t ng = scale.dim() == 2 ? scale.size(1) : 1;
  TORCH_CHECK(ng >= 1 && K % ng == 0 && (ng == 1 || (K / ng) % 32 == 0),
              "int8_linear: ", ng, " scale groups do not split K = ", K,
              " into groups of a multiple of 32");
  Scales sc{scale.data_ptr<float>(), ng == 1 ? K : K / ng, ng};
  const bool has_offset = offset.has_value() && offset->defined();
  if (has_offset) {
    TORCH_CHECK(offset->sizes() == scale.sizes() && offset->is_contiguous() &&
                    offset->scalar_type() == at::kFloat,
                "int8_linear: offset must be contiguous float32 of scale's shape");
    sc.off = offset->data_ptr<float>();
  }
  const bool has_bias = bias.has_value() && bias->defined();
  if (has_bias)
    TORCH_CHECK(bias->dim() == 1 && bias->is_contiguous() &&
                    bias->scalar_type() == at::kFloat && bias->size(0) == N,
                "int8_linear: bias must be contiguous float32 [N]");
  const Tensor xf = x.scalar_type() == at::kFloat ? x : x.to(at::kFloat);
  Tensor out;
  if (M <= kSmallM) {
    out = at::empty({M, N}, x.options().dtype(at::kFloat));
    if (out.numel() > 0)
      small_m(xf.data_ptr<float>(), M, K, weight.data_ptr<int8_t>(), sc,
              has_bias ? bias->data_ptr<float>() : nullptr, out.data_ptr<float>(), N);
  } else {
    out = at::empty({M, N}, x.options().dtype(at::kFloat));
    for (int64_t n0 = 0; n0 < N; n0 += kGemmRows) {
      const int64_t nb = std::min(kGemmRows, N - n0);
      const Tensor s = scale.narrow(0, n0, nb).reshape({nb, ng, 1});
      Tensor wf = weight.narrow(0, n0, nb).to(at::kFloat).reshape({nb, ng, K / ng}) * s;
      if (has_offset) wf.add_(offset->narrow(0, n0, nb).reshape({nb, ng, 1}));
      wf = wf.reshape({nb, K});
      Tensor y = at::mm(xf, wf.t());
      if (has_bias) y.add_(bias->narrow(0, n0, nb));
      out.narrow(1, n0, nb).copy_(y);
    }
  }
  return x.scalar_type() == at::kFloat ? out : out.to(x.scalar_type());
}

TORCH_LIBRARY_IMPL(astra_C, CPU, m) { m.impl("int8_linear", &int8_linear_cpu); }

}  // namespace astra
