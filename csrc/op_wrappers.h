// The ops' device-independent bodies: check arguments, allocate outputs, call one device's kernels,
// turn prior sums into gradients. Each device registers them with its own kernel table.
#pragma once
#include <ATen/core/Tensor.h>

#include <tuple>

#include "kernel_table.h"

namespace halfvae {

using OptTensor = c10::optional<at::Tensor>;

std::tuple<at::Tensor, at::Tensor> reparam_gmm_kl_op(
    const Kernels& kernels, const at::Tensor& mu, const at::Tensor& logvar,
    const at::Tensor& prior_logits, const at::Tensor& prior_means, const at::Tensor& prior_logvars,
    const OptTensor& eps, const OptTensor& seed, int64_t reduction,
    const OptTensor& idx = c10::nullopt);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> reparam_gmm_kl_backward_op(
    const Kernels& kernels, const at::Tensor& grad_z, const at::Tensor& grad_kl,
    const at::Tensor& mu, const at::Tensor& logvar, const at::Tensor& prior_logits,
    const at::Tensor& prior_means, const at::Tensor& prior_logvars, const OptTensor& eps,
    const OptTensor& seed, int64_t reduction, bool prior_grads,
    const OptTensor& idx = c10::nullopt);

at::Tensor gmm_log_prob_op(const Kernels& kernels, const at::Tensor& z,
                           const at::Tensor& prior_logits, const at::Tensor& prior_means,
                           const at::Tensor& prior_logvars);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> gmm_log_prob_backward_op(
    const Kernels& kernels, const at::Tensor& grad, const at::Tensor& z,
    const at::Tensor& prior_logits, const at::Tensor& prior_means, const at::Tensor& prior_logvars,
    bool prior_grads);

void latent_rows_update_op(const Kernels& kernels, const at::Tensor& mu,
                           const at::Tensor& logvar, const at::Tensor& state,
                           const at::Tensor& idx, const at::Tensor& grad_mu,
                           const at::Tensor& grad_logvar, c10::string_view optimizer, double lr,
                           double beta1, double beta2, double eps, int64_t step);

std::tuple<at::Tensor, at::Tensor, at::Tensor> reparam_gmm_kl_rows_backward_step_op(
    const Kernels& kernels, const at::Tensor& grad_z, const at::Tensor& grad_kl,
    const at::Tensor& mu, const at::Tensor& logvar, const at::Tensor& state, const at::Tensor& idx,
    const at::Tensor& prior_logits, const at::Tensor& prior_means, const at::Tensor& prior_logvars,
    const OptTensor& eps, const OptTensor& seed, int64_t reduction, bool prior_grads,
    c10::string_view optimizer, double lr, double beta1, double beta2, double adam_eps,
    int64_t step);

at::Tensor philox_normal_op(const Kernels& kernels, const at::Tensor& seed, int64_t numel,
                            at::ScalarType dtype);

// Registers the ops for one dispatch key with a kernel-table getter.
#define HALFVAE_REGISTER_OPS(KEY, GET_KERNELS)                                                   \
  TORCH_LIBRARY_IMPL(halfvae_ext, KEY, m) {                                                      \
    m.impl("reparam_gmm_kl", [](const at::Tensor& mu, const at::Tensor& logvar,                 \
                                const at::Tensor& pl, const at::Tensor& pm, const at::Tensor& pv, \
                                const halfvae::OptTensor& eps, const halfvae::OptTensor& seed,   \
                                int64_t reduction) {                                             \
      return halfvae::reparam_gmm_kl_op(GET_KERNELS(), mu, logvar, pl, pm, pv, eps, seed,        \
                                        reduction);                                              \
    });                                                                                          \
    m.impl("reparam_gmm_kl_backward",                                                            \
           [](const at::Tensor& gz, const at::Tensor& gk, const at::Tensor& mu,                  \
              const at::Tensor& logvar, const at::Tensor& pl, const at::Tensor& pm,              \
              const at::Tensor& pv, const halfvae::OptTensor& eps,                               \
              const halfvae::OptTensor& seed, int64_t reduction, bool prior_grads) {             \
             return halfvae::reparam_gmm_kl_backward_op(GET_KERNELS(), gz, gk, mu, logvar, pl,   \
                                                        pm, pv, eps, seed, reduction,            \
                                                        prior_grads);                            \
           });                                                                                   \
    m.impl("reparam_gmm_kl_rows",                                                                \
           [](const at::Tensor& mu, const at::Tensor& logvar, const at::Tensor& idx,             \
              const at::Tensor& pl, const at::Tensor& pm, const at::Tensor& pv,                  \
              const halfvae::OptTensor& eps, const halfvae::OptTensor& seed, int64_t reduction,  \
              int64_t /*table_grad*/) {                                                          \
             return halfvae::reparam_gmm_kl_op(GET_KERNELS(), mu, logvar, pl, pm, pv, eps, seed, \
                                               reduction, idx);                                  \
           });                                                                                   \
    m.impl("reparam_gmm_kl_rows_backward",                                                       \
           [](const at::Tensor& gz, const at::Tensor& gk, const at::Tensor& mu,                  \
              const at::Tensor& logvar, const at::Tensor& idx, const at::Tensor& pl,             \
              const at::Tensor& pm, const at::Tensor& pv, const halfvae::OptTensor& eps,         \
              const halfvae::OptTensor& seed, int64_t reduction, bool prior_grads) {             \
             return halfvae::reparam_gmm_kl_backward_op(GET_KERNELS(), gz, gk, mu, logvar, pl,   \
                                                        pm, pv, eps, seed, reduction,            \
                                                        prior_grads, idx);                       \
           });                                                                                   \
    m.impl("latent_rows_update_",                                                                \
           [](const at::Tensor& mu, const at::Tensor& logvar, const at::Tensor& state,           \
              const at::Tensor& idx, const at::Tensor& gmu, const at::Tensor& glv,               \
              c10::string_view opt, double lr, double b1, double b2, double eps, int64_t step) { \
             halfvae::latent_rows_update_op(GET_KERNELS(), mu, logvar, state, idx, gmu, glv,     \
                                            opt, lr, b1, b2, eps, step);                         \
           });                                                                                   \
    m.impl("reparam_gmm_kl_rows_backward_step_",                                                 \
           [](const at::Tensor& gz, const at::Tensor& gk, const at::Tensor& mu,                  \
              const at::Tensor& logvar, const at::Tensor& state, const at::Tensor& idx,          \
              const at::Tensor& pl, const at::Tensor& pm, const at::Tensor& pv,                  \
              const halfvae::OptTensor& eps, const halfvae::OptTensor& seed, int64_t reduction,  \
              bool prior_grads, c10::string_view opt, double lr, double b1, double b2,           \
              double adam_eps, int64_t step) {                                                   \
             return halfvae::reparam_gmm_kl_rows_backward_step_op(                               \
                 GET_KERNELS(), gz, gk, mu, logvar, state, idx, pl, pm, pv, eps, seed, reduction,\
                 prior_grads, opt, lr, b1, b2, adam_eps, step);                                  \
           });                                                                                   \
    m.impl("gmm_log_prob", [](const at::Tensor& z, const at::Tensor& pl, const at::Tensor& pm,   \
                              const at::Tensor& pv) {                                            \
      return halfvae::gmm_log_prob_op(GET_KERNELS(), z, pl, pm, pv);                             \
    });                                                                                          \
    m.impl("gmm_log_prob_backward",                                                              \
           [](const at::Tensor& g, const at::Tensor& z, const at::Tensor& pl,                    \
              const at::Tensor& pm, const at::Tensor& pv, bool prior_grads) {                    \
             return halfvae::gmm_log_prob_backward_op(GET_KERNELS(), g, z, pl, pm, pv,           \
                                                      prior_grads);                              \
           });                                                                                   \
    m.impl("philox_normal", [](const at::Tensor& seed, int64_t numel, at::ScalarType dtype) {    \
      return halfvae::philox_normal_op(GET_KERNELS(), seed, numel, dtype);                       \
    });                                                                                          \
  }

}  // namespace halfvae
