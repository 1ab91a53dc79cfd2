// CPU kernels, compiled once per instruction set (DEFAULT, AVX2, AVX512 -- see CMakeLists.txt) into
// namespaces of that name; dispatch.cpp picks one at run time from torch's own CPU capability, so
// ATEN_CPU_CAPABILITY=avx2 (or default) forces a narrower kernel just as it does for torch.
#pragma once
#include <ATen/core/Tensor.h>

#include "../reparam_gmm_kl.h"

namespace halfvae::cpu {

struct Kernels {
  void (*reparam_gmm_kl_forward)(const ReparamGmmKlProblem& p, at::Tensor& z, at::Tensor& kl);
  // prior_sums: [K, 3C+1] float64, or undefined when prior gradients are not wanted.
  void (*reparam_gmm_kl_backward)(const ReparamGmmKlProblem& p, const at::Tensor& grad_z,
                                  const at::Tensor& grad_kl, at::Tensor& grad_mu,
                                  at::Tensor& grad_logvar, at::Tensor& prior_sums);
  void (*gmm_log_prob_forward)(const at::Tensor& z, const PriorTables& prior, at::Tensor& out);
  void (*gmm_log_prob_backward)(const at::Tensor& grad, const at::Tensor& z,
                                const PriorTables& prior, at::Tensor& grad_z,
                                at::Tensor& prior_sums);
  void (*philox_normal)(const PhiloxSeed& seed, at::Tensor& out);
  const char* isa;
};

// One table per compiled instruction set (defined in kernel_table.cpp).
const Kernels& kernels_DEFAULT();
const Kernels& kernels_AVX2();
const Kernels& kernels_AVX512();

// The kernels for this machine (and ATEN_CPU_CAPABILITY).
const Kernels& kernels();

PhiloxSeed read_seed(const at::Tensor& seed);

}  // namespace halfvae::cpu
