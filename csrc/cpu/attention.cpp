// astra::mixed_attention and astra::merge_attention on the CPU.
//
// mixed_attention is flash-style: one work item is (batch b, kv head h, query tile);
// it stacks the rep = H/Hkv query heads that share kv head h into one block of
// rows = rep x bq query rows (row r = head_in_group * bq + query), so each key tile
// that is loaded or gathered serves all of them. Items run in parallel
// (at::parallel_for); query tiles are visited in zig-zag order so that the static
// split hands each thread a similar amount of causal work.
// Per item, key tiles of kKeyTile: first the local keys, then the remote ones. For
// each tile:
//   S = (scale q) . K^T                         tile_gemm, fp32
//   S += bias (codebook space only), mask: invisible -> -inf
//   online softmax: running max m, sum l; acc *= e^(m_old - m_new)
//   acc += e^(S - m) . V                        tile_gemm, fp32
// bf16 inputs (head dim a multiple of 16, CPU with AVX512-BF16): both GEMMs are
// VDPBF16PS micro-kernels on bf16 pairs with fp32 accumulation (K^T and V tiles in
// the VNNI layout, P rounded to bf16 as 16-bit SDPA does; the softmax stays fp32).
// fp16 inputs, and bf16 elsewhere, are converted to fp32 and run the fp32 path.
//
// Key tables (KeyTable), built once per call in parallel and shared by all items:
// - local keys, when there are several query tiles: K^T tiles (and V in fp32 for
//   16-bit inputs), instead of a transpose/convert per key tile per item;
// - remote keys in codebook space (G = 1, codes): tokens with one code have one key,
//   so the remote part equals attention over the distinct codes c of batch b with
//   score bias log(count_b(c)) (missing / out-of-range codes are not counted). Cost
//   rule (build_codebook_table): used when the distinct codes U are fewer than the
//   remote tokens (3/4 of them with a single query tile); then a query tile costs
//   Tl + U keys instead of Tl + Tr, whatever Tr.
//   Exactness rule per query tile, as the Triton kernel's: non-causal, or causal with
//   every remote position <= the tile's smallest query position -> codebook space;
//   every remote position > the tile's largest -> no remote work; otherwise the tile
//   takes the gather loop with per-key masks.
// Otherwise remote keys come from codes (gathered from the projected codebooks pk/pv
// into a per-tile scratch, sum over groups in fp32, rounded to the table dtype as
// the reference does) or from materialized remote_k/remote_v.
// RoPE (rope_cos/rope_sin given): each remote key row of the tile scratch is rotated
// on its first R dims in fp32 (rope_row) and rounded to the table dtype, before the
// transpose; a per-tile branch, so the path without rope is unchanged. Rotated keys
// depend on the position, so codebook space is never used with rope. With several query
// tiles per head, each thread keeps the gathered tiles of its current head (items
// are ordered by head; at most 32 MiB per thread) so they are gathered once per head
// and thread, not once per query tile; no B x Hkv x Tr table is materialized.
// Tiles that no query of the item can see are skipped before any load; the mask
// is applied only to tiles that need it. Rows that see no key give zeros, lse=-inf.
// NaN: the tile max propagates NaN (nan_max) and a row ends empty only when its sum
// l is exactly 0, so a NaN score among a row's visible keys gives NaN out and lse,
// as the reference does; masked scores are replaced by -inf (a select, not an add),
// so a NaN key a row does not see never reaches it.
//
// Small items (decode). With one query tile of rows = rep x Tq <= kSmallRows (one
// token x the rep heads of a kv head, or a few tokens) the GEMMs have M = rows, and
// gathering into scratch, rotating, transposing and the tile GEMM cost several times
// the arithmetic. Such items take the row loop instead (p.small; not dp, whose P is
// rounded to bf16 for its bf16 GEMM): per key tile, krow_/vrow_ point at fp32 K/V
// rows, in place where the input is fp32 as is (local k/v, remote_k/v, pk/pv rows
// of G = 1 codes), else in kf_/vf_ holding what the tile path computes (converted,
// summed over groups and rounded, rotated by rope_row and rounded); then
//   S = (scale q) . k_j      row_scores: dot products over d, no transpose
//   softmax_tile             the same masks, bias and m/l/acc update as the tiles
//   acc += P . V             row_pv: rows of V added into register blocks of acc
// Same key tiles, same fp32 values, same online softmax: only the order of the sums
// in the two products differs from the tile path. A run covers all of a thread's kv
// heads of one batch, key tile outer, heads inner, so the rope cos/sin rows and the
// codes of a tile are read once while hot, not once per head. Codebook space needs
// no K^T/V table there (only the code list and bias), so it is used whenever U < Tr.
// Random pk/pv rows are prefetched kPrefetch keys ahead.
// Measured (Zen 3, AVX2, 1 thread; H = 9, Hkv = 3, d = 64, Tq = 1, Tl = 512, Tr = 1536
// codes with rope; the op alone, best of many): 0.53 -> 0.22 ms a call, where SDPA
// over 2048 exact keys takes 0.34 ms; local keys only 0.10 -> 0.037 ms.
//
// merge_attention combines two partial results row by row (scalar weights,
// vectorized over d), in parallel over rows.
#include "astra.h"
#include "cpu/cpu_utils.h"

#include <torch/library.h>

#include <cmath>
#include <limits>
#include <vector>

namespace astra {
namespace {

using cpu::fVec;

// 128 x 128 tiles: larger tiles spread the per-row softmax overhead over more keys.
constexpr int64_t kKeyTile = 128;    // keys per tile; a multiple of fVec::size()
constexpr int64_t kRowTarget = 128;  // query rows (heads x positions) per work item
constexpr float kNegInf = -std::numeric_limits<float>::infinity();
// Work items with at most this many query rows (decode: one query x rep heads) take
// the row loop instead of the tile GEMMs (see the comment at the top). Measured
// (AVX2, d = 64 and 128): the row loop is 1.5-4x faster up to 16 rows, even at ~24.
constexpr int64_t kSmallRows = 16;
// Query rows per register block of the row loop (its accumulators: 4 keys x rows)
constexpr int kRowBlock = fVec::size() == 16 ? 4 : 3;

// Keys of one (batch, kv head) in fp32, laid out for the tile loop once per call
// instead of once per query tile: K^T tiles [n_tiles][d][kKeyTile] and V rows
// [n_tiles * kKeyTile][d], plus (codebook space) a per-key score bias.
struct KeyTable {
  int64_t B = 0, Hkv = 0, d = 0, cap = 0;  // cap: padded key capacity per (b, h)
  std::vector<int64_t> n;                  // [B] keys per batch
  at::Tensor kt, v, bias;                  // [B, Hkv, cap/kKeyTile, d, kKeyTile], [B, Hkv, cap, d], [B, cap]
  bool dp = false;  // tiles hold VNNI bf16 words (K^T [d/2][kKeyTile], V [kKeyTile/2][d])
  bool has_v = false;                      // false: V is read from the input (fp32, dense)
  at::Tensor code;  // [B, cap] codebook space for small query tiles: each key's code
                    // (kt and v are not filled; the row loop reads pk/pv rows)

