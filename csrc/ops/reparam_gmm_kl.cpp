// reparam_gmm_kl and reparam_gmm_kl_rows, forward and backward: schemas, argument preparation, the
// op bodies and their registration (one body for CPU and CUDA: it finds its device's kernels).
#include "reparam_gmm_kl.h"

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/custom_function.h>
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

// ------------------------------------------------------------------------- autograd (C++)
// The ops' autograd formulas as C++ autograd Functions at the Autograd key: no Python on the
// training step's path (the Python formula of torch.library.register_autograd cost ~100 us of a
// small step: its setup_context, backward and the wrapping around both). The forward and backward
// still call the ops through the dispatcher (below autograd), so torch.compile and opcheck trace
// and check the same ops as before.
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

OptTensor opt(const at::Tensor& t) { return t.defined() ? OptTensor(t) : OptTensor(); }
at::Tensor or_undefined(const OptTensor& t) { return t.has_value() ? *t : at::Tensor(); }
bool any_requires_grad(std::initializer_list<const at::Tensor*> ts) {
  for (const auto* t : ts)
    if (t->defined() && t->requires_grad()) return true;
  return false;
}
// An upstream gradient autograd left undefined (an output nobody used): zeros of its shape.
at::Tensor grad_or_zeros(const at::Tensor& g, at::IntArrayRef shape, const at::Tensor& like) {
  return g.defined() ? g : at::zeros(shape, like.options());
}

using ForwardSig = std::tuple<at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
    const OptTensor&, const OptTensor&, int64_t, const OptTensor&, int64_t);
using RowsForwardSig = std::tuple<at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
    const at::Tensor&, const OptTensor&, const OptTensor&, int64_t, int64_t, const OptTensor&,
    int64_t);
using Grads5 = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using BackwardSig = Grads5(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                           const at::Tensor&, const at::Tensor&, const at::Tensor&,
                           const at::Tensor&, const OptTensor&, const OptTensor&, int64_t, bool,
                           const OptTensor&, int64_t, bool);
using RowsBackwardSig = Grads5(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                               const at::Tensor&, const at::Tensor&, const at::Tensor&,
                               const at::Tensor&, const at::Tensor&, const OptTensor&,
                               const OptTensor&, int64_t, bool, const OptTensor&, int64_t, bool);

const auto& forward_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("halfvae_ext::reparam_gmm_kl", "")
                             .typed<ForwardSig>();
  return op;
}
const auto& backward_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("halfvae_ext::reparam_gmm_kl_backward", "")
                             .typed<BackwardSig>();
  return op;
}
const auto& rows_forward_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("halfvae_ext::reparam_gmm_kl_rows", "")
                             .typed<RowsForwardSig>();
  return op;
}
const auto& rows_backward_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("halfvae_ext::reparam_gmm_kl_rows_backward", "")
                             .typed<RowsBackwardSig>();
  return op;
}

std::vector<int64_t> kl_shape(int64_t reduction, int64_t N, int64_t K) {
  return reduction == kReductionRow ? std::vector<int64_t>{N} : std::vector<int64_t>{N, K};
}

struct ReparamGmmKlFunction : torch::autograd::Function<ReparamGmmKlFunction> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& mu,
                               const at::Tensor& logvar, const at::Tensor& prior_logits,
                               const at::Tensor& prior_means, const at::Tensor& prior_logvars,
                               const OptTensor& eps, const OptTensor& seed, int64_t reduction,
                               const OptTensor& prior_index, int64_t kl_kind) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [z, kl] = forward_op().call(mu, logvar, prior_logits, prior_means, prior_logvars, eps,
                                     seed, reduction, prior_index, kl_kind);
    ctx->save_for_backward({mu, logvar, prior_logits, prior_means, prior_logvars,
                            or_undefined(eps), or_undefined(seed), or_undefined(prior_index)});
    ctx->saved_data["reduction"] = reduction;
    ctx->saved_data["kl"] = kl_kind;
    return {z, kl};
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto s = ctx->get_saved_variables();
    const auto& mu = s[0];
    const int64_t reduction = ctx->saved_data["reduction"].toInt();
    const auto N = mu.size(0), K = mu.size(1);
    const bool prior_grads =
        ctx->needs_input_grad(2) || ctx->needs_input_grad(3) || ctx->needs_input_grad(4);
    auto [g_mu, g_lv, g_l, g_m, g_v] = backward_op().call(
        grad_or_zeros(grads[0], {N, K}, mu), grad_or_zeros(grads[1], kl_shape(reduction, N, K), mu),
        mu, s[1], s[2], s[3], s[4], opt(s[5]), opt(s[6]), reduction, prior_grads, opt(s[7]),
        ctx->saved_data["kl"].toInt(), /*range_checked=*/true);  // saved: checked by the forward
    const auto keep = [&](size_t i, at::Tensor& g) {
      return ctx->needs_input_grad(i) ? g : at::Tensor();
    };
    return {keep(0, g_mu), keep(1, g_lv), keep(2, g_l), keep(3, g_m), keep(4, g_v),
            at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

std::tuple<at::Tensor, at::Tensor> reparam_gmm_kl_autograd(
    const at::Tensor& mu, const at::Tensor& logvar, const at::Tensor& prior_logits,
    const at::Tensor& prior_means, const at::Tensor& prior_logvars, const OptTensor& eps,
    const OptTensor& seed, int64_t reduction, const OptTensor& prior_index, int64_t kl_kind) {
  if (!at::GradMode::is_enabled() ||
      !any_requires_grad({&mu, &logvar, &prior_logits, &prior_means, &prior_logvars})) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return forward_op().call(mu, logvar, prior_logits, prior_means, prior_logvars, eps, seed,
                             reduction, prior_index, kl_kind);
  }
  auto out = ReparamGmmKlFunction::apply(mu, logvar, prior_logits, prior_means, prior_logvars,
                                         eps, seed, reduction, prior_index, kl_kind);
  return {out[0], out[1]};
}

