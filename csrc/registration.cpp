// The compiled library (namespace astra_C) registers kernels only: each kernel sits
// next to its code (TORCH_LIBRARY_IMPL(astra_C, CPU, m) in csrc/cpu, CUDA in
// csrc/cuda). The op schemas are written once, in astra_kernels/ops.py (SCHEMAS), and
// given to astra_C from Python right after this library loads
// (astra_kernels.ops.define_compiled); the dispatcher then checks every kernel's C++
// signature against its schema. Only the extension's own helpers are defined here.
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
  m.def("has_cuda() -> bool", &has_cuda);
}
