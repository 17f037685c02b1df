// mixed_attention and merge_attention on CUDA.
//
// mixed_attention is a flash-attention-style forward pass: a block owns a tile
// of queries of one (batch, head) and streams key/value tiles, first the local
// ones, then the remote ones, keeping an online softmax (running max m, running
// sum l, unnormalized output O) per query row. Remote rows are either read from
// remote_k/remote_v or gathered from the projected codebooks inside the tile
// loader: key j of kv-head h is sum_g pk[g, codes[b, j, g], h, :] (fp32 sum,
// rounded to the table dtype as the reference does). A code outside [0, K) in
// any group marks the token missing: its row is zero-filled and masked, never
// read. Causal masking compares global positions (key visible iff
// pos <= query pos). Scores are kept in the log2 domain (scale * log2(e)) so
// exp2 serves for exp; rows that see no key end with l = 0 -> zeros, lse = -inf.
// NaN: masked scores are -inf by a select, so a key a row does not see never reaches
// it; a NaN score among its visible keys makes p and l NaN (fmaxf drops NaN from the
// running max, exp2f does not), hence NaN out and lse, as the reference.
//
// Two kernels:
// - attn_tc_kernel<T, HD> (fp16/bf16, d % 8 == 0, d <= 128, 16-byte aligned
//   inputs, sm_80+): 4 warps, 64 queries x 64 keys per tile, each warp 16 query
//   rows. S = Q K^T and O += P V run on tensor cores (mma.sync m16n8k16, fp32
//   accumulate); P goes from the S accumulators to the A operand in registers
//   (the accumulator layout of two n8 tiles is the A layout of one k16 step).
//   K/V tiles are padded to HD (zero columns) in shared memory and filled by
//   cp.async where rows come straight from memory; the fill of V overlaps
//   Q K^T and the fill of the next K overlaps P V (flash-attention 2's order).
// - attn_generic_kernel<T> (any dtype, d <= 256): CUDA cores, 4 warps x 4 query
//   rows, 32-key tiles in fp32 shared memory; lane j scores key j, then the
//   probabilities are broadcast by shuffles for P V. The fp32 path, and the
//   fallback for head dims / alignments the tensor-core kernel does not take,
//   and the kernel for RoPE (rope_cos/rope_sin): once a warp has written a remote
//   key row to shared memory (summed and rounded to T), its lanes rotate the row's
//   first R dims in pairs (i, i + R/2) in fp32 and round them to T again, as the
//   reference does. Codebook space does not exist here, so nothing else changes.
#include "common.cuh"

#include <climits>
#include <cmath>

