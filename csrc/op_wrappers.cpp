#include "op_wrappers.h"

#include <ATen/ATen.h>

#include "latent_rows_update.h"

namespace halfvae {
namespace {

void check_dtype(const Kernels& kernels, at::ScalarType dtype, const char* name) {
  const bool full = dtype == at::kFloat || dtype == at::kDouble;
  const bool half = dtype == at::kHalf || dtype == at::kBFloat16;
  TORCH_CHECK(full || (half && kernels.half_types), name, " has dtype ", dtype, ", which the ",
              kernels.name, " kernels do not support (float32, float64",
              kernels.half_types ? ", float16, bfloat16)" : ")");
}

at::Tensor zero_sums(const PriorTables& t, const at::Tensor& like) {
  return at::zeros({t.K, 3 * t.C + 1}, like.options().dtype(at::kDouble));
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> reparam_gmm_kl_op(
    const Kernels& kernels, const at::Tensor& mu, const at::Tensor& logvar,
    const at::Tensor& prior_logits, const at::Tensor& prior_means, const at::Tensor& prior_logvars,
    const OptTensor& eps, const OptTensor& seed, int64_t reduction, const OptTensor& idx) {
  check_dtype(kernels, mu.scalar_type(), "mu");
  auto p = prepare_reparam_gmm_kl(mu, logvar, prior_logits, prior_means, prior_logvars, eps, seed,
                                  reduction, idx);
  auto z = kernels.empty(p.latent_shape(), p.options());
  auto kl = kernels.empty(kl_shape(p), p.options());
  if (p.N * p.K > 0) {
    kernels.reparam_gmm_kl_forward(p, z, kl);
  } else if (kl.numel() > 0) {
    kl.zero_();  // K == 0: an empty sum per row
  }
  return {z, kl};
}

namespace {

struct BackwardOutputs {
  at::Tensor grad_mu, grad_logvar;  // [N, K]
  at::Tensor sums;                  // [K, 3C+1] prior sums, or undefined
};

BackwardOutputs run_backward(const Kernels& kernels, const ReparamGmmKlProblem& p,
                             const at::Tensor& grad_z, const at::Tensor& grad_kl,
                             bool prior_grads) {
  TORCH_CHECK(grad_z.sizes() == at::IntArrayRef(p.latent_shape()), "grad_z must have shape ",
              at::IntArrayRef(p.latent_shape()), ", got ", grad_z.sizes());
  const auto gz = grad_z.to(p.mu.scalar_type()).contiguous();
  const auto gk = checked_grad_kl(p, grad_kl);
  BackwardOutputs out{kernels.empty(p.latent_shape(), p.options()),
                      kernels.empty(p.latent_shape(), p.options()), {}};
  if (prior_grads) out.sums = zero_sums(p.prior, p.mu);
  if (p.N * p.K > 0)
    kernels.reparam_gmm_kl_backward(p, gz, gk, out.grad_mu, out.grad_logvar, out.sums);
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> prior_grads_of(const BackwardOutputs& out,
                                                              const ReparamGmmKlProblem& p,
                                                              const at::Tensor& prior_logits,
                                                              const at::Tensor& prior_means,
                                                              const at::Tensor& prior_logvars) {
  if (!out.sums.defined())
    return {at::zeros_like(prior_logits), at::zeros_like(prior_means),
            at::zeros_like(prior_logvars)};
  return prior_grads_from_sums(out.sums, p.prior, -1.0, prior_logits.scalar_type());
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> reparam_gmm_kl_backward_op(
    const Kernels& kernels, const at::Tensor& grad_z, const at::Tensor& grad_kl,
    const at::Tensor& mu, const at::Tensor& logvar, const at::Tensor& prior_logits,
    const at::Tensor& prior_means, const at::Tensor& prior_logvars, const OptTensor& eps,
    const OptTensor& seed, int64_t reduction, bool prior_grads, const OptTensor& idx) {
  check_dtype(kernels, mu.scalar_type(), "mu");
  const auto p = prepare_reparam_gmm_kl(mu, logvar, prior_logits, prior_means, prior_logvars, eps,
                                        seed, reduction, idx);
  const auto out = run_backward(kernels, p, grad_z, grad_kl, prior_grads);
  auto [gl, gm, gv] = prior_grads_of(out, p, prior_logits, prior_means, prior_logvars);
  return {out.grad_mu, out.grad_logvar, gl, gm, gv};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> reparam_gmm_kl_rows_backward_step_op(
    const Kernels& kernels, const at::Tensor& grad_z, const at::Tensor& grad_kl,
    const at::Tensor& mu, const at::Tensor& logvar, const at::Tensor& state, const at::Tensor& idx,
    const at::Tensor& prior_logits, const at::Tensor& prior_means, const at::Tensor& prior_logvars,
    const OptTensor& eps, const OptTensor& seed, int64_t reduction, bool prior_grads,
    c10::string_view optimizer, double lr, double beta1, double beta2, double adam_eps,
    int64_t step) {
  check_dtype(kernels, mu.scalar_type(), "mu");
  // Every check (the optimizer's, then idx's range) comes before anything is written.
  RowUpdate u = make_row_update(mu, logvar, state, optimizer, lr, beta1, beta2, adam_eps, step);
  auto p = prepare_reparam_gmm_kl(mu, logvar, prior_logits, prior_means, prior_logvars, eps, seed,
                                  reduction, idx);
  u.idx = p.idx;
  if (kernels.backward_steps_rows) p.row_step = &u;
  const auto out = run_backward(kernels, p, grad_z, grad_kl, prior_grads);
  if (!kernels.backward_steps_rows && p.N * p.K > 0) {
    u.grad_mu = out.grad_mu;
    u.grad_logvar = out.grad_logvar;
    kernels.latent_rows_update(u);
  }
  return prior_grads_of(out, p, prior_logits, prior_means, prior_logvars);
}

at::Tensor gmm_log_prob_op(const Kernels& kernels, const at::Tensor& z,
                           const at::Tensor& prior_logits, const at::Tensor& prior_means,
                           const at::Tensor& prior_logvars) {
  check_prior(prior_logits, prior_means, prior_logvars);
  check_latent(z, "z", prior_logits);
  check_dtype(kernels, z.scalar_type(), "z");
  const auto zc = z.contiguous();
  auto out = kernels.empty(zc.sizes(), zc.options());
  if (zc.numel() > 0)
    kernels.gmm_log_prob_forward(zc, make_prior_tables(prior_logits, prior_means, prior_logvars),
                                 out);
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> gmm_log_prob_backward_op(
    const Kernels& kernels, const at::Tensor& grad, const at::Tensor& z,
    const at::Tensor& prior_logits, const at::Tensor& prior_means, const at::Tensor& prior_logvars,
    bool prior_grads) {
  check_prior(prior_logits, prior_means, prior_logvars);
  check_latent(z, "z", prior_logits);
  check_dtype(kernels, z.scalar_type(), "z");
  TORCH_CHECK(grad.sizes() == z.sizes(), "grad must have the shape of z ", z.sizes(), ", got ",
              grad.sizes());
  const auto zc = z.contiguous();
  const auto gc = grad.to(z.scalar_type()).contiguous();
  const auto tables = make_prior_tables(prior_logits, prior_means, prior_logvars);
  auto grad_z = kernels.empty(zc.sizes(), zc.options());
  at::Tensor sums;
  if (prior_grads) sums = zero_sums(tables, z);
  if (zc.numel() > 0) kernels.gmm_log_prob_backward(gc, zc, tables, grad_z, sums);
  if (!prior_grads) {
    return {grad_z, at::zeros_like(prior_logits), at::zeros_like(prior_means),
            at::zeros_like(prior_logvars)};
  }
  auto [gl, gm, gv] = prior_grads_from_sums(sums, tables, 1.0, prior_logits.scalar_type());
  return {grad_z, gl, gm, gv};
}

at::Tensor philox_normal_op(const Kernels& kernels, const at::Tensor& seed, int64_t numel,
                            at::ScalarType dtype) {
  check_seed(seed, seed);
  TORCH_CHECK(numel >= 0, "numel must be non-negative, got ", numel);
  check_dtype(kernels, dtype, "dtype");
  auto out = at::empty({numel}, seed.options().dtype(dtype));
  if (numel > 0) kernels.philox_normal(seed, out);
  return out;
}

}  // namespace halfvae