  const float* kt_tile(int64_t b, int64_t h, int64_t j0) const {
    return kt.data_ptr<float>() + ((b * Hkv + h) * cap + j0) * d;
  }
  const float* v_rows(int64_t b, int64_t h, int64_t j0) const {
    return v.data_ptr<float>() + ((b * Hkv + h) * cap + j0) * d;
  }
  const float* bias_at(int64_t b, int64_t j0) const {
    return bias.defined() ? bias.data_ptr<float>() + b * cap + j0 : nullptr;
  }
  const int32_t* code_at(int64_t b, int64_t j0) const {
    return code.data_ptr<int32_t>() + b * cap + j0;
  }
};

template <typename scalar_t>
struct AttnParams {
  const scalar_t *q, *k, *v;            // [B,H,Tq,d], [B,Hkv,Tl,d] x2
  bool use_codes;                       // remote keys from codes (else rk/rv)
  const int32_t* codes;                 // [B,Tr,G]
  const scalar_t *pk, *pv;              // [G,K,Hkv,d]
  const scalar_t *rk, *rv;              // [B,Hkv,Tr,d]
  const int64_t *q_pos, *kv_pos, *remote_pos;  // causal only
  const float *rope_cos = nullptr, *rope_sin = nullptr;  // [B or 1, Tr, R] fp32
  int64_t rope_R = 0;       // rotary dims of remote keys; 0: no rope
  int64_t rope_bstride = 0;  // Tr * R, or 0 when cos/sin are shared by the batch
  int64_t B, H, Hkv, Tq, Tl, Tr, d, G, K;
  bool causal;
  float scale;
  scalar_t* out;  // [B,H,Tq,d]
  float* lse;     // [B,H,Tq]
  // Key tables built once per call and shared by every query tile (see KeyTable)
  const struct KeyTable* local = nullptr;     // local keys, when there are several query tiles
  const struct KeyTable* codebook = nullptr;  // remote keys in codebook space (G = 1)
  int64_t rmin = 0, rmax = 0;                 // causal: remote position range
  bool dp = false;  // bf16 inputs: VDPBF16PS GEMMs on VNNI tiles (else fp32 tile_gemm)
  bool cache_gather = false;  // several query tiles per head: keep gathered remote tiles
  bool small = false;  // rows = rep x bq <= kSmallRows: the row loop (row_scores, row_pv)
};

// y[:R] = x[:R] * c + rotate_half(x[:R]) * s, rotate_half(x) = (-x[R/2:], x[:R/2]);
// y may be x.
inline void rope_row(const float* x, float* y, const float* c, const float* s, int64_t R) {
  constexpr int64_t kV = fVec::size();
  const int64_t h = R / 2;
  int64_t i = 0;
  for (; i + kV <= h; i += kV) {
    const fVec x1 = fVec::loadu(x + i), x2 = fVec::loadu(x + h + i);
    (x1 * fVec::loadu(c + i) - x2 * fVec::loadu(s + i)).store(y + i);
    (x2 * fVec::loadu(c + h + i) + x1 * fVec::loadu(s + h + i)).store(y + h + i);
  }
  for (; i < h; ++i) {
    const float x1 = x[i], x2 = x[h + i];
    y[i] = x1 * c[i] - x2 * s[i];
    y[h + i] = x2 * c[h + i] + x1 * s[h + i];
  }
}

// Row loop: rows are read this many keys ahead of their use (codes make the rows of
// pk/pv random accesses that the hardware prefetchers cannot predict)
constexpr int64_t kPrefetch = 8;
template <typename T>
inline void prefetch_row(const T* x, int64_t n) {
  for (int64_t i = 0; i < n; i += 64 / sizeof(T))
    _mm_prefetch(reinterpret_cast<const char*>(x + i), _MM_HINT_T0);
}

inline void scale_row(float* x, int64_t n, float a) {
  constexpr int64_t kV = fVec::size();
  const fVec va(a);
  int64_t j = 0;
  for (; j + kV <= n; j += kV) (fVec::loadu(x + j) * va).store(x + j);
  for (; j < n; ++j) x[j] *= a;
}


#if defined(__AVX512BF16__)
// bf16 GEMM micro-kernels (VDPBF16PS: bf16 pairs, fp32 accumulation), for bf16 inputs.
// Operands are 32-bit words holding bf16 pairs: A rows [M][n_pairs] (lda words per
// row), B in VNNI layout [n_pairs][N] (ldb words per pair index), C fp32 [M][N].
// C (+)= A . B over NC rows x NR 16-column vectors, all accumulators in registers.
template <int NC, int NR, bool kAdd>
inline void dp_block(const uint32_t* a, int64_t lda, const uint32_t* b, int64_t ldb,
                     int64_t n_pairs, float* c, int64_t ldc) {
  __m512 acc[NC][NR];
#pragma GCC unroll 8
  for (int i = 0; i < NC; ++i)
#pragma GCC unroll 4
    for (int j = 0; j < NR; ++j)
      acc[i][j] = kAdd ? _mm512_loadu_ps(c + i * ldc + j * 16) : _mm512_setzero_ps();
  cpu::dpbf16_accumulate<NC, NR>(acc, a, lda, b, ldb, n_pairs);
#pragma GCC unroll 8
  for (int i = 0; i < NC; ++i)
#pragma GCC unroll 4
    for (int j = 0; j < NR; ++j) _mm512_storeu_ps(c + i * ldc + j * 16, acc[i][j]);
}

template <int NR, bool kAdd>
inline void dp_rows(int64_t M, const uint32_t* a, int64_t lda, const uint32_t* b, int64_t ldb,
                    int64_t n_pairs, float* c, int64_t ldc) {
  int64_t i = 0;
  for (; i + 6 <= M; i += 6) dp_block<6, NR, kAdd>(a + i * lda, lda, b, ldb, n_pairs, c + i * ldc, ldc);
  switch (M - i) {
    case 5: return dp_block<5, NR, kAdd>(a + i * lda, lda, b, ldb, n_pairs, c + i * ldc, ldc);
    case 4: return dp_block<4, NR, kAdd>(a + i * lda, lda, b, ldb, n_pairs, c + i * ldc, ldc);
    case 3: return dp_block<3, NR, kAdd>(a + i * lda, lda, b, ldb, n_pairs, c + i * ldc, ldc);
    case 2: return dp_block<2, NR, kAdd>(a + i * lda, lda, b, ldb, n_pairs, c + i * ldc, ldc);
    case 1: return dp_block<1, NR, kAdd>(a + i * lda, lda, b, ldb, n_pairs, c + i * ldc, ldc);
    default: return;
  }
}

// C[M, N] (+)= A . B, N a multiple of 16.
template <bool kAdd>
void dp_gemm(int64_t M, int64_t N, const uint32_t* a, int64_t lda, const uint32_t* b, int64_t ldb,
             int64_t n_pairs, float* c, int64_t ldc) {
  int64_t j = 0;
  for (; j + 64 <= N; j += 64) dp_rows<4, kAdd>(M, a, lda, b + j, ldb, n_pairs, c + j, ldc);
  for (; j < N; j += 16) dp_rows<1, kAdd>(M, a, lda, b + j, ldb, n_pairs, c + j, ldc);
}

// K rows [bk][d] (fp32 holding bf16 values) -> VNNI K^T [d/2][kKeyTile] words, via a
// bf16 copy [bk][d] (tmp) whose 32-bit words are transposed.
inline void pack_kt_vnni(const float* k, int64_t bk, int64_t d, at::BFloat16* tmp, uint32_t* dst) {
  cpu::from_f32(k, tmp, bk * d);
  at::vec::transpose_mxn<float>(reinterpret_cast<const float*>(tmp), d / 2,
                                reinterpret_cast<float*>(dst), kKeyTile, static_cast<int>(bk),
                                static_cast<int>(d / 2));
}

// V rows [bk][d] (fp32 holding bf16 values) -> VNNI [ceil(bk/2)][d] words: word (j2, n)
// = (V[2 j2][n], V[2 j2 + 1][n]); a missing odd row is zero (P = 0 multiplies it).
inline void pack_v_vnni(const float* v, int64_t bk, int64_t d, uint32_t* dst) {
  for (int64_t j2 = 0; j2 < (bk + 1) / 2; ++j2) {
    const float* r0 = v + 2 * j2 * d;
    const bool has1 = 2 * j2 + 1 < bk;
    for (int64_t n = 0; n < d; n += 16) {
      const __m512i lo = _mm512_cvtepu16_epi32(
          (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(r0 + n)));
      const __m512i hi = has1 ? _mm512_cvtepu16_epi32(
          (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(r0 + d + n))) : _mm512_setzero_si512();
      _mm512_storeu_si512(static_cast<void*>(dst + j2 * d + n),
                          _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16)));
    }
  }
}

inline bool dp_cpu() {
  static const bool ok = __builtin_cpu_supports("avx512bf16");
  return ok;
}
constexpr bool kHaveDp = true;
#else
inline bool dp_cpu() { return false; }
constexpr bool kHaveDp = false;
#endif

// max with NaN propagation: a NaN score (NaN in q, or in a visible key) makes the
// tile max NaN, hence the row's running max, alpha, sum and output NaN, as the
// reference's softmax does. (A max that drops NaN would let a row whose visible
// scores are all NaN pass for a row that sees nothing: zeros, lse = -inf.)
inline fVec nan_max(const fVec& a, const fVec& b) {
#if defined(CPU_CAPABILITY_AVX512)
  const __m512 m = _mm512_max_ps(a, b);
  return fVec(_mm512_mask_blend_ps(_mm512_cmp_ps_mask(a, b, _CMP_UNORD_Q), m,
                                   _mm512_add_ps(a, b)));  // a + b: NaN if either is
#else
  return at::vec::maximum(a, b);  // propagates NaN
#endif
}

// Register arrays of the row loop hold the raw vector type: GCC keeps arrays of it in
// registers, arrays of Vectorized<float> (a class) beyond a few elements on the stack.
#if defined(CPU_CAPABILITY_AVX512)
using vreg = __m512;
#elif defined(CPU_CAPABILITY_AVX2)
using vreg = __m256;
#else
using vreg = fVec;
#endif

inline float hsum(const fVec& a) {
  return at::vec::vec_reduce_all<float>([](fVec& x, fVec& y) { return x + y; }, a);
}

// out[0:4] = the sums of the lanes of a0 .. a3
inline void hsum4(const fVec& a0, const fVec& a1, const fVec& a2, const fVec& a3, float* out) {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
#if defined(CPU_CAPABILITY_AVX512)
  const auto half = [](const fVec& x) {  // 16 lanes -> 8 lanes, pairwise sums
    const __m512 v = x;
    return _mm256_add_ps(_mm512_castps512_ps256(v),
                         _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
  };
  const __m256 b0 = half(a0), b1 = half(a1), b2 = half(a2), b3 = half(a3);
#else
  const __m256 b0 = a0, b1 = a1, b2 = a2, b3 = a3;
#endif
  // [a0 a0 a1 a1 | a0 a0 a1 a1] + [a2 a2 a3 a3 | ...] -> [a0 a1 a2 a3 | a0 a1 a2 a3]
  const __m256 t = _mm256_hadd_ps(_mm256_hadd_ps(b0, b1), _mm256_hadd_ps(b2, b3));
  _mm_storeu_ps(out, _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1)));