namespace astra {
namespace cuda {
namespace {

struct AttnParams {
  const void* q;       // [B, H, Tq, d]
  const void* k;       // [B, Hkv, Tl, d]
  const void* v;
  const int32_t* codes;  // [B, Tr, G]              (remote == 1)
  const void* pk;        // [G, K, Hkv, d]
  const void* pv;
  const void* rk;        // [B, Hkv, Tr, d]         (remote == 2)
  const void* rv;
  const int64_t* q_pos;   // [Tq]  (causal only)
  const int64_t* kv_pos;  // [Tl]
  const int64_t* r_pos;   // [Tr]
  void* out;              // [B, H, Tq, d]
  float* lse;             // [B, H, Tq]
  int B, H, Hkv, Tq, Tl, Tr, d, G, K;
  int remote;  // 0: no remote keys, 1: codes + tables, 2: dense remote_k/remote_v
  int causal;
  float scale_log2;  // scale * log2(e)
  const float* rope_cos;  // [B or 1, Tr, R] fp32 (rope_R > 0)
  const float* rope_sin;
  int rope_R;           // rotary dims of remote keys; 0: no rope
  int64_t rope_bs;      // batch stride of rope_cos/rope_sin: Tr * R, or 0 (shared)
};

// Where remote row `key` (< Tr) of batch b comes from. For codes, ok is false
// when any group's code is outside [0, K); with G == 1 (or dense rows) `single`
// points at the row's first element of the K (or V) table, else the row is a
// sum over groups and `cp` points at its G codes.
struct RowSrc {
  bool ok;
  const int32_t* cp;
  int64_t off;  // element offset of the row in k/v, remote_k/v, or pk/pv (G == 1)
  bool single;
};

__device__ __forceinline__ RowSrc remote_row(const AttnParams& p, int b, int hkv, int key) {
  RowSrc r;
  r.ok = true;
  r.cp = nullptr;
  r.single = true;
  if (p.remote == 2) {
    r.off = ((static_cast<int64_t>(b) * p.Hkv + hkv) * p.Tr + key) * p.d;
    return r;
  }
  r.cp = p.codes + (static_cast<int64_t>(b) * p.Tr + key) * p.G;
  for (int g = 0; g < p.G; ++g) {
    const int c = r.cp[g];
    r.ok = r.ok && c >= 0 && c < p.K;
  }
  if (p.G == 1 && r.ok) {
    r.off = (static_cast<int64_t>(r.cp[0]) * p.Hkv + hkv) * p.d;
  } else {
    r.off = 0;
    r.single = false;
  }
  return r;
}

// Element offset in pk/pv of group g, code c, kv-head hkv.
__device__ __forceinline__ int64_t table_off(const AttnParams& p, int g, int c, int hkv) {
  return ((static_cast<int64_t>(g) * p.K + c) * p.Hkv + hkv) * p.d;
}

__device__ __forceinline__ int64_t warp_min_i64(int64_t v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const long long w = __shfl_xor_sync(0xffffffffu, static_cast<long long>(v), o);
    v = w < v ? w : v;
  }
  return v;
}
__device__ __forceinline__ int64_t warp_max_i64(int64_t v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const long long w = __shfl_xor_sync(0xffffffffu, static_cast<long long>(v), o);
    v = w > v ? w : v;
  }
  return v;
}

// ---------------------------------------------------------------------------
// Tensor-core kernel
// ---------------------------------------------------------------------------
constexpr int kTcRows = 64;     // queries per block (16 per warp)
constexpr int kTcKeys = 64;     // keys per tile
constexpr int kTcThreads = 128;

template <typename T, int HD>
struct TcSmem {
  static constexpr int kLds = HD + 8;  // row stride: (HD/2 + 4) words = 4 mod 8 -> no bank conflicts
  T k[kTcKeys][kLds];
  T v[kTcKeys][kLds];
  int64_t kpos[kTcKeys];  // key positions (causal)
  int kok[kTcKeys];       // key exists and is not missing
};

// Fill the K (is_v false: also kpos/kok) or V tile of key tile t into dst.
// Tiles 0 .. nL-1 are local (Tl keys), the rest remote (Tr keys). Each row is
// HD/8 chunks of 8 elements; chunks past d, rows past the end, and missing
// rows are zeros.
template <typename T, int HD>
__device__ __forceinline__ void tc_load_tile(const AttnParams& p, int b, int hkv, int t, int nL,
                                             bool is_v, T (*dst)[HD + 8], int64_t* kpos,
                                             int* kok) {
  constexpr int CPR = HD / 8;
  const bool remote = t >= nL;
  const int key0 = (remote ? t - nL : t) * kTcKeys;
  const int nkeys = remote ? p.Tr : p.Tl;
  const T* local = static_cast<const T*>(is_v ? p.v : p.k) +
                   (static_cast<int64_t>(b) * p.Hkv + hkv) * p.Tl * p.d;
  const T* rbase = static_cast<const T*>(p.remote == 2 ? (is_v ? p.rv : p.rk)
                                                        : (is_v ? p.pv : p.pk));
  for (int c = threadIdx.x; c < kTcKeys * CPR; c += kTcThreads) {
    const int row = c / CPR;
    const int col = (c % CPR) * 8;
    const int key = key0 + row;
    T* sp = &dst[row][col];
    bool ok = key < nkeys;
    RowSrc src{ok, nullptr, 0, true};
    const T* single = nullptr;
    if (ok) {
      if (!remote) {
        single = local + static_cast<int64_t>(key) * p.d;
      } else {
        src = remote_row(p, b, hkv, key);
        ok = src.ok;
        if (ok && src.single) single = rbase + src.off;
      }
    }
    if (!ok || col >= p.d) {
      *reinterpret_cast<uint4*>(sp) = make_uint4(0, 0, 0, 0);
    } else if (single != nullptr) {
      cp_async16(sp, single + col);
    } else {
      // Sum over groups in fp32, rounded once to T.
      float acc[8];
#pragma unroll
      for (int i = 0; i < 8; ++i) acc[i] = 0.0f;
      for (int g = 0; g < p.G; ++g) {
        const uint4 raw = *reinterpret_cast<const uint4*>(
            rbase + table_off(p, g, src.cp[g], hkv) + col);
        const uint32_t w[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const float2 f = unpack2<T>(w[i]);
          acc[2 * i] += f.x;
          acc[2 * i + 1] += f.y;
        }
      }
      uint4 o;
      o.x = pack2<T>(acc[0], acc[1]);
      o.y = pack2<T>(acc[2], acc[3]);
      o.z = pack2<T>(acc[4], acc[5]);
      o.w = pack2<T>(acc[6], acc[7]);
      *reinterpret_cast<uint4*>(sp) = o;
    }
    if (!is_v && col == 0) {
      kok[row] = ok ? 1 : 0;
      kpos[row] = (ok && p.causal) ? (remote ? p.r_pos[key] : p.kv_pos[key]) : 0;
    }
  }
}

template <typename T, int HD>
__global__ void __launch_bounds__(kTcThreads) attn_tc_kernel(const AttnParams p) {
  static_assert(HD % 16 == 0 && HD <= 128, "HD must be a multiple of 16, at most 128");
  constexpr int KC = HD / 16;  // k16 steps over the head dim (Q K^T), d16 pairs (P V)
  constexpr int ND = HD / 8;   // n8 tiles of the output
  __shared__ __align__(16) TcSmem<T, HD> sm;

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int gq = lane >> 2, tq = lane & 3;  // fragment row / column-pair index
  const int b = blockIdx.z, h = blockIdx.y;
  const int hkv = h / (p.H / p.Hkv);
  const int d = p.d;
  const int q0 = blockIdx.x * kTcRows + warp * 16;  // first query row of this warp
  const int64_t bh = static_cast<int64_t>(b) * p.H + h;
  const T* qb = static_cast<const T*>(p.q) + bh * p.Tq * d;

  // Q fragments for the whole head dim, straight from global memory.
  const int qr[2] = {q0 + gq, q0 + gq + 8};
  uint32_t qf[KC][4];
#pragma unroll
  for (int kc = 0; kc < KC; ++kc) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int r = qr[i & 1];
      const int c = kc * 16 + tq * 2 + (i >> 1) * 8;  // even; c < d implies c + 1 < d
      qf[kc][i] = (r < p.Tq && c < d)
                      ? *reinterpret_cast<const uint32_t*>(qb + static_cast<int64_t>(r) * d + c)
                      : 0u;
    }
  }

  // Query positions; the warp's largest (for skipping fully masked tiles).
  int64_t qpos[2];
  int64_t wmax = 0;  // non-causal: a tile is skipped only if it has no valid key
  if (p.causal) {
    int64_t mine = LLONG_MIN;
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      qpos[i] = qr[i] < p.Tq ? p.q_pos[qr[i]] : LLONG_MIN;
      mine = qpos[i] > mine ? qpos[i] : mine;
    }
    wmax = warp_max_i64(mine);
  } else {
    qpos[0] = qpos[1] = 0;
  }

  float o[ND][4];
