// The Python module: importing it runs the static TORCH_LIBRARY registrations. It also reports
// which CPU kernel variant was chosen.
#include <Python.h>
#include <torch/library.h>

#include "cpu/output_cache.h"
#include "kernel_table.h"

TORCH_LIBRARY(halfvae_ext, m) {
  // Ops are defined with TORCH_LIBRARY_FRAGMENT next to each op's code.
}

static PyObject* cpu_kernel_name(PyObject*, PyObject*) {
  return PyUnicode_FromString(halfvae::cpu::kernels().name);
}

static PyObject* cpu_output_cache_info(PyObject*, PyObject*) {
  const auto i = halfvae::cpu::output_cache_info();
  return Py_BuildValue("{s:K,s:K,s:K,s:K,s:K}", "limit_bytes", (unsigned long long)i.limit_bytes,
                       "cached_bytes", (unsigned long long)i.cached_bytes, "in_use_bytes",
                       (unsigned long long)i.in_use_bytes, "hits", (unsigned long long)i.hits,
                       "misses", (unsigned long long)i.misses);
}

static PyObject* set_cpu_output_cache_limit(PyObject*, PyObject* arg) {
  const unsigned long long bytes = PyLong_AsUnsignedLongLong(arg);
  if (PyErr_Occurred()) return nullptr;
  halfvae::cpu::set_output_cache_limit(static_cast<size_t>(bytes));
  Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"cpu_output_cache_info", cpu_output_cache_info, METH_NOARGS,
     "Sizes and hit counts of the CPU output-buffer cache."},
    {"set_cpu_output_cache_limit", set_cpu_output_cache_limit, METH_O,
     "Bound (bytes) of the CPU output-buffer cache; 0 disables it and frees cached buffers."},
    {"cpu_kernel_name", cpu_kernel_name, METH_NOARGS,
     "Name of the CPU kernel variant in use, e.g. 'cpu-AVX512'."},
    {nullptr, nullptr, 0, nullptr}};

extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "halfvae_ext kernels", -1, methods};
  return PyModule_Create(&module);
}