#else
  out[0] = hsum(a0), out[1] = hsum(a1), out[2] = hsum(a2), out[3] = hsum(a3);
#endif
}

// Row loop, scores: s[r * lds + j] = q_r . k_j for NR query rows q [NR][d] and key rows
// krow[0:bk] (fp32, d each), vectorized over d; 4 keys at a time so that their
// NR x 4 lane sums are reduced together (hsum4). No transpose of K.
template <int NR>
void row_scores(const float* q, int64_t d, const float* const* krow, int64_t bk, float* s,
                int64_t lds) {
  constexpr int64_t kV = fVec::size();
  const int64_t dv = d - d % kV, tail = d % kV;
  int64_t j = 0;
  for (; j + 4 <= bk; j += 4) {
    for (int64_t t = j + kPrefetch; t < std::min(j + kPrefetch + 4, bk); ++t)
      prefetch_row(krow[t], d);
    vreg acc[NR][4];
#pragma GCC unroll 4
    for (int r = 0; r < NR; ++r)
#pragma GCC unroll 4
      for (int t = 0; t < 4; ++t) acc[r][t] = fVec(0.f);
    for (int64_t c = 0; c < dv; c += kV) {
#pragma GCC unroll 4
      for (int t = 0; t < 4; ++t) {
        const fVec kv = fVec::loadu(krow[j + t] + c);
#pragma GCC unroll 4
        for (int r = 0; r < NR; ++r)
          acc[r][t] = at::vec::fmadd(fVec::loadu(q + r * d + c), kv, fVec(acc[r][t]));
      }
    }
    if (tail > 0) {
#pragma GCC unroll 4
      for (int t = 0; t < 4; ++t) {
        const fVec kv = fVec::loadu(krow[j + t] + dv, tail);
#pragma GCC unroll 4
        for (int r = 0; r < NR; ++r)
          acc[r][t] = at::vec::fmadd(fVec::loadu(q + r * d + dv, tail), kv, fVec(acc[r][t]));
      }
    }
#pragma GCC unroll 4
    for (int r = 0; r < NR; ++r)
      hsum4(acc[r][0], acc[r][1], acc[r][2], acc[r][3], s + r * lds + j);
  }
  for (; j < bk; ++j) {
    fVec acc[NR];
#pragma GCC unroll 4
    for (int r = 0; r < NR; ++r) acc[r] = fVec(0.f);
    for (int64_t c = 0; c < dv; c += kV) {
      const fVec kv = fVec::loadu(krow[j] + c);
#pragma GCC unroll 4
      for (int r = 0; r < NR; ++r) acc[r] = at::vec::fmadd(fVec::loadu(q + r * d + c), kv, acc[r]);
    }
    if (tail > 0) {
      const fVec kv = fVec::loadu(krow[j] + dv, tail);
#pragma GCC unroll 4
      for (int r = 0; r < NR; ++r)
        acc[r] = at::vec::fmadd(fVec::loadu(q + r * d + dv, tail), kv, acc[r]);
    }
#pragma GCC unroll 4
    for (int r = 0; r < NR; ++r) s[r * lds + j] = hsum(acc[r]);
  }
}

// acc[r][c0 : c0 + CB kV] += sum_j p[r * ldp + j] v_j[...], accumulators in registers.
template <int NR, int CB>
inline void pv_block(const float* p, int64_t ldp, const float* const* vrow, int64_t bk,
                     float* acc, int64_t d, int64_t c0) {
  constexpr int64_t kV = fVec::size();
  vreg a[NR][CB];  // in registers: constant indices after the unrolling
#pragma GCC unroll 4
  for (int r = 0; r < NR; ++r)
#pragma GCC unroll 4
    for (int c = 0; c < CB; ++c) a[r][c] = fVec::loadu(acc + r * d + c0 + c * kV);
  for (int64_t j = 0; j < bk; ++j) {
    if (j + kPrefetch < bk) prefetch_row(vrow[j + kPrefetch] + c0, CB * kV);
    vreg vv[CB];
#pragma GCC unroll 4
    for (int c = 0; c < CB; ++c) vv[c] = fVec::loadu(vrow[j] + c0 + c * kV);
#pragma GCC unroll 4
    for (int r = 0; r < NR; ++r) {
      const fVec pr(p[r * ldp + j]);
#pragma GCC unroll 4
      for (int c = 0; c < CB; ++c) a[r][c] = at::vec::fmadd(pr, fVec(vv[c]), fVec(a[r][c]));
    }
  }
#pragma GCC unroll 4
  for (int r = 0; r < NR; ++r)
#pragma GCC unroll 4
    for (int c = 0; c < CB; ++c) fVec(a[r][c]).store(acc + r * d + c0 + c * kV);
}

// Row loop, values: acc[r] += sum_j p[r * ldp + j] v_j for NR rows and value rows
// vrow[0:bk], column blocks of kCB vectors held in registers over all bk keys
// (NR x kCB accumulators, kCB values and a broadcast: within AVX2's 16 registers).
template <int NR>
void row_pv(const float* p, int64_t ldp, const float* const* vrow, int64_t bk, float* acc,
            int64_t d) {
  constexpr int64_t kV = fVec::size();
  constexpr int kCB = kV == 16 ? 4 : 2;
  int64_t c = 0;
  for (; c + kCB * kV <= d; c += kCB * kV) pv_block<NR, kCB>(p, ldp, vrow, bk, acc, d, c);
  for (; c + kV <= d; c += kV) pv_block<NR, 1>(p, ldp, vrow, bk, acc, d, c);
  for (; c < d; ++c) {  // head dims that are not whole vectors
    for (int r = 0; r < NR; ++r) {
      float x = acc[r * d + c];
      for (int64_t j = 0; j < bk; ++j) x += p[r * ldp + j] * vrow[j][c];
      acc[r * d + c] = x;
    }
  }
}

// State and scratch of one thread; one work item at a time.
template <typename scalar_t>
class AttnWorker {
 public:
  // nh_max: kv heads per run (several only for small items, see run)
  AttnWorker(const AttnParams<scalar_t>& p, int64_t bq_max, int64_t nh_max = 1)
      : p_(p), d_(p.d), rep_(p.H / p.Hkv), bq_max_(bq_max),
        kp_(kKeyTile), ok_(kKeyTile), qp_(bq_max_), krow_(kKeyTile), vrow_(kKeyTile) {
    const int64_t rows = nh_max * rep_ * bq_max_;
    buf_ = cpu::scratch_f32(2 * rows * d_ + rows * kKeyTile + 2 * rows + 3 * kKeyTile * d_ +
                            (p.dp ? rows * d_ / 2 + rows * kKeyTile / 2 + kKeyTile * d_ : 0));
    q_ = buf_.data_ptr<float>();      // [rows, d] scaled queries
    acc_ = q_ + rows * d_;            // [rows, d] unnormalized output
    s_ = acc_ + rows * d_;            // [rows, kKeyTile] scores, then probabilities
    m_ = s_ + rows * kKeyTile;        // [rows] running max
    l_ = m_ + rows;                   // [rows] running sum
    kt_ = l_ + rows;                  // [d, kKeyTile] K tile transposed
    kf_ = kt_ + d_ * kKeyTile;        // [kKeyTile, d] K tile in fp32 (when converted)
    vf_ = kf_ + kKeyTile * d_;        // [kKeyTile, d] V tile in fp32 (when converted)
    if (p.dp) {
      auto* w = reinterpret_cast<uint32_t*>(vf_ + kKeyTile * d_);
      qb_ = w;                                   // [rows, d/2] bf16 query pairs (unscaled)
      pb_ = qb_ + rows * d_ / 2;                 // [rows, kKeyTile/2] bf16 probability pairs
      ktv_ = pb_ + rows * kKeyTile / 2;          // [d/2, kKeyTile] VNNI K^T tile
      vv_ = ktv_ + d_ * kKeyTile / 2;            // [kKeyTile/2, d] VNNI V tile
      tmpb_ = reinterpret_cast<at::BFloat16*>(kt_);  // bf16 K rows for packing (kt_ unused)
      int e;
      q_scaled_ = std::frexp(p.scale, &e) == 0.5f && e > -100 && e < 100;
    }
    if (p.cache_gather) {
      rc_tiles_ = cpu::ceil_div(p.Tr, kKeyTile);
      rc_buf_ = cpu::scratch_f32(rc_tiles_ * 2 * kKeyTile * d_);
      rc_done_.assign(rc_tiles_, 0);
    }
  }

