// astra::vq_encode on the CPU: fused nearest-codeword search per group.
//
// Rows are cut into tiles (kRowTile rows for fp32, kDpRowTile for bf16; smaller when
// M is small so every thread gets work); threads take whole row tiles and run every
// group on them (one pass over x: grouped codebooks are G back-to-back searches on
// the tile in cache, not G separate GEMM calls over x). For row tile R and group g,
// codewords are scanned in blocks C, each giving dot[C, R] (brgemm for fp32, a
// register-blocked micro-kernel for bf16) and a running min/argmin over C,
// vectorized over the rows of R (lanes = rows), so at most C x R distances exist at
// a time. Codewords are scanned in increasing order and only a strictly better
// distance replaces the running best, so ties go to the lowest index; a NaN
// distance never wins.
//
// Two paths:
// - fp32 (exact): A = codebook rows, B = x^T (fp32), dist = ||c||^2 - 2 x.c. The
//   expanded form loses precision when x ~ c, so the second-best distance is tracked
//   too; a row-group whose best two are closer than the rounding bound of the
//   expanded form (2 x (2 dg + 4) u (cmax^2 + 2 |x| cmax), u = 2^-24) is re-ranked
//   exactly. When the tile's dot products for all K codewords fit kKeepDots they are
//   kept, and fp64 distances are computed only for the codewords whose expanded
//   distance is within twice that bound of the best (the exact argmin is among them).
//   Otherwise: direct fp32 distances sum((x - c)^2) to all codewords (error relative
//   to the distance itself, so tight near x), then fp64 for the codewords within that
//   bound of the smallest. So the result is the exact argmin of the fp32 inputs, as
//   the fp64 reference's.
// - bf16 (precision="bf16", where the CPU has AVX512-BF16): bf16 products with fp32
//   accumulation (VDPBF16PS) in a register-blocked micro-kernel (6 codewords x 64
//   rows) with the running argmax fused in, so no distance ever leaves the registers.
//   The norm is folded into the dot product: codeword row c = [bf16(c), h, l, 0...]
//   with h + l = -||bf16(c)||^2 / 2 split into two bf16 parts (error ~2^-17 of the
//   norm, far below the bf16 rounding of x), and x gets two 1.0 columns, so
//   dot' = x.c - ||c||^2/2 and the kernel takes the running argmax of dot'. x is
//   rounded to bf16 per tile and laid out as bf16 pairs [dgp/2][64 rows] per block
//   of 64 rows (the VNNI layout AMX brgemm also uses: a 32-bit transpose of the bf16
//   rows); codewords are broadcast pairs from the cached table. Loop order: codeword
//   blocks outside, row blocks inside, so 6 codewords stay in L1 while the x tile
//   (400 KB at D=768) streams from L2. Without AVX512-BF16, precision="bf16"
//   rounds x and the codebooks to bf16 and runs the fp32 kernel (bf16 products are
//   exact in fp32, only the accumulation rounds). There is no AMX tile path.
//
// Codebook cache: what a codebook needs besides its values (fp32: squared norms and
// the largest norm per group; bf16: the rounded, norm-augmented bf16 rows) is built
// once per codebook tensor and kept in a small LRU cache (kCacheEntries entries,
// kCacheBytes in all). An entry is keyed by the storage (held by a weak reference, so
// a freed tensor never matches a new one at the same address), data pointer, shape,
// dtype and mode, and checked against the tensor's version counter: any in-place
// change through PyTorch (cb.add_(...), cb[0] = ..., optimizer steps) rebuilds it.
// Writes that bypass the version counter (through .data, numpy views, raw pointers)
// are not seen: call torch.ops.astra_C.vq_cache_clear() after those. Inference-mode
// tensors have no version counter and are never cached.
//
// The error output is recomputed directly as sum((x - c)^2) for the chosen c (from
// the bf16-rounded values when precision="bf16", as the reference does).
//
// Non-finite x: a row group holding a NaN or an infinity has only NaN or +-inf
// distances (NaN never wins, -inf may), so its best distance is not finite; it gets
// code -1 and the row's error NaN (set_missing), as the reference does. One check
// per row group after the scan: the hot loops are unchanged.
#include "astra.h"
#include "cpu/cpu_utils.h"