#pragma unroll
  for (int n = 0; n < ND; ++n)
#pragma unroll
    for (int e = 0; e < 4; ++e) o[n][e] = 0.0f;
  float m[2] = {-INFINITY, -INFINITY};  // running max (log2 domain), per row gq / gq+8
  float l[2] = {0.0f, 0.0f};            // this thread's part of the running sum

  const int nL = static_cast<int>(ceil_div(p.Tl, kTcKeys));
  const int nT = nL + (p.remote ? static_cast<int>(ceil_div(p.Tr, kTcKeys)) : 0);

  if (nT > 0) tc_load_tile<T, HD>(p, b, hkv, 0, nL, false, sm.k, sm.kpos, sm.kok);
  cp_async_commit();
  for (int t = 0; t < nT; ++t) {
    cp_async_wait<0>();
    __syncthreads();  // K tile t is in; every warp is done with V tile t-1
    tc_load_tile<T, HD>(p, b, hkv, t, nL, true, sm.v, nullptr, nullptr);
    cp_async_commit();

    // Skip the tile (warp-uniformly) when no key in it is visible to any row
    // of this warp: processing it would change nothing.
    int64_t kmin = LLONG_MAX;
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int j = lane + 32 * i;
      if (sm.kok[j]) {
        const int64_t kp = p.causal ? sm.kpos[j] : LLONG_MIN;
        kmin = kp < kmin ? kp : kmin;
      }
    }
    const bool skip = warp_min_i64(kmin) > wmax;

    // s[n][e]: row gq + 8*(e/2), key 8n + 2tq + (e%2) of this tile.
    float s[kTcKeys / 8][4];
    if (!skip) {
#pragma unroll
      for (int n = 0; n < kTcKeys / 8; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) s[n][e] = 0.0f;
#pragma unroll
      for (int kc = 0; kc < KC; ++kc) {
#pragma unroll
        for (int np = 0; np < kTcKeys / 16; ++np) {
          // matrices: (keys 0-7, dims 0-7), (keys 0-7, dims 8-15), (keys 8-15, dims 0-7), (keys 8-15, dims 8-15)
          uint32_t kb[4];
          ldmatrix_x4(kb, &sm.k[np * 16 + (lane >> 4) * 8 + (lane & 7)]
                               [kc * 16 + ((lane >> 3) & 1) * 8]);
          mma_16816<T>(s[2 * np], qf[kc], kb[0], kb[1]);
          mma_16816<T>(s[2 * np + 1], qf[kc], kb[2], kb[3]);
        }
      }
      // Scale, mask, and update the online softmax.
#pragma unroll
      for (int n = 0; n < kTcKeys / 8; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int j = n * 8 + tq * 2 + (e & 1);
          const bool vis = sm.kok[j] && (!p.causal || sm.kpos[j] <= qpos[e >> 1]);
          s[n][e] = vis ? s[n][e] * p.scale_log2 : -INFINITY;
        }
#pragma unroll
      for (int ri = 0; ri < 2; ++ri) {
        float mx = -INFINITY;
#pragma unroll
        for (int n = 0; n < kTcKeys / 8; ++n)
          mx = fmaxf(mx, fmaxf(s[n][2 * ri], s[n][2 * ri + 1]));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));  // the quad shares the row
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
        const float m_new = fmaxf(m[ri], mx);
        const float base = m_new == -INFINITY ? 0.0f : m_new;  // all masked so far: no NaN
        const float alpha = exp2f(m[ri] - base);
        m[ri] = m_new;
        float sum = 0.0f;
#pragma unroll
        for (int n = 0; n < kTcKeys / 8; ++n) {
          s[n][2 * ri] = exp2f(s[n][2 * ri] - base);
          s[n][2 * ri + 1] = exp2f(s[n][2 * ri + 1] - base);
          sum += s[n][2 * ri] + s[n][2 * ri + 1];
        }
        l[ri] = l[ri] * alpha + sum;
