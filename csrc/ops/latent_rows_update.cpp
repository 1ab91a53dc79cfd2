// latent_rows_update_: schema, checks, body and registration (one body for CPU and CUDA); and
// make_row_update, the preparation it shares with reparam_gmm_kl_rows_backward_step_.
#include "latent_rows_update.h"

#include <ATen/ATen.h>
#include <c10/util/accumulate.h>
#include <torch/library.h>

#include <cmath>

#include "../arg_checks.h"
#include "../kernel_table.h"

namespace halfvae {

namespace {

// A [rows, ...] state tensor whose rows may be strided (views into a record) but are each
// contiguous inside; returns its row stride.
int64_t check_state_rows(const at::Tensor& t, const char* name, at::IntArrayRef row_shape,
                         int64_t rows) {
  TORCH_CHECK_VALUE(t.dim() == 1 + static_cast<int64_t>(row_shape.size()) && t.size(0) == rows &&
                        t.sizes().slice(1) == row_shape,
                    name, " must have shape [rows, ", row_shape, "] with rows = ", rows, ", got ",
                    t.sizes());
  int64_t expected = 1;
  if (t.numel() == 0) return c10::multiply_integers(row_shape);  // nothing stored: any strides
  for (int64_t d = t.dim() - 1; d >= 1; --d) {
    TORCH_CHECK_VALUE(t.size(d) <= 1 || t.stride(d) == expected, name,
                      " must have contiguous rows, got strides ", t.strides());
    expected *= t.size(d);
  }
  TORCH_CHECK_VALUE(rows <= 1 || t.stride(0) >= expected, name,
                    " must have non-overlapping rows, got strides ", t.strides());
  return t.stride(0);
}

}  // namespace

RowUpdate make_row_update(const Kernels& kernels, const at::Tensor& mu, const at::Tensor& logvar,
                          const at::Tensor& state, c10::string_view optimizer, double lr,
                          double beta1, double beta2, double eps, int64_t step,
                          const c10::optional<at::Tensor>& row_state, int64_t row_offset) {
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
  const int64_t rows = mu.size(0), K = mu.size(1);
  RowUpdate u;
  if (optimizer == "adam") {
    u.optimizer = RowOptimizer::kAdam;
  } else if (optimizer == "rowwise_adam") {
    u.optimizer = RowOptimizer::kRowwiseAdam;
  } else if (optimizer == "rowwise_adagrad") {
    u.optimizer = RowOptimizer::kRowwiseAdagrad;
  } else {
    TORCH_CHECK_VALUE(optimizer == "sgd",
                      "optimizer must be 'adam', 'rowwise_adam', 'rowwise_adagrad' or 'sgd', got '",
                      optimizer, "'");
    u.optimizer = RowOptimizer::kSgd;
  }
  const bool adam = u.optimizer == RowOptimizer::kAdam;
  const bool rowwise_adam = u.optimizer == RowOptimizer::kRowwiseAdam;
  const bool rowwise = rowwise_adam || u.optimizer == RowOptimizer::kRowwiseAdagrad;
  if (adam || rowwise_adam) {
    TORCH_CHECK_VALUE(state.device() == mu.device(), "state must be on the device of mu (",
                      mu.device(), "), got ", state.device());
    TORCH_CHECK_VALUE(state.scalar_type() == mu.scalar_type() ||
                          state.scalar_type() == at::kBFloat16,
                      "state must have the dtype of mu (", mu.scalar_type(),
                      ") or bfloat16, got ", state.scalar_type());
    u.state_stride = adam ? check_state_rows(state, "Adam state", {4, K}, rows)
                          : check_state_rows(state, "rowwise_adam state", {2, K}, rows);
    u.state = state;
    u.bf16_state = state.scalar_type() == at::kBFloat16 && mu.scalar_type() != at::kBFloat16;
    TORCH_CHECK_VALUE(step >= 1, "step must be >= 1 (the step being taken), got ", step);
    TORCH_CHECK_VALUE(0 <= beta1 && beta1 < 1 && 0 <= beta2 && beta2 < 1,
                      "betas must be in [0, 1), got ", beta1, ", ", beta2);
  }
  if (adam || rowwise) TORCH_CHECK_VALUE(eps > 0, "eps must be positive, got ", eps);
  if (rowwise) {
    TORCH_CHECK_VALUE(mu.scalar_type() == at::kFloat || mu.scalar_type() == at::kDouble, optimizer,
                      " steps float32 or float64 tables (its per-row sums and step counts have "
                      "the table's dtype), got ", mu.scalar_type());
    TORCH_CHECK_VALUE(!mu.is_cuda() || K <= kMaxRowwiseCudaLatents, optimizer, " on CUDA takes K <= ",
                      kMaxRowwiseCudaLatents, " latent dimensions, got ", K);
    TORCH_CHECK_VALUE(row_state.has_value(), "row_state is needed by ", optimizer,
                      " (its per-row state)");
    const at::Tensor& rs = *row_state;
    check_same(rs, "row_state", mu, "mu");
    u.row_state_stride = check_state_rows(rs, "row_state", {rowwise_adam ? 3 : 2}, rows);
    u.row_state = rs;
  } else {
    TORCH_CHECK_VALUE(!row_state.has_value(), optimizer, " takes no row_state");
  }
  if (adam)
    u.step_size = lr * std::sqrt(1 - std::pow(beta2, double(step))) /
                  (1 - std::pow(beta1, double(step)));
  u.mu = mu;
  u.logvar = logvar;
  u.row_stride = mu.stride(0);
  u.lr = lr;
  u.beta1 = beta1;
  u.beta2 = beta2;
  u.eps = eps;
  u.step = step;
  TORCH_CHECK_VALUE(row_offset >= 0, "row_offset must be >= 0 (the global number of the "
                    "table's row 0), got ", row_offset);
  u.row_offset = row_offset;
  return u;
}

namespace {

void latent_rows_update_(const at::Tensor& mu, const at::Tensor& logvar, const at::Tensor& state,
                         const at::Tensor& idx, const at::Tensor& grad_mu,
                         const at::Tensor& grad_logvar, c10::string_view optimizer, double lr,
                         double beta1, double beta2, double eps, int64_t step,
                         const c10::optional<at::Tensor>& row_state, int64_t row_offset) {
  const Kernels& kernels = kernels_for(mu);
  RowUpdate u = make_row_update(kernels, mu, logvar, state, optimizer, lr, beta1, beta2, eps, step,
                                row_state, row_offset);
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
  // in batch order, so the result is deterministic. optimizer: "adam" (state [rows, 4, K]),
  // "rowwise_adam" (state [rows, 2, K], row_state [rows, 3]), "rowwise_adagrad" (row_state
  // [rows, 2]) or "sgd"; state of mu's dtype or bfloat16, rows of state and row_state may be
  // strided (views into one record per row). row_offset: the global number of row 0 when mu and
  // logvar are one shard of a larger table (the random bits of bfloat16 rounding are the global
  // row's).
  m.def(
      "latent_rows_update_(Tensor(a!) mu, Tensor(b!) logvar, Tensor(c!) state, Tensor idx, "
      "Tensor grad_mu, Tensor grad_logvar, str optimizer, float lr, float beta1, float beta2, "
      "float eps, int step, Tensor(d!)? row_state=None, int row_offset=0) -> ()");
}

TORCH_LIBRARY_IMPL(halfvae_ext, CPU, m) { halfvae::impls(m); }
#ifdef HALFVAE_WITH_CUDA
TORCH_LIBRARY_IMPL(halfvae_ext, CUDA, m) { halfvae::impls(m); }
#endif
