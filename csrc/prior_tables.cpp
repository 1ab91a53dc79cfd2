#include "prior_tables.h"

#include <ATen/ATen.h>

#include "halfvae/gmm_math.h"

namespace halfvae {

at::ScalarType compute_dtype(at::ScalarType input_dtype) {
  return input_dtype == at::kDouble ? at::kDouble : at::kFloat;
}

PriorTables make_prior_tables(const at::Tensor& logits, const at::Tensor& means,
                              const at::Tensor& logvars) {
  const auto dt = compute_dtype(logits.scalar_type());
  const auto lg = logits.to(dt);
  const auto lv = logvars.to(dt);
  PriorTables t;
  t.K = logits.size(0);
  t.C = logits.size(1);
  const auto log_pi = at::log_softmax(lg, 1);
  t.w = (log_pi - 0.5 * (lv + kLog2Pi)).contiguous();
  t.m = means.to(dt).contiguous();
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
  return {grad_logits.to(out_dtype), grad_means.to(out_dtype), grad_logvars.to(out_dtype)};
}

void check_prior(const at::Tensor& logits, const at::Tensor& means, const at::Tensor& logvars) {
  TORCH_CHECK(logits.dim() == 2, "prior_logits must have shape [K, C], got ", logits.sizes());
  TORCH_CHECK(logits.size(1) >= 1, "prior_logits needs at least one component, got ",
              logits.sizes());
  TORCH_CHECK(logits.size(1) <= kMaxComponents, "at most ", kMaxComponents,
              " mixture components are supported, prior_logits has ", logits.size(1));
  TORCH_CHECK(means.sizes() == logits.sizes(), "prior_means must have the shape of prior_logits ",
              logits.sizes(), ", got ", means.sizes());
  TORCH_CHECK(logvars.sizes() == logits.sizes(),
              "prior_logvars must have the shape of prior_logits ", logits.sizes(), ", got ",
              logvars.sizes());
  TORCH_CHECK(at::isFloatingType(logits.scalar_type()), "prior_logits must be floating point, got ",
              logits.scalar_type());
  check_same(means, "prior_means", logits, "prior_logits");
  check_same(logvars, "prior_logvars", logits, "prior_logits");
}

void check_same(const at::Tensor& a, const char* a_name, const at::Tensor& b, const char* b_name) {
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), a_name, " has dtype ", a.scalar_type(), " but ",
              b_name, " has dtype ", b.scalar_type());
  TORCH_CHECK(a.device() == b.device(), a_name, " is on ", a.device(), " but ", b_name, " is on ",
              b.device());
}

void check_latent(const at::Tensor& t, const char* name, const at::Tensor& prior_logits) {
  TORCH_CHECK(t.dim() == 2, name, " must have shape [N, K], got ", t.sizes());
  TORCH_CHECK(t.size(1) == prior_logits.size(0), name, " has K = ", t.size(1),
              " latent dimensions but the prior has K = ", prior_logits.size(0));
  check_same(t, name, prior_logits, "prior_logits");
}

void check_seed(const c10::optional<at::Tensor>& seed, const at::Tensor& like) {
  if (!seed.has_value()) return;
  TORCH_CHECK(seed->scalar_type() == at::kLong && seed->numel() == 2,
              "seed must be an int64 tensor of 2 elements (seed, offset)");
  TORCH_CHECK(seed->device() == like.device(), "seed is on ", seed->device(), " but mu is on ",
              like.device());
}

}  // namespace halfvae
