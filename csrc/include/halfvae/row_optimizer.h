// The update rules of a latent table's fused optimizers, for one element or one row, shared by the
// CPU and CUDA kernels (latent_rows_update_ and the fused table step). halfvae_ext.reference has
// each rule in plain PyTorch, in the same order of operations.
//
// adam: torch.optim.SparseAdam exactly: m += (1-b1)(g-m); v += (1-b2)(g^2-v);
//   w -= step_size * m / (sqrt(v) + eps), step_size = lr*sqrt(1-b2^t)/(1-b1^t) from the host (t:
//   the table's step count).
// rowwise_adam (FBGEMM's partial row-wise Adam): m per element as Adam's; one second moment per
//   row of each table (mu, logvar): v += (1-b2)(mean_k g^2 - v); bias correction by the row's own
//   step count t_r (rows are stepped only when touched: a shared count would under-correct a row
//   touched late, lazy Adam's known flaw): w -= lr/(1-b1^t_r) / (sqrt(v/(1-b2^t_r)) + eps) * m.
// rowwise_adagrad (FBGEMM's row-wise Adagrad): one sum per row of each table:
//   G += mean_k g^2; w -= lr * g / (sqrt(G) + eps).
// bfloat16 state (per-element moments only): loaded to float32, updated there, stored with
//   stochastic rounding (unbiased: E[stored] = value), so that small updates of an average are not
//   lost on the way back; its random bits are a hash of (row, element, table step): deterministic,
//   and the same on any number of threads and on CPU and CUDA.
#pragma once
#include <c10/macros/Macros.h>
#include <c10/util/BFloat16.h>

#include <cmath>
#include <cstdint>
#include <cstring>

