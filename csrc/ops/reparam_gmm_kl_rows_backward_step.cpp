// reparam_gmm_kl_rows_backward_step_: the backward of reparam_gmm_kl_rows fused with the optimizer
// step of latent_rows_update_. Schema, body and registration (one body for CPU and CUDA).
#include <ATen/ATen.h>
#include <torch/library.h>

#include "../arg_checks.h"
#include "../kernel_table.h"
#include "../prior_tables.h"
#include "latent_rows_update.h"
#include "reparam_gmm_kl.h"

namespace halfvae {
namespace {

using OptTensor = c10::optional<at::Tensor>;

// A gradient of the gathered rows from other terms, [len(idx), K] like them, or undefined.
at::Tensor extra_row_gradient(const OptTensor& g, const char* name, const ReparamGmmKlProblem& p,
                              const at::Tensor& mu) {
  if (!g.has_value()) return {};
  TORCH_CHECK_VALUE(g->sizes() == at::IntArrayRef(p.latent_shape()), name,
                    " must have shape [len(idx), K] = ", at::IntArrayRef(p.latent_shape()),
                    ", got ", g->sizes());
  check_same(*g, name, mu, "mu");
  return g->contiguous();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> reparam_gmm_kl_rows_backward_step_(
    const at::Tensor& grad_z, const at::Tensor& grad_kl, const OptTensor& grad_mu_rows,
    const OptTensor& grad_logvar_rows, const at::Tensor& mu,
    const at::Tensor& logvar, const at::Tensor& state, const at::Tensor& idx,
    const at::Tensor& prior_logits, const at::Tensor& prior_means, const at::Tensor& prior_logvars,
    const OptTensor& eps, const OptTensor& seed, int64_t reduction, bool prior_grads,
    c10::string_view optimizer, double lr, double beta1, double beta2, double adam_eps,
    int64_t step, const OptTensor& prior_index, int64_t kl_kind, bool range_checked,
    const OptTensor& row_state, int64_t row_offset) {
  const Kernels& kernels = kernels_for(mu);
  // Every check (the optimizer's, then the problem's, the index ranges last unless the forward
  // made them: range_checked) comes before anything is written.
  RowUpdate u =
      make_row_update(kernels, mu, logvar, state, optimizer, lr, beta1, beta2, adam_eps, step,
                      row_state, row_offset);
  const OptTensor gathered_rows{idx};
  auto p = prepare_reparam_gmm_kl(kernels,
                                  {mu, logvar, prior_logits, prior_means, prior_logvars, eps,
                                   seed, reduction, gathered_rows, prior_index, kl_kind},
                                  range_checked);
  p.extra_grad_mu = extra_row_gradient(grad_mu_rows, "grad_mu_rows", p, mu);
  p.extra_grad_logvar = extra_row_gradient(grad_logvar_rows, "grad_logvar_rows", p, mu);
  u.idx = p.idx;
  p.row_step = &u;
  const auto g = reparam_gmm_kl_backward_of(kernels, p, grad_z, grad_kl, prior_grads);
  return prior_grads_or_zeros(g.prior_sums, p.prior, -1.0, prior_logits, prior_means,
                              prior_logvars);
}

void impls(torch::Library& m) {
  m.impl("reparam_gmm_kl_rows_backward_step_", TORCH_FN(reparam_gmm_kl_rows_backward_step_));
}

}  // namespace
}  // namespace halfvae

TORCH_LIBRARY_FRAGMENT(halfvae_ext, m) {
  // The gradients of the gathered rows never leave the op, idx is checked once, and (CPU) the
  // backward prefetches the rows of the optimizer state that the step will write, so their cache
  // misses overlap its arithmetic. grad_mu_rows, grad_logvar_rows: optional [B, K] gradients of
  // the gathered rows from other terms (a likelihood that uses mu and logvar), added to each
  // index's gradient before duplicates are summed and the rows stepped. range_checked: the
  // forward checked idx and prior_index (autograd passes True; see prepare_reparam_gmm_kl): then
  // the step makes no host synchronization. row_offset: as latent_rows_update_'s. Returns the
  // prior's gradients.
  m.def(
      "reparam_gmm_kl_rows_backward_step_(Tensor grad_z, Tensor grad_kl, Tensor? grad_mu_rows, "
      "Tensor? grad_logvar_rows, Tensor(a!) mu, Tensor(b!) logvar, Tensor(c!) state, Tensor idx, "
      "Tensor prior_logits, Tensor prior_means, Tensor prior_logvars, Tensor? eps, Tensor? seed, "
      "int reduction, bool prior_grads, str optimizer, float lr, float beta1, float beta2, "
      "float adam_eps, int step, Tensor? prior_index=None, int kl=0, bool range_checked=False, "
      "Tensor(d!)? row_state=None, int row_offset=0) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(halfvae_ext, CPU, m) { halfvae::impls(m); }
#ifdef HALFVAE_WITH_CUDA
TORCH_LIBRARY_IMPL(halfvae_ext, CUDA, m) { halfvae::impls(m); }
#endif
