// reparam_gmm_kl: z = mu + exp(logvar/2)*eps and the Monte-Carlo KL log N(z; mu, sigma^2) - log p_k(z)
// (or its closed-form upper bound, kl_kind) against a per-dimension Gaussian mixture, one per row
// group with a conditional prior (PriorTables::index), fused. eps is given, or drawn in the kernel by Philox from
// a (seed, offset) tensor; the backward regenerates it from the same seed. The _rows variants
// gather rows idx of latent tables inside the kernel.
#pragma once
#include <ATen/core/Tensor.h>

#include <tuple>
#include <vector>

#include "../kernel_args.h"

namespace halfvae {

struct Kernels;

// The arguments of the reparam_gmm_kl ops that state the problem, as their schemas take them
// (idx: the _rows ops only). References: an instance lives for the call it is passed to.
struct ReparamGmmKlArgs {
  const at::Tensor& mu;
  const at::Tensor& logvar;
  const at::Tensor& prior_logits;
  const at::Tensor& prior_means;
  const at::Tensor& prior_logvars;
  const c10::optional<at::Tensor>& eps;
  const c10::optional<at::Tensor>& seed;
  int64_t reduction;
  const c10::optional<at::Tensor>& idx;
  const c10::optional<at::Tensor>& prior_index;
  int64_t kl_kind;
};

// Checks every argument (the index ranges last) and prepares the problem for `kernels`.
// range_checked: the values of idx and prior_index were checked by the forward of this very call
// (autograd's backward: the tensors are saved, and autograd refuses ones modified since), so the
// range check, a host synchronization on CUDA, is skipped; direct calls leave it false.
ReparamGmmKlProblem prepare_reparam_gmm_kl(const Kernels& kernels, const ReparamGmmKlArgs& args,
                                           bool range_checked);

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
