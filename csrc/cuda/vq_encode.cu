// vq_encode on CUDA: nearest codeword per (row, group) in squared L2.
//
// argmin_k ||x - c_k||^2 = argmin_k (||c_k||^2 - 2 x.c_k): the codeword norms are
// computed once, then each block takes a tile of rows of one group and sweeps
// all codewords in tiles, accumulating the dot products like a GEMM and keeping
// a running (min, argmin) per row in registers. The M x K distance matrix never
// exists. Ties go to the lowest index: each thread visits its codes in
// increasing order with a strict `<`, and the cross-thread reductions break
// ties by index. A row group holding a NaN or an infinity has no finite distance
// (NaN never wins, -inf may): code -1, and its row's error NaN, as the reference.
//
// precision="fp32": fp32 FMA on CUDA cores (no TF32).
// precision="bf16": operands rounded to bf16 (as the reference does), products
//   on tensor cores (mma.sync m16n8k16, exact in fp32) with fp32 accumulation.
//   The codebook is converted once into a zero-padded [G, K, dgp] bf16 copy
//   (dgp = dg rounded up to 32); x is used in place when it is already bf16
//   with dg % 32 == 0, otherwise converted into the same padded layout, so the
//   main loop only does aligned 16-byte cp.async copies.
#include "common.cuh"

