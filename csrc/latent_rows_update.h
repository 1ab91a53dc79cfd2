// latent_rows_update_: the optimizer step of a latent table for the rows a batch touched, applied
// in place without ever forming a gradient of the whole table. Duplicate indices are summed first,
// in batch order (a stable sort groups them), so the result is deterministic.
#pragma once
#include <ATen/core/Tensor.h>

namespace halfvae {

enum class RowOptimizer { kAdam, kSgd };

// Prepared by the op wrapper: rows grouped by a stable sort of idx.
struct RowUpdate {
  at::Tensor table;       // [rows, K], contiguous, updated in place
  at::Tensor exp_avg;     // [rows, K] Adam first moments (undefined for SGD)
  at::Tensor exp_avg_sq;  // [rows, K] Adam second moments (undefined for SGD)
  at::Tensor unique_rows; // int64 [U], the touched rows
  at::Tensor offsets;     // int64 [U + 1]: unique row u sums grad_sorted[offsets[u] : offsets[u+1]]
  at::Tensor grad_sorted; // [B, K], gradient rows in the order of the stable sort
  RowOptimizer optimizer = RowOptimizer::kAdam;
  double lr = 0, beta1 = 0, beta2 = 0, eps = 0;
  double step_size = 0;   // Adam: lr * sqrt(1 - beta2^step) / (1 - beta1^step), as SparseAdam
};

}  // namespace halfvae
