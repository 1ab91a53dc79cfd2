// reparam_gmm_kl: z = mu + exp(logvar/2)*eps and the Monte-Carlo KL log N(z; mu, sigma^2) - log p_k(z)
// (or its closed-form upper bound, kl_kind) against a per-dimension Gaussian mixture, one per row
// group with a conditional prior (PriorTables::index), fused. eps is given, or drawn in the kernel by Philox from
// a (seed, offset) tensor; the backward regenerates it from the same seed. The _rows variants
// gather rows idx of latent tables inside the kernel.
#pragma once
#include <ATen/core/Tensor.h>

#include <tuple>
#include <vector>

#include "../prior_tables.h"
#include "halfvae/philox.h"

namespace halfvae {

struct Kernels;
struct RowUpdate;

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

// Checks every argument (the index ranges last) and prepares the problem for `kernels`.
// range_checked: the values of idx and prior_index were checked by the forward of this very call
// (autograd's backward: the tensors are saved, and autograd refuses ones modified since), so the
// range check, a host synchronization on CUDA, is skipped; direct calls leave it false.
ReparamGmmKlProblem prepare_reparam_gmm_kl(const Kernels& kernels, const at::Tensor& mu,
                                           const at::Tensor& logvar,
                                           const at::Tensor& prior_logits,
                                           const at::Tensor& prior_means,
                                           const at::Tensor& prior_logvars,
                                           const c10::optional<at::Tensor>& eps,
                                           const c10::optional<at::Tensor>& seed,
                                           int64_t reduction,
                                           const c10::optional<at::Tensor>& idx,
                                           const c10::optional<at::Tensor>& prior_index,
                                           int64_t kl_kind, bool range_checked);

// The backward of a prepared problem: gradients of the (gathered) rows [N, K] and, when
// prior_grads, the prior sums [U*K, 3C+1] (else undefined).
struct ReparamGmmKlGrads {
  at::Tensor grad_mu, grad_logvar;
  at::Tensor prior_sums;
};
ReparamGmmKlGrads reparam_gmm_kl_backward_of(const Kernels& kernels, const ReparamGmmKlProblem& p,
                                             const at::Tensor& grad_z, const at::Tensor& grad_kl,
                                             bool prior_grads);

}  // namespace halfvae
