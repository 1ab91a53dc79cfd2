// The Python module: importing it runs the static TORCH_LIBRARY registrations. It also reports
// which CPU kernel variant was chosen.
#include <Python.h>
#include <torch/library.h>

#include <cstdint>
#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "cpu/output_cache.h"
#include "kernel_table.h"
#include "launch_plan.h"

TORCH_LIBRARY(halfvae_ext, m) {
  // Ops are defined with TORCH_LIBRARY_FRAGMENT next to each op's code.
}

static PyObject* cpu_kernel_name(PyObject*, PyObject*) {
  try {
    return PyUnicode_FromString(halfvae::cpu::kernels().name);
  } catch (const c10::Error& e) {  // a bad HALFVAE_CPU_HIDE_FEATURES
    PyErr_SetString(PyExc_ValueError, e.what_without_backtrace());
    return nullptr;
  }
}

static PyObject* cpu_kernel_variants(PyObject*, PyObject*) {
  std::vector<std::pair<std::string, std::vector<std::string>>> variants;
  try {
    variants = halfvae::cpu::kernel_variants();
  } catch (const c10::Error& e) {
    PyErr_SetString(PyExc_ValueError, e.what_without_backtrace());
    return nullptr;
  }
  PyObject* out = PyDict_New();
  for (const auto& [name, missing] : variants) {
    PyObject* list = PyList_New(0);
    for (const auto& f : missing) {
      PyObject* s = PyUnicode_FromString(f.c_str());
      PyList_Append(list, s);
      Py_DECREF(s);
    }
    PyDict_SetItemString(out, name.c_str(), list);
    Py_DECREF(list);
  }
  return out;
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

// madvise(MADV_HUGEPAGE) on the 2 MiB pages inside [address, address + nbytes); returns the bytes
// advised (0 where unsupported). Latent tables are read at random rows: with 4 KiB pages nearly
// every touched row is also a TLB miss whose page walk misses the cache too.
static PyObject* advise_huge_pages(PyObject*, PyObject* args) {
  unsigned long long address = 0, nbytes = 0;
  if (!PyArg_ParseTuple(args, "KK", &address, &nbytes)) return nullptr;
  unsigned long long advised = 0;
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr unsigned long long kHuge = 2ull << 20;
  const unsigned long long first = (address + kHuge - 1) & ~(kHuge - 1);
  const unsigned long long end = (address + nbytes) & ~(kHuge - 1);
  if (end > first &&
      madvise(reinterpret_cast<void*>(first), static_cast<size_t>(end - first), MADV_HUGEPAGE) == 0)
    advised = end - first;
#endif
  return PyLong_FromUnsignedLongLong(advised);
}

// The CUDA kernels' grid for (numel, K, threads per block, block cap), as (blocks, stride): host
// arithmetic, exposed so that the CPU tests can check it (launch_plan.h).
static PyObject* plan_launch_blocks(PyObject*, PyObject* args) {
  long long numel = 0, K = 0, threads = 0, cap = 0;
  if (!PyArg_ParseTuple(args, "LLLL", &numel, &K, &threads, &cap)) return nullptr;
  try {
    const auto plan = halfvae::plan_launch_blocks(numel, K, threads, cap);
    return Py_BuildValue("(LL)", (long long)plan.blocks, (long long)plan.stride);
  } catch (const c10::Error& e) {
    PyErr_SetString(PyExc_ValueError, e.what_without_backtrace());
    return nullptr;
  }
}

static PyMethodDef methods[] = {
    {"plan_launch_blocks", plan_launch_blocks, METH_VARARGS,
     "plan_launch_blocks(numel, K, threads, cap) -> (blocks, stride) of the CUDA kernels' grid."},
    {"advise_huge_pages", advise_huge_pages, METH_VARARGS,
     "advise_huge_pages(address, nbytes) -> bytes advised: ask Linux for transparent huge pages "
     "on the 2 MiB-aligned part of a buffer (call before the memory is first touched)."},
    {"cpu_output_cache_info", cpu_output_cache_info, METH_NOARGS,
     "Sizes and hit counts of the CPU output-buffer cache."},
    {"set_cpu_output_cache_limit", set_cpu_output_cache_limit, METH_O,
     "Bound (bytes) of the CPU output-buffer cache; 0 disables it and frees cached buffers."},
    {"cpu_kernel_name", cpu_kernel_name, METH_NOARGS,
     "Name of the CPU kernel variant in use, e.g. 'cpu-AVX512'."},
    {"cpu_kernel_variants", cpu_kernel_variants, METH_NOARGS,
     "The compiled CPU kernel variants, each with the instruction-set features it needs that "
     "this CPU lacks ({'cpu-DEFAULT': [], 'cpu-AVX512': ['avx512f', ...]}); a variant with none "
     "missing can run. HALFVAE_CPU_HIDE_FEATURES=avx512f,... (a test hook) hides features."},
    {nullptr, nullptr, 0, nullptr}};

extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "halfvae_ext kernels", -1, methods};
  return PyModule_Create(&module);
}
