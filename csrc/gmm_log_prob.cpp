// Schema of gmm_log_prob: log p_k(z[n, k]) under a per-dimension Gaussian mixture.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(halfvae_ext, m) {
  m.def(
      "gmm_log_prob(Tensor z, Tensor prior_logits, Tensor prior_means, Tensor prior_logvars) "
      "-> Tensor");
  m.def(
      "gmm_log_prob_backward(Tensor grad, Tensor z, Tensor prior_logits, Tensor prior_means, "
      "Tensor prior_logvars, bool prior_grads) -> (Tensor, Tensor, Tensor, Tensor)");
}
