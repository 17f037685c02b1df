// astra::pack_codes / astra::unpack_codes on the CPU: the wire format.
//
// Code i (row-major) occupies bits [i*bits, (i+1)*bits) of a little-endian,
// LSB-first bit stream of exactly ceil(n*bits/8) bytes, the last byte zero-padded.
// Eight consecutive codes fill exactly `bits` bytes, so threads take runs of whole
// 8-code groups independently; the < 8 trailing codes are done after. `bits` is a
// template constant (switch over 1..16) so each group compiles to straight-line
// shifts.
#include "astra.h"
#include "cpu/cpu_utils.h"

#include <torch/library.h>

#include <type_traits>

namespace astra {
namespace {

constexpr int64_t kGroupGrain = 4096;  // 8-code groups per parallel chunk, at least

// Packs n <= 8 codes into ceil(n*BITS/8) bytes (n = 8 is inlined as a constant).
template <int BITS>
inline void pack_group(const int32_t* in, uint8_t* out, int64_t n) {
  constexpr uint64_t kMask = (uint64_t{1} << BITS) - 1;
  uint64_t acc = 0;  // holds < 8 + BITS bits between byte stores
  int nacc = 0;
  for (int64_t i = 0; i < n; ++i) {
    acc |= (static_cast<uint64_t>(static_cast<uint32_t>(in[i])) & kMask) << nacc;
    nacc += BITS;
    while (nacc >= 8) {
      *out++ = static_cast<uint8_t>(acc);
      acc >>= 8;
      nacc -= 8;
    }
  }
  if (nacc > 0) *out = static_cast<uint8_t>(acc);
}

// Unpacks n <= 8 codes, reading exactly ceil(n*BITS/8) bytes.
template <int BITS>
inline void unpack_group(const uint8_t* in, int32_t* out, int64_t n) {
  constexpr uint64_t kMask = (uint64_t{1} << BITS) - 1;
  uint64_t acc = 0;
  int nacc = 0;
  for (int64_t i = 0; i < n; ++i) {
    while (nacc < BITS) {
      acc |= static_cast<uint64_t>(*in++) << nacc;
      nacc += 8;
    }
    out[i] = static_cast<int32_t>(acc & kMask);
    acc >>= BITS;
    nacc -= BITS;
  }
}

// Calls f(std::integral_constant<int, bits>{}) for bits in 1..16.
template <typename F>
void bits_switch(int64_t bits, F&& f) {
  switch (bits) {
#define ASTRA_BITS_CASE(b) \
  case b:                  \
    return f(std::integral_constant<int, b>{});
    ASTRA_BITS_CASE(1) ASTRA_BITS_CASE(2) ASTRA_BITS_CASE(3) ASTRA_BITS_CASE(4)
    ASTRA_BITS_CASE(5) ASTRA_BITS_CASE(6) ASTRA_BITS_CASE(7) ASTRA_BITS_CASE(8)
    ASTRA_BITS_CASE(9) ASTRA_BITS_CASE(10) ASTRA_BITS_CASE(11) ASTRA_BITS_CASE(12)
    ASTRA_BITS_CASE(13) ASTRA_BITS_CASE(14) ASTRA_BITS_CASE(15) ASTRA_BITS_CASE(16)
#undef ASTRA_BITS_CASE
    default:
      TORCH_CHECK(false, "bits must be in 1..16, got ", bits);
  }
}

}  // namespace

Tensor pack_codes_cpu(const Tensor& codes, int64_t bits) {
  TORCH_CHECK(codes.scalar_type() == at::kInt && codes.is_contiguous(),
              "pack_codes: codes must be contiguous int32");
  TORCH_CHECK(bits >= 1 && bits <= 16, "pack_codes: bits must be in 1..16, got ", bits);
  const int64_t n = codes.numel();
  Tensor out = at::empty({(n * bits + 7) / 8}, codes.options().dtype(at::kByte));
  if (n == 0) return out;
  const int32_t* in = codes.data_ptr<int32_t>();
  uint8_t* dst = out.data_ptr<uint8_t>();
  const int64_t groups = n / 8, tail = n % 8;
  bits_switch(bits, [&](auto b) {
    constexpr int B = decltype(b)::value;
    at::parallel_for(0, groups, kGroupGrain, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) pack_group<B>(in + 8 * i, dst + B * i, 8);
    });
    if (tail) pack_group<B>(in + 8 * groups, dst + B * groups, tail);
  });
  return out;
}

Tensor unpack_codes_cpu(const Tensor& payload, at::IntArrayRef shape, int64_t bits) {
  TORCH_CHECK(payload.scalar_type() == at::kByte && payload.dim() == 1 &&
                  payload.is_contiguous(),
              "unpack_codes: payload must be contiguous 1-D uint8");
  TORCH_CHECK(bits >= 1 && bits <= 16, "unpack_codes: bits must be in 1..16, got ", bits);
  int64_t n = 1;
  for (int64_t s : shape) {
    TORCH_CHECK(s >= 0, "unpack_codes: shape must be non-negative, got ", shape);
    n *= s;
  }
  TORCH_CHECK(payload.numel() == (n * bits + 7) / 8, "unpack_codes: payload has ",
              payload.numel(), " bytes but shape ", shape, " at ", bits, " bits needs ",
              (n * bits + 7) / 8);
  Tensor out = at::empty(shape, payload.options().dtype(at::kInt));
  if (n == 0) return out;
  const uint8_t* src = payload.data_ptr<uint8_t>();
  int32_t* dst = out.data_ptr<int32_t>();
  const int64_t groups = n / 8, tail = n % 8;
  bits_switch(bits, [&](auto b) {
    constexpr int B = decltype(b)::value;
    at::parallel_for(0, groups, kGroupGrain, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) unpack_group<B>(src + B * i, dst + 8 * i, 8);
    });
    if (tail) unpack_group<B>(src + B * groups, dst + 8 * groups, tail);
  });
  return out;
}

TORCH_LIBRARY_IMPL(astra_C, CPU, m) {
  m.impl("pack_codes", &pack_codes_cpu);
  m.impl("unpack_codes", &unpack_codes_cpu);
}

}  // namespace astra
