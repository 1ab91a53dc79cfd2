// The kernels of one device, as a table of functions: the device-independent op wrappers
// (op_wrappers.cpp) check arguments, allocate outputs and finalize prior gradients, then call these.
// The CPU has one table per instruction set (DEFAULT, AVX2, AVX512 -- see CMakeLists.txt), chosen at
// run time: the best one that torch's CPU capability allows (ATEN_CPU_CAPABILITY=avx2 narrows ours
// like torch's) and whose every instruction-set feature the CPU has.
#pragma once
#include <ATen/core/Tensor.h>

#include <string>
#include <utility>
#include <vector>

#include "latent_rows_update.h"
#include "reparam_gmm_kl.h"

namespace halfvae {

struct Kernels {
  void (*reparam_gmm_kl_forward)(const ReparamGmmKlProblem& p, at::Tensor& z, at::Tensor& kl);
  // prior_sums: [K, 3C+1] float64 zeros to add into, or undefined when prior gradients are not
  // wanted. Every kernel is only called with at least one element.
  void (*reparam_gmm_kl_backward)(const ReparamGmmKlProblem& p, const at::Tensor& grad_z,
                                  const at::Tensor& grad_kl, at::Tensor& grad_mu,
                                  at::Tensor& grad_logvar, at::Tensor& prior_sums);
  void (*gmm_log_prob_forward)(const at::Tensor& z, const PriorTables& prior, at::Tensor& out);
  void (*gmm_log_prob_backward)(const at::Tensor& grad, const at::Tensor& z,
                                const PriorTables& prior, at::Tensor& grad_z,
                                at::Tensor& prior_sums);
  void (*philox_normal)(const at::Tensor& seed, at::Tensor& out);  // seed: int64[2] on the device
  void (*latent_rows_update)(const RowUpdate& u);
  // Allocates an uninitialized output (the CPU reuses large buffers: cpu/output_cache.h).
  at::Tensor (*empty)(at::IntArrayRef sizes, const at::TensorOptions& options);
  const char* name;           // e.g. "cpu-AVX512", "cuda"
  // reparam_gmm_kl_backward applies ReparamGmmKlProblem::row_step itself (else the caller runs
  // latent_rows_update after it).
  bool backward_steps_rows;
  bool half_types;            // accepts float16/bfloat16 (computed in float32)
};

namespace cpu {

// One table per compiled instruction set (defined in kernel_table.cpp).
const Kernels& kernels_DEFAULT();
const Kernels& kernels_AVX2();
const Kernels& kernels_AVX512();

// The kernels for this machine (and ATEN_CPU_CAPABILITY).
const Kernels& kernels();

// Each compiled variant ("cpu-AVX2", ...) with the features it needs that this CPU lacks (or that
// HALFVAE_CPU_HIDE_FEATURES hides); an empty list: the CPU can run it.
std::vector<std::pair<std::string, std::vector<std::string>>> kernel_variants();

PhiloxSeed read_seed(const at::Tensor& seed);
}  // namespace cpu

namespace cuda {
const Kernels& kernels();
}  // namespace cuda

}  // namespace halfvae