#include <c10/core/Storage.h>
#include <torch/library.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <list>
#include <mutex>
#include <vector>

namespace astra {
namespace {

using cpu::fVec;

constexpr int64_t kRowTile = 128;  // rows per tile; a multiple of fVec::size()
constexpr int64_t kKeepDots = int64_t(1) << 19;  // fp32 exact: [K, rows] dots kept up to 2 MiB
constexpr int64_t kCodeTile = 64;  // fp32 path: codewords per brgemm (64 x 128 fp32 = 32 KiB)
constexpr int64_t kDpRowTile = 256;  // bf16 path: rows per tile (x tile in L2, 400 KB at D=768)
constexpr int64_t kDpCodes = 6;    // bf16 path: codewords per register block (6 x 4 x 16 lanes)
constexpr int64_t kDpRows = 64;    // bf16 path: rows per register block (4 vectors)
constexpr int64_t kAugCols = 2;    // bf16 columns that carry -||c||^2/2 (hi + lo)
constexpr size_t kCacheEntries = 64;
constexpr size_t kCacheBytes = size_t{512} << 20;
constexpr double kUnit = 1.0 / (1 << 24);  // fp32 unit roundoff

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

// sum((a - b)^2) in fp64 (exact products of fp32 differences, fp64 sums).
inline double sq_dist64(const float* a, const float* b, int64_t n) {
  int64_t j = 0;
  double s = 0.0;
#if defined(CPU_CAPABILITY_AVX512)
  __m512d acc = _mm512_setzero_pd();
  for (; j + 8 <= n; j += 8) {
    const __m512d t = _mm512_sub_pd(_mm512_cvtps_pd(_mm256_loadu_ps(a + j)),
                                    _mm512_cvtps_pd(_mm256_loadu_ps(b + j)));
    acc = _mm512_fmadd_pd(t, t, acc);
  }
  s = _mm512_reduce_add_pd(acc);
#endif
  for (; j < n; ++j) {
    const double t = double(a[j]) - double(b[j]);
    s += t * t;
  }
  return s;
}

// fp32 path: running min/argmin (and second-best value) over codewords c = 0..nb-1
// (index k0 + c) for NR row vectors; dist[c, rows] = cn[c] - 2 dot[c * ld + rows].
// Only a strictly smaller distance moves the argmin (ties keep the lower index).
template <int NR, bool kSecond>
inline void argmin_rows(const float* dot, int64_t ld, const float* cn, int64_t nb, int64_t k0,
                        float* best, float* arg, float* second) {
  constexpr int64_t kV = fVec::size();
#if defined(CPU_CAPABILITY_AVX512)
  __m512 b[NR], a[NR], s[NR];
  for (int i = 0; i < NR; ++i) {
    b[i] = _mm512_loadu_ps(best + i * kV);
    a[i] = _mm512_loadu_ps(arg + i * kV);
    if constexpr (kSecond) s[i] = _mm512_loadu_ps(second + i * kV);
  }
  const __m512 minus_two = _mm512_set1_ps(-2.f);
  for (int64_t c = 0; c < nb; ++c) {
    const __m512 cnv = _mm512_set1_ps(cn[c]);
    const __m512 idx = _mm512_set1_ps(static_cast<float>(k0 + c));
    for (int i = 0; i < NR; ++i) {
      const __m512 d = _mm512_fmadd_ps(_mm512_loadu_ps(dot + c * ld + i * kV), minus_two, cnv);
      const __mmask16 lt = _mm512_cmp_ps_mask(d, b[i], _CMP_LT_OQ);
      a[i] = _mm512_mask_mov_ps(a[i], lt, idx);
      if constexpr (kSecond) s[i] = _mm512_min_ps(s[i], _mm512_max_ps(d, b[i]));
      b[i] = _mm512_min_ps(d, b[i]);  // returns b[i] when d is NaN or equal
    }
  }
  for (int i = 0; i < NR; ++i) {
    _mm512_storeu_ps(best + i * kV, b[i]);
    _mm512_storeu_ps(arg + i * kV, a[i]);
    if constexpr (kSecond) _mm512_storeu_ps(second + i * kV, s[i]);
  }
#else
  fVec b[NR], a[NR], s[NR];
  for (int i = 0; i < NR; ++i) {
    b[i] = fVec::loadu(best + i * kV);
    a[i] = fVec::loadu(arg + i * kV);
    if constexpr (kSecond) s[i] = fVec::loadu(second + i * kV);
  }
  const fVec minus_two(-2.f);
  for (int64_t c = 0; c < nb; ++c) {
    const fVec cnv(cn[c]), idx(static_cast<float>(k0 + c));
    for (int i = 0; i < NR; ++i) {
      const fVec d = at::vec::fmadd(fVec::loadu(dot + c * ld + i * kV), minus_two, cnv);
      const fVec lt = d < b[i];
      a[i] = fVec::blendv(a[i], idx, lt);
      if constexpr (kSecond) {
        const fVec hi = fVec::blendv(d, b[i], lt);  // the larger of d, b (d when NaN)
        s[i] = fVec::blendv(s[i], hi, hi < s[i]);
      }
      b[i] = fVec::blendv(b[i], d, lt);
    }
  }
  for (int i = 0; i < NR; ++i) {
    b[i].store(best + i * kV);
    a[i].store(arg + i * kV);
    if constexpr (kSecond) s[i].store(second + i * kV);
  }
#endif
}

// ---------------------------------------------------------------- codebook cache

enum class Mode : int { kFp32 = 0, kBf16Round = 1, kBf16Dp = 2 };

struct Prepared {
  Tensor cb;    // fp32 [G, K, dg] bf16-rounded codebook (kBf16Round only: the cache
                // never holds the caller's tensor, or its weak reference would never expire)
  Tensor cn;    // fp32 [G, K] squared norms of cb (fp32 modes)
  Tensor cmax;  // fp32 [G] largest codeword norm per group (fp32 modes)
  Tensor dp;    // bf16 [G, Kp, dgp] rows [bf16(c), -||c||^2/2 as 2 bf16 parts, 0...]
  int64_t dgp = 0;
  size_t bytes = 0;
};

struct CacheEntry {
  c10::weak_intrusive_ptr<c10::StorageImpl> storage;
  const void* data;
  std::vector<int64_t> sizes;
  at::ScalarType dtype;
  Mode mode;
  uint32_t version;
  std::shared_ptr<const Prepared> prepared;