  // Query tile q0 of kv heads h .. h+nh-1 of batch b (nh > 1 only for small items:
  // rows of head h + i are [i hrows_, (i + 1) hrows_), each key tile serves all of them).
  void run(int64_t b, int64_t h, int64_t nh, int64_t q0) {
    bq_ = std::min(bq_max_, p_.Tq - q0);
    hrows_ = rep_ * bq_;
    rows_ = nh * hrows_;
    load_queries(b, h, q0);
    const int64_t kv_off = (b * p_.Hkv + h) * p_.Tl * d_;
    for (int64_t j0 = 0; j0 < p_.Tl; j0 += kKeyTile) {
      const int64_t bk = std::min(kKeyTile, p_.Tl - j0);
      for (int64_t j = 0; j < bk; ++j) {
        kp_[j] = p_.causal ? p_.kv_pos[j0 + j] : 0;
        ok_[j] = 1;
      }
      bool need_mask;
      if (!visible(bk, &need_mask)) continue;
      if (p_.small) {
        for (int64_t i = 0; i < nh; ++i) {
          const int64_t off = kv_off + (i * p_.Tl + j0) * d_;
          dense_rows(p_.k + off, p_.v + off, bk);
          attend_rows(i, bk, need_mask, nullptr);
        }
      } else if (p_.local != nullptr) {
        const KeyTable& t = *p_.local;
        const float* v = t.has_v ? t.v_rows(b, h, j0)
                                 : reinterpret_cast<const float*>(p_.v + kv_off + j0 * d_);
        attend(t.kt_tile(b, h, j0), v, bk, need_mask, nullptr);
      } else {
        const float* v = load_kv(p_.k + kv_off + j0 * d_, p_.v + kv_off + j0 * d_, bk);
        attend(kt_operand(), v, bk, need_mask, nullptr);
      }
    }
    if (p_.Tr > 0 && p_.codebook != nullptr && (!p_.causal || p_.rmax <= qmin_)) {
      // codebook space: every remote token is visible to every query of this tile, so
      // tokens sharing a code are one key with score bias log(count)
      const KeyTable& t = *p_.codebook;
      for (int64_t j0 = 0; j0 < t.n[b]; j0 += kKeyTile) {
        const int64_t bk = std::min(kKeyTile, t.n[b] - j0);
        if (p_.small) {
          for (int64_t i = 0; i < nh; ++i) {
            code_rows(h + i, t.code_at(b, j0), bk);
            attend_rows(i, bk, false, t.bias_at(b, j0));
          }
          continue;
        }
        attend(t.kt_tile(b, h, j0), t.v_rows(b, h, j0), bk, false, t.bias_at(b, j0));
      }
    } else if (p_.Tr > 0 && (!p_.causal || p_.rmin <= qmax_)) {
      const int64_t r_off = (b * p_.Hkv + h) * p_.Tr * d_;
      for (int64_t j0 = 0; j0 < p_.Tr; j0 += kKeyTile) {
        const int64_t bk = std::min(kKeyTile, p_.Tr - j0);
        for (int64_t j = 0; j < bk; ++j) {
          kp_[j] = p_.causal ? p_.remote_pos[j0 + j] : 0;
          ok_[j] = p_.use_codes ? code_ok(p_.codes + (b * p_.Tr + j0 + j) * p_.G) : 1;
        }
        bool need_mask;
        if (!visible(bk, &need_mask)) continue;
        if (p_.small) {
          for (int64_t i = 0; i < nh; ++i) {
            if (p_.use_codes) {
              gather_rows(b, h + i, j0, bk);
            } else {
              const int64_t off = r_off + (i * p_.Tr + j0) * d_;
              dense_rows(p_.rk + off, p_.rv + off, bk, p_.rope_R > 0 ? b : -1, j0);
            }
            attend_rows(i, bk, need_mask, nullptr);
          }
          continue;
        }
        if (p_.use_codes && rc_tiles_ > 0) {  // gathered once per (b, h) per thread
          const float* kt;
          const float* v = cached_gather(b, h, j0, bk, &kt);
          attend(kt, v, bk, need_mask, nullptr);
          continue;
        }
        const float* v = p_.use_codes ? gather_kv(b, h, j0, bk)
                                  : load_kv(p_.rk + r_off + j0 * d_, p_.rv + r_off + j0 * d_, bk,
                                            p_.rope_R > 0 ? b : -1, j0);
        attend(kt_operand(), v, bk, need_mask, nullptr);
      }
    }
    store(b, h, q0);
  }

 private:
  // Gathered remote tiles of the current (b, h), kept while the thread's next items
  // (other query tiles of the same head: items are ordered by head) reuse them.
  // Slot per tile: K^T (or its VNNI form) then V, kKeyTile x d floats each.
  const float* cached_gather(int64_t b, int64_t h, int64_t j0, int64_t bk, const float** kt) {
    const int64_t bh = b * p_.Hkv + h, ti = j0 / kKeyTile, slot = kKeyTile * d_;
    if (rc_bh_ != bh) {
      rc_bh_ = bh;
      std::fill(rc_done_.begin(), rc_done_.end(), 0);
    }
    float* ks = rc_buf_.data_ptr<float>() + ti * 2 * slot;
    float* vs = ks + slot;
    if (!rc_done_[ti]) {
      const float* v = gather_kv(b, h, j0, bk);
      const int64_t n = p_.dp ? slot / 2 : slot;  // VNNI tiles: bf16 pairs, half the words
      std::copy(kt_operand(), kt_operand() + n, ks);
      std::copy(v, v + n, vs);
      rc_done_[ti] = 1;
    }
    *kt = ks;
    return vs;
  }

  void load_queries(int64_t b, int64_t h, int64_t q0) {
    for (int64_t hl = 0; hl < rows_ / bq_; ++hl) {
      const scalar_t* src = p_.q + ((b * p_.H + h * rep_ + hl) * p_.Tq + q0) * d_;
      cpu::to_f32(src, q_ + hl * bq_ * d_, bq_ * d_);
    }
    if (p_.dp) {  // bf16 queries, scaled only when that is exact (a power of two):
      // otherwise the scale is applied to the fp32 scores
      if (q_scaled_) scale_row(q_, rows_ * d_, p_.scale);
      cpu::from_f32(q_, reinterpret_cast<at::BFloat16*>(qb_), rows_ * d_);
    } else {
      scale_row(q_, rows_ * d_, p_.scale);
    }
    std::fill(acc_, acc_ + rows_ * d_, 0.f);
    std::fill(m_, m_ + rows_, kNegInf);
    std::fill(l_, l_ + rows_, 0.f);
    qmin_ = std::numeric_limits<int64_t>::max();
    qmax_ = std::numeric_limits<int64_t>::min();
    for (int64_t i = 0; i < bq_; ++i) {
      qp_[i] = p_.causal ? p_.q_pos[q0 + i] : 0;
      qmin_ = std::min(qmin_, qp_[i]);
      qmax_ = std::max(qmax_, qp_[i]);
    }
  }

  bool code_ok(const int32_t* c) const {
    bool ok = true;
    for (int64_t g = 0; g < p_.G; ++g) ok &= (c[g] >= 0) & (c[g] < p_.K);
    return ok;
  }

  // Whether any query of the item sees a key of the tile; *need_mask: some does not.
  bool visible(int64_t bk, bool* need_mask) const {
    int64_t n_ok = 0;
    int64_t kmin = std::numeric_limits<int64_t>::max();
    int64_t kmax = std::numeric_limits<int64_t>::min();
    for (int64_t j = 0; j < bk; ++j) {
      if (!ok_[j]) continue;
      ++n_ok;
      kmin = std::min(kmin, kp_[j]);
      kmax = std::max(kmax, kp_[j]);
    }
    if (n_ok == 0 || (p_.causal && kmin > qmax_)) return false;
    *need_mask = n_ok < bk || (p_.causal && kmax > qmin_);
    return true;
  }

  // K, V rows [bk, d] as fp32: fp32 inputs in place, 16-bit ones converted into kf_/vf_;
  // rope_b >= 0: the keys are remote keys j0 .. j0+bk-1 of batch rope_b, rotated in kf_.
  void rows_f32(const scalar_t* k, const scalar_t* v, int64_t bk, int64_t rope_b, int64_t j0,
                const float** kf, const float** vf) {
    if constexpr (std::is_same_v<scalar_t, float>) {
      *kf = k;
      *vf = v;
    } else {
      cpu::to_f32(v, vf_, bk * d_);
      *vf = vf_;
    }
    if (rope_b >= 0 || !std::is_same_v<scalar_t, float>) {
      cpu::to_f32(k, kf_, bk * d_);
      *kf = kf_;
      if (rope_b >= 0) rope_rows(rope_b, j0, bk);
    }
  }

  // K rows [bk, d] -> kt_ (fp32, transposed); returns V rows in fp32 [bk, d].
  // rope_b >= 0: the rows are remote keys j0 .. j0+bk-1 of batch rope_b, rotated first.
  const float* load_kv(const scalar_t* k, const scalar_t* v, int64_t bk, int64_t rope_b = -1,
                       int64_t j0 = 0) {
    const float* kf;
    const float* vf;
    rows_f32(k, v, bk, rope_b, j0, &kf, &vf);
    if (p_.dp) return pack_dp(kf, vf, bk);
    at::vec::transpose_mxn<float>(kf, d_, kt_, kKeyTile, static_cast<int>(bk),
                                  static_cast<int>(d_));
    return vf;
  }

  // dp mode: K, V rows in fp32 -> VNNI tiles ktv_, vv_; returns vv_ (as the V operand).
  const float* pack_dp(const float* kf, const float* vf, int64_t bk) {
#if defined(__AVX512BF16__)
    pack_kt_vnni(kf, bk, d_, tmpb_, ktv_);
    pack_v_vnni(vf, bk, d_, vv_);
#endif
    return reinterpret_cast<const float*>(vv_);
  }

