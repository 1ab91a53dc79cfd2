// Kernel entry points of one instruction set; the including file is compiled with CPU_CAPABILITY set.
#pragma once
#include "../kernel_table.h"

namespace halfvae::cpu {
inline namespace CPU_CAPABILITY {
void reparam_gmm_kl_forward(const ReparamGmmKlProblem& p, at::Tensor& z, at::Tensor& kl);
void reparam_gmm_kl_backward(const ReparamGmmKlProblem& p, const at::Tensor& grad_z,
                             const at::Tensor& grad_kl, at::Tensor& grad_mu,
                             at::Tensor& grad_logvar, at::Tensor& prior_sums);
void gmm_log_prob_forward(const at::Tensor& z, const PriorTables& prior, at::Tensor& out);
void gmm_log_prob_backward(const at::Tensor& grad, const at::Tensor& z, const PriorTables& prior,
                           at::Tensor& grad_z, at::Tensor& prior_sums);
void philox_normal(const at::Tensor& seed, at::Tensor& out);
void latent_rows_update(const RowUpdate& u);
}  // namespace CPU_CAPABILITY
}  // namespace halfvae::cpu