#pragma unroll
        for (int n = 0; n < ND; ++n) {
          o[n][2 * ri] *= alpha;
          o[n][2 * ri + 1] *= alpha;
        }
      }
    }

    cp_async_wait<0>();
    __syncthreads();  // V tile t is in; every warp is done with K tile t (and kpos/kok)
    if (t + 1 < nT) tc_load_tile<T, HD>(p, b, hkv, t + 1, nL, false, sm.k, sm.kpos, sm.kok);
    cp_async_commit();

    if (!skip) {
#pragma unroll
      for (int kc = 0; kc < kTcKeys / 16; ++kc) {
        // P as the A operand: accumulator tiles 2kc and 2kc+1 are keys 16kc .. 16kc+15.
        const uint32_t a[4] = {pack2<T>(s[2 * kc][0], s[2 * kc][1]),
                               pack2<T>(s[2 * kc][2], s[2 * kc][3]),
                               pack2<T>(s[2 * kc + 1][0], s[2 * kc + 1][1]),
                               pack2<T>(s[2 * kc + 1][2], s[2 * kc + 1][3])};
#pragma unroll
        for (int dp = 0; dp < KC; ++dp) {
          // transposed matrices: (keys 0-7, dims 0-7), (keys 8-15, dims 0-7), (keys 0-7, dims 8-15), (keys 8-15, dims 8-15)
          uint32_t vb[4];
          ldmatrix_x4_trans(vb, &sm.v[kc * 16 + ((lane >> 3) & 1) * 8 + (lane & 7)]
                                     [dp * 16 + (lane >> 4) * 8]);
          mma_16816<T>(o[2 * dp], a, vb[0], vb[1]);
          mma_16816<T>(o[2 * dp + 1], a, vb[2], vb[3]);
        }
      }
    }
  }

  // Normalize and store: o[n][e] is (row qr[e/2], dim 8n + 2tq + e%2).
  T* ob = static_cast<T*>(p.out) + bh * p.Tq * d;
#pragma unroll
  for (int ri = 0; ri < 2; ++ri) {
    float lt = l[ri];
    lt += __shfl_xor_sync(0xffffffffu, lt, 1);
    lt += __shfl_xor_sync(0xffffffffu, lt, 2);
    const int r = qr[ri];
    if (r < p.Tq) {
      // l = 0 exactly: the row saw no key; a NaN sum (NaN inputs): NaN out and lse
      const float inv = lt == 0.0f ? 0.0f : 1.0f / lt;
#pragma unroll
      for (int n = 0; n < ND; ++n) {
        const int c = n * 8 + tq * 2;
        if (c < d)
          *reinterpret_cast<uint32_t*>(ob + static_cast<int64_t>(r) * d + c) =
              pack2<T>(o[n][2 * ri] * inv, o[n][2 * ri + 1] * inv);
      }
      if (tq == 0) p.lse[bh * p.Tq + r] = lt == 0.0f ? -INFINITY : (m[ri] + log2f(lt)) * kLn2;
    }
  }
}

// ---------------------------------------------------------------------------
// Generic CUDA-core kernel
// ---------------------------------------------------------------------------
constexpr int kGenWarps = 4;
constexpr int kGenRowsPerWarp = 4;
constexpr int kGenRows = kGenWarps * kGenRowsPerWarp;  // 16 queries per block
constexpr int kGenKeys = 32;                           // keys per tile: one per lane
constexpr int kGenMaxPerLane = 8;                      // d <= 256
constexpr int kGenMaxD = 32 * kGenMaxPerLane;

__host__ __device__ __forceinline__ int gen_ldk(int d) { return d | 1; }  // odd stride: lane j reads row j conflict-free

inline size_t gen_smem_bytes(int d) {
  // Qs [16][d] + Ks [32][ldk] + Vs [32][d] floats (an even count), kpos [32], kok [32]
  const size_t floats = static_cast<size_t>(kGenRows) * d + static_cast<size_t>(kGenKeys) * gen_ldk(d) +
                        static_cast<size_t>(kGenKeys) * d;
  return floats * sizeof(float) + kGenKeys * sizeof(int64_t) + kGenKeys * sizeof(int);
}