namespace halfvae {

template <typename T>
C10_HOST_DEVICE inline void adam_element(T* w, T* m, T* v, T g, T beta1, T beta2, T eps,
                                         T step_size) {
  const T m_new = *m + (T(1) - beta1) * (g - *m);
  const T v_new = *v + (T(1) - beta2) * (g * g - *v);
  *m = m_new;
  *v = v_new;
  *w -= step_size * m_new / (::sqrt(v_new) + eps);
}

// 32 random bits for element e of a row at a table step: murmur3's finalizer of a mix that is a
// row's and step's base plus e times a constant (so a kernel can take the base once per row).
constexpr uint32_t kRoundingElementMix = 0xC2B2AE3Du;
C10_HOST_DEVICE inline uint32_t rounding_base(int64_t row, int64_t step) {
  const uint64_t r = static_cast<uint64_t>(row);
  return static_cast<uint32_t>(r) * 0x9E3779B1u + static_cast<uint32_t>(r >> 32) * 0x85EBCA77u +
         static_cast<uint32_t>(step) * 0x27D4EB2Fu;
}
C10_HOST_DEVICE inline uint32_t rounding_mix(uint32_t h) {
  h ^= h >> 16;
  h *= 0x85EBCA6Bu;
  h ^= h >> 13;
  h *= 0xC2B2AE35u;
  h ^= h >> 16;
  return h;
}
C10_HOST_DEVICE inline uint32_t rounding_bits(int64_t row, int64_t e, int64_t step) {
  return rounding_mix(rounding_base(row, step) + static_cast<uint32_t>(e) * kRoundingElementMix);
}

// x rounded to bfloat16 stochastically: the 16 bits dropped are compared with the low 16 random
// bits (add, then truncate). Inf and NaN are truncated as they are.
C10_HOST_DEVICE inline c10::BFloat16 to_bfloat16_stochastic(float x, uint32_t bits) {
  uint32_t u;
#ifdef __CUDA_ARCH__
  u = __float_as_uint(x);
#else
  std::memcpy(&u, &x, sizeof(u));
#endif
  if ((u & 0x7F800000u) != 0x7F800000u) u += bits & 0xFFFFu;
  return c10::BFloat16(static_cast<uint16_t>(u >> 16), c10::BFloat16::from_bits());
}

// Per-element state of type S (the table's type or bfloat16) read as, and written from, T.
template <typename T, typename S>
struct StateIO {
  C10_HOST_DEVICE static T load(const S* p) { return static_cast<T>(*p); }
  C10_HOST_DEVICE static void store(S* p, T x, int64_t, int64_t, int64_t) { *p = static_cast<S>(x); }
};
template <typename T>
struct StateIO<T, c10::BFloat16> {
  C10_HOST_DEVICE static T load(const c10::BFloat16* p) { return static_cast<T>(static_cast<float>(*p)); }
  C10_HOST_DEVICE static void store(c10::BFloat16* p, T x, int64_t row, int64_t e, int64_t step) {
    *p = to_bfloat16_stochastic(static_cast<float>(x), rounding_bits(row, e, step));
  }
};

// exp and sqrt of the type given (::exp of a float is the double function).
C10_HOST_DEVICE inline float exp_of(float x) { return ::expf(x); }
C10_HOST_DEVICE inline double exp_of(double x) { return ::exp(x); }
C10_HOST_DEVICE inline float sqrt_of(float x) { return ::sqrtf(x); }
C10_HOST_DEVICE inline double sqrt_of(double x) { return ::sqrt(x); }

// The constants of one step of the row-wise rules.
template <typename T>
struct RowwiseConstants {
  T lr, beta1, beta2, eps;
  int64_t step;  // the table's step count (random bits of bfloat16 rounding)
  T log_beta1, log_beta2;  // log(beta), or -inf for beta = 0
  RowwiseConstants(T lr_, T beta1_, T beta2_, T eps_, int64_t step_)
      : lr(lr_), beta1(beta1_), beta2(beta2_), eps(eps_), step(step_),
        log_beta1(std::log(beta1_)), log_beta2(std::log(beta2_)) {}
};

// 1 - exp(x) for x <= 0, without the exp where the result rounds to 1 anyway: exp(x) below half
// an ulp of 1 (x < -18 in float, -38 in double). A row touched a thousand times has b1^t far below
// that, and expf's underflow path (glibc's __math_uflowf) costs more than the rest of the row.
C10_HOST_DEVICE inline float one_minus_exp(float x) { return x < -18.0f ? 1.0f : 1.0f - exp_of(x); }
C10_HOST_DEVICE inline double one_minus_exp(double x) { return x < -38.0 ? 1.0 : 1.0 - exp_of(x); }

// The bias corrections 1 - beta^t of a row's step count t (the count after this step), as
// 1 - exp(t log beta): one exp each, where pow costs a log and an exp per row.
template <typename T>
struct BiasCorrections {
  T first, second;
  C10_HOST_DEVICE BiasCorrections(const RowwiseConstants<T>& c, T t)
      : first(one_minus_exp(t * c.log_beta1)), second(one_minus_exp(t * c.log_beta2)) {}
};

// rowwise_adam's element step on elements [k0, n) of one row of one table: the first moment
// (type S) and w -= scale * m. e0: the index of m[0] among the row's moments (0 for mu, K for
// logvar; rounding bits). Also the tail of the CPU's vectorized bfloat16 loop (cpu/row_step.h).
template <typename T, typename S>
C10_HOST_DEVICE inline void rowwise_adam_elements(T* __restrict__ w, S* __restrict__ m,
                                                  const T* __restrict__ g, int64_t k0, int64_t n,
                                                  T scale, const RowwiseConstants<T>& c,
                                                  int64_t row, int64_t e0) {
  for (int64_t k = k0; k < n; ++k) {
    T mk = StateIO<T, S>::load(m + k);
    mk += (T(1) - c.beta1) * (g[k] - mk);
    StateIO<T, S>::store(m + k, mk, row, e0 + k, c.step);
    w[k] -= scale * mk;
  }
}

// rowwise_adam on one row of one table (n = K values w, gradient g, moments m of type S; v: the
// row's second moment, updated in place). e0 as above.
// The scale of the step, lr / (1 - b1^t) / (sqrt(v / (1 - b2^t)) + eps), is taken once per row.
template <typename T, typename S>
C10_HOST_DEVICE inline void rowwise_adam_row(T* __restrict__ w, S* __restrict__ m,
                                             T* __restrict__ v, const T* __restrict__ g,
                                             int64_t n, const BiasCorrections<T>& bc,
                                             const RowwiseConstants<T>& c, int64_t row,
                                             int64_t e0) {
  T sq = 0;
  for (int64_t k = 0; k < n; ++k) sq += g[k] * g[k];
  const T v_new = *v + (T(1) - c.beta2) * (sq / T(n) - *v);
  *v = v_new;
  const T scale = c.lr / bc.first / (sqrt_of(v_new / bc.second) + c.eps);
  rowwise_adam_elements(w, m, g, 0, n, scale, c, row, e0);
}

// rowwise_adagrad on one row of one table: G, the row's sum, is updated in place.
template <typename T>
C10_HOST_DEVICE inline void rowwise_adagrad_row(T* __restrict__ w, T* __restrict__ G,
                                                const T* __restrict__ g, int64_t n,
                                                const RowwiseConstants<T>& c) {
  T sq = 0;
  for (int64_t k = 0; k < n; ++k) sq += g[k] * g[k];
  const T G_new = *G + sq / T(n);
  *G = G_new;
  const T scale = c.lr / (sqrt_of(G_new) + c.eps);
  for (int64_t k = 0; k < n; ++k) w[k] -= scale * g[k];
}

}  // namespace halfvae
