// latent_rows_update_: the optimizer step of a latent table (mu and logvar) for the rows a batch
// touched, applied in place without ever forming a gradient of the whole table. Duplicate indices
// are summed first, in batch order, so the result is deterministic.
#pragma once
#include <ATen/core/Tensor.h>

namespace halfvae {

// The rules: csrc/include/halfvae/row_optimizer.h.
enum class RowOptimizer { kAdam, kSgd, kRowwiseAdam, kRowwiseAdagrad };

// The CUDA kernel of the row-wise rules stages a row's gradient in registers: K at most this.
constexpr int64_t kMaxRowwiseCudaLatents = 64;

struct RowUpdate {
  at::Tensor mu, logvar;  // [rows, K], updated in place; rows row_stride apart
  // K (contiguous tables), 2K (halves of one [rows, 2, K]) or a record's length (a row's table and
  // state in one record, LatentTable with a compact optimizer)
  int64_t row_stride = 0;
  // Per-element moments, [rows, M, K] with rows state_stride apart (the rest contiguous), of mu's
  // dtype or bfloat16: adam M = 4 (m of mu, m of logvar, v of mu, v of logvar); rowwise_adam
  // M = 2 (m of mu, m of logvar); undefined otherwise.
  at::Tensor state;
  int64_t state_stride = 0;
  bool bf16_state = false;
  // Per-row state, [rows, R] of mu's dtype, rows row_state_stride apart: rowwise_adam R = 3 (v of
  // mu, v of logvar, the row's step count); rowwise_adagrad R = 2 (sums of mu, of logvar).
  at::Tensor row_state;
  int64_t row_state_stride = 0;
  at::Tensor idx;                   // int64 [B], range-checked
  at::Tensor grad_mu, grad_logvar;  // [B, K] gradients of the gathered rows, one per index
  RowOptimizer optimizer = RowOptimizer::kAdam;
  double lr = 0, beta1 = 0, beta2 = 0, eps = 0;
  double step_size = 0;  // Adam: lr * sqrt(1 - beta2^step) / (1 - beta1^step), as SparseAdam
  int64_t step = 0;      // the table's step count, this step included
  // The whole table's number of row 0: a shard of a larger table (ShardedLatentTable) rounds
  // bfloat16 moments with the bits of the global row, so any number of ranks steps bit for bit
  // as one process. Only the rounding uses it.
  int64_t row_offset = 0;
};

struct Kernels;

// Checks the tables and the optimizer's arguments and fills everything of a RowUpdate but idx and
// the gradients.
RowUpdate make_row_update(const Kernels& kernels, const at::Tensor& mu, const at::Tensor& logvar,
                          const at::Tensor& state, c10::string_view optimizer, double lr,
                          double beta1, double beta2, double eps, int64_t step,
                          const c10::optional<at::Tensor>& row_state, int64_t row_offset);

}  // namespace halfvae