template <typename T>
__global__ void __launch_bounds__(kGenWarps * 32) attn_generic_kernel(const AttnParams p) {
  extern __shared__ __align__(16) unsigned char gen_smem[];
  const int d = p.d, ldk = gen_ldk(d);
  float* Qs = reinterpret_cast<float*>(gen_smem);  // pre-scaled by scale * log2(e)
  float* Ks = Qs + kGenRows * d;
  float* Vs = Ks + kGenKeys * ldk;
  int64_t* kpos = reinterpret_cast<int64_t*>(Vs + kGenKeys * d);  // 8-byte aligned: even float count
  int* kok = reinterpret_cast<int*>(kpos + kGenKeys);

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int b = blockIdx.z, h = blockIdx.y;
  const int hkv = h / (p.H / p.Hkv);
  const int qblk = blockIdx.x * kGenRows;
  const int64_t bh = static_cast<int64_t>(b) * p.H + h;
  const T* qb = static_cast<const T*>(p.q) + bh * p.Tq * d;

  for (int i = tid; i < kGenRows * d; i += kGenWarps * 32) {
    const int r = i / d, c = i - (i / d) * d;
    const int row = qblk + r;
    Qs[i] = row < p.Tq ? to_float(qb[static_cast<int64_t>(row) * d + c]) * p.scale_log2 : 0.0f;
  }

  int64_t qpos[kGenRowsPerWarp];
#pragma unroll
  for (int r = 0; r < kGenRowsPerWarp; ++r) {
    const int row = qblk + warp * kGenRowsPerWarp + r;
    qpos[r] = (p.causal && row < p.Tq) ? p.q_pos[row] : 0;
  }
  float o[kGenRowsPerWarp][kGenMaxPerLane];
  float m[kGenRowsPerWarp], l[kGenRowsPerWarp];  // l: this lane's part of the sum
#pragma unroll
  for (int r = 0; r < kGenRowsPerWarp; ++r) {
    m[r] = -INFINITY;
    l[r] = 0.0f;
#pragma unroll
    for (int e = 0; e < kGenMaxPerLane; ++e) o[r][e] = 0.0f;
  }

  const T* kl = static_cast<const T*>(p.k) + (static_cast<int64_t>(b) * p.Hkv + hkv) * p.Tl * d;
  const T* vl = static_cast<const T*>(p.v) + (static_cast<int64_t>(b) * p.Hkv + hkv) * p.Tl * d;
  const T* rkb = static_cast<const T*>(p.remote == 2 ? p.rk : p.pk);
  const T* rvb = static_cast<const T*>(p.remote == 2 ? p.rv : p.pv);
  const int nL = static_cast<int>(ceil_div(p.Tl, kGenKeys));
  const int nT = nL + (p.remote ? static_cast<int>(ceil_div(p.Tr, kGenKeys)) : 0);

  for (int t = 0; t < nT; ++t) {
    __syncthreads();  // Qs written (t = 0); every warp is done with tile t-1
    const bool remote = t >= nL;
    const int key0 = (remote ? t - nL : t) * kGenKeys;
    const int nkeys = remote ? p.Tr : p.Tl;
    for (int row = warp; row < kGenKeys; row += kGenWarps) {
      const int key = key0 + row;
      bool ok = key < nkeys;
      RowSrc src{ok, nullptr, 0, true};
      const T* ks = nullptr;
      const T* vs = nullptr;
      if (ok) {
        if (!remote) {
          ks = kl + static_cast<int64_t>(key) * d;
          vs = vl + static_cast<int64_t>(key) * d;
        } else {
          src = remote_row(p, b, hkv, key);
          ok = src.ok;
          if (ok && src.single) {
            ks = rkb + src.off;
            vs = rvb + src.off;
          }
        }
      }
      for (int c = lane; c < d; c += 32) {
        float kv = 0.0f, vv = 0.0f;
        if (ok) {
          if (ks != nullptr) {
            kv = to_float(ks[c]);
            vv = to_float(vs[c]);
          } else {
            for (int g = 0; g < p.G; ++g) {
              const int64_t off = table_off(p, g, src.cp[g], hkv) + c;
              kv += to_float(rkb[off]);
              vv += to_float(rvb[off]);
            }
            kv = round_to<T>(kv);
            vv = round_to<T>(vv);
          }
        }
        Ks[row * ldk + c] = kv;
        Vs[row * d + c] = vv;
      }
      if (remote && ok && p.rope_R > 0) {
        // k[:R] = k[:R] * cos + rotate_half(k[:R]) * sin; lane pairs (c, c + R/2)
        __syncwarp();  // the row was written by this warp's lanes
        const int hr = p.rope_R / 2;
        const int64_t cs = b * p.rope_bs + static_cast<int64_t>(key) * p.rope_R;
        float* kr = Ks + row * ldk;
        for (int c = lane; c < hr; c += 32) {
          const float x1 = kr[c], x2 = kr[c + hr];
          kr[c] = round_to<T>(x1 * p.rope_cos[cs + c] - x2 * p.rope_sin[cs + c]);
          kr[c + hr] = round_to<T>(x2 * p.rope_cos[cs + c + hr] + x1 * p.rope_sin[cs + c + hr]);
        }
      }
      if (lane == 0) {
        kok[row] = ok ? 1 : 0;
        kpos[row] = (ok && p.causal) ? (remote ? p.r_pos[key] : p.kv_pos[key]) : 0;
      }
    }
    __syncthreads();

    // Lane j scores key j against the warp's rows.
    float s[kGenRowsPerWarp];
#pragma unroll
    for (int r = 0; r < kGenRowsPerWarp; ++r) s[r] = 0.0f;
    const float* kr = Ks + lane * ldk;
    const float* qw = Qs + warp * kGenRowsPerWarp * d;
    for (int c = 0; c < d; ++c) {
      const float kc = kr[c];
#pragma unroll
      for (int r = 0; r < kGenRowsPerWarp; ++r) s[r] = fmaf(qw[r * d + c], kc, s[r]);
    }
    const bool kvalid = kok[lane] != 0;
    const int64_t kp = kpos[lane];
#pragma unroll
    for (int r = 0; r < kGenRowsPerWarp; ++r) {
      const bool vis = kvalid && (!p.causal || kp <= qpos[r]);
      const float sv = vis ? s[r] : -INFINITY;
      const float m_new = fmaxf(m[r], warp_max(sv));
      const float base = m_new == -INFINITY ? 0.0f : m_new;
      const float alpha = exp2f(m[r] - base);
      m[r] = m_new;
      s[r] = exp2f(sv - base);
      l[r] = l[r] * alpha + s[r];
#pragma unroll
      for (int e = 0; e < kGenMaxPerLane; ++e) o[r][e] *= alpha;
    }
    // O += P V: lane owns dims lane + 32e; p_j comes from lane j.
    for (int j = 0; j < kGenKeys; ++j) {
      float pj[kGenRowsPerWarp];
#pragma unroll
      for (int r = 0; r < kGenRowsPerWarp; ++r) pj[r] = __shfl_sync(0xffffffffu, s[r], j);
      const float* vr = Vs + j * d;
#pragma unroll
      for (int e = 0; e < kGenMaxPerLane; ++e) {
        const int c = lane + 32 * e;
        if (c < d) {
          const float vv = vr[c];
#pragma unroll
          for (int r = 0; r < kGenRowsPerWarp; ++r) o[r][e] = fmaf(pj[r], vv, o[r][e]);
        }
      }
    }
  }

  T* ob = static_cast<T*>(p.out) + bh * p.Tq * d;
#pragma unroll
  for (int r = 0; r < kGenRowsPerWarp; ++r) {
    const float lt = warp_sum(l[r]);
    const int row = qblk + warp * kGenRowsPerWarp + r;
    if (row < p.Tq) {
      const float inv = lt == 0.0f ? 0.0f : 1.0f / lt;  // as the tensor-core kernel
#pragma unroll
      for (int e = 0; e < kGenMaxPerLane; ++e) {
        const int c = lane + 32 * e;
        if (c < d) ob[static_cast<int64_t>(row) * d + c] = from_float<T>(o[r][e] * inv);
      }
      if (lane == 0) p.lse[bh * p.Tq + row] = lt == 0.0f ? -INFINITY : (m[r] + log2f(lt)) * kLn2;
    }
  }
}

