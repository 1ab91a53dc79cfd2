// Per-element math of the fused ops, written once for the CPU (V = at::vec::Vectorized<T>, through
// a math policy) and CUDA (V = float or double). Notation, for one latent dimension k:
//   a_c(z) = w_c - 0.5 * (z - m_c)^2 * prec_c,   w_c = log_softmax(logits)_c - 0.5*(log 2pi + lv_c),
//   prec_c = exp(-lv_c),   log p(z) = logsumexp_c a_c,   r_c = softmax_c(a_c) (responsibilities).
// Prior gradients are accumulated as four sums per (k, c) -- see PriorGradSums -- and turned into
// gradients of logits, means and log-variances on the host (prior_tables.cpp).
#pragma once
#include <c10/macros/Macros.h>

#include <cstdint>

namespace halfvae {

constexpr double kLog2Pi = 1.8378770664093454835606594728112;
// Runtime C is allowed up to this many components (compile-time C is unrolled instead).
constexpr int kMaxComponents = 64;
// Accumulators per (k, c): sum g*r_c, sum g*r_c*(z-m_c)*prec_c, sum g*r_c*(0.5*(z-m_c)^2*prec_c-0.5);
// plus one per k: sum g. Layout [K, 3*C + 1].
C10_HOST_DEVICE constexpr int num_prior_sums(int C) { return 3 * C + 1; }

// CT > 0: the number of components is known at compile time; CT == 0: runtime C <= kMaxComponents.
template <int CT>
C10_HOST_DEVICE constexpr int components(int C) { return CT > 0 ? CT : C; }
template <int CT>
C10_HOST_DEVICE constexpr int component_capacity() { return CT > 0 ? CT : kMaxComponents; }

// log-sum-exp over c of a_c = w_c - half_prec_c * ((x - m_c)^2 + spread), for one latent dimension.
// spread = 0 (kSpread false) gives log p(x); spread = s^2 gives the log-sum-exp of the KL bound
// (reparam_kl_bound_forward). `prior` exposes w(c), m(c), prec(c) and half_prec(c) = 0.5 * prec(c)
// returning V; `M` exp, log, max and exp_nonpos (exp of arguments <= 0, which the log-sum-exp's
// shifted terms always are: a CPU vector can skip the overflow handling). NaN: M::max may drop a
// NaN operand (fmax does), so a NaN a_c reaches the result only through exp_nonpos(a_c - amax)
// and the log of the sum, and M::exp_nonpos and M::log must return NaN for NaN.
template <class M, int CT, bool kSpread, class V, class Prior>
C10_HOST_DEVICE inline V gmm_log_sum_exp(const V& x, const V& spread, int C_runtime,
                                         const Prior& prior) {
  const int C = components<CT>(C_runtime);
  V a[component_capacity<CT>()];
  V amax;
#pragma unroll
  for (int c = 0; c < C; ++c) {
    const V d = x - prior.m(c);
    if constexpr (kSpread) a[c] = prior.w(c) - (d * d + spread) * prior.half_prec(c);
    else a[c] = prior.w(c) - d * d * prior.half_prec(c);
    amax = (c == 0) ? a[c] : M::max(amax, a[c]);
  }
  V sum = V(0);
#pragma unroll
  for (int c = 0; c < C; ++c) sum = sum + M::exp_nonpos(a[c] - amax);
  return amax + M::log(sum);
}

// log p(z) for one latent dimension.
template <class M, int CT, class V, class Prior>
C10_HOST_DEVICE inline V gmm_log_density(const V& z, int C_runtime, const Prior& prior) {
  return gmm_log_sum_exp<M, CT, false>(z, V(0), C_runtime, prior);
}

// The derivatives of gmm_log_sum_exp: returns d/dx = -sum_c r_c * (x - m_c) * prec_c (the score
// d log p(z) / dz when spread = 0), with r_c = softmax_c(a_c); with kSpread also sets
// *r_prec = sum_c r_c * prec_c (-2 times the derivative in spread). Hands weight * (responsibility
// terms) for every component to `acc`:
//   acc(c, g*r, g*r*d*prec, g*r*(0.5*(d^2 + spread)*prec - 0.5)),
// from which the prior gradients are built.
template <class M, int CT, bool kPriorGrads, bool kSpread, class V, class Prior, class Acc>
C10_HOST_DEVICE inline V gmm_log_sum_exp_grad(const V& x, const V& spread, const V& weight,
                                              int C_runtime, const Prior& prior, Acc& acc,
                                              V* r_prec) {
  const int C = components<CT>(C_runtime);
  V a[component_capacity<CT>()];
  V d[component_capacity<CT>()];
  // e_c = 0.5 * (d_c^2 + spread) * prec_c, kept for the log-variance term of the prior gradients
  // (recomputing it there cost the kl="bound" backward three more operations per component).
  V e[component_capacity<CT>()];
  V amax;
#pragma unroll
  for (int c = 0; c < C; ++c) {
    d[c] = x - prior.m(c);
    if constexpr (kSpread) e[c] = (d[c] * d[c] + spread) * prior.half_prec(c);
    else e[c] = d[c] * d[c] * prior.half_prec(c);
    a[c] = prior.w(c) - e[c];
    amax = (c == 0) ? a[c] : M::max(amax, a[c]);
  }
  V sum = V(0);
#pragma unroll
  for (int c = 0; c < C; ++c) {
    a[c] = M::exp_nonpos(a[c] - amax);  // unnormalized responsibility
    sum = sum + a[c];
  }
  const V inv_sum = V(1) / sum;
  V score = V(0);
  V rp = V(0);
#pragma unroll
  for (int c = 0; c < C; ++c) {
    const V dprec = d[c] * prior.prec(c);
    const V r = a[c] * inv_sum;
    score = score - r * dprec;
    if constexpr (kSpread) rp = rp + r * prior.prec(c);
    if constexpr (kPriorGrads) {
      const V gr = weight * r;
      acc(c, gr, gr * dprec, gr * (e[c] - V(0.5)));
    }
  }
  if constexpr (kSpread) *r_prec = rp;
  return score;
}

// Score d log p(z) / dz; also hands weight * (responsibility terms) for every component to `acc`
// (acc(c, g*r, g*r*d*prec, g*r*(0.5*d^2*prec - 0.5))), from which the prior gradients are built.
template <class M, int CT, bool kPriorGrads, class V, class Prior, class Acc>
C10_HOST_DEVICE inline V gmm_score(const V& z, const V& weight, int C_runtime, const Prior& prior,
                                   Acc& acc) {
  return gmm_log_sum_exp_grad<M, CT, kPriorGrads, false>(z, V(0), weight, C_runtime, prior, acc,
                                                        static_cast<V*>(nullptr));
}

// Forward of the fused op: z = mu + exp(logvar/2)*eps, kl = log N(z; mu, sigma^2) - log p(z).
template <class M, int CT, class V, class Prior>
C10_HOST_DEVICE inline void reparam_kl_forward(const V& mu, const V& logvar, const V& eps,
                                               int C, const Prior& prior, V& z, V& kl) {
  const V sigma = M::exp(V(0.5) * logvar);
  z = mu + sigma * eps;
  const V log_q = V(-0.5) * (V(kLog2Pi) + logvar + eps * eps);
  kl = log_q - gmm_log_density<M, CT>(z, C, prior);
}

// Backward of the fused op for upstream gradients grad_z and grad_kl (eps held fixed).
template <class M, int CT, bool kPriorGrads, class V, class Prior, class Acc>
C10_HOST_DEVICE inline void reparam_kl_backward(const V& mu, const V& logvar, const V& eps,
                                                const V& grad_z, const V& grad_kl, int C,
                                                const Prior& prior, Acc& acc, V& grad_mu,
                                                V& grad_logvar) {
  const V sigma = M::exp(V(0.5) * logvar);
  const V z = mu + sigma * eps;
  const V score = gmm_score<M, CT, kPriorGrads>(z, grad_kl, C, prior, acc);
  const V grad_z_total = grad_z - grad_kl * score;  // d kl / dz = -score
  grad_mu = grad_z_total;
  grad_logvar = grad_z_total * V(0.5) * sigma * eps - V(0.5) * grad_kl;
}

// The closed-form KL bound (kl = "bound"). For q = N(mu, s^2) and p = sum_c pi_c N(m_c, v_c),
// KL(q || p) <= -log sum_c pi_c exp(-KL(q || N(m_c, v_c)))  (Hershey & Olsen 2007), which is
//   -H(q) - log sum_c exp(w_c - 0.5 * prec_c * ((mu - m_c)^2 + s^2)),  -H(q) = -0.5 (log 2pi + 1 + logvar),
// the log-sum-exp of gmm_log_sum_exp at x = mu with spread s^2. z is still the reparameterized
// sample (for the decoder); the bound does not depend on eps.
template <class M, int CT, class V, class Prior>
C10_HOST_DEVICE inline void reparam_kl_bound_forward(const V& mu, const V& logvar, const V& eps,
                                                     int C, const Prior& prior, V& z, V& kl) {
  const V sigma = M::exp(V(0.5) * logvar);
  z = mu + sigma * eps;
  const V neg_entropy = V(-0.5) * (V(kLog2Pi + 1.0) + logvar);
  kl = neg_entropy - gmm_log_sum_exp<M, CT, true>(mu, sigma * sigma, C, prior);
}

// Backward of reparam_kl_bound_forward: z's gradient flows through mu + sigma*eps, the bound's
// through mu (d/dmu = -score) and logvar (d/dlogvar = 0.5 * s^2 * sum_c r_c prec_c - 0.5).
template <class M, int CT, bool kPriorGrads, class V, class Prior, class Acc>
C10_HOST_DEVICE inline void reparam_kl_bound_backward(const V& mu, const V& logvar, const V& eps,
                                                      const V& grad_z, const V& grad_kl, int C,
                                                      const Prior& prior, Acc& acc, V& grad_mu,
                                                      V& grad_logvar) {
  const V sigma = M::exp(V(0.5) * logvar);
  const V s2 = sigma * sigma;
  V r_prec;
  const V score =
      gmm_log_sum_exp_grad<M, CT, kPriorGrads, true>(mu, s2, grad_kl, C, prior, acc, &r_prec);
  grad_mu = grad_z - grad_kl * score;
  grad_logvar = grad_z * V(0.5) * sigma * eps + grad_kl * (V(0.5) * s2 * r_prec - V(0.5));
}

// Host side: calls f.template operator()<CT>() with CT = 3 (the default mixture, unrolled) or 0
// (runtime C). More unrolled sizes cost compile time for every kernel and instruction set.
template <typename F>
inline void dispatch_components(int64_t C, const F& f) {
  if (C == 3) f.template operator()<3>();
  else f.template operator()<0>();
}

}  // namespace halfvae
