// Schema and device-independent argument handling of reparam_gmm_kl.
#include "reparam_gmm_kl.h"

#include <ATen/ATen.h>
#include <torch/library.h>

namespace halfvae {

ReparamGmmKlProblem prepare_reparam_gmm_kl(const at::Tensor& mu, const at::Tensor& logvar,
                                           const at::Tensor& prior_logits,
                                           const at::Tensor& prior_means,
                                           const at::Tensor& prior_logvars,
                                           const c10::optional<at::Tensor>& eps,
                                           const c10::optional<at::Tensor>& seed,
                                           int64_t reduction) {
  check_prior(prior_logits, prior_means, prior_logvars);
  check_latent(mu, "mu", prior_logits);
  check_latent(logvar, "logvar", prior_logits);
  TORCH_CHECK(logvar.sizes() == mu.sizes(), "logvar must have the shape of mu ", mu.sizes(),
              ", got ", logvar.sizes());
  TORCH_CHECK(reduction == kReductionNone || reduction == kReductionRow,
              "reduction code must be 0 (none) or 1 (row), got ", reduction);
  TORCH_CHECK(eps.has_value() != seed.has_value(), "pass exactly one of eps and seed");
  ReparamGmmKlProblem p;
  if (eps.has_value()) {
    TORCH_CHECK(eps->sizes() == mu.sizes(), "eps must have the shape of mu ", mu.sizes(), ", got ",
                eps->sizes());
    check_same(*eps, "eps", mu, "mu");
    p.eps = eps->contiguous();
  } else {
    check_seed(seed, mu);
    p.seed = *seed;
  }
  p.mu = mu.contiguous();
  p.logvar = logvar.contiguous();
  p.prior = make_prior_tables(prior_logits, prior_means, prior_logvars);
  p.N = mu.size(0);
  p.K = mu.size(1);
  p.C = prior_logits.size(1);
  p.reduction = reduction;
  return p;
}

std::vector<int64_t> kl_shape(const ReparamGmmKlProblem& p) {
  if (p.reduction == kReductionRow) return {p.N};
  return {p.N, p.K};
}

at::Tensor checked_grad_kl(const ReparamGmmKlProblem& p, const at::Tensor& grad_kl) {
  if (p.reduction == kReductionRow) {
    TORCH_CHECK(grad_kl.dim() == 1 && grad_kl.size(0) == p.N, "grad_kl must have shape [N] = [",
                p.N, "], got ", grad_kl.sizes());
  } else {
    TORCH_CHECK(grad_kl.dim() == 2 && grad_kl.size(0) == p.N && grad_kl.size(1) == p.K,
                "grad_kl must have shape [N, K], got ", grad_kl.sizes());
  }
  return grad_kl.to(p.mu.scalar_type()).contiguous();
}

}  // namespace halfvae

TORCH_LIBRARY_FRAGMENT(halfvae_ext, m) {
  m.def(
      "reparam_gmm_kl(Tensor mu, Tensor logvar, Tensor prior_logits, Tensor prior_means, "
      "Tensor prior_logvars, Tensor? eps, Tensor? seed, int reduction) -> (Tensor, Tensor)");
  m.def(
      "reparam_gmm_kl_backward(Tensor grad_z, Tensor grad_kl, Tensor mu, Tensor logvar, "
      "Tensor prior_logits, Tensor prior_means, Tensor prior_logvars, Tensor? eps, Tensor? seed, "
      "int reduction, bool prior_grads) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
}