  // Not a dangling pointer: the weak reference keeps the StorageImpl object itself
  // alive, so no other storage can take its address while the entry exists.
  bool matches(const Tensor& t, Mode m) const {
    return mode == m && data == t.data_ptr() && dtype == t.scalar_type() &&
           sizes == t.sizes().vec() && !storage.expired() &&
           storage._unsafe_get_target() == t.storage().unsafeGetStorageImpl();
  }
};

struct CodebookCache {
  std::mutex mu;
  std::list<CacheEntry> lru;  // most recent first
  int64_t hits = 0, misses = 0;
};

CodebookCache& cache() {
  static CodebookCache* c = new CodebookCache();  // never destroyed: no exit-order issues
  return *c;
}

std::shared_ptr<const Prepared> build_prepared(const Tensor& codebooks, Mode mode) {
  const int64_t G = codebooks.size(0), K = codebooks.size(1), dg = codebooks.size(2);
  auto p = std::make_shared<Prepared>();
  const float* src = codebooks.data_ptr<float>();
  if (mode == Mode::kBf16Dp) {
    p->dgp = cpu::round_up(dg + kAugCols, 2);
    // rows padded to a multiple of kDpCodes (zeros, never chosen)
    p->dp = at::zeros({G, cpu::round_up(K, kDpCodes), p->dgp},
                       codebooks.options().dtype(at::kBFloat16));
    auto* dst = p->dp.data_ptr<at::BFloat16>();
    const int64_t dgp = p->dgp;
    const int64_t Kp = p->dp.size(1);
    at::parallel_for(0, G * K, 64, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        at::BFloat16* row = dst + ((i / K) * Kp + i % K) * dgp;
        cpu::from_f32(src + i * dg, row, dg);
        double n = 0.0;
        for (int64_t j = 0; j < dg; ++j) {
          const double v = static_cast<float>(row[j]);
          n += v * v;
        }
        double rest = -0.5 * n;  // bf16 parts, each the rounding of what is left
        for (int64_t j = 0; j < kAugCols; ++j) {
          row[dg + j] = at::BFloat16(static_cast<float>(rest));
          rest -= static_cast<double>(static_cast<float>(row[dg + j]));
        }
      }
    });
    p->bytes = p->dp.nbytes();
    return p;
  }
  const bool round = mode == Mode::kBf16Round;
  if (round) p->cb = at::empty_like(codebooks);
  p->cn = at::empty({G, K}, codebooks.options());
  p->cmax = at::empty({G}, codebooks.options());
  const float* dst = round ? p->cb.data_ptr<float>() : src;
  float* cn = p->cn.data_ptr<float>();
  at::parallel_for(0, G * K, 64, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      if (round) {
        float* r = p->cb.data_ptr<float>() + i * dg;
        std::copy(src + i * dg, src + (i + 1) * dg, r);
        cpu::round_through<c10::BFloat16>(r, dg);
      }
      double n = 0.0;  // fp64, then one rounding: |cn - ||c||^2| <= u ||c||^2
      for (int64_t j = 0; j < dg; ++j) n += double(dst[i * dg + j]) * double(dst[i * dg + j]);
      cn[i] = static_cast<float>(n);
    }
  });
  float* cmax = p->cmax.data_ptr<float>();
  for (int64_t g = 0; g < G; ++g) {
    float m = 0.f;
    for (int64_t k = 0; k < K; ++k) m = std::max(m, cn[g * K + k]);
    cmax[g] = std::sqrt(m) * (1.f + 1e-6f);
  }
  p->bytes = p->cn.nbytes() + (round ? p->cb.nbytes() : 0);
  return p;
}