// [B, K] gradients of gathered rows -> the table's gradient (duplicates summed): dense zeros with
// the rows added in batch order, or a coalesced sparse COO tensor.
at::Tensor table_gradient(const at::Tensor& rows_grad, const at::Tensor& idx,
                          at::IntArrayRef shape, bool sparse) {
  if (sparse)  // idx was range-checked by the forward
    return at::_sparse_coo_tensor_unsafe(idx.to(at::kLong).unsqueeze(0), rows_grad, shape)
        .coalesce();
  return at::zeros(shape, rows_grad.options()).index_add_(0, idx, rows_grad);
}

struct ReparamGmmKlRowsFunction : torch::autograd::Function<ReparamGmmKlRowsFunction> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& mu,
                               const at::Tensor& logvar, const at::Tensor& idx,
                               const at::Tensor& prior_logits, const at::Tensor& prior_means,
                               const at::Tensor& prior_logvars, const OptTensor& eps,
                               const OptTensor& seed, int64_t reduction, int64_t table_grad,
                               const OptTensor& prior_index, int64_t kl_kind) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [z, kl] = rows_forward_op().call(mu, logvar, idx, prior_logits, prior_means,
                                          prior_logvars, eps, seed, reduction, table_grad,
                                          prior_index, kl_kind);
    ctx->save_for_backward({mu, logvar, idx, prior_logits, prior_means, prior_logvars,
                            or_undefined(eps), or_undefined(seed), or_undefined(prior_index)});
    ctx->saved_data["reduction"] = reduction;
    ctx->saved_data["kl"] = kl_kind;
    ctx->saved_data["table_grad"] = table_grad;
    return {z, kl};
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto s = ctx->get_saved_variables();
    const auto &mu = s[0], &idx = s[2];
    const int64_t reduction = ctx->saved_data["reduction"].toInt();
    const auto B = idx.size(0), K = mu.size(1);
    const bool prior_grads =
        ctx->needs_input_grad(3) || ctx->needs_input_grad(4) || ctx->needs_input_grad(5);
    auto [g_mu, g_lv, g_l, g_m, g_v] = rows_backward_op().call(
        grad_or_zeros(grads[0], {B, K}, mu), grad_or_zeros(grads[1], kl_shape(reduction, B, K), mu),
        mu, s[1], idx, s[3], s[4], s[5], opt(s[6]), opt(s[7]), reduction, prior_grads, opt(s[8]),
        ctx->saved_data["kl"].toInt(), /*range_checked=*/true);  // idx, prior_index: saved
    const bool sparse = ctx->saved_data["table_grad"].toInt() == 1;
    const auto keep = [&](size_t i, at::Tensor& g) {
      return ctx->needs_input_grad(i) ? g : at::Tensor();
    };
    return {ctx->needs_input_grad(0) ? table_gradient(g_mu, idx, mu.sizes(), sparse) : at::Tensor(),
            ctx->needs_input_grad(1) ? table_gradient(g_lv, idx, mu.sizes(), sparse) : at::Tensor(),
            at::Tensor(), keep(3, g_l), keep(4, g_m), keep(5, g_v), at::Tensor(), at::Tensor(),
            at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

std::tuple<at::Tensor, at::Tensor> reparam_gmm_kl_rows_autograd(
    const at::Tensor& mu, const at::Tensor& logvar, const at::Tensor& idx,
    const at::Tensor& prior_logits, const at::Tensor& prior_means,
    const at::Tensor& prior_logvars, const OptTensor& eps, const OptTensor& seed,
    int64_t reduction, int64_t table_grad, const OptTensor& prior_index, int64_t kl_kind) {
  if (!at::GradMode::is_enabled() ||
      !any_requires_grad({&mu, &logvar, &prior_logits, &prior_means, &prior_logvars})) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return rows_forward_op().call(mu, logvar, idx, prior_logits, prior_means, prior_logvars, eps,
                                  seed, reduction, table_grad, prior_index, kl_kind);
  }
  auto out = ReparamGmmKlRowsFunction::apply(mu, logvar, idx, prior_logits, prior_means,
                                             prior_logvars, eps, seed, reduction, table_grad,
                                             prior_index, kl_kind);
  return {out[0], out[1]};
}

void autograd_impls(torch::Library& m) {
  m.impl("reparam_gmm_kl", TORCH_FN(reparam_gmm_kl_autograd));
  m.impl("reparam_gmm_kl_rows", TORCH_FN(reparam_gmm_kl_rows_autograd));
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
TORCH_LIBRARY_IMPL(halfvae_ext, Autograd, m) { halfvae::autograd_impls(m); }
#ifdef HALFVAE_WITH_CUDA
TORCH_LIBRARY_IMPL(halfvae_ext, CUDA, m) { halfvae::impls(m); }
#endif
