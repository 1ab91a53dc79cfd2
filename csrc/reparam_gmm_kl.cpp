// Schema and device-independent argument handling of reparam_gmm_kl.
#include "reparam_gmm_kl.h"

#include <ATen/ATen.h>
#include <torch/library.h>

#include <vector>

namespace halfvae {

ReparamGmmKlProblem prepare_reparam_gmm_kl(const at::Tensor& mu, const at::Tensor& logvar,
                                           const at::Tensor& prior_logits,
                                           const at::Tensor& prior_means,
                                           const at::Tensor& prior_logvars,
                                           const c10::optional<at::Tensor>& eps,
                                           const c10::optional<at::Tensor>& seed,
                                           int64_t reduction,
                                           const c10::optional<at::Tensor>& idx) {
  check_prior(prior_logits, prior_means, prior_logvars);
  check_latent(mu, "mu", prior_logits);
  check_latent(logvar, "logvar", prior_logits);
  TORCH_CHECK(logvar.sizes() == mu.sizes(), "logvar must have the shape of mu ", mu.sizes(),
              ", got ", logvar.sizes());
  TORCH_CHECK(reduction == kReductionNone || reduction == kReductionRow,
              "reduction code must be 0 (none) or 1 (row), got ", reduction);
  TORCH_CHECK(eps.has_value() != seed.has_value(), "pass exactly one of eps and seed");
  ReparamGmmKlProblem p;
  p.N = mu.size(0);
  if (idx.has_value()) {
    TORCH_CHECK(idx->dim() == 1, "idx must be a 1-D tensor of row indices, got shape ", idx->sizes());
    TORCH_CHECK(idx->scalar_type() == at::kLong || idx->scalar_type() == at::kInt,
                "idx must be an int64 or int32 tensor, got ", idx->scalar_type());
    TORCH_CHECK(idx->device() == mu.device(), "idx is on ", idx->device(), " but mu is on ",
                mu.device());
    p.idx = idx->to(at::kLong).contiguous();
    if (p.idx.numel() > 0) {
      // One synchronizing check keeps a bad index from reading (or, in the optimizer, writing)
      // outside the table.
      const auto [lo, hi] = at::aminmax(p.idx);
      const int64_t min_i = lo.item<int64_t>(), max_i = hi.item<int64_t>();
      TORCH_CHECK_INDEX(min_i >= 0 && max_i < mu.size(0), "idx values must be in [0, ", mu.size(0),
                  "), got min ", min_i, " and max ", max_i);
    }
    p.N = p.idx.numel();
  }
  const std::vector<int64_t> latent_shape{p.N, mu.size(1)};
  if (eps.has_value()) {
    TORCH_CHECK(eps->sizes() == at::IntArrayRef(latent_shape), "eps must have shape ",
                at::IntArrayRef(latent_shape), ", got ", eps->sizes());
    check_same(*eps, "eps", mu, "mu");
    p.eps = eps->contiguous();
  } else {
    check_seed(seed, mu);
    p.seed = *seed;
  }
  // Gathered tables may be row-strided views (rows of mu and logvar the same distance apart,
  // elements within a row contiguous): the kernels index them as they are, without a copy.
  const bool strided_ok = idx.has_value() && mu.stride(0) == logvar.stride(0) &&
                          mu.stride(0) >= mu.size(1) &&
                          (mu.size(1) <= 1 || (mu.stride(1) == 1 && logvar.stride(1) == 1));
  p.mu = strided_ok ? mu : mu.contiguous();
  p.logvar = strided_ok ? logvar : logvar.contiguous();
  p.row_stride = strided_ok ? mu.stride(0) : mu.size(1);
  p.prior = make_prior_tables(prior_logits, prior_means, prior_logvars);
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
  // (p.N is the number of gathered rows when idx is given.)
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
  // The same on rows idx of latent tables mu, logvar [rows, K], gathered inside the kernel.
  // table_grad (0 dense, 1 sparse) only tells the autograd formula what to build.
  m.def(
      "reparam_gmm_kl_rows(Tensor mu, Tensor logvar, Tensor idx, Tensor prior_logits, "
      "Tensor prior_means, Tensor prior_logvars, Tensor? eps, Tensor? seed, int reduction, "
      "int table_grad) -> (Tensor, Tensor)");
  // Gradients with respect to the gathered rows ([B, K], one per index, duplicates not summed).
  m.def(
      "reparam_gmm_kl_rows_backward(Tensor grad_z, Tensor grad_kl, Tensor mu, Tensor logvar, "
      "Tensor idx, Tensor prior_logits, Tensor prior_means, Tensor prior_logvars, Tensor? eps, "
      "Tensor? seed, int reduction, bool prior_grads) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
}
