// Astra compiled kernels: declarations shared by the CPU and CUDA sources.
// The op schemas are those of astra_kernels/ops.py (SCHEMAS), given to namespace
// astra_C from Python (see csrc/registration.cpp); inputs arrive validated by
// astra_kernels/api.py, and every kernel re-checks what memory safety depends on
// (TORCH_CHECK).
#pragma once
#include <ATen/ATen.h>
#include <c10/util/Optional.h>
#include <tuple>

namespace astra {

using at::Tensor;
using OptTensor = c10::optional<at::Tensor>;

// CPU kernels (csrc/cpu/)
std::tuple<Tensor, Tensor> vq_encode_cpu(const Tensor& x, const Tensor& codebooks,
                                         c10::string_view precision, bool return_error);
Tensor pack_codes_cpu(const Tensor& codes, int64_t bits);
Tensor unpack_codes_cpu(const Tensor& payload, at::IntArrayRef shape, int64_t bits);
std::tuple<Tensor, Tensor> mixed_attention_cpu(
    const Tensor& q, const Tensor& k, const Tensor& v, const OptTensor& codes,
    const OptTensor& pk, const OptTensor& pv, const OptTensor& remote_k,
    const OptTensor& remote_v, bool causal, const OptTensor& q_pos,
    const OptTensor& kv_pos, const OptTensor& remote_pos, c10::optional<double> scale,
    const OptTensor& rope_cos, const OptTensor& rope_sin);
Tensor int8_linear_cpu(const Tensor& x, const Tensor& weight, const Tensor& scale,
                       const OptTensor& bias, const OptTensor& offset);
std::tuple<Tensor, Tensor> merge_attention_cpu(const Tensor& out_a, const Tensor& lse_a,
                                               const Tensor& out_b, const Tensor& lse_b);

}  // namespace astra