  const float* kt_operand() const {
    return p_.dp ? reinterpret_cast<const float*>(ktv_) : kt_;
  }

  // Remote key/value j = sum_g pk/pv[g, codes[b, j0+j, g], h]; missing keys get zeros
  // (masked anyway; V must be finite because P = 0 multiplies it).
  const float* gather_kv(int64_t b, int64_t h, int64_t j0, int64_t bk) {
    for (int64_t j = 0; j < bk; ++j) {
      float* kr = kf_ + j * d_;
      float* vr = vf_ + j * d_;
      if (!ok_[j] || p_.G == 0) {  // G = 0: an empty sum, a zero key/value
        std::fill(kr, kr + d_, 0.f);
        std::fill(vr, vr + d_, 0.f);
        continue;
      }
      const int32_t* c = p_.codes + (b * p_.Tr + j0 + j) * p_.G;
      for (int64_t g = 0; g < p_.G; ++g) {
        const int64_t off = ((g * p_.K + c[g]) * p_.Hkv + h) * d_;
        cpu::add_to_f32(p_.pk + off, kr, d_, g == 0);
        cpu::add_to_f32(p_.pv + off, vr, d_, g == 0);
      }
      if (p_.G > 1) {  // the reference materializes remote K/V in the table dtype
        cpu::round_through<scalar_t>(kr, d_);
        cpu::round_through<scalar_t>(vr, d_);
      }
    }
    if (p_.rope_R > 0) rope_rows(b, j0, bk);
    if (p_.dp) return pack_dp(kf_, vf_, bk);
    at::vec::transpose_mxn<float>(kf_, d_, kt_, kKeyTile, static_cast<int>(bk),
                                  static_cast<int>(d_));
    return vf_;
  }

  // Rotates the remote key rows kf_[0:bk] (keys j0 .. j0+bk-1 of batch b) on their
  // first R dims in fp32, then rounds them to the table dtype as the reference does.
  // Missing keys stay zero (their rows are masked).
  void rope_rows(int64_t b, int64_t j0, int64_t bk) {
    const int64_t R = p_.rope_R;
    const int64_t off = b * p_.rope_bstride + j0 * R;
    for (int64_t j = 0; j < bk; ++j) {
      if (!ok_[j]) continue;
      float* kr = kf_ + j * d_;
      rope_row(kr, kr, p_.rope_cos + off + j * R, p_.rope_sin + off + j * R, R);
      cpu::round_through<scalar_t>(kr, R);
    }
  }

  // Row loop: krow_/vrow_[0:bk] point at the fp32 K/V rows of the tile: into the
  // inputs where they are fp32 and used as they are, else into kf_/vf_ (converted,
  // summed over groups, rotated: the same fp32 values as load_kv / gather_kv).
  // Dense rows k, v [bk][d]; rope_b >= 0: remote keys j0 .. j0+bk-1 of batch rope_b.
  void dense_rows(const scalar_t* k, const scalar_t* v, int64_t bk, int64_t rope_b = -1,
                  int64_t j0 = 0) {
    const float* kf;
    const float* vf;
    rows_f32(k, v, bk, rope_b, j0, &kf, &vf);
    for (int64_t j = 0; j < bk; ++j) krow_[j] = kf + j * d_, vrow_[j] = vf + j * d_;
  }

  // Remote keys j0 .. j0+bk-1 of batch b from codes, the values gather_kv computes:
  // fp32 tables with G = 1 are read in place (K rotated straight from the table row
  // with rope), the rest is summed / converted / rotated in kf_, vf_.
  void gather_rows(int64_t b, int64_t h, int64_t j0, int64_t bk) {
    const int64_t R = p_.rope_R, G = p_.G;
    const int64_t rope_off = b * p_.rope_bstride + j0 * R;
    const int32_t* codes = p_.codes + (b * p_.Tr + j0) * G;
    const bool in_place = std::is_same_v<scalar_t, float> && G == 1;
    for (int64_t j = 0; j < bk; ++j) {
      if ((!in_place || R > 0) && j + kPrefetch < bk && ok_[j + kPrefetch]) {  // read here
        const int32_t* cn = codes + (j + kPrefetch) * G;
        for (int64_t g = 0; g < G; ++g) {
          const int64_t off = ((g * p_.K + cn[g]) * p_.Hkv + h) * d_;
          prefetch_row(p_.pk + off, d_);
          if (!in_place) prefetch_row(p_.pv + off, d_);
        }
      }
      float* kr = kf_ + j * d_;
      float* vr = vf_ + j * d_;
      krow_[j] = kr, vrow_[j] = vr;
      if (!ok_[j] || G == 0) {  // masked; V must be finite (P = 0 multiplies it)
        std::fill(kr, kr + d_, 0.f);
        std::fill(vr, vr + d_, 0.f);
        continue;
      }
      const int32_t* c = codes + j * G;
      if constexpr (std::is_same_v<scalar_t, float>) {
        if (G == 1) {
          const int64_t off = (static_cast<int64_t>(c[0]) * p_.Hkv + h) * d_;
          vrow_[j] = p_.pv + off;
          if (R == 0) {
            krow_[j] = p_.pk + off;
          } else {  // rope_rows' arithmetic, out of place
            rope_row(p_.pk + off, kr, p_.rope_cos + rope_off + j * R,
                     p_.rope_sin + rope_off + j * R, R);
            std::copy(p_.pk + off + R, p_.pk + off + d_, kr + R);
          }
          continue;
        }
      }
      for (int64_t g = 0; g < G; ++g) {
        const int64_t off = ((g * p_.K + c[g]) * p_.Hkv + h) * d_;
        cpu::add_to_f32(p_.pk + off, kr, d_, g == 0);
        cpu::add_to_f32(p_.pv + off, vr, d_, g == 0);
      }
      if (G > 1) {  // the reference materializes remote K/V in the table dtype
        cpu::round_through<scalar_t>(kr, d_);
        cpu::round_through<scalar_t>(vr, d_);
      }
    }
    if (R > 0 && !in_place) rope_rows(b, j0, bk);  // rotates the kf_ rows
  }

  // Codebook-space keys (G = 1): rows code[0:bk] of pk/pv for kv head h.
  void code_rows(int64_t h, const int32_t* code, int64_t bk) {
    for (int64_t j = 0; j < bk; ++j) {
      const int64_t off = (static_cast<int64_t>(code[j]) * p_.Hkv + h) * d_;
      if constexpr (std::is_same_v<scalar_t, float>) {
        krow_[j] = p_.pk + off, vrow_[j] = p_.pv + off;
      } else {
        cpu::to_f32(p_.pk + off, kf_ + j * d_, d_);
        cpu::to_f32(p_.pv + off, vf_ + j * d_, d_);
        krow_[j] = kf_ + j * d_, vrow_[j] = vf_ + j * d_;
      }
    }
  }

  // attend() for small items on the rows krow_/vrow_: scores and P.V as vectorized dot
  // products and row updates (row_scores, row_pv) in blocks of kRowBlock query rows;
  // the softmax step is attend's (softmax_tile). Rows of kv head i of the run.
  void attend_rows(int64_t i, int64_t bk, bool need_mask, const float* bias) {
    const int64_t r_begin = i * hrows_, r_end = r_begin + hrows_;
    for (int64_t r0 = r_begin; r0 < r_end; r0 += kRowBlock) {
      row_block(r_end - r0, [&](auto nr) {
        row_scores<decltype(nr)::value>(q_ + r0 * d_, d_, krow_.data(), bk,
                                        s_ + r0 * kKeyTile, kKeyTile);
      });
    }
    softmax_tile(bk, need_mask, bias, r_begin, r_end);
    for (int64_t r0 = r_begin; r0 < r_end; r0 += kRowBlock) {
      row_block(r_end - r0, [&](auto nr) {
        row_pv<decltype(nr)::value>(s_ + r0 * kKeyTile, kKeyTile, vrow_.data(), bk,
                                    acc_ + r0 * d_, d_);
      });
    }
  }

  // f(integral_constant<int, min(n, kRowBlock)>): the row-loop instance for that many rows
  template <typename Fn>
  static void row_block(int64_t n, const Fn& f) {
    switch (std::min<int64_t>(n, kRowBlock)) {
      case 1: return f(std::integral_constant<int, 1>{});
      case 2: return f(std::integral_constant<int, 2>{});
      case 3: return f(std::integral_constant<int, 3>{});
      default: return f(std::integral_constant<int, kRowBlock == 4 ? 4 : 3>{});
    }
  }

  // kt: K^T tile [d][kKeyTile]; v: V rows [bk][d]; bias: per-key score bias or nullptr.
  // dp mode: kt, v are the VNNI tiles (K^T [d/2][kKeyTile], V [kKeyTile/2][d] words).
  void attend(const float* kt, const float* v, int64_t bk, bool need_mask, const float* bias) {
#if defined(__AVX512BF16__)
    if (p_.dp) {
      dp_gemm<false>(rows_, cpu::round_up(bk, fVec::size()), qb_, d_ / 2,
                     reinterpret_cast<const uint32_t*>(kt), kKeyTile, d_ / 2, s_, kKeyTile);
    } else
#endif
    {
      cpu::tile_gemm(rows_, bk, d_, d_, kKeyTile, kKeyTile, false, q_, kt, s_);
    }
    softmax_tile(bk, need_mask, bias, 0, rows_);
#if defined(__AVX512BF16__)
    if (p_.dp) {
      const int64_t n_even = cpu::round_up(bk, 2);  // <= bk_pad; P is 0 past bk
      dp_gemm<true>(rows_, d_, pb_, kKeyTile / 2, reinterpret_cast<const uint32_t*>(v), d_,
                    n_even / 2, acc_, d_);
      return;
    }
#endif
    cpu::tile_gemm(rows_, d_, bk, kKeyTile, d_, d_, true, s_, v, acc_);
  }

