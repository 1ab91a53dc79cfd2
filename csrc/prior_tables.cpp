#include "prior_tables.h"

#include <ATen/ATen.h>

#include "halfvae/gmm_math.h"

namespace halfvae {

at::ScalarType compute_dtype(at::ScalarType input_dtype) {
  return input_dtype == at::kDouble ? at::kDouble : at::kFloat;
}

PriorTables make_prior_tables(const at::Tensor& logits, const at::Tensor& means,
                              const at::Tensor& logvars,
                              const c10::optional<at::Tensor>& prior_index) {
  const auto dt = compute_dtype(logits.scalar_type());
  PriorTables t;
  t.K = logits.size(-2);
  t.C = logits.size(-1);
  t.U = logits.dim() == 3 ? logits.size(0) : 1;
  if (prior_index.has_value()) t.index = prior_index->to(at::kLong).contiguous();
  const auto lg = logits.to(dt).reshape({t.U * t.K, t.C});
  const auto lv = logvars.to(dt).reshape({t.U * t.K, t.C});
  const auto log_pi = at::log_softmax(lg, 1);
  t.w = (log_pi - 0.5 * (lv + kLog2Pi)).contiguous();
  t.m = means.to(dt).reshape({t.U * t.K, t.C}).contiguous();
  t.prec = at::exp(-lv).contiguous();
  t.pi = at::exp(log_pi).contiguous();
  return t;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> prior_grads_from_sums(const at::Tensor& sums,
                                                                      const PriorTables& tables,
                                                                      double sign,
                                                                      at::ScalarType out_dtype) {
  const int64_t C = tables.C;
  const auto s = sums.to(tables.pi.scalar_type());
  const auto weighted_r = s.narrow(1, 0, C);
  const auto weighted_r_dprec = s.narrow(1, C, C);
  const auto weighted_r_lv = s.narrow(1, 2 * C, C);
  const auto weight = s.narrow(1, 3 * C, 1);
  auto grad_logits = (weighted_r - tables.pi * weight) * sign;
  auto grad_means = weighted_r_dprec * sign;
  auto grad_logvars = weighted_r_lv * sign;
  const auto shape = tables.U > 1 || tables.conditional()
                         ? std::vector<int64_t>{tables.U, tables.K, tables.C}
                         : std::vector<int64_t>{tables.K, tables.C};
  return {grad_logits.to(out_dtype).reshape(shape), grad_means.to(out_dtype).reshape(shape),
          grad_logvars.to(out_dtype).reshape(shape)};
}

at::Tensor zero_prior_sums(const PriorTables& tables, const at::Tensor& like) {
  return at::zeros({tables.U * tables.K, 3 * tables.C + 1}, like.options().dtype(at::kDouble));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> prior_grads_or_zeros(
    const at::Tensor& sums, const PriorTables& tables, double sign,
    const at::Tensor& prior_logits, const at::Tensor& prior_means,
    const at::Tensor& prior_logvars) {
  if (!sums.defined())
    return {at::zeros_like(prior_logits), at::zeros_like(prior_means),
            at::zeros_like(prior_logvars)};
  return prior_grads_from_sums(sums, tables, sign, prior_logits.scalar_type());
}

}  // namespace halfvae