// ---------------------------------------------------------------------------
// merge_attention: one thread per output element (rows x max(d, 1), so d = 0
// still writes lse).
// ---------------------------------------------------------------------------
template <typename T>
__global__ void merge_attention_kernel(const T* __restrict__ oa, const float* __restrict__ la,
                                       const T* __restrict__ ob, const float* __restrict__ lb,
                                       T* __restrict__ out, float* __restrict__ lse,
                                       int64_t rows, int64_t d) {
  const int64_t dd = d > 0 ? d : 1;
  const int64_t n = rows * dd;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = i / dd;
    const int64_t c = i - r * dd;
    const float a = la[r], bb = lb[r];
    // a NaN lse on either side: NaN out and lse (fmaxf would drop it)
    const float mx = (isnan(a) || isnan(bb)) ? a + bb : fmaxf(a, bb);
    if (mx == -INFINITY) {
      if (c < d) out[r * d + c] = from_float<T>(0.0f);
      if (c == 0) lse[r] = -INFINITY;
      continue;
    }
    const float wa = expf(a - mx), wb = expf(bb - mx);  // the larger one is 1
    if (c < d) {
      const int64_t e = r * d + c;
      out[e] = from_float<T>((wa * to_float(oa[e]) + wb * to_float(ob[e])) / (wa + wb));
    }
    if (c == 0) lse[r] = mx + log1pf(fminf(wa, wb));
  }
}

// ---------------------------------------------------------------------------
// Host
// ---------------------------------------------------------------------------
void check_same(const at::Tensor& t, const at::Tensor& q, const char* name) {
  check_cuda_tensor(t, name);
  TORCH_CHECK(t.device() == q.device(), "mixed_attention: ", name, " is on another device");
  TORCH_CHECK(t.scalar_type() == q.scalar_type(), "mixed_attention: ", name,
              " must have q's dtype");
}

const int64_t* positions(const c10::optional<at::Tensor>& t, int64_t n, const at::Tensor& q,
                         const char* name) {
  TORCH_CHECK(t.has_value(), "mixed_attention: causal needs ", name);
  check_cuda_tensor(*t, name);
  TORCH_CHECK(t->device() == q.device(), "mixed_attention: ", name, " is on another device");
  TORCH_CHECK(t->scalar_type() == at::kLong && t->dim() == 1 && t->size(0) == n,
              "mixed_attention: ", name, " must be int64 [", n, "]");
  return t->data_ptr<int64_t>();
}

