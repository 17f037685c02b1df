// The Python module astra_kernels._C. It has no Python functions: importing it
// runs the static op registrations (torch.ops.astra_C.*). Python.h only here, so
// the CMake build links the kernels without Python.
#include <Python.h>

extern "C" {
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}
