// pack_codes / unpack_codes on CUDA: the wire format.
//
// Code i (row-major) occupies bits [i*bits, (i+1)*bits) of a little-endian,
// LSB-first bit stream of exactly ceil(n*bits/8) bytes, the last byte
// zero-padded. Eight consecutive codes fill exactly `bits` bytes, so one thread
// owns one group of 8 codes and its `bits` bytes: no atomics, no races. A group
// is at most 8 * 16 = 128 bits, held in two 64-bit words (lo = bits 0..63).
#include "common.cuh"

namespace astra {
namespace cuda {
namespace {

constexpr int kPackThreads = 256;

__global__ void pack_codes_kernel(const int32_t* __restrict__ codes, uint8_t* __restrict__ out,
                                  int64_t n, int64_t nbytes, int bits) {
  const int64_t grp = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t first = grp * 8;
  if (first >= n) return;
  const uint64_t mask = (uint64_t{1} << bits) - 1;  // bits <= 16
  uint64_t lo = 0, hi = 0;
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    if (first + j < n) {
      const uint64_t c = static_cast<uint64_t>(static_cast<uint32_t>(codes[first + j])) & mask;
      const int off = j * bits;  // 0 .. 112
      if (off < 64) {
        lo |= c << off;
        if (off + bits > 64) hi |= c >> (64 - off);  // 64 - off in 1 .. 15
      } else {
        hi |= c << (off - 64);
      }
    }
  }
  // The group's bytes are [grp*bits, grp*bits + bits); the stream may end inside.
  const int64_t b0 = grp * bits;
  for (int k = 0; k < bits; ++k) {
    if (b0 + k < nbytes) {
      const uint64_t w = k < 8 ? lo : hi;
      out[b0 + k] = static_cast<uint8_t>(w >> (8 * (k & 7)));
    }
  }
}

__global__ void unpack_codes_kernel(const uint8_t* __restrict__ payload,
                                    int32_t* __restrict__ codes, int64_t n, int64_t nbytes,
                                    int bits) {
  const int64_t grp = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t first = grp * 8;
  if (first >= n) return;
  const uint64_t mask = (uint64_t{1} << bits) - 1;
  const int64_t b0 = grp * bits;
  uint64_t lo = 0, hi = 0;
  for (int k = 0; k < bits; ++k) {
    if (b0 + k < nbytes) {
      const uint64_t byte = payload[b0 + k];
      if (k < 8) lo |= byte << (8 * k);
      else hi |= byte << (8 * (k - 8));
    }
  }
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    if (first + j < n) {
      const int off = j * bits;
      uint64_t v;
      if (off < 64) {
        v = lo >> off;
        if (off + bits > 64) v |= hi << (64 - off);
      } else {
        v = hi >> (off - 64);
      }
      codes[first + j] = static_cast<int32_t>(v & mask);
    }
  }
}

at::Tensor pack_codes_cuda(const at::Tensor& codes, int64_t bits) {
  check_cuda_tensor(codes, "codes");
  TORCH_CHECK(codes.scalar_type() == at::kInt, "pack_codes: codes must be int32");
  TORCH_CHECK(bits >= 1 && bits <= 16, "pack_codes: bits must be in 1..16, got ", bits);
  const c10::cuda::CUDAGuard guard(codes.device());
  const int64_t n = codes.numel();
  const int64_t nbytes = (n * bits + 7) / 8;
  at::Tensor out = at::empty({nbytes}, codes.options().dtype(at::kByte));
  if (n == 0) return out;
  const int64_t groups = ceil_div(n, 8);
  const int64_t blocks = ceil_div(groups, kPackThreads);
  TORCH_CHECK(blocks <= INT32_MAX, "pack_codes: too many codes");
  pack_codes_kernel<<<static_cast<unsigned>(blocks), kPackThreads, 0,
                      current_stream()>>>(
      codes.data_ptr<int32_t>(), out.data_ptr<uint8_t>(), n, nbytes, static_cast<int>(bits));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor unpack_codes_cuda(const at::Tensor& payload, at::IntArrayRef shape, int64_t bits) {
  check_cuda_tensor(payload, "payload");
  TORCH_CHECK(payload.scalar_type() == at::kByte, "unpack_codes: payload must be uint8");
  TORCH_CHECK(payload.dim() == 1, "unpack_codes: payload must be 1-D");
  TORCH_CHECK(bits >= 1 && bits <= 16, "unpack_codes: bits must be in 1..16, got ", bits);
  int64_t n = 1;
  for (int64_t s : shape) {
    TORCH_CHECK(s >= 0, "unpack_codes: shape must be non-negative");
    n *= s;
  }
  const int64_t nbytes = (n * bits + 7) / 8;
  TORCH_CHECK(payload.numel() == nbytes, "unpack_codes: payload has ", payload.numel(),
              " bytes but the shape at ", bits, " bits needs exactly ", nbytes);
  const c10::cuda::CUDAGuard guard(payload.device());
  at::Tensor codes = at::empty(shape, payload.options().dtype(at::kInt));
  if (n == 0) return codes;
  const int64_t groups = ceil_div(n, 8);
  const int64_t blocks = ceil_div(groups, kPackThreads);
  TORCH_CHECK(blocks <= INT32_MAX, "unpack_codes: too many codes");
  unpack_codes_kernel<<<static_cast<unsigned>(blocks), kPackThreads, 0,
                        current_stream()>>>(
      payload.data_ptr<uint8_t>(), codes.data_ptr<int32_t>(), n, nbytes,
      static_cast<int>(bits));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return codes;
}

}  // namespace
}  // namespace cuda
}  // namespace astra

TORCH_LIBRARY_IMPL(astra_C, CUDA, m) {
  m.impl("pack_codes", &astra::cuda::pack_codes_cuda);
  m.impl("unpack_codes", &astra::cuda::unpack_codes_cuda);
}
