// The kernels of one device (or one CPU instruction set) as a table of functions, like ATen's
// DispatchStub. An op body (ops/<op>.cpp) checks its arguments, allocates outputs and finalizes
// prior gradients, and calls the kernels of its tensors' device: kernels_for(tensor). Each kernel
// file fills its own slot with HALFVAE_REGISTER_KERNEL / HALFVAE_REGISTER_CPU_KERNEL when the
// library is loaded. CPU kernel files are compiled once per instruction set (DEFAULT, AVX2, AVX512;
// CMakeLists.txt) and fill that set's table; which CPU table is used is chosen at run time
// (cpu/isa_choice.cpp).
#pragma once
#include <ATen/core/Tensor.h>

#include <string>
#include <utility>
#include <vector>

#include "kernel_args.h"

namespace halfvae {

struct Kernels {
  // Every kernel is only called with at least one element.
  void (*reparam_gmm_kl_forward)(const ReparamGmmKlProblem& p, at::Tensor& z, at::Tensor& kl);
  // prior_sums: [U*K, 3C+1] float64 zeros to add into, or undefined when prior gradients are not
  // wanted. Adds p.extra_grad_mu / p.extra_grad_logvar when defined, then applies p.row_step
  // when set (the fused table step).
  void (*reparam_gmm_kl_backward)(const ReparamGmmKlProblem& p, const at::Tensor& grad_z,
                                  const at::Tensor& grad_kl, at::Tensor& grad_mu,
                                  at::Tensor& grad_logvar, at::Tensor& prior_sums);
  void (*gmm_log_prob_forward)(const at::Tensor& z, const PriorTables& prior, at::Tensor& out);
  void (*gmm_log_prob_backward)(const at::Tensor& grad, const at::Tensor& z,
                                const PriorTables& prior, at::Tensor& grad_z,
                                at::Tensor& prior_sums);
  void (*philox_normal)(const at::Tensor& seed, at::Tensor& out);  // seed: int64[2] on the device
  // out[b, k] = element rows[b] * K + k of philox_normal's stream (rows: int64, >= 0, contiguous;
  // out: [len(rows), K] contiguous).
  void (*philox_normal_rows)(const at::Tensor& seed, const at::Tensor& rows, at::Tensor& out);
  void (*latent_rows_update)(const RowUpdate& u);

  // Filled for each table by kernel_table.cpp:
  // allocates an uninitialized output (the CPU reuses large buffers: cpu/output_cache.h);
  at::Tensor (*empty)(at::IntArrayRef sizes, const at::TensorOptions& options);
  const char* name;  // e.g. "cpu-AVX512", "cuda"
  bool half_types;   // accepts float16/bfloat16 (computed in float32)
};

enum class KernelSet { cpu_DEFAULT, cpu_AVX2, cpu_AVX512, cuda };

// The table of one set: kernel files fill it in while the library loads, ops read it.
Kernels& kernel_table(KernelSet set);

namespace cpu {
// The CPU table in use: the best instruction set that torch (ATEN_CPU_CAPABILITY) and this CPU
// both allow.
const Kernels& kernels();

// Each compiled variant ("cpu-AVX2", ...) with the features it needs that this CPU lacks (or that
// HALFVAE_CPU_HIDE_FEATURES hides); an empty list: the CPU can run it.
std::vector<std::pair<std::string, std::vector<std::string>>> kernel_variants();
}  // namespace cpu

// The kernels of t's device.
inline const Kernels& kernels_for(const at::Tensor& t) {
  return t.is_cuda() ? kernel_table(KernelSet::cuda) : cpu::kernels();
}

}  // namespace halfvae

#define HALFVAE_CONCAT_IMPL(a, b) a##b
#define HALFVAE_CONCAT(a, b) HALFVAE_CONCAT_IMPL(a, b)

// Fills slot SLOT of SET's table with FN while the library loads. This runs on every machine, also
// in files compiled for an instruction set the CPU may lack: keep it a plain pointer store.
#define HALFVAE_REGISTER_KERNEL(SET, SLOT, FN)                                   \
  [[maybe_unused]] static const bool HALFVAE_CONCAT(halfvae_registered_, SLOT) = \
      (::halfvae::kernel_table(SET).SLOT = (FN), true)

// The same in a CPU kernel file, for the instruction set it is being compiled for.
#define HALFVAE_REGISTER_CPU_KERNEL(SLOT, FN) \
  HALFVAE_REGISTER_KERNEL(::halfvae::KernelSet::HALFVAE_CONCAT(cpu_, CPU_CAPABILITY), SLOT, FN)
