// Helpers shared by the CPU kernels (private to csrc/cpu): dtype conversion of
// rows to fp32 and back, and the fp32 tile GEMM every kernel is built on.
//
// tile_gemm is ATen's cpublas::brgemm (oneDNN's micro-kernel for small tiles).
// Builds against a torch without the fp32 brgemm, or with -DASTRA_NO_BRGEMM, get a
// plain Vectorized loop instead: correct, slower.
#pragma once
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/native/CPUBlas.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#if defined(CPUBLAS_BRGEMM_F32F32F32) && !defined(ASTRA_NO_BRGEMM)
#define ASTRA_USE_BRGEMM 1
#endif

namespace astra::cpu {

using fVec = at::vec::Vectorized<float>;

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }

// dst[0:n] = float(src[0:n])
template <typename T>
inline void to_f32(const T* src, float* dst, int64_t n) {
  if constexpr (std::is_same_v<T, float>) {
    std::copy(src, src + n, dst);
  } else {
    constexpr int64_t kV = at::vec::Vectorized<T>::size();  // 2 float vectors
    int64_t i = 0;
    for (; i + kV <= n; i += kV) {
      fVec a, b;
      at::vec::load_to_float<T>(src + i, a, b);
      a.store(dst + i);
      b.store(dst + i + fVec::size());
    }
    for (; i < n; ++i) dst[i] = static_cast<float>(src[i]);
  }
}

// dst[0:n] = T(src[0:n]), round to nearest even
template <typename T>
inline void from_f32(const float* src, T* dst, int64_t n) {
  if constexpr (std::is_same_v<T, float>) {
    std::copy(src, src + n, dst);
  } else {
    at::vec::convert(src, dst, n);
  }
}

// dst[0:n] (+)= float(src[0:n])
template <typename T>
inline void add_to_f32(const T* src, float* dst, int64_t n, bool first) {
  if (first) return to_f32(src, dst, n);
  constexpr int64_t kV = fVec::size();
  if constexpr (std::is_same_v<T, float>) {
    int64_t i = 0;
    for (; i + kV <= n; i += kV) (fVec::loadu(dst + i) + fVec::loadu(src + i)).store(dst + i);
    for (; i < n; ++i) dst[i] += src[i];
  } else {
    int64_t i = 0;
    for (; i + kV <= n; i += kV) {
      fVec a;
      at::vec::load_to_float<T>(src + i, a);
      (fVec::loadu(dst + i) + a).store(dst + i);
    }
    for (; i < n; ++i) dst[i] += static_cast<float>(src[i]);
  }
}

// Round fp32 values to the nearest T in place (models a T-typed intermediate).
template <typename T>
inline void round_through(float* p, int64_t n) {
  if constexpr (!std::is_same_v<T, float>) {
    constexpr int64_t kChunk = 256;
    T tmp[kChunk];
    for (int64_t i = 0; i < n; i += kChunk) {
      const int64_t m = std::min(kChunk, n - i);
      from_f32(p + i, tmp, m);
      to_f32(tmp, p + i, m);
    }
  }
}

// C[M,N] (+)= A[M,K] . B[K,N], all row-major fp32 with leading dims lda, ldb, ldc.
inline void tile_gemm(int64_t M, int64_t N, int64_t K, int64_t lda, int64_t ldb,
                      int64_t ldc, bool add_C, const float* A, const float* B, float* C) {
#ifdef ASTRA_USE_BRGEMM
  at::native::cpublas::brgemm(M, N, K, lda, ldb, ldc, add_C, A, B, C, /*is_vnni=*/false);
#else
  constexpr int64_t kV = fVec::size();
  for (int64_t i = 0; i < M; ++i) {
    float* c = C + i * ldc;
    if (!add_C) std::fill(c, c + N, 0.f);
    for (int64_t k = 0; k < K; ++k) {
      const fVec a(A[i * lda + k]);
      const float* b = B + k * ldb;
      int64_t j = 0;
      for (; j + kV <= N; j += kV)
        at::vec::fmadd(a, fVec::loadu(b + j), fVec::loadu(c + j)).store(c + j);
      if (j < N)
        at::vec::fmadd(a, fVec::loadu(b + j, N - j), fVec::loadu(c + j, N - j))
            .store(c + j, N - j);
    }
  }
#endif
}

// Call once per thread after its last tile_gemm (frees micro-kernel state).
inline void tile_gemm_done() {
#ifdef ASTRA_USE_BRGEMM
  at::native::cpublas::brgemm_release(/*is_vnni=*/false);
#endif
}

#if defined(__AVX512BF16__)
// acc[i][j] += sum_kp A[i, kp] . B[kp, 16j .. 16j+15] with VDPBF16PS (bf16 pairs, fp32
// accumulation), all NC x NR accumulators in registers. A: NC rows of 32-bit bf16 pairs
// (lda words per row); B: VNNI layout, ldb words per pair index. The inner loop of the
// bf16 micro-kernels of both vq_encode and attention.
template <int NC, int NR>
inline void dpbf16_accumulate(__m512 (&acc)[NC][NR], const uint32_t* a, int64_t lda,
                              const uint32_t* b, int64_t ldb, int64_t n_pairs) {
  for (int64_t kp = 0; kp < n_pairs; ++kp) {
    __m512bh bv[NR];
#pragma GCC unroll 4
    for (int j = 0; j < NR; ++j)
      bv[j] = (__m512bh)_mm512_loadu_si512(static_cast<const void*>(b + kp * ldb + j * 16));
#pragma GCC unroll 8
    for (int i = 0; i < NC; ++i) {
      const __m512bh av = (__m512bh)_mm512_set1_epi32(static_cast<int>(a[i * lda + kp]));
#pragma GCC unroll 4
      for (int j = 0; j < NR; ++j) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], av, bv[j]);
    }
  }
}
#endif

// Per-thread scratch: one uninitialized fp32 buffer, 64-byte aligned by c10's allocator.
inline at::Tensor scratch_f32(int64_t n) {
  return at::empty({std::max<int64_t>(n, 1)}, at::kFloat);
}

}  // namespace astra::cpu

// Runs `body` with scalar_t bound to the C++ type of fp32/fp16/bf16 `dtype`.
#define ASTRA_DISPATCH_FLOAT_TYPES(dtype, name, ...)                            \
  AT_DISPATCH_SWITCH(dtype, name,                                               \
                     AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)                  \
                         AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__)               \
                             AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))
