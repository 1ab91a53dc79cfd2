// Device-independent preparation shared by the ops: the per-(k, c) prior tables the kernels read
// (PriorTables, kernel_args.h), and the conversion of the kernels' per-(k, c) sums into prior
// gradients. Both are tiny [K, C] computations done with ATen, so the kernels stay element-wise.
#pragma once
#include <ATen/core/Tensor.h>
#include <tuple>
#include <vector>

#include "kernel_args.h"

namespace halfvae {

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

}  // namespace halfvae
