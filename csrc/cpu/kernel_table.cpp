// This instruction set's table of kernels (compiled once per ISA).
#include "isa_kernels.h"
#include "output_cache.h"

namespace halfvae::cpu {
#define HALFVAE_STR2(x) #x
#define HALFVAE_STR(x) HALFVAE_STR2(x)
#define HALFVAE_CAT2(a, b) a##b
#define HALFVAE_CAT(a, b) HALFVAE_CAT2(a, b)
const Kernels& HALFVAE_CAT(kernels_, CPU_CAPABILITY)() {
  // Designated initializers: the compiler checks each field's name and order.
  static const Kernels table{.reparam_gmm_kl_forward = &reparam_gmm_kl_forward,
                             .reparam_gmm_kl_backward = &reparam_gmm_kl_backward,
                             .gmm_log_prob_forward = &gmm_log_prob_forward,
                             .gmm_log_prob_backward = &gmm_log_prob_backward,
                             .philox_normal = &philox_normal,
                             .latent_rows_update = &latent_rows_update,
                             .empty = &empty_output,
                             .name = "cpu-" HALFVAE_STR(CPU_CAPABILITY),
                             .backward_steps_rows = true,
                             .half_types = false};
  return table;
}
}  // namespace halfvae::cpu