std::shared_ptr<const Prepared> prepared_codebook(const Tensor& codebooks, Mode mode) {
  // Inference tensors have no version counter: nothing to validate a cache entry by.
  if (codebooks.is_inference()) return build_prepared(codebooks, mode);
  const uint32_t version = codebooks.unsafeGetTensorImpl()->version_counter().current_version();
  CodebookCache& c = cache();
  {
    std::lock_guard<std::mutex> lock(c.mu);
    for (auto it = c.lru.begin(); it != c.lru.end();) {
      if (it->storage.expired()) {  // the tensor is gone: drop its entry
        it = c.lru.erase(it);
        continue;
      }
      if (it->matches(codebooks, mode)) {
        if (it->version == version) {
          ++c.hits;
          c.lru.splice(c.lru.begin(), c.lru, it);
          return c.lru.front().prepared;
        }
        c.lru.erase(it);  // modified in place: rebuild
        break;
      }
      ++it;
    }
    ++c.misses;
  }
  auto p = build_prepared(codebooks, mode);  // outside the lock: may run in parallel
  std::lock_guard<std::mutex> lock(c.mu);
  c.lru.push_front(CacheEntry{codebooks.storage().getWeakStorageImpl(), codebooks.data_ptr(),
                              codebooks.sizes().vec(), codebooks.scalar_type(), mode, version,
                              p});
  size_t total = 0, n = 0;
  for (auto it = c.lru.begin(); it != c.lru.end();) {
    total += it->prepared->bytes;
    if (++n > kCacheEntries || (n > 1 && total > kCacheBytes)) {
      it = c.lru.erase(it);
    } else {
      ++it;
    }
  }
  return p;
}

void vq_cache_clear() {
  CodebookCache& c = cache();
  std::lock_guard<std::mutex> lock(c.mu);
  c.lru.clear();
}

// [entries, hits, misses]
std::vector<int64_t> vq_cache_stats() {
  CodebookCache& c = cache();
  std::lock_guard<std::mutex> lock(c.mu);
  return {static_cast<int64_t>(c.lru.size()), c.hits, c.misses};
}

// The bf16 kernel needs AVX512-BF16 (VDPBF16PS): compiled in (-march=native on such
// a CPU) and present at run time.
bool bf16_dp_available() {
#if defined(__AVX512BF16__)
  static const bool ok = __builtin_cpu_supports("avx512bf16");
  return ok;
#else
  return false;
#endif
}

// ---------------------------------------------------------------- kernels

