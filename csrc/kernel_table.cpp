// The kernel tables' storage, and what each table says about itself; the kernel files fill in the
// function slots (kernel_table.h).
#include "kernel_table.h"

#include <ATen/ATen.h>

#include "cpu/output_cache.h"

namespace halfvae {
namespace {

at::Tensor device_empty(at::IntArrayRef sizes, const at::TensorOptions& options) {
  return at::empty(sizes, options);
}

Kernels describe(const char* name, at::Tensor (*empty)(at::IntArrayRef, const at::TensorOptions&),
                 bool half_types) {
  Kernels k{};
  k.empty = empty;
  k.name = name;
  k.half_types = half_types;
  return k;
}

}  // namespace

Kernels& kernel_table(KernelSet set) {
  // A function-local static: kernel files fill it in from their static initializers, whose order
  // across files is unspecified.
  static Kernels tables[] = {describe("cpu-DEFAULT", &cpu::empty_output, false),
                             describe("cpu-AVX2", &cpu::empty_output, false),
                             describe("cpu-AVX512", &cpu::empty_output, false),
                             describe("cuda", &device_empty, true)};
  static_assert(sizeof(tables) / sizeof(tables[0]) == static_cast<int>(KernelSet::cuda) + 1);
  return tables[static_cast<int>(set)];
}

}  // namespace halfvae
