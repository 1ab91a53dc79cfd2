// Schema and device-independent preparation of latent_rows_update_.
#include "latent_rows_update.h"

#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>

#include "op_wrappers.h"

namespace halfvae {

RowUpdate make_row_update(const at::Tensor& mu, const at::Tensor& logvar, const at::Tensor& state,
                          c10::string_view optimizer, double lr, double beta1, double beta2,
                          double eps, int64_t step) {
  for (const auto* t : {&mu, &logvar})
    TORCH_CHECK(t->dim() == 2 && t->sizes() == mu.sizes() && t->stride(0) == mu.stride(0) &&
                    t->stride(0) >= t->size(1) && (t->size(1) <= 1 || t->stride(1) == 1),
                "mu and logvar must be [rows, K] tables of one shape whose rows are contiguous "
                "and equally spaced (contiguous tables, or the halves of one [rows, 2, K] "
                "table), got shapes ", mu.sizes(), " and ", logvar.sizes(), ", strides ",
                mu.strides(), " and ", logvar.strides());
  check_same(logvar, "logvar", mu, "mu");
  TORCH_CHECK(lr >= 0, "lr must be non-negative, got ", lr);
  RowUpdate u;
  if (optimizer == "adam") {
    u.optimizer = RowOptimizer::kAdam;
    TORCH_CHECK(state.dim() == 3 && state.size(0) == mu.size(0) && state.size(1) == 4 &&
                    state.size(2) == mu.size(1) && state.is_contiguous(),
                "Adam state must be a contiguous [rows, 4, K] tensor, got ", state.sizes());
    check_same(state, "state", mu, "mu");
    TORCH_CHECK(step >= 1, "step must be >= 1 (the step being taken), got ", step);
    TORCH_CHECK(0 <= beta1 && beta1 < 1 && 0 <= beta2 && beta2 < 1,
                "betas must be in [0, 1), got ", beta1, ", ", beta2);
    TORCH_CHECK(eps > 0, "eps must be positive, got ", eps);
    u.state = state;
    u.step_size = lr * std::sqrt(1 - std::pow(beta2, double(step))) /
                  (1 - std::pow(beta1, double(step)));
  } else {
    TORCH_CHECK(optimizer == "sgd", "optimizer must be 'adam' or 'sgd', got '", optimizer, "'");
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

void latent_rows_update_op(const Kernels& kernels, const at::Tensor& mu,
                           const at::Tensor& logvar, const at::Tensor& state,
                           const at::Tensor& idx, const at::Tensor& grad_mu,
                           const at::Tensor& grad_logvar, c10::string_view optimizer, double lr,
                           double beta1, double beta2, double eps, int64_t step) {
  RowUpdate u = make_row_update(mu, logvar, state, optimizer, lr, beta1, beta2, eps, step);
  TORCH_CHECK(idx.dim() == 1 && (idx.scalar_type() == at::kLong || idx.scalar_type() == at::kInt),
              "idx must be a 1-D int64 or int32 tensor");
  TORCH_CHECK(idx.device() == mu.device(), "idx is on ", idx.device(), " but mu is on ",
              mu.device());
  for (const auto* g : {&grad_mu, &grad_logvar}) {
    TORCH_CHECK(g->dim() == 2 && g->size(0) == idx.size(0) && g->size(1) == mu.size(1),
                "gradients must have shape [len(idx), K] = [", idx.size(0), ", ", mu.size(1),
                "], got ", g->sizes());
    check_same(*g, "gradient", mu, "mu");
  }
  if (idx.numel() == 0) return;
  u.idx = idx.to(at::kLong).contiguous();
  const auto [lo, hi] = at::aminmax(u.idx);
  const int64_t min_i = lo.item<int64_t>(), max_i = hi.item<int64_t>();
  // Checked before anything is written.
  TORCH_CHECK_INDEX(min_i >= 0 && max_i < mu.size(0), "idx values must be in [0, ", mu.size(0),
              "), got min ", min_i, " and max ", max_i);
  u.grad_mu = grad_mu.contiguous();
  u.grad_logvar = grad_logvar.contiguous();
  kernels.latent_rows_update(u);
}

}  // namespace halfvae

TORCH_LIBRARY_FRAGMENT(halfvae_ext, m) {
  m.def(
      "latent_rows_update_(Tensor(a!) mu, Tensor(b!) logvar, Tensor(c!) state, Tensor idx, "
      "Tensor grad_mu, Tensor grad_logvar, str optimizer, float lr, float beta1, float beta2, "
      "float eps, int step) -> ()");
  // The backward of reparam_gmm_kl_rows fused with that step: the gradients of the gathered rows
  // never leave the op, idx is checked once, and (CPU) the backward prefetches the rows of the
  // optimizer state that the step will write, so their cache misses overlap its arithmetic.
  // Returns the prior's gradients.
  m.def(
      "reparam_gmm_kl_rows_backward_step_(Tensor grad_z, Tensor grad_kl, Tensor(a!) mu, "
      "Tensor(b!) logvar, Tensor(c!) state, Tensor idx, Tensor prior_logits, Tensor prior_means, "
      "Tensor prior_logvars, Tensor? eps, Tensor? seed, int reduction, bool prior_grads, "
      "str optimizer, float lr, float beta1, float beta2, float adam_eps, int step) -> "
      "(Tensor, Tensor, Tensor)");
}