struct VqProblem {
  int64_t M, G, K, dg;
  const float* cb;  // [G, K, dg] fp32 (bf16-rounded for the fallback)
  const Prepared* prep;
  bool exact;       // fp32: re-rank near-ties in fp64
  bool round_bf16;  // fallback bf16: round x to bf16 first
  int32_t* codes;   // [M, G]
  float* err;       // [M] or nullptr
};

// Row m, group g holds a NaN or an infinity (its best distance is not finite: every
// distance to it is NaN or +-inf): code -1 and a NaN error for the row.
inline void set_missing(const VqProblem& p, int64_t m, int64_t g) {
  p.codes[m * p.G + g] = -1;
  if (p.err != nullptr) p.err[m] = std::numeric_limits<float>::quiet_NaN();
}


template <bool kSecond>
inline void argmin_tile(const float* dot, int64_t ld, const float* cn, int64_t nb, int64_t k0,
                        int64_t nv, float* best, float* arg, float* second) {
  constexpr int64_t kV = fVec::size();
  int64_t r = 0;  // independent row vectors per pass hide the compare latency
  for (; r + 8 * kV <= nv; r += 8 * kV)
    argmin_rows<8, kSecond>(dot + r, ld, cn, nb, k0, best + r, arg + r, second + r);
  for (; r + 4 * kV <= nv; r += 4 * kV)
    argmin_rows<4, kSecond>(dot + r, ld, cn, nb, k0, best + r, arg + r, second + r);
  for (; r < nv; r += kV)
    argmin_rows<1, kSecond>(dot + r, ld, cn, nb, k0, best + r, arg + r, second + r);
}

