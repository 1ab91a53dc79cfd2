// Device-independent preparation shared by the ops: the per-(k, c) prior tables the kernels read,
// and the conversion of the kernels' per-(k, c) sums into prior gradients. Both are tiny [K, C]
// computations done with ATen, so the kernels stay element-wise.
//
// A conditional prior has U groups: tables [U, K, C], stored as [U*K, C] (group u's dimension k
// is table row u*K + k), and `index` gives row n's group.
#pragma once
#include <ATen/core/Tensor.h>
#include <tuple>
#include <vector>

namespace halfvae {

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

// dtype of the arithmetic for a given input dtype: float32 for the half types.
at::ScalarType compute_dtype(at::ScalarType input_dtype);

// prior_index: checked by check_prior_index; given exactly when the tables are [U, K, C].
PriorTables make_prior_tables(const at::Tensor& logits, const at::Tensor& means,
                              const at::Tensor& logvars,
                              const c10::optional<at::Tensor>& prior_index = c10::nullopt);

// sums: [U*K, 3C+1] as laid out in gmm_math.h. sign = +1 gives the gradients of sum(w * log p),
// sign = -1 those of sum(w * (-log p)) (the KL's prior term).
std::tuple<at::Tensor, at::Tensor, at::Tensor> prior_grads_from_sums(const at::Tensor& sums,
                                                                      const PriorTables& tables,
                                                                      double sign,
                                                                      at::ScalarType out_dtype);

// [U*K, 3C+1] float64 zeros for a backward kernel to add its prior sums into.
at::Tensor zero_prior_sums(const PriorTables& tables, const at::Tensor& like);

// The prior gradients from a backward's sums (as prior_grads_from_sums, in the prior's dtype), or
// zeros when sums is undefined (prior gradients not wanted).
std::tuple<at::Tensor, at::Tensor, at::Tensor> prior_grads_or_zeros(
    const at::Tensor& sums, const PriorTables& tables, double sign,
    const at::Tensor& prior_logits, const at::Tensor& prior_means,
    const at::Tensor& prior_logvars);

constexpr int64_t kReductionNone = 0;
constexpr int64_t kReductionRow = 1;

// The KL estimate of reparam_gmm_kl: the one-sample Monte-Carlo estimate
// log N(z; mu, s^2) - log p(z), or the closed-form variational upper bound
// -H(q) - log sum_c pi_c exp(-KL(q || N(m_c, v_c)))  (Hershey & Olsen 2007; see gmm_math.h).
constexpr int64_t kKlMonteCarlo = 0;
constexpr int64_t kKlBound = 1;

}  // namespace halfvae
