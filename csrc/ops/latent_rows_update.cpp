// latent_rows_update_: schema, checks, body and registration (one body for CPU and CUDA); and
// make_row_update, the preparation it shares with reparam_gmm_kl_rows_backward_step_.
#include "latent_rows_update.h"

#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>

#include "../arg_checks.h"
#include "../kernel_table.h"

namespace halfvae {

RowUpdate make_row_update(const Kernels& kernels, const at::Tensor& mu, const at::Tensor& logvar,
                          const at::Tensor& state, c10::string_view optimizer, double lr,
                          double beta1, double beta2, double eps, int64_t step) {
  for (const auto* t : {&mu, &logvar})
    TORCH_CHECK_VALUE(t->dim() == 2 && t->sizes() == mu.sizes() && t->stride(0) == mu.stride(0) &&
                          t->stride(0) >= t->size(1) && (t->size(1) <= 1 || t->stride(1) == 1),
                      "mu and logvar must be [rows, K] tables of one shape whose rows are "
                      "contiguous and equally spaced (contiguous tables, or the halves of one "
                      "[rows, 2, K] table), got shapes ", mu.sizes(), " and ", logvar.sizes(),
                      ", strides ", mu.strides(), " and ", logvar.strides());
  check_same(logvar, "logvar", mu, "mu");
  check_kernel_dtype(kernels, mu.scalar_type(), "mu has dtype");
  TORCH_CHECK_VALUE(lr >= 0, "lr must be non-negative, got ", lr);
  RowUpdate u;
  if (optimizer == "adam") {
    u.optimizer = RowOptimizer::kAdam;
    TORCH_CHECK_VALUE(state.dim() == 3 && state.size(0) == mu.size(0) && state.size(1) == 4 &&
                          state.size(2) == mu.size(1) && state.is_contiguous(),
                      "Adam state must be a contiguous [rows, 4, K] tensor, got ", state.sizes());
    check_same(state, "state", mu, "mu");
    TORCH_CHECK_VALUE(step >= 1, "step must be >= 1 (the step being taken), got ", step);
    TORCH_CHECK_VALUE(0 <= beta1 && beta1 < 1 && 0 <= beta2 && beta2 < 1,
                      "betas must be in [0, 1), got ", beta1, ", ", beta2);
    TORCH_CHECK_VALUE(eps > 0, "eps must be positive, got ", eps);
    u.state = state;
    u.step_size = lr * std::sqrt(1 - std::pow(beta2, double(step))) /
                  (1 - std::pow(beta1, double(step)));
  } else {
    TORCH_CHECK_VALUE(optimizer == "sgd", "optimizer must be 'adam' or 'sgd', got '", optimizer,
                      "'");
    u.optimizer = RowOptimizer::kSgd;
  }
  u.mu = mu;
  u.logvar = logvar;
  u.row_stride = mu.stride(0);
  u.lr = lr;
  u.beta1 = beta1;
  u.beta2 = beta2;
  u.eps = eps;
  return u;
}

namespace {

void latent_rows_update_(const at::Tensor& mu, const at::Tensor& logvar, const at::Tensor& state,
                         const at::Tensor& idx, const at::Tensor& grad_mu,
                         const at::Tensor& grad_logvar, c10::string_view optimizer, double lr,
                         double beta1, double beta2, double eps, int64_t step) {
  const Kernels& kernels = kernels_for(mu);
  RowUpdate u = make_row_update(kernels, mu, logvar, state, optimizer, lr, beta1, beta2, eps, step);
  check_idx(idx, mu);
  using Named = std::pair<const at::Tensor*, const char*>;
  for (const auto& [g, name] : {Named{&grad_mu, "grad_mu"}, Named{&grad_logvar, "grad_logvar"}}) {
    TORCH_CHECK_VALUE(g->dim() == 2 && g->size(0) == idx.size(0) && g->size(1) == mu.size(1),
                      name, " must have shape [len(idx), K] = [", idx.size(0), ", ", mu.size(1),
                      "], got ", g->sizes());
    check_same(*g, name, mu, "mu");
  }
  if (idx.numel() == 0) return;
  u.idx = idx.to(at::kLong).contiguous();
  check_idx_range(u.idx, mu.size(0));  // before anything is written
  if (mu.size(1) == 0) return;  // K == 0: no element to step
  u.grad_mu = grad_mu.contiguous();
  u.grad_logvar = grad_logvar.contiguous();
  kernels.latent_rows_update(u);
}

void impls(torch::Library& m) { m.impl("latent_rows_update_", TORCH_FN(latent_rows_update_)); }

}  // namespace
}  // namespace halfvae

TORCH_LIBRARY_FRAGMENT(halfvae_ext, m) {
  // The optimizer step of a latent table (mu and logvar) for the rows a batch touched, applied in
  // place without ever forming a gradient of the whole table. Duplicate indices are summed first,
  // in batch order, so the result is deterministic.
  m.def(
      "latent_rows_update_(Tensor(a!) mu, Tensor(b!) logvar, Tensor(c!) state, Tensor idx, "
      "Tensor grad_mu, Tensor grad_logvar, str optimizer, float lr, float beta1, float beta2, "
      "float eps, int step) -> ()");
}

TORCH_LIBRARY_IMPL(halfvae_ext, CPU, m) { halfvae::impls(m); }
#ifdef HALFVAE_WITH_CUDA
TORCH_LIBRARY_IMPL(halfvae_ext, CUDA, m) { halfvae::impls(m); }
#endif