// fp32 kernel (exact, or the bf16-rounding fallback).
template <typename scalar_t>
void vq_encode_fp32(const scalar_t* x, const VqProblem& p, int64_t row_tile) {
  const int64_t D = p.G * p.dg, dg = p.dg, K = p.K;
  constexpr int64_t kV = fVec::size();
  const int64_t n_tiles = cpu::ceil_div(p.M, row_tile);
  const float* cb = p.cb;
  const float* cn = p.prep->cn.data_ptr<float>();
  const float* cmax = p.prep->cmax.data_ptr<float>();

  // exact mode keeps every codeword's dot products of the tile ([K, row_tile]) when
  // they fit kKeepDots: a near-tie row is then re-ranked in fp64 over only the
  // codewords whose expanded distance is within the rounding bound of the best,
  // instead of direct distances to all K codewords
  const bool keep = p.exact && K > 1 && K * row_tile <= kKeepDots;
  const int64_t dot_rows = keep ? K : kCodeTile;

  at::parallel_for(0, n_tiles, 1, [&](int64_t t_begin, int64_t t_end) {
    at::Tensor buf = cpu::scratch_f32(row_tile * D + dg * row_tile + dot_rows * row_tile +
                                      3 * row_tile);
    float* xf = buf.data_ptr<float>();       // [row_tile, D] x tile in fp32
    float* xT = xf + row_tile * D;           // [dg, row_tile] one group, transposed
    float* dot = xT + dg * row_tile;         // [kCodeTile or K, row_tile]
    float* best = dot + dot_rows * row_tile;
    float* arg = best + row_tile;            // argmin as float: exact for K <= 2^24
    float* second = arg + row_tile;
    std::vector<float> direct;  // near-tie re-rank: a score per codeword

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
        std::fill(second, second + nv, std::numeric_limits<float>::infinity());
        std::fill(arg, arg + nv, 0.f);
        const float* cb_g = cb + g * K * dg;
        const float* cn_g = cn + g * K;

        for (int64_t k0 = 0; k0 < K; k0 += kCodeTile) {
          const int64_t nb = std::min(kCodeTile, K - k0);
          float* dk = keep ? dot + k0 * row_tile : dot;
          cpu::tile_gemm(nb, nv, dg, dg, row_tile, row_tile, false, cb_g + k0 * dg, xT, dk);
          if (p.exact) {
            argmin_tile<true>(dk, row_tile, cn_g + k0, nb, k0, nv, best, arg, second);
          } else {
            argmin_tile<false>(dk, row_tile, cn_g + k0, nb, k0, nv, best, arg, second);
          }
        }

        for (int64_t r = 0; r < mb; ++r) {
          const float* xr = xf + r * D + g * dg;
          if (!std::isfinite(best[r])) {  // NaN / inf in x: no nearest codeword
            set_missing(p, r0 + r, g);
            continue;
          }
          int64_t code = static_cast<int64_t>(arg[r]);
          if (p.exact && K > 1) {
            // rounding bound of cn - 2 x.c for one codeword; two candidates' errors add
            const double xn = std::sqrt(static_cast<double>(sq_dist(xr, nullptr, dg)));
            const double cm = cmax[g];
            const double eps = (2.0 * dg + 4.0) * kUnit * (cm * cm + 2.0 * xn * cm) * 1.25;
            const double gap = static_cast<double>(second[r]) - static_cast<double>(best[r]);
            if (!(gap > 2.0 * eps)) {  // near-tie (or NaN): exact re-rank
              // score every codeword, then fp64 distances only for those scoring <= lim
              if (static_cast<int64_t>(direct.size()) < K) direct.resize(K);
              double lim;
              if (keep) {
                // the kept expanded distances (recomputed exactly as argmin_rows does:
                // -2 dot is exact): |dist~(c) - dist(c)| <= eps for every c, so the
                // exact argmin c* has dist~(c*) <= dist(best) + eps <= best + 2 eps
                for (int64_t c = 0; c < K; ++c)
                  direct[c] = std::fma(dot[c * row_tile + r], -2.f, cn_g[c]);
                lim = static_cast<double>(best[r]) + 2.0 * eps;
              } else {
                // direct distances in fp32: |d32 - d| <= delta d (relative, so tight
                // near x); the argmin has d32(c) <= d32_min (1 + delta) / (1 - delta)
                float dmin = std::numeric_limits<float>::infinity();
                for (int64_t c = 0; c < K; ++c) {
                  direct[c] = sq_dist(xr, cb_g + c * dg, dg);
                  dmin = std::min(dmin, direct[c]);  // NaN never becomes the min
                }
                const double delta = (dg + 4.0) * kUnit * 1.25;
                lim = static_cast<double>(dmin) * (1.0 + delta) / (1.0 - delta);
              }
              double bd = std::numeric_limits<double>::infinity();
              for (int64_t c = 0; c < K; ++c) {
                if (!(static_cast<double>(direct[c]) <= lim)) continue;  // NaN: never
                const double dd = sq_dist64(xr, cb_g + c * dg, dg);
                if (dd < bd) bd = dd, code = c;
              }
            }
          }
          p.codes[(r0 + r) * p.G + g] = static_cast<int32_t>(code);
          if (p.err == nullptr) continue;
          const float e = sq_dist(xr, cb_g + code * dg, dg);
          p.err[r0 + r] = (g == 0 ? 0.f : p.err[r0 + r]) + e;  // NaN stays NaN
        }
      }
    }
    cpu::tile_gemm_done();
  });
}

#if defined(__AVX512BF16__)
// bf16 micro-kernel: dot'[c, rows] = sum_kp A[c, kp] . xv[kp, rows] for NC codewords x
// NR row vectors (16 rows each) with VDPBF16PS (bf16 pairs, fp32 accumulation), all
// in registers; then the running argmax over the NC codewords in increasing order.
// a: codeword c0's row of 32-bit bf16 pairs (lda words per codeword); b: xv at the
// first row vector (ldb words per pair index). Codewords >= K (table padding) are skipped.
template <int NR, int NC>
inline void dp_block(const uint32_t* a, int64_t lda, const uint32_t* b, int64_t ldb,
                     int64_t n_pairs, int64_t c0, int64_t K, float* best, float* arg) {
  __m512 acc[NC][NR];
#pragma GCC unroll 8
  for (int i = 0; i < NC; ++i)
#pragma GCC unroll 4
    for (int j = 0; j < NR; ++j) acc[i][j] = _mm512_setzero_ps();
  cpu::dpbf16_accumulate<NC, NR>(acc, a, lda, b, ldb, n_pairs);
#pragma GCC unroll 4
  for (int j = 0; j < NR; ++j) {
    __m512 bb = _mm512_loadu_ps(best + j * 16);
    __m512 aa = _mm512_loadu_ps(arg + j * 16);
#pragma GCC unroll 8
    for (int i = 0; i < NC; ++i) {
      if (c0 + i >= K) break;
      const __m512 idx = _mm512_set1_ps(static_cast<float>(c0 + i));
      aa = _mm512_mask_mov_ps(aa, _mm512_cmp_ps_mask(acc[i][j], bb, _CMP_GT_OQ), idx);
      bb = _mm512_max_ps(acc[i][j], bb);  // keeps bb when acc is NaN or equal
    }
    _mm512_storeu_ps(best + j * 16, bb);
    _mm512_storeu_ps(arg + j * 16, aa);
  }
}