namespace astra {
namespace cuda {
namespace {

// ---------------------------------------------------------------------------
// Preparation and error kernels
// ---------------------------------------------------------------------------

// cn[w] = sum_i c[w][i]^2 (c rounded to bf16 first if asked), one warp per codeword.
__global__ void codebook_norms_kernel(const float* __restrict__ cb, float* __restrict__ cn,
                                      int64_t GK, int dg, bool round_bf16) {
  const int64_t w = static_cast<int64_t>(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x & 31;
  if (w >= GK) return;  // whole warp leaves together
  double s = 0.0;
  for (int i = lane; i < dg; i += 32) {
    float v = cb[w * dg + i];
    if (round_bf16) v = round_to<__nv_bfloat16>(v);
    s += static_cast<double>(v) * v;
  }
  s = warp_sum(s);
  if (lane == 0) cn[w] = static_cast<float>(s);
}

// cbp[w][i] = bf16(cb[w][i]) for i < dg, 0 for dg <= i < dgp.
__global__ void codebook_to_bf16_kernel(const float* __restrict__ cb,
                                        __nv_bfloat16* __restrict__ cbp, int64_t GK, int dg,
                                        int dgp) {
  const int64_t n = GK * dgp;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t w = i / dgp;
    const int c = static_cast<int>(i - w * dgp);
    cbp[i] = __float2bfloat16_rn(c < dg ? cb[w * dg + c] : 0.0f);
  }
}

// x viewed as [M*G, dg] -> xb [M*G, dgp] bf16, zero-padded.
template <typename T>
__global__ void x_to_bf16_kernel(const T* __restrict__ x, __nv_bfloat16* __restrict__ xb,
                                 int64_t MG, int dg, int dgp) {
  const int64_t n = MG * dgp;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = i / dgp;
    const int c = static_cast<int>(i - r * dgp);
    xb[i] = __float2bfloat16_rn(c < dg ? to_float(x[r * dg + c]) : 0.0f);
  }
}

// err[m] = sum_g ||x[m, g] - cb[g, codes[m, g]]||^2, one warp per row, fp64 sum.
template <typename T>
__global__ void vq_error_kernel(const T* __restrict__ x, const float* __restrict__ cb,
                                const int32_t* __restrict__ codes, float* __restrict__ err,
                                int64_t M, int G, int K, int dg, bool round_bf16) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x & 31;
  if (row >= M) return;
  const int64_t D = static_cast<int64_t>(G) * dg;
  double s = 0.0;
  for (int64_t i = lane; i < D; i += 32) {
    const int g = static_cast<int>(i / dg);
    const int c = static_cast<int>(i - static_cast<int64_t>(g) * dg);
    int code = codes[row * G + g];
    if (code < 0) {  // -1: NaN / inf in x, no codeword; the row's error is NaN
      s = nan("");
      continue;
    }
    code = min(code, K - 1);
    float xv = to_float(x[row * D + i]);
    float cv = cb[(static_cast<int64_t>(g) * K + code) * dg + c];
    if (round_bf16) {
      xv = round_to<__nv_bfloat16>(xv);
      cv = round_to<__nv_bfloat16>(cv);
    }
    const double diff = static_cast<double>(xv) - static_cast<double>(cv);
    s += diff * diff;
  }
  s = warp_sum(s);
  if (lane == 0) err[row] = static_cast<float>(s);
}

// (d, i) beats (bd, bi): smaller distance, or equal distance and lower index.
__device__ __forceinline__ void take_better(float& bd, int& bi, float d, int i) {
  if (d < bd || (d == bd && i < bi)) {
    bd = d;
    bi = i;
  }
}

// ---------------------------------------------------------------------------
// fp32 path: CUDA-core FMA, 128 rows x 128 codes per block, 8 x 8 per thread.
// ---------------------------------------------------------------------------
constexpr int kF32Rows = 128, kF32Codes = 128, kF32K = 8, kF32Threads = 256;

// Block (blockIdx.x, g): rows [128*blockIdx.x, +128) of group g. Thread (ty, tx)
// (16 x 16) owns rows {4ty..4ty+3, 64+4ty..64+4ty+3} and, within each code tile,
// codes {4tx..4tx+3, 64+4tx..64+4tx+3}. round_bf16 rounds both operands to bf16
// (the bf16 precision on GPUs without bf16 tensor cores).
template <typename T>
__global__ void __launch_bounds__(kF32Threads)
    vq_f32_kernel(const T* __restrict__ x, const float* __restrict__ cb,
                  const float* __restrict__ cn, int32_t* __restrict__ codes, int64_t M, int G,
                  int K, int dg, bool round_bf16) {
  __shared__ __align__(16) float As[kF32K][kF32Rows + 4];   // [k][row]
  __shared__ __align__(16) float Bs[kF32K][kF32Codes + 4];  // [k][code]

  const int tid = threadIdx.x;
  const int tx = tid & 15, ty = tid >> 4;
  const int g = blockIdx.y;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * kF32Rows;
  const int64_t D = static_cast<int64_t>(G) * dg;
  const T* xg = x + static_cast<int64_t>(g) * dg;             // row m at xg + m * D
  const float* cbg = cb + static_cast<int64_t>(g) * K * dg;   // code c at cbg + c * dg
  const float* cng = cn + static_cast<int64_t>(g) * K;

  float best[8];
  int bidx[8];
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    best[i] = INFINITY;
    bidx[i] = INT_MAX;
  }