  // Scores s_[r_begin:r_end][0:bk] -> probabilities (s_, or pb_ in dp mode): scale
  // (dp), mask, bias, online softmax update of m_, l_ and rescaling of acc_ per row.
  void softmax_tile(int64_t bk, bool need_mask, const float* bias, int64_t r_begin,
                    int64_t r_end) {
    constexpr int64_t kV = fVec::size();
    const int64_t bk_pad = cpu::round_up(bk, kV);
    for (int64_t r = r_begin; r < r_end; ++r) {
      float* s = s_ + r * kKeyTile;
      if (p_.dp && !q_scaled_) scale_row(s, bk, p_.scale);
      if (need_mask) {
        const int64_t qp = qp_[r % bq_];
        for (int64_t j = 0; j < bk; ++j) s[j] = (ok_[j] && kp_[j] <= qp) ? s[j] : kNegInf;
      }
      if (bias != nullptr) {
        int64_t j = 0;
        for (; j + kV <= bk; j += kV) (fVec::loadu(s + j) + fVec::loadu(bias + j)).store(s + j);
        for (; j < bk; ++j) s[j] += bias[j];
      }
      std::fill(s + bk, s + bk_pad, kNegInf);

      fVec vmax(kNegInf);
      for (int64_t j = 0; j < bk_pad; j += kV) vmax = nan_max(vmax, fVec::loadu(s + j));
      const float tile_max =
          at::vec::vec_reduce_all<float>([](fVec& a, fVec& b) { return nan_max(a, b); }, vmax);
      // NaN sticks: a NaN tile max, or a NaN running max (std::max returns its first
      // argument when the comparison fails)
      const float m_new = std::isnan(tile_max) ? tile_max : std::max(m_[r], tile_max);
      if (m_new == kNegInf) {  // nothing visible to this row yet: contributes nothing
        std::fill(s, s + bk_pad, 0.f);
        if (p_.dp) {
          auto* pr = reinterpret_cast<at::BFloat16*>(pb_) + r * kKeyTile;
          std::fill(pr, pr + bk_pad, at::BFloat16(0.f));
        }
        continue;
      }
      const fVec vm(m_new);
      fVec vsum(0.f);
#if defined(__AVX512BF16__)
      if (p_.dp) {  // P straight to bf16 (pairs of keys), as 16-bit SDPA rounds it
        auto* pr = reinterpret_cast<at::BFloat16*>(pb_) + r * kKeyTile;
        for (int64_t j = 0; j < bk_pad; j += kV) {
          const fVec e = (fVec::loadu(s + j) - vm).exp_u20();
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(pr + j), (__m256i)_mm512_cvtneps_pbh(e));
          vsum = vsum + e;
        }
      } else
#endif
      {
        for (int64_t j = 0; j < bk_pad; j += kV) {
          const fVec e = (fVec::loadu(s + j) - vm).exp_u20();
          e.store(s + j);
          vsum = vsum + e;
        }
      }
      const float alpha = std::exp(m_[r] - m_new);  // 0 on the first visible tile
      l_[r] = l_[r] * alpha +
              at::vec::vec_reduce_all<float>([](fVec& a, fVec& b) { return a + b; }, vsum);
      if (alpha != 1.f) scale_row(acc_ + r * d_, d_, alpha);
      m_[r] = m_new;
    }
  }

  void store(int64_t b, int64_t h, int64_t q0) {
    for (int64_t r = 0; r < rows_; ++r) {
      const int64_t row = (b * p_.H + h * rep_ + r / bq_) * p_.Tq + q0 + r % bq_;
      float* a = acc_ + r * d_;
      if (l_[r] == 0.f) {  // saw no key (l >= 1 once any key is visible; NaN: NaN inputs)
        std::fill(a, a + d_, 0.f);
        p_.lse[row] = kNegInf;
      } else {  // a NaN sum (NaN inputs) gives NaN out and lse
        scale_row(a, d_, 1.f / l_[r]);
        p_.lse[row] = m_[r] + std::log(l_[r]);
      }
      cpu::from_f32(a, p_.out + row * d_, d_);
    }
  }

  const AttnParams<scalar_t>& p_;
  const int64_t d_, rep_, bq_max_;
  std::vector<int64_t> kp_;  // key positions of the tile (0 when not causal)
  std::vector<uint8_t> ok_;  // key present (code in range)
  std::vector<int64_t> qp_;  // query positions of the item (0 when not causal)
  std::vector<const float*> krow_, vrow_;  // row loop: fp32 K/V rows of the tile
  at::Tensor buf_;
  float *q_, *acc_, *s_, *m_, *l_, *kt_, *kf_, *vf_;
  uint32_t *qb_ = nullptr, *pb_ = nullptr, *ktv_ = nullptr, *vv_ = nullptr;
  at::BFloat16* tmpb_ = nullptr;
  bool q_scaled_ = false;
  int64_t rc_tiles_ = 0, rc_bh_ = -1;  // remote gather cache (cached_gather)
  at::Tensor rc_buf_;
  std::vector<uint8_t> rc_done_;
  int64_t bq_ = 0, hrows_ = 0, rows_ = 0, qmin_ = 0, qmax_ = 0;  // hrows_: rows per kv head
};

// Fills t.kt / t.v for t.n[b] keys per (b, h); row(b, h, j) gives key j's K and V rows.
template <typename scalar_t, typename RowFn>
void fill_table(KeyTable& t, const RowFn& row) {
  const int64_t d = t.d, cap = t.cap;
  t.kt = at::empty({std::max<int64_t>(1, t.B * t.Hkv * cap * d)}, at::kFloat);
  if (t.has_v) t.v = at::empty({std::max<int64_t>(1, t.B * t.Hkv * cap * d)}, at::kFloat);
  at::parallel_for(0, t.B * t.Hkv, 1, [&](int64_t begin, int64_t end) {
    at::Tensor tmp = cpu::scratch_f32(3 * kKeyTile * d);
    float* kf = tmp.data_ptr<float>();
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / t.Hkv, h = bh % t.Hkv;
      for (int64_t j0 = 0; j0 < t.n[b]; j0 += kKeyTile) {
        const int64_t bk = std::min(kKeyTile, t.n[b] - j0);
        float* vdst = t.has_v ? t.v.data_ptr<float>() + (bh * cap + j0) * d : nullptr;
        float* ktdst = t.kt.data_ptr<float>() + (bh * cap + j0) * d;
#if defined(__AVX512BF16__)
        if (t.dp) {  // VNNI tiles at the same offsets (they take half the slot)
          float* vf = kf + kKeyTile * d;
          for (int64_t j = 0; j < bk; ++j) {
            const auto [kr, vr] = row(b, h, j0 + j);
            cpu::to_f32(kr, kf + j * d, d);
            cpu::to_f32(vr, vf + j * d, d);
          }
          pack_kt_vnni(kf, bk, d, reinterpret_cast<at::BFloat16*>(vf + kKeyTile * d),
                       reinterpret_cast<uint32_t*>(ktdst));
          pack_v_vnni(vf, bk, d, reinterpret_cast<uint32_t*>(vdst));
          continue;
        }
#endif
        for (int64_t j = 0; j < bk; ++j) {
          const auto [kr, vr] = row(b, h, j0 + j);
          cpu::to_f32(kr, kf + j * d, d);
          if (vdst != nullptr) cpu::to_f32(vr, vdst + j * d, d);
        }
        at::vec::transpose_mxn<float>(kf, d, ktdst, kKeyTile, static_cast<int>(bk),
                                      static_cast<int>(d));
      }
    }
  });
}