// bf16 kernel: x tile in bf16 (+ 1.0 columns), VNNI layout, dp_block over all codewords.
template <typename scalar_t>
void vq_encode_bf16dp(const scalar_t* x, const VqProblem& p, int64_t row_tile) {
  using bf16 = at::BFloat16;
  const int64_t G = p.G, D = G * p.dg, dg = p.dg, K = p.K, dgp = p.prep->dgp;
  const int64_t n_pairs = dgp / 2;
  constexpr int64_t kV = fVec::size();
  const int64_t n_tiles = cpu::ceil_div(p.M, row_tile);
  const auto* table = reinterpret_cast<const uint32_t*>(p.prep->dp.data_ptr<bf16>());
  const int64_t Kp = p.prep->dp.size(1);

  at::parallel_for(0, n_tiles, 1, [&](int64_t t_begin, int64_t t_end) {
    // bf16 x tile [row_tile, G * dgp] and its VNNI form [G][dgp / 2][row_tile] (pairs)
    const int64_t rt64 = cpu::round_up(row_tile, kDpRows);
    at::Tensor bbuf = at::empty({(row_tile + rt64) * G * dgp}, at::kBFloat16);
    bf16* xb = bbuf.data_ptr<bf16>();
    auto* xv = reinterpret_cast<uint32_t*>(xb + row_tile * G * dgp);
    at::Tensor fbuf = cpu::scratch_f32(row_tile * D + 2 * row_tile + 2 * dg);
    float* xf = fbuf.data_ptr<float>();      // [row_tile, D] x tile in fp32
    float* best = xf + row_tile * D;
    float* arg = best + row_tile;
    float* xr = arg + row_tile;              // one bf16-rounded row group in fp32
    float* cr = xr + dg;                     // one bf16 codeword in fp32

    for (int64_t t = t_begin; t < t_end; ++t) {
      const int64_t r0 = t * row_tile;
      const int64_t mb = std::min(row_tile, p.M - r0);
      const int64_t nv = cpu::round_up(mb, kV);
      cpu::to_f32(x + r0 * D, xf, mb * D);
      // rows [x_g in bf16, 1, 1, 0...] per group; padding rows all zero
      for (int64_t r = 0; r < nv; ++r) {
        bf16* row = xb + r * G * dgp;
        if (r >= mb) {
          std::memset(static_cast<void*>(row), 0, G * dgp * sizeof(bf16));
          continue;
        }
        for (int64_t g = 0; g < G; ++g) {
          bf16* rg = row + g * dgp;
          cpu::from_f32(xf + r * D + g * dg, rg, dg);
          for (int64_t j = dg; j < dgp; ++j) rg[j] = bf16(j < dg + kAugCols ? 1.f : 0.f);
        }
      }
      for (int64_t g = 0; g < G; ++g) {
        // VNNI: bf16 pairs (k, k+1) of each row stay together; transpose the 32-bit
        // words [rows, dgp/2] -> [dgp/2, kDpRows] per row block (bit moves only)
        for (int64_t rb = 0; rb < nv; rb += kDpRows) {
          at::vec::transpose_mxn<float>(
              reinterpret_cast<const float*>(xb + rb * G * dgp + g * dgp), G * n_pairs,
              reinterpret_cast<float*>(xv + (g * rt64 + rb) * n_pairs), kDpRows,
              static_cast<int>(std::min(kDpRows, nv - rb)), static_cast<int>(n_pairs));
        }
      }

      for (int64_t g = 0; g < G; ++g) {
        std::fill(best, best + nv, -std::numeric_limits<float>::infinity());
        std::fill(arg, arg + nv, 0.f);
        const uint32_t* a_g = table + g * Kp * n_pairs;
        const uint32_t* b_g = xv + g * rt64 * n_pairs;
        // codeword blocks outside, row blocks inside: a block's codewords stay in L1
        // while every row of the tile passes (the x tile stays in L2)
        for (int64_t c0 = 0; c0 < K; c0 += kDpCodes) {
          const uint32_t* a_c = a_g + c0 * n_pairs;
          for (int64_t rb = 0; rb < nv; rb += kDpRows) {
            const uint32_t* b_rb = b_g + rb * n_pairs;
            if (rb + kDpRows <= nv) {
              dp_block<kDpRows / 16, kDpCodes>(a_c, n_pairs, b_rb, kDpRows, n_pairs, c0, K, best + rb,
                                    arg + rb);
              continue;
            }
            for (int64_t r = rb; r < nv; r += kV)
              dp_block<1, kDpCodes>(a_c, n_pairs, b_rb + (r - rb), kDpRows, n_pairs, c0, K,
                                    best + r, arg + r);
          }
        }
        const auto* a_rows = reinterpret_cast<const bf16*>(a_g);
        for (int64_t rr = 0; rr < mb; ++rr) {
          if (!std::isfinite(best[rr])) {  // NaN / inf in x: no nearest codeword
            set_missing(p, r0 + rr, g);
            continue;
          }
          const int64_t code = static_cast<int64_t>(arg[rr]);
          p.codes[(r0 + rr) * G + g] = static_cast<int32_t>(code);
          if (p.err == nullptr) continue;
          cpu::to_f32(xb + rr * G * dgp + g * dgp, xr, dg);
          cpu::to_f32(a_rows + code * dgp, cr, dg);
          const float e = sq_dist(xr, cr, dg);
          p.err[r0 + rr] = (g == 0 ? 0.f : p.err[r0 + rr]) + e;
        }
      }
    }
  });
}
#endif

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

  const bool bf16 = precision == "bf16";
  const Mode mode = !bf16 ? Mode::kFp32 : bf16_dp_available() ? Mode::kBf16Dp : Mode::kBf16Round;
  const auto prep = prepared_codebook(codebooks, mode);

  // Row tiles split evenly over the threads (small M: smaller tiles so every thread
  // gets work; M = 4096 on 2 threads with 256-row tiles: 8 tiles each).
  const int64_t per_thread = cpu::ceil_div(M, at::get_num_threads());
  const int64_t max_tile = mode == Mode::kBf16Dp ? kDpRowTile : kRowTile;
  const int64_t tiles_per_thread = cpu::ceil_div(per_thread, max_tile);
  const int64_t row_tile =
      std::min(max_tile, cpu::round_up(cpu::ceil_div(per_thread, tiles_per_thread), fVec::size()));

  const float* cb = mode == Mode::kBf16Round ? prep->cb.data_ptr<float>()
                                             : codebooks.data_ptr<float>();
  VqProblem p{M, G, K, dg, cb, prep.get(), mode == Mode::kFp32, mode == Mode::kBf16Round,
              codes.data_ptr<int32_t>(), return_error ? err.data_ptr<float>() : nullptr};
  ASTRA_DISPATCH_FLOAT_TYPES(x.scalar_type(), "vq_encode_cpu", [&] {
#if defined(__AVX512BF16__)
    if (mode == Mode::kBf16Dp) return vq_encode_bf16dp<scalar_t>(x.data_ptr<scalar_t>(), p, row_tile);
#endif
    vq_encode_fp32<scalar_t>(x.data_ptr<scalar_t>(), p, row_tile);
  });
  return {codes, err};
}

TORCH_LIBRARY_IMPL(astra_C, CPU, m) { m.impl("vq_encode", &vq_encode_cpu); }

// Codebook cache control (see the top of this file); not part of the op contract.
TORCH_LIBRARY_FRAGMENT(astra_C, m) {
  m.def("vq_cache_clear() -> ()", &vq_cache_clear);
  m.def("vq_cache_stats() -> int[]", &vq_cache_stats);
  m.def("vq_bf16_fast_available() -> bool", &bf16_dp_available);
}

}  // namespace astra
