// gmm_log_prob: log p_k(z[n, k]) under a per-dimension Gaussian mixture, and its backward: schemas,
// argument checks, the op bodies and their registration (one body for CPU and CUDA).
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include "../arg_checks.h"
#include "../kernel_table.h"
#include "../prior_tables.h"

namespace halfvae {
namespace {

void check_arguments(const Kernels& kernels, const at::Tensor& z, const at::Tensor& prior_logits,
                     const at::Tensor& prior_means, const at::Tensor& prior_logvars,
                     const c10::optional<at::Tensor>& prior_index, bool range_checked) {
  check_prior(prior_logits, prior_means, prior_logvars);
  check_latent(z, "z", prior_logits);
  check_same(prior_logits, "prior_logits", z, "z");
  check_same(prior_means, "prior_means", z, "z");
  check_same(prior_logvars, "prior_logvars", z, "z");
  check_kernel_dtype(kernels, z.scalar_type(), "z has dtype");
  check_prior_index(prior_index, z.size(0), prior_logits, z);
  if (prior_index.has_value() && !range_checked)
    check_index_ranges({{&*prior_index, prior_logits.size(0), "prior_index",
                         " (the number of prior groups)"}});
}

at::Tensor gmm_log_prob(const at::Tensor& z, const at::Tensor& prior_logits,
                        const at::Tensor& prior_means, const at::Tensor& prior_logvars,
                        const c10::optional<at::Tensor>& prior_index) {
  const Kernels& kernels = kernels_for(z);
  check_arguments(kernels, z, prior_logits, prior_means, prior_logvars, prior_index,
                  /*range_checked=*/false);
  const auto zc = z.contiguous();
  auto out = kernels.empty(zc.sizes(), zc.options());
  if (zc.numel() > 0)
    kernels.gmm_log_prob_forward(
        zc, make_prior_tables(prior_logits, prior_means, prior_logvars, prior_index), out);
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> gmm_log_prob_backward(
    const at::Tensor& grad, const at::Tensor& z, const at::Tensor& prior_logits,
    const at::Tensor& prior_means, const at::Tensor& prior_logvars, bool prior_grads,
    const c10::optional<at::Tensor>& prior_index, bool range_checked) {
  const Kernels& kernels = kernels_for(z);
  check_arguments(kernels, z, prior_logits, prior_means, prior_logvars, prior_index,
                  range_checked);
  TORCH_CHECK_VALUE(grad.sizes() == z.sizes(), "grad must have the shape of z ", z.sizes(),
                    ", got ", grad.sizes());
  TORCH_CHECK_VALUE(grad.device() == z.device(), "grad is on ", grad.device(), " but z is on ",
                    z.device());
  const auto zc = z.contiguous();
  const auto gc = grad.to(z.scalar_type()).contiguous();
  const auto tables = make_prior_tables(prior_logits, prior_means, prior_logvars, prior_index);
  auto grad_z = kernels.empty(zc.sizes(), zc.options());
  at::Tensor sums;
  if (prior_grads) sums = zero_prior_sums(tables, z);
  if (zc.numel() > 0) kernels.gmm_log_prob_backward(gc, zc, tables, grad_z, sums);
  auto [gl, gm, gv] =
      prior_grads_or_zeros(sums, tables, 1.0, prior_logits, prior_means, prior_logvars);
  return {grad_z, gl, gm, gv};
}

void impls(torch::Library& m) {
  m.impl("gmm_log_prob", TORCH_FN(gmm_log_prob));
  m.impl("gmm_log_prob_backward", TORCH_FN(gmm_log_prob_backward));
}

// The autograd formula in C++ at the Autograd key (see reparam_gmm_kl.cpp): no Python per step;
// the forward and backward ops are still called through the dispatcher.
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using OptTensor = c10::optional<at::Tensor>;
using Grads4 = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

const auto& forward_op() {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("halfvae_ext::gmm_log_prob", "")
          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                            const at::Tensor&, const OptTensor&)>();
  return op;
}
const auto& backward_op() {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("halfvae_ext::gmm_log_prob_backward", "")
          .typed<Grads4(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                        const at::Tensor&, const at::Tensor&, bool, const OptTensor&, bool)>();
  return op;
}

struct GmmLogProbFunction : torch::autograd::Function<GmmLogProbFunction> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& z,
                               const at::Tensor& prior_logits, const at::Tensor& prior_means,
                               const at::Tensor& prior_logvars, const OptTensor& prior_index) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto out = forward_op().call(z, prior_logits, prior_means, prior_logvars, prior_index);
    ctx->save_for_backward({z, prior_logits, prior_means, prior_logvars,
                            prior_index.has_value() ? *prior_index : at::Tensor()});
    return {out};
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto s = ctx->get_saved_variables();
    const bool prior_grads =
        ctx->needs_input_grad(1) || ctx->needs_input_grad(2) || ctx->needs_input_grad(3);
    const auto grad = grads[0].defined() ? grads[0] : at::zeros_like(s[0]);
    auto [g_z, g_l, g_m, g_v] = backward_op().call(
        grad, s[0], s[1], s[2], s[3], prior_grads,
        s[4].defined() ? OptTensor(s[4]) : OptTensor(), /*range_checked=*/true);
    const auto keep = [&](size_t i, at::Tensor& g) {
      return ctx->needs_input_grad(i) ? g : at::Tensor();
    };
    return {keep(0, g_z), keep(1, g_l), keep(2, g_m), keep(3, g_v), at::Tensor()};
  }
};

at::Tensor gmm_log_prob_autograd(const at::Tensor& z, const at::Tensor& prior_logits,
                                 const at::Tensor& prior_means, const at::Tensor& prior_logvars,
                                 const OptTensor& prior_index) {
  if (!at::GradMode::is_enabled() ||
      !(z.requires_grad() || prior_logits.requires_grad() || prior_means.requires_grad() ||
        prior_logvars.requires_grad())) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return forward_op().call(z, prior_logits, prior_means, prior_logvars, prior_index);
  }
  return GmmLogProbFunction::apply(z, prior_logits, prior_means, prior_logvars, prior_index)[0];
}

}  // namespace
}  // namespace halfvae

TORCH_LIBRARY_FRAGMENT(halfvae_ext, m) {
  m.def(
      "gmm_log_prob(Tensor z, Tensor prior_logits, Tensor prior_means, Tensor prior_logvars, "
      "Tensor? prior_index=None) -> Tensor");
  // range_checked: prior_index was checked by the forward (autograd passes True: the tensor is
  // saved, and autograd refuses one modified since), so the check, a synchronization on CUDA, is
  // skipped; direct calls check.
  m.def(
      "gmm_log_prob_backward(Tensor grad, Tensor z, Tensor prior_logits, Tensor prior_means, "
      "Tensor prior_logvars, bool prior_grads, Tensor? prior_index=None, "
      "bool range_checked=False) -> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(halfvae_ext, CPU, m) { halfvae::impls(m); }
TORCH_LIBRARY_IMPL(halfvae_ext, Autograd, m) {
  m.impl("gmm_log_prob", TORCH_FN(halfvae::gmm_log_prob_autograd));
}
#ifdef HALFVAE_WITH_CUDA
TORCH_LIBRARY_IMPL(halfvae_ext, CUDA, m) { halfvae::impls(m); }
#endif