// Codebook space (G = 1): per batch, the distinct valid codes in increasing order
// and bias log(count). Cost rule: a query tile attends to U distinct codes instead
// of Tr tokens, and the table costs about one gather pass over U keys, once per call.
// So it is used when U < Tr (summed over the batch) and, with a single query tile
// per (b, h) (no reuse of the table), when U <= 3/4 Tr. Returns false otherwise.
// Small query tiles (p.small) read the codes' pk/pv rows in place: only the code list
// and the bias are built (no K^T / V copies), so any U < Tr pays.
template <typename scalar_t>
bool build_codebook_table(const AttnParams<scalar_t>& p, int64_t n_qt, KeyTable& t) {
  std::vector<std::vector<int32_t>> uniq(p.B);
  std::vector<std::vector<float>> cnt(p.B);
  int64_t total = 0, n_max = 0;
  std::vector<int32_t> count(p.K);
  for (int64_t b = 0; b < p.B; ++b) {
    std::fill(count.begin(), count.end(), 0);
    const int32_t* c = p.codes + b * p.Tr;  // G = 1
    for (int64_t j = 0; j < p.Tr; ++j)
      if (c[j] >= 0 && c[j] < p.K) ++count[c[j]];  // missing / out of range: not a key
    for (int64_t k = 0; k < p.K; ++k) {
      if (count[k] == 0) continue;
      uniq[b].push_back(static_cast<int32_t>(k));
      cnt[b].push_back(std::log(static_cast<float>(count[k])));
    }
    total += static_cast<int64_t>(uniq[b].size());
    n_max = std::max<int64_t>(n_max, static_cast<int64_t>(uniq[b].size()));
  }
  if (total >= p.B * p.Tr || (n_qt == 1 && !p.small && 4 * total > 3 * p.B * p.Tr)) return false;
  t.B = p.B, t.Hkv = p.Hkv, t.d = p.d, t.has_v = true, t.dp = p.dp;
  t.cap = cpu::round_up(std::max<int64_t>(n_max, 1), kKeyTile);
  t.n.resize(p.B);
  t.bias = at::empty({p.B * t.cap}, at::kFloat);
  for (int64_t b = 0; b < p.B; ++b) {
    t.n[b] = static_cast<int64_t>(uniq[b].size());
    std::copy(cnt[b].begin(), cnt[b].end(), t.bias.data_ptr<float>() + b * t.cap);
  }
  if (p.small) {
    t.code = at::empty({p.B * t.cap}, at::kInt);
    for (int64_t b = 0; b < p.B; ++b)
      std::copy(uniq[b].begin(), uniq[b].end(), t.code.data_ptr<int32_t>() + b * t.cap);
    return true;
  }
  fill_table<scalar_t>(t, [&](int64_t b, int64_t h, int64_t j) {
    const int64_t off = (static_cast<int64_t>(uniq[b][j]) * p.Hkv + h) * p.d;
    return std::make_pair(p.pk + off, p.pv + off);
  });
  return true;
}

template <typename scalar_t>
void mixed_attention_kernel(AttnParams<scalar_t>& p) {
  // bf16 inputs: bf16 dot products with fp32 accumulation where the CPU has them
  // (d a multiple of 16 so every tile is whole vectors; the fp32 path serves the rest)
  p.dp = std::is_same_v<scalar_t, c10::BFloat16> && kHaveDp && dp_cpu() && p.d % 16 == 0 &&
         p.d <= 256;
  const int64_t rep = p.H / p.Hkv;
  int64_t bq = std::max<int64_t>(1, std::min(p.Tq, kRowTarget / rep));
  // Smaller query tiles when there are too few items to keep every thread busy.
  while (bq > 16 && p.B * p.Hkv * cpu::ceil_div(p.Tq, bq) < 2 * at::get_num_threads())
    bq = cpu::ceil_div(bq, 2);
  const int64_t n_qt = cpu::ceil_div(p.Tq, bq);
  // Few query rows per item (decode): the row loop; dp keeps its bf16 GEMMs (P in bf16).
  p.small = !p.dp && n_qt == 1 && rep * bq <= kSmallRows;

  // Local keys: transposed (and converted to fp32) once, not once per query tile.
  KeyTable local;
  if (n_qt > 1 && p.Tl > 0 && !p.small) {
    local.B = p.B, local.Hkv = p.Hkv, local.d = p.d;
    local.cap = cpu::round_up(p.Tl, kKeyTile);
    local.n.assign(p.B, p.Tl);
    local.has_v = !std::is_same_v<scalar_t, float> || p.dp;
    local.dp = p.dp;
    fill_table<scalar_t>(local, [&](int64_t b, int64_t h, int64_t j) {
      const int64_t off = ((b * p.Hkv + h) * p.Tl + j) * p.d;
      return std::make_pair(p.k + off, p.v + off);
    });
    p.local = &local;
  }
  // Remote keys in codebook space where that is exact and has fewer keys.
  KeyTable codebook;
  if (p.use_codes && p.G == 1 && p.Tr > 0 && p.rope_R == 0) {
    bool some_tile = true;  // causal: only tiles whose queries all follow every remote token
    if (p.causal) {
      p.rmin = *std::min_element(p.remote_pos, p.remote_pos + p.Tr);
      p.rmax = *std::max_element(p.remote_pos, p.remote_pos + p.Tr);
      some_tile = p.rmax <= *std::max_element(p.q_pos, p.q_pos + p.Tq);
    }
    if (some_tile && build_codebook_table(p, n_qt, codebook)) p.codebook = &codebook;
  } else if (p.causal && p.Tr > 0) {
    p.rmin = *std::min_element(p.remote_pos, p.remote_pos + p.Tr);
    p.rmax = *std::max_element(p.remote_pos, p.remote_pos + p.Tr);
  }

  // Gather path with several query tiles per head: each thread keeps the remote tiles
  // of its current head (up to 32 MiB per thread) instead of gathering them per tile.
  p.cache_gather = p.use_codes && p.Tr > 0 && n_qt > 1 && !p.small &&
                   (p.codebook == nullptr || p.causal) &&
                   cpu::ceil_div(p.Tr, kKeyTile) * 2 * kKeyTile * p.d * 4 <= (int64_t{32} << 20);
  at::parallel_for(0, p.B * p.Hkv * n_qt, 1, [&](int64_t begin, int64_t end) {
    AttnWorker<scalar_t> w(p, bq, p.small ? std::min(p.Hkv, end - begin) : 1);
    for (int64_t item = begin; item < end;) {
      if (p.small) {  // n_qt = 1, item = (b, h): the thread's heads of batch b in one run
        const int64_t b = item / p.Hkv, h = item % p.Hkv;
        const int64_t nh = std::min(end - item, p.Hkv - h);
        w.run(b, h, nh, 0);
        item += nh;
        continue;
      }
      const int64_t bh = item / n_qt, z = item % n_qt;
      const int64_t qt = (z % 2 == 0) ? z / 2 : n_qt - 1 - z / 2;  // zig-zag: 0, n-1, 1, ...
      w.run(bh / p.Hkv, bh % p.Hkv, 1, qt * bq);
      ++item;
    }
    cpu::tile_gemm_done();
  });
}

bool is_float_type(const Tensor& t) {
  const auto s = t.scalar_type();
  return s == at::kFloat || s == at::kHalf || s == at::kBFloat16;
}

void check_positions(const OptTensor& pos, int64_t n, const char* name) {
  TORCH_CHECK(pos.has_value() && pos->defined(), "mixed_attention: causal needs ", name);
  TORCH_CHECK(pos->scalar_type() == at::kLong && pos->dim() == 1 && pos->is_contiguous() &&
                  pos->numel() == n,
              "mixed_attention: ", name, " must be contiguous int64 [", n, "], got ",
              pos->scalar_type(), " ", pos->sizes());
}

void check_rope(const Tensor& cos, const OptTensor& sin, int64_t B, int64_t Tr, int64_t d) {
  TORCH_CHECK(sin.has_value() && sin->defined(), "mixed_attention: rope_cos needs rope_sin");
  TORCH_CHECK(cos.device().is_cpu() && sin->device().is_cpu(),
              "mixed_attention: rope_cos, rope_sin must be CPU tensors");
  TORCH_CHECK(cos.scalar_type() == at::kFloat && cos.dim() == 3 && cos.is_contiguous() &&
                  sin->scalar_type() == at::kFloat && sin->is_contiguous() &&
                  sin->sizes() == cos.sizes(),
              "mixed_attention: rope_cos, rope_sin must be contiguous float32 of one shape");
  const int64_t R = cos.size(2);
  TORCH_CHECK((cos.size(0) == B || cos.size(0) == 1) && cos.size(1) == Tr && R % 2 == 0 &&
                  R >= 2 && R <= d,
              "mixed_attention: rope_cos must be [B or 1, Tr=", Tr, ", R] with R even in [2, ",
              d, "], got ", cos.sizes());
}

void merge_row(const float* a, float wa, const float* b, float wb, float* o, int64_t d) {
  constexpr int64_t kV = fVec::size();
  const fVec va(wa), vb(wb);
  int64_t j = 0;
  for (; j + kV <= d; j += kV)
    at::vec::fmadd(fVec::loadu(a + j), va, fVec::loadu(b + j) * vb).store(o + j);
  for (; j < d; ++j) o[j] = a[j] * wa + b[j] * wb;
}

template <typename scalar_t>
void merge_attention_kernel(const scalar_t* out_a, const float* lse_a, const scalar_t* out_b,
                            const float* lse_b, scalar_t* out, float* lse, int64_t rows,
                            int64_t d) {
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(d, 1));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> fa, fb, fo;
    if constexpr (!std::is_same_v<scalar_t, float>) fa.resize(d), fb.resize(d), fo.resize(d);
    for (int64_t r = begin; r < end; ++r) {
      const float la = lse_a[r], lb = lse_b[r];
      // a NaN lse on either side: NaN weights, out and lse (std::max / std::min would
      // return one side or the other depending on the order)
      const bool nan = std::isnan(la) || std::isnan(lb);
      const float mx = nan ? la + lb : std::max(la, lb), mn = nan ? mx : std::min(la, lb);
      scalar_t* o = out + r * d;
      if (mx == kNegInf) {  // neither part saw a key
        lse[r] = kNegInf;
        std::fill(o, o + d, scalar_t(0));
        continue;
      }
      const float l = mx + std::log1p(std::exp(mn - mx));  // logaddexp
      lse[r] = l;
      const float wa = std::exp(la - l), wb = std::exp(lb - l);
      if constexpr (std::is_same_v<scalar_t, float>) {
        merge_row(out_a + r * d, wa, out_b + r * d, wb, o, d);
      } else {
        cpu::to_f32(out_a + r * d, fa.data(), d);
        cpu::to_f32(out_b + r * d, fb.data(), d);
        merge_row(fa.data(), wa, fb.data(), wb, fo.data(), d);
        cpu::from_f32(fo.data(), o, d);
      }
    }
  });
}

}  // namespace

