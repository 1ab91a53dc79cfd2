// Schema and device-independent preparation of latent_rows_update_.
#include "latent_rows_update.h"

#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>

#include "op_wrappers.h"

namespace halfvae {

void latent_rows_update_op(const Kernels& kernels, const at::Tensor& table,
                           const at::Tensor& exp_avg, const at::Tensor& exp_avg_sq,
                           const at::Tensor& idx, const at::Tensor& grad_rows,
                           c10::string_view optimizer, double lr, double beta1, double beta2,
                           double eps, int64_t step) {
  TORCH_CHECK(table.dim() == 2 && table.is_contiguous(),
              "table must be a contiguous [rows, K] tensor, got shape ", table.sizes());
  TORCH_CHECK(idx.dim() == 1 && (idx.scalar_type() == at::kLong || idx.scalar_type() == at::kInt),
              "idx must be a 1-D int64 or int32 tensor");
  TORCH_CHECK(grad_rows.dim() == 2 && grad_rows.size(0) == idx.size(0) &&
                  grad_rows.size(1) == table.size(1),
              "grad_rows must have shape [len(idx), K] = [", idx.size(0), ", ", table.size(1),
              "], got ", grad_rows.sizes());
  check_same(grad_rows, "grad_rows", table, "table");
  TORCH_CHECK(idx.device() == table.device(), "idx is on ", idx.device(), " but table is on ",
              table.device());
  TORCH_CHECK(lr >= 0, "lr must be non-negative, got ", lr);
  RowUpdate u;
  if (optimizer == "adam") {
    u.optimizer = RowOptimizer::kAdam;
    for (const auto* s : {&exp_avg, &exp_avg_sq}) {
      TORCH_CHECK(s->sizes() == table.sizes() && s->is_contiguous(),
                  "Adam moments must be contiguous with the table's shape ", table.sizes());
      check_same(*s, "exp_avg", table, "table");
    }
    TORCH_CHECK(step >= 1, "step must be >= 1 (the step being taken), got ", step);
    TORCH_CHECK(0 <= beta1 && beta1 < 1 && 0 <= beta2 && beta2 < 1,
                "betas must be in [0, 1), got ", beta1, ", ", beta2);
    TORCH_CHECK(eps > 0, "eps must be positive, got ", eps);
    u.exp_avg = exp_avg;
    u.exp_avg_sq = exp_avg_sq;
    u.step_size = lr * std::sqrt(1 - std::pow(beta2, double(step))) /
                  (1 - std::pow(beta1, double(step)));
  } else {
    TORCH_CHECK(optimizer == "sgd", "optimizer must be 'adam' or 'sgd', got '", optimizer, "'");
    u.optimizer = RowOptimizer::kSgd;
  }
  if (idx.numel() == 0) return;
  const auto idx64 = idx.to(at::kLong);
  const auto [lo, hi] = at::aminmax(idx64);
  const int64_t min_i = lo.item<int64_t>(), max_i = hi.item<int64_t>();
  // Checked before anything is written.
  TORCH_CHECK(min_i >= 0 && max_i < table.size(0), "idx values must be in [0, ", table.size(0),
              "), got min ", min_i, " and max ", max_i);
  const auto [sorted, perm] = at::sort(idx64, /*stable=*/true, /*dim=*/0, /*descending=*/false);
  const auto [unique_rows, inverse, counts] = at::unique_consecutive(sorted, false, true);
  u.table = table;
  u.unique_rows = unique_rows;
  u.offsets = at::cat({at::zeros({1}, counts.options()), counts.cumsum(0)});
  u.grad_sorted = grad_rows.index_select(0, perm).contiguous();
  u.lr = lr;
  u.beta1 = beta1;
  u.beta2 = beta2;
  u.eps = eps;
  kernels.latent_rows_update(u);
}

}  // namespace halfvae

TORCH_LIBRARY_FRAGMENT(halfvae_ext, m) {
  m.def(
      "latent_rows_update_(Tensor(a!) table, Tensor(b!) exp_avg, Tensor(c!) exp_avg_sq, "
      "Tensor idx, Tensor grad_rows, str optimizer, float lr, float beta1, float beta2, "
      "float eps, int step) -> ()");
}
