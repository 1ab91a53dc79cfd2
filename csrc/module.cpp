// The Python module: importing it runs the static TORCH_LIBRARY registrations. It also reports
// which CPU kernel variant was chosen.
#include <Python.h>
#include <torch/library.h>

#include "kernel_table.h"

TORCH_LIBRARY(halfvae_ext, m) {
  // Ops are defined with TORCH_LIBRARY_FRAGMENT next to each op's code.
}

static PyObject* cpu_kernel_name(PyObject*, PyObject*) {
  return PyUnicode_FromString(halfvae::cpu::kernels().name);
}

static PyMethodDef methods[] = {
    {"cpu_kernel_name", cpu_kernel_name, METH_NOARGS,
     "Name of the CPU kernel variant in use, e.g. 'cpu-AVX512'."},
    {nullptr, nullptr, 0, nullptr}};

extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "halfvae_ext kernels", -1, methods};
  return PyModule_Create(&module);
}