std::tuple<Tensor, Tensor> mixed_attention_cpu(
    const Tensor& q, const Tensor& k, const Tensor& v, const OptTensor& codes,
    const OptTensor& pk, const OptTensor& pv, const OptTensor& remote_k,
    const OptTensor& remote_v, bool causal, const OptTensor& q_pos,
    const OptTensor& kv_pos, const OptTensor& remote_pos, c10::optional<double> scale,
    const OptTensor& rope_cos, const OptTensor& rope_sin) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4,
              "mixed_attention: q, k, v must be 4-D");
  TORCH_CHECK(q.is_contiguous() && k.is_contiguous() && v.is_contiguous(),
              "mixed_attention: q, k, v must be contiguous");
  TORCH_CHECK(is_float_type(q) && k.scalar_type() == q.scalar_type() &&
                  v.scalar_type() == q.scalar_type(),
              "mixed_attention: q, k, v must share one dtype of float32/float16/bfloat16");
  const int64_t B = q.size(0), H = q.size(1), Tq = q.size(2), d = q.size(3);
  const int64_t Hkv = k.size(1), Tl = k.size(2);
  TORCH_CHECK(d >= 1, "mixed_attention: head dim must be >= 1");
  TORCH_CHECK(k.size(0) == B && k.size(3) == d && v.sizes() == k.sizes(),
              "mixed_attention: k, v must be [B, Hkv, Tl, d] matching q ", q.sizes(), ", got ",
              k.sizes(), " and ", v.sizes());
  TORCH_CHECK(Hkv >= 1 && H % Hkv == 0, "mixed_attention: H=", H,
              " is not a multiple of Hkv=", Hkv);

  const bool has_codes = codes.has_value() && codes->defined();
  const bool has_remote = remote_k.has_value() && remote_k->defined();
  TORCH_CHECK(!(has_codes && has_remote), "mixed_attention: pass codes or remote_k/v, not both");
  int64_t Tr = 0, G = 0, K = 0;
  if (has_codes) {
    TORCH_CHECK(pk.has_value() && pk->defined() && pv.has_value() && pv->defined(),
                "mixed_attention: codes need pk and pv");
    TORCH_CHECK(codes->scalar_type() == at::kInt && codes->dim() == 3 &&
                    codes->is_contiguous() && codes->size(0) == B,
                "mixed_attention: codes must be contiguous int32 [B, Tr, G]");
    TORCH_CHECK(pk->dim() == 4 && pk->is_contiguous() && pv->is_contiguous() &&
                    pk->scalar_type() == q.scalar_type() &&
                    pv->scalar_type() == q.scalar_type() && pv->sizes() == pk->sizes() &&
                    pk->size(2) == Hkv && pk->size(3) == d,
                "mixed_attention: pk, pv must be contiguous [G, K, Hkv, d] in q's dtype");
    G = pk->size(0);
    K = pk->size(1);
    TORCH_CHECK(codes->size(2) == G && K >= 1, "mixed_attention: codes ", codes->sizes(),
                " do not match pk ", pk->sizes());
    Tr = codes->size(1);
  } else if (has_remote) {
    TORCH_CHECK(remote_v.has_value() && remote_v->defined(),
                "mixed_attention: remote_k needs remote_v");
    TORCH_CHECK(remote_k->dim() == 4 && remote_k->is_contiguous() &&
                    remote_v->is_contiguous() && remote_k->scalar_type() == q.scalar_type() &&
                    remote_v->scalar_type() == q.scalar_type() &&
                    remote_v->sizes() == remote_k->sizes() && remote_k->size(0) == B &&
                    remote_k->size(1) == Hkv && remote_k->size(3) == d,
                "mixed_attention: remote_k, remote_v must be contiguous [B, Hkv, Tr, d] in "
                "q's dtype");
    Tr = remote_k->size(2);
  }
  if (causal) {
    check_positions(q_pos, Tq, "q_pos");
    check_positions(kv_pos, Tl, "kv_pos");
    if (Tr > 0) check_positions(remote_pos, Tr, "remote_pos");
  }
  const bool has_rope = Tr > 0 && rope_cos.has_value() && rope_cos->defined();
  TORCH_CHECK(has_rope || Tr == 0 || !(rope_sin.has_value() && rope_sin->defined()),
              "mixed_attention: rope_sin needs rope_cos");
  if (has_rope) check_rope(*rope_cos, rope_sin, B, Tr, d);

  Tensor out = at::empty_like(q);
  Tensor lse = at::empty({B, H, Tq}, q.options().dtype(at::kFloat));
  if (out.numel() == 0) return {out, lse};
  const float sc = static_cast<float>(scale.has_value() ? *scale : 1.0 / std::sqrt(double(d)));

  ASTRA_DISPATCH_FLOAT_TYPES(q.scalar_type(), "mixed_attention_cpu", [&] {
    AttnParams<scalar_t> p{};
    p.q = q.data_ptr<scalar_t>();
    p.k = k.data_ptr<scalar_t>();
    p.v = v.data_ptr<scalar_t>();
    p.use_codes = has_codes;
    if (has_codes) {
      p.codes = codes->data_ptr<int32_t>();
      p.pk = pk->data_ptr<scalar_t>();
      p.pv = pv->data_ptr<scalar_t>();
    } else if (has_remote) {
      p.rk = remote_k->data_ptr<scalar_t>();
      p.rv = remote_v->data_ptr<scalar_t>();
    }
    if (causal) {
      p.q_pos = q_pos->data_ptr<int64_t>();
      p.kv_pos = kv_pos->data_ptr<int64_t>();
      p.remote_pos = Tr > 0 ? remote_pos->data_ptr<int64_t>() : nullptr;
    }
    p.B = B, p.H = H, p.Hkv = Hkv, p.Tq = Tq, p.Tl = Tl, p.Tr = Tr, p.d = d, p.G = G, p.K = K;
    p.causal = causal;
    if (has_rope) {
      p.rope_cos = rope_cos->data_ptr<float>();
      p.rope_sin = rope_sin->data_ptr<float>();
      p.rope_R = rope_cos->size(2);
      p.rope_bstride = rope_cos->size(0) == 1 ? 0 : Tr * p.rope_R;
    }
    p.scale = sc;
    p.out = out.data_ptr<scalar_t>();
    p.lse = lse.data_ptr<float>();
    mixed_attention_kernel<scalar_t>(p);
  });
  return {out, lse};
}

std::tuple<Tensor, Tensor> merge_attention_cpu(const Tensor& out_a, const Tensor& lse_a,
                                               const Tensor& out_b, const Tensor& lse_b) {
  TORCH_CHECK(out_a.dim() >= 1 && out_a.is_contiguous() && out_b.is_contiguous() &&
                  lse_a.is_contiguous() && lse_b.is_contiguous(),
              "merge_attention: inputs must be contiguous, out_* at least 1-D");
  TORCH_CHECK(is_float_type(out_a) && out_b.scalar_type() == out_a.scalar_type(),
              "merge_attention: out_a, out_b must share one dtype of float32/float16/bfloat16");
  TORCH_CHECK(lse_a.scalar_type() == at::kFloat && lse_b.scalar_type() == at::kFloat,
              "merge_attention: lse_a, lse_b must be float32");
  TORCH_CHECK(out_b.sizes() == out_a.sizes() && lse_b.sizes() == lse_a.sizes() &&
                  lse_a.sizes() == out_a.sizes().slice(0, out_a.dim() - 1),
              "merge_attention: shapes do not match: out ", out_a.sizes(), " / ", out_b.sizes(),
              ", lse ", lse_a.sizes(), " / ", lse_b.sizes());
  Tensor out = at::empty_like(out_a);
  Tensor lse = at::empty_like(lse_a);
  const int64_t d = out_a.size(-1), rows = lse_a.numel();
  if (out.numel() == 0 && rows == 0) return {out, lse};
  ASTRA_DISPATCH_FLOAT_TYPES(out_a.scalar_type(), "merge_attention_cpu", [&] {
    merge_attention_kernel<scalar_t>(out_a.data_ptr<scalar_t>(), lse_a.data_ptr<float>(),
                                     out_b.data_ptr<scalar_t>(), lse_b.data_ptr<float>(),
                                     out.data_ptr<scalar_t>(), lse.data_ptr<float>(), rows, d);
  });
  return {out, lse};
}

TORCH_LIBRARY_IMPL(astra_C, CPU, m) {
  m.impl("mixed_attention", &mixed_attention_cpu);
  m.impl("merge_attention", &merge_attention_cpu);
}

}  // namespace astra