  const int nk = static_cast<int>(ceil_div(dg, kF32K));
  for (int n0 = 0; n0 < K; n0 += kF32Codes) {
    float acc[8][8];
#pragma unroll
    for (int i = 0; i < 8; ++i)
#pragma unroll
      for (int j = 0; j < 8; ++j) acc[i][j] = 0.0f;

    for (int kc = 0; kc < nk; ++kc) {
      // Stage x[rows, k-chunk] and cb[codes, k-chunk] transposed: element
      // e = tid + 256*i is (row or code e / 8, k e % 8).
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int e = tid + kF32Threads * i;
        const int r = e >> 3, kk = e & 7;
        const int k = kc * kF32K + kk;
        const int64_t m = m0 + r;
        float xv = 0.0f, cv = 0.0f;
        if (m < M && k < dg) xv = to_float(xg[m * D + k]);
        if (n0 + r < K && k < dg) cv = cbg[static_cast<int64_t>(n0 + r) * dg + k];
        if (round_bf16) {
          xv = round_to<__nv_bfloat16>(xv);
          cv = round_to<__nv_bfloat16>(cv);
        }
        As[kk][r] = xv;
        Bs[kk][r] = cv;
      }
      __syncthreads();
#pragma unroll
      for (int k = 0; k < kF32K; ++k) {
        const float4 a0 = *reinterpret_cast<const float4*>(&As[k][4 * ty]);
        const float4 a1 = *reinterpret_cast<const float4*>(&As[k][64 + 4 * ty]);
        const float4 b0 = *reinterpret_cast<const float4*>(&Bs[k][4 * tx]);
        const float4 b1 = *reinterpret_cast<const float4*>(&Bs[k][64 + 4 * tx]);
        const float a[8] = {a0.x, a0.y, a0.z, a0.w, a1.x, a1.y, a1.z, a1.w};
        const float b[8] = {b0.x, b0.y, b0.z, b0.w, b1.x, b1.y, b1.z, b1.w};
#pragma unroll
        for (int i = 0; i < 8; ++i)
#pragma unroll
          for (int j = 0; j < 8; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
      }
      __syncthreads();
    }

    // Distances of this code tile; j ascending visits codes in increasing order.
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const int code = n0 + (j < 4 ? 4 * tx + j : 64 + 4 * tx + (j - 4));
      if (code < K) {
        const float c2 = cng[code];
#pragma unroll
        for (int i = 0; i < 8; ++i) {
          const float dist = c2 - 2.0f * acc[i][j];
          if (dist < best[i]) {
            best[i] = dist;
            bidx[i] = code;
          }
        }
      }
    }
  }

  // Reduce over the 16 threads (tx) that share each row: lanes differing in bits 0..3.
#pragma unroll
  for (int i = 0; i < 8; ++i) {
#pragma unroll
    for (int o = 8; o > 0; o >>= 1) {
      const float od = __shfl_xor_sync(0xffffffffu, best[i], o);
      const int oi = __shfl_xor_sync(0xffffffffu, bidx[i], o);
      take_better(best[i], bidx[i], od, oi);
    }
    if (tx == 0) {
      const int64_t m = m0 + (i < 4 ? 4 * ty + i : 64 + 4 * ty + (i - 4));
      // no finite distance (NaN / inf in x): no nearest codeword, -1
      if (m < M) codes[m * G + g] = bidx[i] == INT_MAX || !isfinite(best[i]) ? -1 : bidx[i];
    }
  }
}

// ---------------------------------------------------------------------------
// bf16 path: tensor cores. 128 rows x 128 codes x 32 dims per pipeline step,
// 8 warps as 4 (rows) x 2 (codes), each warp 32 rows x 64 codes (2 x 8 mma
// tiles of 16 x 8). Two shared-memory stages filled by cp.async.
// ---------------------------------------------------------------------------
constexpr int kBfRows = 128, kBfCodes = 128, kBfK = 32, kBfThreads = 256;
constexpr int kBfLds = kBfK + 8;  // smem row stride (bf16): 80 bytes, conflict-free ldmatrix

