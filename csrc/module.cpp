// The Python module only has to exist: importing it runs the static TORCH_LIBRARY registrations.
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(halfvae_ext, m) {
  // Ops are defined with TORCH_LIBRARY_FRAGMENT next to each op's code.
}

extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "halfvae_ext kernels", -1, nullptr};
  return PyModule_Create(&module);
}

