// Schema of philox_normal: the standard normal draws reparam_gmm_kl makes in-kernel for a seed,
// exposed so tests can check the stream and users can reproduce eps.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(halfvae_ext, m) {
  m.def("philox_normal(Tensor seed, int numel, ScalarType dtype) -> Tensor");
}
