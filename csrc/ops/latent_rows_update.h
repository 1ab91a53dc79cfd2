// latent_rows_update_: the optimizer step of a latent table (mu and logvar) for the rows a batch
// touched, applied in place without ever forming a gradient of the whole table. Duplicate indices
// are summed first, in batch order, so the result is deterministic.
#pragma once
#include <ATen/core/Tensor.h>

namespace halfvae {

enum class RowOptimizer { kAdam, kSgd };

struct RowUpdate {
  at::Tensor mu, logvar;            // [rows, K], updated in place; rows row_stride apart
  int64_t row_stride = 0;           // K (contiguous tables) or 2K (halves of one [rows, 2, K])
  at::Tensor state;                 // Adam: [rows, 4, K] = m of mu, m of logvar, v of mu, v of logvar
  at::Tensor idx;                   // int64 [B], range-checked
  at::Tensor grad_mu, grad_logvar;  // [B, K] gradients of the gathered rows, one per index
  RowOptimizer optimizer = RowOptimizer::kAdam;
  double lr = 0, beta1 = 0, beta2 = 0, eps = 0;
  double step_size = 0;  // Adam: lr * sqrt(1 - beta2^step) / (1 - beta1^step), as SparseAdam
};

struct Kernels;

// Checks the tables and the optimizer's arguments and fills everything of a RowUpdate but idx and
// the gradients.
RowUpdate make_row_update(const Kernels& kernels, const at::Tensor& mu, const at::Tensor& logvar,
                          const at::Tensor& state, c10::string_view optimizer, double lr,
                          double beta1, double beta2, double eps, int64_t step);

}  // namespace halfvae