// A: bf16 rows, row m of group g at A + m * lda + g * a_goff, dgp valid columns
// (dgp % 32 == 0, rows 16-byte aligned). Bp: [G, K, dgp] bf16. cn: [G, K].
__global__ void __launch_bounds__(kBfThreads)
    vq_bf16_mma_kernel(const __nv_bfloat16* __restrict__ A, int64_t lda, int64_t a_goff,
                       const __nv_bfloat16* __restrict__ Bp, const float* __restrict__ cn,
                       int32_t* __restrict__ codes, int64_t M, int G, int K, int dgp) {
  __shared__ __align__(16) __nv_bfloat16 As[2][kBfRows][kBfLds];
  __shared__ __align__(16) __nv_bfloat16 Bs[2][kBfCodes][kBfLds];
  __shared__ float red_d[kBfRows][2];
  __shared__ int red_i[kBfRows][2];

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wm = warp >> 1, wn = warp & 1;  // warp's rows: 32*wm.., codes: 64*wn..
  const int gq = lane >> 2, tq = lane & 3;  // mma fragment coordinates
  const int g = blockIdx.y;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * kBfRows;
  const __nv_bfloat16* Ag = A + static_cast<int64_t>(g) * a_goff;
  const __nv_bfloat16* Bg = Bp + static_cast<int64_t>(g) * K * dgp;
  const float* cng = cn + static_cast<int64_t>(g) * K;
  const int nk = dgp / kBfK;
  const int ntiles = static_cast<int>(ceil_div(K, kBfCodes));
  const int nsteps = ntiles * nk;

  // Step s = (code tile s / nk, k-chunk s % nk) into stage s & 1. Each tile is
  // 128 rows x 4 chunks of 16 bytes; out-of-range rows/codes are zero-filled.
  auto issue = [&](int s) {
    const int buf = s & 1, nt = s / nk, kc = s % nk;
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int c = tid + kBfThreads * i;  // 0 .. 511
      const int r = c >> 2, col = (c & 3) * 8;
      const int64_t m = m0 + r;
      __nv_bfloat16* da = &As[buf][r][col];
      if (m < M) cp_async16(da, Ag + m * lda + kc * kBfK + col);
      else *reinterpret_cast<uint4*>(da) = make_uint4(0, 0, 0, 0);
      const int code = nt * kBfCodes + r;
      __nv_bfloat16* db = &Bs[buf][r][col];
      if (code < K) cp_async16(db, Bg + static_cast<int64_t>(code) * dgp + kc * kBfK + col);
      else *reinterpret_cast<uint4*>(db) = make_uint4(0, 0, 0, 0);
    }
  };

  float acc[2][8][4];
#pragma unroll
  for (int mi = 0; mi < 2; ++mi)
#pragma unroll
    for (int ni = 0; ni < 8; ++ni)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[mi][ni][e] = 0.0f;
  float best[2][2];  // [m-tile][row half: gq, gq + 8]
  int bidx[2][2];
#pragma unroll
  for (int mi = 0; mi < 2; ++mi)
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
      best[mi][hh] = INFINITY;
      bidx[mi][hh] = INT_MAX;
    }

  issue(0);
  cp_async_commit();
  for (int s = 0; s < nsteps; ++s) {
    if (s + 1 < nsteps) issue(s + 1);  // stage (s+1)&1 was released by the barrier ending step s-1
    cp_async_commit();
    cp_async_wait<1>();  // step s's group has landed
    __syncthreads();
    const int buf = s & 1;
#pragma unroll
    for (int ks = 0; ks < kBfK / 16; ++ks) {
      uint32_t af[2][4];
#pragma unroll
      for (int mi = 0; mi < 2; ++mi) {
        // matrices: (rows 0-7, k 0-7), (rows 8-15, k 0-7), (rows 0-7, k 8-15), (rows 8-15, k 8-15)
        const int r = wm * 32 + mi * 16 + ((lane >> 3) & 1) * 8 + (lane & 7);
        ldmatrix_x4(af[mi], &As[buf][r][ks * 16 + (lane >> 4) * 8]);
      }
#pragma unroll
      for (int np = 0; np < 4; ++np) {
        // matrices: (codes 0-7, k 0-7), (codes 0-7, k 8-15), (codes 8-15, k 0-7), (codes 8-15, k 8-15)
        uint32_t bfr[4];
        const int c = wn * 64 + np * 16 + (lane >> 4) * 8 + (lane & 7);
        ldmatrix_x4(bfr, &Bs[buf][c][ks * 16 + ((lane >> 3) & 1) * 8]);
#pragma unroll
        for (int mi = 0; mi < 2; ++mi) {
          mma_16816<__nv_bfloat16>(acc[mi][2 * np], af[mi], bfr[0], bfr[1]);
          mma_16816<__nv_bfloat16>(acc[mi][2 * np + 1], af[mi], bfr[2], bfr[3]);
        }
      }
    }
    if (s % nk == nk - 1) {
      // Code tile complete: acc[mi][ni][2*hh + e] is (row 32wm + 16mi + gq + 8hh,
      // code 128nt + 64wn + 8ni + 2tq + e); ni then e ascending = codes ascending.
      const int nbase = (s / nk) * kBfCodes + wn * 64;
#pragma unroll
      for (int ni = 0; ni < 8; ++ni) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int code = nbase + ni * 8 + tq * 2 + e;
          if (code < K) {
            const float c2 = cng[code];
#pragma unroll
            for (int mi = 0; mi < 2; ++mi)
#pragma unroll
              for (int hh = 0; hh < 2; ++hh) {
                const float dist = c2 - 2.0f * acc[mi][ni][2 * hh + e];
                if (dist < best[mi][hh]) {
                  best[mi][hh] = dist;
                  bidx[mi][hh] = code;
                }
              }
          }
        }
      }
