// What the kernels take: the argument structs an op body (ops/<op>.cpp) prepares and the kernel
// layer (kernel_table.h, cpu/, cuda/) reads. Plain data only, below both layers, so that the
// kernels never include the ops' headers: an op's checks and preparation can change without
// recompiling every kernel variant.
#pragma once
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <vector>

namespace halfvae {

// ------------------------------------------------------------------------- the prior's tables
// The per-(k, c) tables of a Gaussian-mixture prior (made by make_prior_tables, prior_tables.h).
// A conditional prior has U groups: tables [U, K, C], stored as [U*K, C] (group u's dimension k
// is table row u*K + k), and `index` gives row n's group.
struct PriorTables {
  at::Tensor w;     // log_softmax(logits) - 0.5*(log 2pi + logvars), [U*K, C], compute dtype
  at::Tensor m;     // means, [U*K, C]
  at::Tensor prec;  // exp(-logvars), [U*K, C]
  at::Tensor pi;    // softmax(logits), [U*K, C]
  at::Tensor index;  // int64 [N] contiguous, row n's group in [0, U); undefined: one prior (U = 1)
  int64_t U = 1;
  int64_t K = 0;
  int64_t C = 0;
  bool conditional() const { return index.defined(); }
};

constexpr int64_t kReductionNone = 0;
constexpr int64_t kReductionRow = 1;

// The KL estimate of reparam_gmm_kl: the one-sample Monte-Carlo estimate
// log N(z; mu, s^2) - log p(z), or the closed-form variational upper bound
// -H(q) - log sum_c pi_c exp(-KL(q || N(m_c, v_c)))  (Hershey & Olsen 2007; see gmm_math.h).
constexpr int64_t kKlMonteCarlo = 0;
constexpr int64_t kKlBound = 1;

// ------------------------------------------------------------------------- latent_rows_update_
// The rules: csrc/include/halfvae/row_optimizer.h.
enum class RowOptimizer { kAdam, kSgd, kRowwiseAdam, kRowwiseAdagrad };

// The CUDA kernel of the row-wise rules stages a row's gradient in registers: K at most this.
constexpr int64_t kMaxRowwiseCudaLatents = 64;

// The optimizer step of a latent table's touched rows (made by make_row_update,
// ops/latent_rows_update.h).
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

// ------------------------------------------------------------------------- reparam_gmm_kl
// One call of reparam_gmm_kl or reparam_gmm_kl_rows (made by prepare_reparam_gmm_kl,
// ops/reparam_gmm_kl.h).
struct ReparamGmmKlProblem {
  at::Tensor mu, logvar;  // [N, K], contiguous; with idx: the whole tables [rows, K], see below
  // With idx: elements from one row of mu (and of logvar) to the next. K when the tables are
  // contiguous; 2K when they are the two halves of one [rows, 2, K] table (LatentTable with a
  // fused optimizer), so that a row's mu and logvar share a cache line.
  int64_t row_stride = 0;
  at::Tensor idx;         // int64 [N] row indices into mu/logvar (reparam_gmm_kl_rows), or undefined
  at::Tensor eps;         // [N, K], contiguous; undefined when sampled in the kernel
  at::Tensor seed;        // int64[2] on the device of mu; undefined when eps is given
  // Backward only, optional: gradients [N, K] (contiguous) of the same rows from other terms (the
  // table step's likelihood terms), added to each index's grad_mu and grad_logvar.
  at::Tensor extra_grad_mu, extra_grad_logvar;
  // Backward with idx only, optional: the optimizer step to apply to rows idx of mu and logvar from
  // the gradients being computed.
  const RowUpdate* row_step = nullptr;
  PriorTables prior;  // prior.index (conditional prior): one entry per gathered row
  int64_t N = 0, K = 0, C = 0;
  int64_t reduction = kReductionRow;
  int64_t kl_kind = kKlMonteCarlo;
  bool bound() const { return kl_kind == kKlBound; }
  bool sampled() const { return !eps.defined(); }
  at::TensorOptions options() const { return mu.options(); }
  bool gathered() const { return idx.defined(); }
  std::vector<int64_t> latent_shape() const { return {N, K}; }
};

}  // namespace halfvae
