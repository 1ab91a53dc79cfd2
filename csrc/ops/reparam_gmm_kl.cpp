// reparam_gmm_kl and reparam_gmm_kl_rows, forward and backward: schemas, argument preparation, the
// op bodies and their registration (one body for CPU and CUDA: it finds its device's kernels).
#include "reparam_gmm_kl.h"

#include <ATen/ATen.h>
#include <torch/library.h>

#include "../arg_checks.h"
#include "../kernel_table.h"
#include "../prior_tables.h"

namespace halfvae {

ReparamGmmKlProblem prepare_reparam_gmm_kl(const Kernels& kernels, const ReparamGmmKlArgs& args,
                                           bool range_checked) {
  const auto& [mu, logvar, prior_logits, prior_means, prior_logvars, eps, seed, reduction, idx,
               prior_index, kl_kind] = args;
  check_prior(prior_logits, prior_means, prior_logvars);
  check_latent(mu, "mu", prior_logits);
  check_latent(logvar, "logvar", prior_logits);
  TORCH_CHECK_VALUE(logvar.sizes() == mu.sizes(), "logvar must have the shape of mu ", mu.sizes(),
                    ", got ", logvar.sizes());
  TORCH_CHECK_VALUE(reduction == kReductionNone || reduction == kReductionRow,
                    "reduction code must be 0 (none) or 1 (row), got ", reduction);
  check_kl_kind(kl_kind);
  ReparamGmmKlProblem p;
  p.N = mu.size(0);
  if (idx.has_value()) {
    check_idx(*idx, mu);
    p.N = idx->size(0);
  }
  const std::vector<int64_t> latent_shape{p.N, mu.size(1)};
  TORCH_CHECK_VALUE(eps.has_value() != seed.has_value(), "pass exactly one of eps and seed");
  if (eps.has_value()) {
    TORCH_CHECK_TYPE(at::isFloatingType(eps->scalar_type()),
                     "eps must be a floating-point tensor, got dtype ",
                     dtype_name(eps->scalar_type()));
    if (idx.has_value()) {
      TORCH_CHECK_VALUE(eps->sizes() == at::IntArrayRef(latent_shape),
                        "eps must have shape [len(idx), K] = ", at::IntArrayRef(latent_shape),
                        ", got ", eps->sizes());
    } else {
      TORCH_CHECK_VALUE(eps->sizes() == mu.sizes(), "eps must have the shape of mu ", mu.sizes(),
                        ", got ", eps->sizes());
    }
  } else {
    check_seed(*seed, mu);
  }
  check_same(logvar, "logvar", mu, "mu");
  check_same(prior_logits, "prior_logits", mu, "mu");
  check_same(prior_means, "prior_means", mu, "mu");
  check_same(prior_logvars, "prior_logvars", mu, "mu");
  if (eps.has_value()) check_same(*eps, "eps", mu, "mu");
  check_kernel_dtype(kernels, mu.scalar_type(), "mu has dtype");
  check_prior_index(prior_index, p.N, prior_logits, mu);
  if (idx.has_value()) p.idx = idx->to(at::kLong).contiguous();
  if (!range_checked)  // both in one synchronization (CUDA)
    check_index_ranges({{idx.has_value() ? &p.idx : nullptr, mu.size(0), "idx", ""},
                        {prior_index.has_value() ? &*prior_index : nullptr,
                         prior_logits.dim() == 3 ? prior_logits.size(0) : 0, "prior_index",
                         " (the number of prior groups)"}});
  if (eps.has_value()) p.eps = eps->contiguous();
  else p.seed = seed->contiguous();  // the kernels read seed[0] and seed[1]
  // Gathered tables may be row-strided views (rows of mu and logvar the same distance apart,
  // elements within a row contiguous): the kernels index them as they are, without a copy.
  const bool strided_ok = idx.has_value() && mu.stride(0) == logvar.stride(0) &&
                          mu.stride(0) >= mu.size(1) &&
                          (mu.size(1) <= 1 || (mu.stride(1) == 1 && logvar.stride(1) == 1));
  p.mu = strided_ok ? mu : mu.contiguous();
  p.logvar = strided_ok ? logvar : logvar.contiguous();
  p.row_stride = strided_ok ? mu.stride(0) : mu.size(1);
  p.prior = make_prior_tables(prior_logits, prior_means, prior_logvars, prior_index);
  p.K = mu.size(1);
  p.C = p.prior.C;
  p.reduction = reduction;
  p.kl_kind = kl_kind;
  return p;
}

ReparamGmmKlGrads reparam_gmm_kl_backward_of(const Kernels& kernels, const ReparamGmmKlProblem& p,
                                             const at::Tensor& grad_z, const at::Tensor& grad_kl,
                                             bool prior_grads) {
  // (p.N is the number of gathered rows when idx is given.)
  TORCH_CHECK_VALUE(grad_z.sizes() == at::IntArrayRef(p.latent_shape()), "grad_z must have shape ",
                    at::IntArrayRef(p.latent_shape()), ", got ", grad_z.sizes());
  if (p.reduction == kReductionRow) {
    TORCH_CHECK_VALUE(grad_kl.dim() == 1 && grad_kl.size(0) == p.N,
                      "grad_kl must have shape [N] = [", p.N, "], got ", grad_kl.sizes());
  } else {
    TORCH_CHECK_VALUE(grad_kl.dim() == 2 && grad_kl.size(0) == p.N && grad_kl.size(1) == p.K,
                      "grad_kl must have shape [N, K], got ", grad_kl.sizes());
  }
  TORCH_CHECK_VALUE(grad_z.device() == p.mu.device() && grad_kl.device() == p.mu.device(),
                    "grad_z and grad_kl must be on the device of mu, ", p.mu.device(), ", got ",
                    grad_z.device(), " and ", grad_kl.device());
  const auto gz = grad_z.to(p.mu.scalar_type()).contiguous();
  const auto gk = grad_kl.to(p.mu.scalar_type()).contiguous();
  ReparamGmmKlGrads out{kernels.empty(p.latent_shape(), p.options()),
                        kernels.empty(p.latent_shape(), p.options()), {}};
  if (prior_grads) out.prior_sums = zero_prior_sums(p.prior, p.mu);
  if (p.N * p.K > 0)
    kernels.reparam_gmm_kl_backward(p, gz, gk, out.grad_mu, out.grad_logvar, out.prior_sums);
  return out;
}

namespace {

using OptTensor = c10::optional<at::Tensor>;

std::tuple<at::Tensor, at::Tensor> forward(const at::Tensor& mu, const at::Tensor& logvar,
                                           const at::Tensor& prior_logits,
                                           const at::Tensor& prior_means,
                                           const at::Tensor& prior_logvars, const OptTensor& eps,
                                           const OptTensor& seed, int64_t reduction,
                                           const OptTensor& idx, const OptTensor& prior_index,
                                           int64_t kl_kind) {
  const Kernels& kernels = kernels_for(mu);
  const auto p = prepare_reparam_gmm_kl(kernels,
                                        {mu, logvar, prior_logits, prior_means, prior_logvars,
                                         eps, seed, reduction, idx, prior_index, kl_kind},
                                        /*range_checked=*/false);
  auto z = kernels.empty(p.latent_shape(), p.options());
  auto kl = kernels.empty(p.reduction == kReductionRow ? std::vector<int64_t>{p.N}
                                                       : p.latent_shape(),
                          p.options());
  if (p.N * p.K > 0) {
    kernels.reparam_gmm_kl_forward(p, z, kl);
  } else if (kl.numel() > 0) {
    kl.zero_();  // K == 0: an empty sum per row
  }
  return {z, kl};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward(
    const at::Tensor& grad_z, const at::Tensor& grad_kl, const at::Tensor& mu,
    const at::Tensor& logvar, const at::Tensor& prior_logits, const at::Tensor& prior_means,
    const at::Tensor& prior_logvars, const OptTensor& eps, const OptTensor& seed,
    int64_t reduction, bool prior_grads, const OptTensor& idx, const OptTensor& prior_index,
    int64_t kl_kind, bool range_checked) {
  const Kernels& kernels = kernels_for(mu);
  const auto p = prepare_reparam_gmm_kl(kernels,
                                        {mu, logvar, prior_logits, prior_means, prior_logvars,
                                         eps, seed, reduction, idx, prior_index, kl_kind},
                                        range_checked);
  const auto g = reparam_gmm_kl_backward_of(kernels, p, grad_z, grad_kl, prior_grads);
  auto [gl, gm, gv] =
      prior_grads_or_zeros(g.prior_sums, p.prior, -1.0, prior_logits, prior_means, prior_logvars);
  return {g.grad_mu, g.grad_logvar, gl, gm, gv};
}

std::tuple<at::Tensor, at::Tensor> reparam_gmm_kl(const at::Tensor& mu, const at::Tensor& logvar,
                                                  const at::Tensor& prior_logits,
                                                  const at::Tensor& prior_means,
                                                  const at::Tensor& prior_logvars,
                                                  const OptTensor& eps, const OptTensor& seed,
                                                  int64_t reduction, const OptTensor& prior_index,
                                                  int64_t kl_kind) {
  return forward(mu, logvar, prior_logits, prior_means, prior_logvars, eps, seed, reduction,
                 c10::nullopt, prior_index, kl_kind);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> reparam_gmm_kl_backward(
    const at::Tensor& grad_z, const at::Tensor& grad_kl, const at::Tensor& mu,
    const at::Tensor& logvar, const at::Tensor& prior_logits, const at::Tensor& prior_means,
    const at::Tensor& prior_logvars, const OptTensor& eps, const OptTensor& seed,
    int64_t reduction, bool prior_grads, const OptTensor& prior_index, int64_t kl_kind,
    bool range_checked) {
  return backward(grad_z, grad_kl, mu, logvar, prior_logits, prior_means, prior_logvars, eps,
                  seed, reduction, prior_grads, c10::nullopt, prior_index, kl_kind,
                  range_checked);
}

std::tuple<at::Tensor, at::Tensor> reparam_gmm_kl_rows(
    const at::Tensor& mu, const at::Tensor& logvar, const at::Tensor& idx,
    const at::Tensor& prior_logits, const at::Tensor& prior_means,
    const at::Tensor& prior_logvars, const OptTensor& eps, const OptTensor& seed,
    int64_t reduction, int64_t /*table_grad: for the autograd formula only*/,
    const OptTensor& prior_index, int64_t kl_kind) {
  return forward(mu, logvar, prior_logits, prior_means, prior_logvars, eps, seed, reduction, idx,
                 prior_index, kl_kind);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
reparam_gmm_kl_rows_backward(const at::Tensor& grad_z, const at::Tensor& grad_kl,
                             const at::Tensor& mu, const at::Tensor& logvar,
                             const at::Tensor& idx, const at::Tensor& prior_logits,
                             const at::Tensor& prior_means, const at::Tensor& prior_logvars,
                             const OptTensor& eps, const OptTensor& seed, int64_t reduction,
                             bool prior_grads, const OptTensor& prior_index, int64_t kl_kind,
                             bool range_checked) {
  return backward(grad_z, grad_kl, mu, logvar, prior_logits, prior_means, prior_logvars, eps,
                  seed, reduction, prior_grads, idx, prior_index, kl_kind, range_checked);
}

void impls(torch::Library& m) {
  m.impl("reparam_gmm_kl", TORCH_FN(reparam_gmm_kl));
  m.impl("reparam_gmm_kl_backward", TORCH_FN(reparam_gmm_kl_backward));
  m.impl("reparam_gmm_kl_rows", TORCH_FN(reparam_gmm_kl_rows));
  m.impl("reparam_gmm_kl_rows_backward", TORCH_FN(reparam_gmm_kl_rows_backward));
}

}  // namespace
}  // namespace halfvae

TORCH_LIBRARY_FRAGMENT(halfvae_ext, m) {
  // Prior tensors [K, C], or [U, K, C] with prior_index [N] choosing each row's group. kl: 0
  // Monte-Carlo estimate, 1 closed-form upper bound (prior_tables.h).
  m.def(
      "reparam_gmm_kl(Tensor mu, Tensor logvar, Tensor prior_logits, Tensor prior_means, "
      "Tensor prior_logvars, Tensor? eps, Tensor? seed, int reduction, Tensor? prior_index=None, "
      "int kl=0) -> (Tensor, Tensor)");
  m.def(
      "reparam_gmm_kl_backward(Tensor grad_z, Tensor grad_kl, Tensor mu, Tensor logvar, "
      "Tensor prior_logits, Tensor prior_means, Tensor prior_logvars, Tensor? eps, Tensor? seed, "
      "int reduction, bool prior_grads, Tensor? prior_index=None, int kl=0, "
      "bool range_checked=False) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // The same on rows idx of latent tables mu, logvar [rows, K], gathered inside the kernel.
  // table_grad (0 dense, 1 sparse) only tells the autograd formula what to build. prior_index:
  // one group per gathered row, [len(idx)].
  m.def(
      "reparam_gmm_kl_rows(Tensor mu, Tensor logvar, Tensor idx, Tensor prior_logits, "
      "Tensor prior_means, Tensor prior_logvars, Tensor? eps, Tensor? seed, int reduction, "
      "int table_grad, Tensor? prior_index=None, int kl=0) -> (Tensor, Tensor)");
  // Gradients with respect to the gathered rows ([B, K], one per index, duplicates not summed).
  // range_checked (both backward ops): see prepare_reparam_gmm_kl; autograd passes True.
  m.def(
      "reparam_gmm_kl_rows_backward(Tensor grad_z, Tensor grad_kl, Tensor mu, Tensor logvar, "
      "Tensor idx, Tensor prior_logits, Tensor prior_means, Tensor prior_logvars, Tensor? eps, "
      "Tensor? seed, int reduction, bool prior_grads, Tensor? prior_index=None, int kl=0, "
      "bool range_checked=False) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(halfvae_ext, CPU, m) { halfvae::impls(m); }
#ifdef HALFVAE_WITH_CUDA
TORCH_LIBRARY_IMPL(halfvae_ext, CUDA, m) { halfvae::impls(m); }
#endif
