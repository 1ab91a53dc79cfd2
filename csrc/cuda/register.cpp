// CUDA registration: the op wrappers with the CUDA kernel table.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "../op_wrappers.h"

namespace halfvae::cuda {

void register_reparam_gmm_kl(Kernels& k);
void register_gmm_log_prob(Kernels& k);
void register_philox_normal(Kernels& k);
void register_latent_rows_update(Kernels& k);

const Kernels& kernels() {
  static const Kernels table = [] {
    Kernels k{};
    register_reparam_gmm_kl(k);
    register_gmm_log_prob(k);
    register_philox_normal(k);
    register_latent_rows_update(k);
    k.empty = [](at::IntArrayRef sizes, const at::TensorOptions& options) {
      return at::empty(sizes, options);
    };
    k.name = "cuda";
    k.half_types = true;
    k.backward_steps_rows = false;  // the backward, then latent_rows_update
    return k;
  }();
  return table;
}

}  // namespace halfvae::cuda

HALFVAE_REGISTER_OPS(CUDA, halfvae::cuda::kernels)
