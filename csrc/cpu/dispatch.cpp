// CPU registrations: argument preparation (once), then the kernel of the best instruction set.
#include <ATen/ATen.h>
#include <ATen/Version.h>
#include <torch/library.h>

#include "kernels.h"

namespace halfvae::cpu {

const Kernels& kernels() {
  static const Kernels& chosen = [] () -> const Kernels& {
    // torch's own choice, which honours ATEN_CPU_CAPABILITY.
    const std::string cap = at::get_cpu_capability();
#ifdef HALFVAE_HAVE_AVX512
    if (cap.rfind("AVX512", 0) == 0) return kernels_AVX512();
#endif
#ifdef HALFVAE_HAVE_AVX2
    if (cap.rfind("AVX2", 0) == 0 || cap.rfind("AVX512", 0) == 0) return kernels_AVX2();
#endif
    return kernels_DEFAULT();
  }();
  return chosen;
}

PhiloxSeed read_seed(const at::Tensor& seed) {
  const auto s = seed.to(at::kCPU).contiguous();
  const int64_t* v = s.data_ptr<int64_t>();
  return PhiloxSeed{static_cast<uint64_t>(v[0]), static_cast<uint64_t>(v[1])};
}

namespace {

void check_cpu_dtype(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble,
              "on the CPU ", name, " must be float32 or float64, got ", t.scalar_type());
}

std::tuple<at::Tensor, at::Tensor> reparam_gmm_kl_cpu(
    const at::Tensor& mu, const at::Tensor& logvar, const at::Tensor& prior_logits,
    const at::Tensor& prior_means, const at::Tensor& prior_logvars,
    const c10::optional<at::Tensor>& eps, const c10::optional<at::Tensor>& seed,
    int64_t reduction) {
  check_cpu_dtype(mu, "mu");
  auto p = prepare_reparam_gmm_kl(mu, logvar, prior_logits, prior_means, prior_logvars, eps, seed,
                                  reduction);
  auto z = at::empty_like(p.mu);
  auto kl = empty_kl(p);
  if (p.N * p.K > 0) kernels().reparam_gmm_kl_forward(p, z, kl);
  return {z, kl};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
reparam_gmm_kl_backward_cpu(const at::Tensor& grad_z, const at::Tensor& grad_kl,
                            const at::Tensor& mu, const at::Tensor& logvar,
                            const at::Tensor& prior_logits, const at::Tensor& prior_means,
                            const at::Tensor& prior_logvars, const c10::optional<at::Tensor>& eps,
                            const c10::optional<at::Tensor>& seed, int64_t reduction,
                            bool prior_grads) {
  check_cpu_dtype(mu, "mu");
  auto p = prepare_reparam_gmm_kl(mu, logvar, prior_logits, prior_means, prior_logvars, eps, seed,
                                  reduction);
  TORCH_CHECK(grad_z.sizes() == mu.sizes(), "grad_z must have the shape of mu");
  const auto gz = grad_z.to(mu.scalar_type()).contiguous();
  const auto gk = checked_grad_kl(p, grad_kl);
  auto grad_mu = at::empty_like(p.mu);
  auto grad_logvar = at::empty_like(p.mu);
  at::Tensor sums;
  if (prior_grads) sums = at::zeros({p.K, 3 * p.C + 1}, mu.options().dtype(at::kDouble));
  if (p.N * p.K > 0)
    kernels().reparam_gmm_kl_backward(p, gz, gk, grad_mu, grad_logvar, sums);
  if (!prior_grads) {
    auto zero = at::zeros_like(prior_logits);
    return {grad_mu, grad_logvar, zero, zero.clone(), zero.clone()};
  }
  auto [gl, gm, glv] = prior_grads_from_sums(sums, p.prior, -1.0, prior_logits.scalar_type());
  return {grad_mu, grad_logvar, gl, gm, glv};
}

at::Tensor gmm_log_prob_cpu(const at::Tensor& z, const at::Tensor& prior_logits,
                            const at::Tensor& prior_means, const at::Tensor& prior_logvars) {
  check_prior(prior_logits, prior_means, prior_logvars);
  check_latent(z, "z", prior_logits);
  check_cpu_dtype(z, "z");
  const auto zc = z.contiguous();
  auto out = at::empty_like(zc);
  if (zc.numel() > 0)
    kernels().gmm_log_prob_forward(zc, make_prior_tables(prior_logits, prior_means, prior_logvars),
                                   out);
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> gmm_log_prob_backward_cpu(
    const at::Tensor& grad, const at::Tensor& z, const at::Tensor& prior_logits,
    const at::Tensor& prior_means, const at::Tensor& prior_logvars, bool prior_grads) {
  check_prior(prior_logits, prior_means, prior_logvars);
  check_latent(z, "z", prior_logits);
  check_cpu_dtype(z, "z");
  TORCH_CHECK(grad.sizes() == z.sizes(), "grad must have the shape of z");
  const auto zc = z.contiguous();
  const auto gc = grad.to(z.scalar_type()).contiguous();
  const auto tables = make_prior_tables(prior_logits, prior_means, prior_logvars);
  auto grad_z = at::empty_like(zc);
  at::Tensor sums;
  if (prior_grads) sums = at::zeros({tables.K, 3 * tables.C + 1}, z.options().dtype(at::kDouble));
  if (zc.numel() > 0) kernels().gmm_log_prob_backward(gc, zc, tables, grad_z, sums);
  if (!prior_grads) {
    auto zero = at::zeros_like(prior_logits);
    return {grad_z, zero, zero.clone(), zero.clone()};
  }
  auto [gl, gm, glv] = prior_grads_from_sums(sums, tables, 1.0, prior_logits.scalar_type());
  return {grad_z, gl, gm, glv};
}

at::Tensor philox_normal_cpu(const at::Tensor& seed, int64_t numel, at::ScalarType dtype) {
  check_seed(seed, seed);
  TORCH_CHECK(numel >= 0, "numel must be non-negative, got ", numel);
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble,
              "on the CPU dtype must be float32 or float64, got ", dtype);
  auto out = at::empty({numel}, seed.options().dtype(dtype));
  if (numel > 0) kernels().philox_normal(read_seed(seed), out);
  return out;
}

}  // namespace
}  // namespace halfvae::cpu

TORCH_LIBRARY_IMPL(halfvae_ext, CPU, m) {
  m.impl("reparam_gmm_kl", &halfvae::cpu::reparam_gmm_kl_cpu);
  m.impl("reparam_gmm_kl_backward", &halfvae::cpu::reparam_gmm_kl_backward_cpu);
  m.impl("gmm_log_prob", &halfvae::cpu::gmm_log_prob_cpu);
  m.impl("gmm_log_prob_backward", &halfvae::cpu::gmm_log_prob_backward_cpu);
  m.impl("philox_normal", &halfvae::cpu::philox_normal_cpu);
}