#pragma unroll
      for (int mi = 0; mi < 2; ++mi)
#pragma unroll
        for (int ni = 0; ni < 8; ++ni)
#pragma unroll
          for (int e = 0; e < 4; ++e) acc[mi][ni][e] = 0.0f;
    }
    __syncthreads();  // everyone is done with stage s & 1 before it is refilled
  }

  // Reduce over the quad (tq), then over the two code warps (wn) through smem.
#pragma unroll
  for (int mi = 0; mi < 2; ++mi)
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
#pragma unroll
      for (int o = 1; o <= 2; o <<= 1) {
        const float od = __shfl_xor_sync(0xffffffffu, best[mi][hh], o);
        const int oi = __shfl_xor_sync(0xffffffffu, bidx[mi][hh], o);
        take_better(best[mi][hh], bidx[mi][hh], od, oi);
      }
      if (tq == 0) {
        const int r = wm * 32 + mi * 16 + hh * 8 + gq;
        red_d[r][wn] = best[mi][hh];
        red_i[r][wn] = bidx[mi][hh];
      }
    }
  __syncthreads();
  for (int r = tid; r < kBfRows; r += kBfThreads) {
    const int64_t m = m0 + r;
    if (m < M) {
      float bd = red_d[r][0];
      int bi = red_i[r][0];
      take_better(bd, bi, red_d[r][1], red_i[r][1]);
      codes[m * G + g] = bi == INT_MAX || !isfinite(bd) ? -1 : bi;  // NaN / inf in x
    }
  }
}

// ---------------------------------------------------------------------------
// Host
// ---------------------------------------------------------------------------
unsigned grid_for(int64_t n, int threads) {
  return static_cast<unsigned>(std::min<int64_t>(ceil_div(n, threads), 65536));
}

