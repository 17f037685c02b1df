// Op schemas of the compiled library (namespace astra_C). They mirror
// astra_kernels/ops.py; the per-device kernels are registered next to their code
// (TORCH_LIBRARY_IMPL(astra_C, CPU, m) in csrc/cpu, CUDA in csrc/cuda).
#include <torch/library.h>

namespace {
bool has_cuda() {
#ifdef ASTRA_WITH_CUDA
  return true;
#else
  return false;
#endif
}
}  // namespace

TORCH_LIBRARY(astra_C, m) {
  m.def("vq_encode(Tensor x, Tensor codebooks, str precision='fp32', "
        "bool return_error=False) -> (Tensor, Tensor)");
  m.def("pack_codes(Tensor codes, int bits) -> Tensor");
  m.def("unpack_codes(Tensor payload, int[] shape, int bits) -> Tensor");
  m.def("mixed_attention(Tensor q, Tensor k, Tensor v, Tensor? codes, Tensor? pk, "
        "Tensor? pv, Tensor? remote_k, Tensor? remote_v, bool causal=False, "
        "Tensor? q_pos=None, Tensor? kv_pos=None, Tensor? remote_pos=None, "
        "float? scale=None) -> (Tensor, Tensor)");
  m.def("merge_attention(Tensor out_a, Tensor lse_a, Tensor out_b, Tensor lse_b) "
        "-> (Tensor, Tensor)");
  m.def("has_cuda() -> bool", &has_cuda);
}