template <typename T, int HD>
void launch_tc(const AttnParams& p, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(ceil_div(p.Tq, kTcRows)), p.H, p.B);
  attn_tc_kernel<T, HD><<<grid, kTcThreads, 0, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void launch_generic(const AttnParams& p, cudaStream_t stream) {
  const size_t smem = gen_smem_bytes(p.d);
  if (smem > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(attn_generic_kernel<T>,
                                        cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(smem)));
  }
  const dim3 grid(static_cast<unsigned>(ceil_div(p.Tq, kGenRows)), p.H, p.B);
  attn_generic_kernel<T><<<grid, kGenWarps * 32, smem, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor> mixed_attention_cuda(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const c10::optional<at::Tensor>& codes, const c10::optional<at::Tensor>& pk,
    const c10::optional<at::Tensor>& pv, const c10::optional<at::Tensor>& remote_k,
    const c10::optional<at::Tensor>& remote_v, bool causal,
    const c10::optional<at::Tensor>& q_pos, const c10::optional<at::Tensor>& kv_pos,
    const c10::optional<at::Tensor>& remote_pos, c10::optional<double> scale,
    const c10::optional<at::Tensor>& rope_cos, const c10::optional<at::Tensor>& rope_sin) {
  check_cuda_tensor(q, "q");
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kHalf ||
                  q.scalar_type() == at::kBFloat16,
              "mixed_attention: q must be float32, float16 or bfloat16");
  check_same(k, q, "k");
  check_same(v, q, "v");
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4, "mixed_attention: q, k, v must be 4-D");
  const int64_t B = q.size(0), H = q.size(1), Tq = q.size(2), d = q.size(3);
  const int64_t Hkv = k.size(1), Tl = k.size(2);
  TORCH_CHECK(k.size(0) == B && k.size(3) == d && v.sizes() == k.sizes(),
              "mixed_attention: k, v must be [B, Hkv, Tl, d] like q");
  TORCH_CHECK(Hkv >= 1 && H % Hkv == 0, "mixed_attention: H must be a multiple of Hkv");
  TORCH_CHECK(d >= 1 && d <= kGenMaxD, "mixed_attention (CUDA): head dim ", d,
              " is not supported (1..", kGenMaxD, ")");
  TORCH_CHECK(B <= 65535 && H <= 65535, "mixed_attention: B and H must be <= 65535");
  TORCH_CHECK(Tq < INT32_MAX && Tl < INT32_MAX, "mixed_attention: sequence too long");

  AttnParams p{};
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.B = static_cast<int>(B);
  p.H = static_cast<int>(H);
  p.Hkv = static_cast<int>(Hkv);
  p.Tq = static_cast<int>(Tq);
  p.Tl = static_cast<int>(Tl);
  p.d = static_cast<int>(d);
  p.G = 1;
  p.K = 1;
  int64_t Tr = 0;
  bool aligned = aligned16(q.data_ptr()) && aligned16(k.data_ptr()) && aligned16(v.data_ptr());
  if (codes.has_value()) {
    TORCH_CHECK(pk.has_value() && pv.has_value(), "mixed_attention: codes need pk and pv");
    TORCH_CHECK(!remote_k.has_value() && !remote_v.has_value(),
                "mixed_attention: codes and remote_k/remote_v are exclusive");
    check_cuda_tensor(*codes, "codes");
    TORCH_CHECK(codes->device() == q.device(), "mixed_attention: codes is on another device");
    TORCH_CHECK(codes->scalar_type() == at::kInt && codes->dim() == 3 && codes->size(0) == B,
                "mixed_attention: codes must be int32 [B, Tr, G]");
    check_same(*pk, q, "pk");
    check_same(*pv, q, "pv");
    const int64_t G = codes->size(2);
    TORCH_CHECK(pk->dim() == 4 && pk->size(0) == G && pk->size(2) == Hkv && pk->size(3) == d &&
                    pv->sizes() == pk->sizes(),
                "mixed_attention: pk, pv must be [G, K, Hkv, d]");
    TORCH_CHECK(G >= 1 && pk->size(1) >= 1 && pk->size(1) < INT32_MAX,
                "mixed_attention: bad codebook size");
    Tr = codes->size(1);
    p.codes = codes->data_ptr<int32_t>();
    p.pk = pk->data_ptr();
    p.pv = pv->data_ptr();
    p.G = static_cast<int>(G);
    p.K = static_cast<int>(pk->size(1));
    p.remote = Tr > 0 ? 1 : 0;
    aligned = aligned && aligned16(p.pk) && aligned16(p.pv);
  } else if (remote_k.has_value() || remote_v.has_value()) {
    TORCH_CHECK(remote_k.has_value() && remote_v.has_value() && !pk.has_value() &&
                    !pv.has_value(),
                "mixed_attention: remote_k and remote_v go together, without pk/pv");
    check_same(*remote_k, q, "remote_k");
    check_same(*remote_v, q, "remote_v");
    TORCH_CHECK(remote_k->dim() == 4 && remote_k->size(0) == B && remote_k->size(1) == Hkv &&
                    remote_k->size(3) == d && remote_v->sizes() == remote_k->sizes(),
                "mixed_attention: remote_k, remote_v must be [B, Hkv, Tr, d]");
    Tr = remote_k->size(2);
    p.rk = remote_k->data_ptr();
    p.rv = remote_v->data_ptr();
    p.remote = Tr > 0 ? 2 : 0;
    aligned = aligned && aligned16(p.rk) && aligned16(p.rv);
  } else {
    TORCH_CHECK(!pk.has_value() && !pv.has_value(), "mixed_attention: pk/pv without codes");
  }
  TORCH_CHECK(Tr < INT32_MAX, "mixed_attention: too many remote tokens");
  // RoPE on remote keys (generic kernel only)
  const bool rope = Tr > 0 && rope_cos.has_value() && rope_cos->defined();
  TORCH_CHECK(rope || Tr == 0 || !(rope_sin.has_value() && rope_sin->defined()),
              "mixed_attention: rope_sin needs rope_cos");
  if (rope) {
    TORCH_CHECK(rope_sin.has_value() && rope_sin->defined(),
                "mixed_attention: rope_cos needs rope_sin");
    check_cuda_tensor(*rope_cos, "rope_cos");
    check_cuda_tensor(*rope_sin, "rope_sin");
    TORCH_CHECK(rope_cos->device() == q.device() && rope_sin->device() == q.device(),
                "mixed_attention: rope_cos/rope_sin are on another device");
    TORCH_CHECK(rope_cos->scalar_type() == at::kFloat && rope_sin->scalar_type() == at::kFloat &&
                    rope_cos->dim() == 3 && rope_sin->sizes() == rope_cos->sizes() &&
                    rope_cos->is_contiguous() && rope_sin->is_contiguous(),
                "mixed_attention: rope_cos, rope_sin must be contiguous float32 of one shape");
    const int64_t R = rope_cos->size(2);
    TORCH_CHECK((rope_cos->size(0) == B || rope_cos->size(0) == 1) && rope_cos->size(1) == Tr &&
                    R % 2 == 0 && R >= 2 && R <= d,
                "mixed_attention: rope_cos must be [B or 1, Tr, R], R even in [2, d]");
    p.rope_cos = rope_cos->data_ptr<float>();
    p.rope_sin = rope_sin->data_ptr<float>();
    p.rope_R = static_cast<int>(R);
    p.rope_bs = rope_cos->size(0) == 1 ? 0 : Tr * R;
  }
  p.Tr = static_cast<int>(Tr);
  p.causal = causal ? 1 : 0;
  if (causal) {
    p.q_pos = positions(q_pos, Tq, q, "q_pos");
    p.kv_pos = positions(kv_pos, Tl, q, "kv_pos");
    if (Tr > 0) p.r_pos = positions(remote_pos, Tr, q, "remote_pos");
  }
  const double sc = scale.has_value() ? *scale : 1.0 / std::sqrt(static_cast<double>(d));
  p.scale_log2 = static_cast<float>(sc * 1.4426950408889634);

  const c10::cuda::CUDAGuard guard(q.device());
  at::Tensor out = at::empty_like(q, at::MemoryFormat::Contiguous);
  at::Tensor lse = at::empty({B, H, Tq}, q.options().dtype(at::kFloat));
  if (B * H * Tq == 0) return {out, lse};
  if (Tl + Tr == 0) {  // no keys at all
    out.zero_();
    lse.fill_(-INFINITY);
    return {out, lse};
  }
  p.out = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  cudaStream_t stream = current_stream();

  const bool tc = q.scalar_type() != at::kFloat && d % 8 == 0 && d <= 128 && aligned &&
                  p.rope_R == 0 && device_is_sm80_plus();
  dispatch_float_types(q.scalar_type(), "mixed_attention", [&](auto tag) {
    using T = decltype(tag);
    if constexpr (std::is_same<T, float>::value) {
      launch_generic<T>(p, stream);
    } else {
      if (!tc) launch_generic<T>(p, stream);
      else if (d <= 32) launch_tc<T, 32>(p, stream);
      else if (d <= 64) launch_tc<T, 64>(p, stream);
      else if (d <= 80) launch_tc<T, 80>(p, stream);
      else launch_tc<T, 128>(p, stream);
    }
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor> merge_attention_cuda(const at::Tensor& out_a,
                                                        const at::Tensor& lse_a,
                                                        const at::Tensor& out_b,
                                                        const at::Tensor& lse_b) {
  check_cuda_tensor(out_a, "out_a");
  check_cuda_tensor(out_b, "out_b");
  check_cuda_tensor(lse_a, "lse_a");
  check_cuda_tensor(lse_b, "lse_b");
  TORCH_CHECK(out_a.dim() >= 1, "merge_attention: out_a must be [..., d]");
  TORCH_CHECK(out_b.sizes() == out_a.sizes() && out_b.scalar_type() == out_a.scalar_type(),
              "merge_attention: out_a and out_b must match");
  TORCH_CHECK(lse_a.scalar_type() == at::kFloat && lse_b.scalar_type() == at::kFloat,
              "merge_attention: lse must be float32");
  TORCH_CHECK(lse_a.sizes() == out_a.sizes().slice(0, out_a.dim() - 1) &&
                  lse_b.sizes() == lse_a.sizes(),
              "merge_attention: lse must be out's shape without the last dim");
  TORCH_CHECK(out_b.device() == out_a.device() && lse_a.device() == out_a.device() &&
                  lse_b.device() == out_a.device(),
              "merge_attention: tensors on different devices");
  const c10::cuda::CUDAGuard guard(out_a.device());
  at::Tensor out = at::empty_like(out_a, at::MemoryFormat::Contiguous);
  at::Tensor lse = at::empty_like(lse_a, at::MemoryFormat::Contiguous);
  const int64_t rows = lse_a.numel();
  const int64_t d = out_a.size(-1);
  if (rows == 0) return {out, lse};
  const int64_t n = rows * std::max<int64_t>(d, 1);
  const unsigned blocks = static_cast<unsigned>(std::min<int64_t>(ceil_div(n, 256), 65536));
  cudaStream_t stream = current_stream();
  dispatch_float_types(out_a.scalar_type(), "merge_attention", [&](auto tag) {
    using T = decltype(tag);
    merge_attention_kernel<T><<<blocks, 256, 0, stream>>>(
        reinterpret_cast<const T*>(out_a.data_ptr()), lse_a.data_ptr<float>(),
        reinterpret_cast<const T*>(out_b.data_ptr()), lse_b.data_ptr<float>(),
        reinterpret_cast<T*>(out.data_ptr()), lse.data_ptr<float>(), rows, d);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {out, lse};
}

}  // namespace
}  // namespace cuda
}  // namespace astra

TORCH_LIBRARY_IMPL(astra_C, CUDA, m) {
  m.impl("mixed_attention", &astra::cuda::mixed_attention_cuda);
  m.impl("merge_attention", &astra::cuda::merge_attention_cuda);
}