std::tuple<at::Tensor, at::Tensor> vq_encode_cuda(const at::Tensor& x, const at::Tensor& codebooks,
                                                  c10::string_view precision, bool return_error) {
  check_cuda_tensor(x, "x");
  check_cuda_tensor(codebooks, "codebooks");
  TORCH_CHECK(x.dim() == 2, "vq_encode: x must be 2-D [M, D]");
  TORCH_CHECK(codebooks.dim() == 3, "vq_encode: codebooks must be 3-D [G, K, D/G]");
  TORCH_CHECK(codebooks.scalar_type() == at::kFloat, "vq_encode: codebooks must be float32");
  TORCH_CHECK(x.device() == codebooks.device(), "vq_encode: x and codebooks on different devices");
  const std::string prec(precision.data(), precision.size());
  const bool bf16 = prec == "bf16";
  TORCH_CHECK(bf16 || prec == "fp32", "vq_encode: precision must be 'fp32' or 'bf16', got ", prec);
  const int64_t M = x.size(0), D = x.size(1);
  const int64_t G = codebooks.size(0), K = codebooks.size(1), dg = codebooks.size(2);
  TORCH_CHECK(G >= 1 && K >= 1 && dg >= 1, "vq_encode: empty codebooks");
  TORCH_CHECK(G * dg == D, "vq_encode: codebooks [G, K, D/G] do not match x's D=", D);
  TORCH_CHECK(G <= 65535 && K < (int64_t{1} << 30) && dg < (int64_t{1} << 30),
              "vq_encode: codebooks too large");

  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor codes = at::empty({M, G}, x.options().dtype(at::kInt));
  at::Tensor err = at::empty({return_error ? M : 0}, x.options().dtype(at::kFloat));
  if (M == 0) return {codes, err};
  TORCH_CHECK(ceil_div(M, kF32Rows) <= INT32_MAX, "vq_encode: too many rows");
  cudaStream_t stream = current_stream();
  const int Gi = static_cast<int>(G), Ki = static_cast<int>(K), dgi = static_cast<int>(dg);
  const float* cb = codebooks.data_ptr<float>();

  at::Tensor cn = at::empty({G * K}, codebooks.options());
  codebook_norms_kernel<<<static_cast<unsigned>(ceil_div(G * K, 8)), 256, 0, stream>>>(
      cb, cn.data_ptr<float>(), G * K, dgi, bf16);
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  if (bf16 && device_is_sm80_plus()) {
    const int64_t dgp = ceil_div(dg, kBfK) * kBfK;
    at::Tensor cbp = at::empty({G, K, dgp}, codebooks.options().dtype(at::kBFloat16));
    auto* cbp_ptr = reinterpret_cast<__nv_bfloat16*>(cbp.data_ptr());
    codebook_to_bf16_kernel<<<grid_for(G * K * dgp, 256), 256, 0, stream>>>(
        cb, cbp_ptr, G * K, dgi, static_cast<int>(dgp));
    C10_CUDA_KERNEL_LAUNCH_CHECK();

    const __nv_bfloat16* A;
    int64_t lda, goff;
    at::Tensor xb;
    if (x.scalar_type() == at::kBFloat16 && dg % kBfK == 0 && aligned16(x.data_ptr())) {
      A = reinterpret_cast<const __nv_bfloat16*>(x.data_ptr());
      lda = D;
      goff = dg;
    } else {
      xb = at::empty({M * G, dgp}, x.options().dtype(at::kBFloat16));
      auto* xb_ptr = reinterpret_cast<__nv_bfloat16*>(xb.data_ptr());
      dispatch_float_types(x.scalar_type(), "vq_encode", [&](auto tag) {
        using T = decltype(tag);
        x_to_bf16_kernel<T><<<grid_for(M * G * dgp, 256), 256, 0, stream>>>(
            reinterpret_cast<const T*>(x.data_ptr()), xb_ptr, M * G, dgi,
            static_cast<int>(dgp));
      });
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      A = xb_ptr;
      lda = G * dgp;
      goff = dgp;
    }
    const dim3 grid(static_cast<unsigned>(ceil_div(M, kBfRows)), static_cast<unsigned>(G));
    vq_bf16_mma_kernel<<<grid, kBfThreads, 0, stream>>>(A, lda, goff, cbp_ptr,
                                                        cn.data_ptr<float>(),
                                                        codes.data_ptr<int32_t>(), M, Gi, Ki,
                                                        static_cast<int>(dgp));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  } else {
    const dim3 grid(static_cast<unsigned>(ceil_div(M, kF32Rows)), static_cast<unsigned>(G));
    dispatch_float_types(x.scalar_type(), "vq_encode", [&](auto tag) {
      using T = decltype(tag);
      vq_f32_kernel<T><<<grid, kF32Threads, 0, stream>>>(
          reinterpret_cast<const T*>(x.data_ptr()), cb, cn.data_ptr<float>(),
          codes.data_ptr<int32_t>(), M, Gi, Ki, dgi, bf16);
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  if (return_error) {
    dispatch_float_types(x.scalar_type(), "vq_encode", [&](auto tag) {
      using T = decltype(tag);
      vq_error_kernel<T><<<static_cast<unsigned>(ceil_div(M, 8)), 256, 0, stream>>>(
          reinterpret_cast<const T*>(x.data_ptr()), cb, codes.data_ptr<int32_t>(),
          err.data_ptr<float>(), M, Gi, Ki, dgi, bf16);
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return {codes, err};
}

}  // namespace
}  // namespace cuda
}  // namespace astra

TORCH_LIBRARY_IMPL(astra_C, CUDA, m) {
  m.impl("vq_encode", &astra::cuda::vq_encode_cuda);
}
