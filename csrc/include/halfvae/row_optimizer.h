// One element's optimizer step, shared by the CPU and CUDA latent_rows_update_ kernels.
// Adam follows torch.optim.SparseAdam exactly: m += (1-b1)(g-m); v += (1-b2)(g^2-v);
// w -= step_size * m / (sqrt(v) + eps), with step_size = lr*sqrt(1-b2^t)/(1-b1^t) from the host.
#pragma once
#include <c10/macros/Macros.h>

#include <cmath>

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

}  // namespace halfvae
