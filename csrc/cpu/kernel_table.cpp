// This instruction set's table of kernels (compiled once per ISA).
#include "isa_kernels.h"
#include "output_cache.h"

namespace halfvae::cpu {
#define HALFVAE_STR2(x) #x
#define HALFVAE_STR(x) HALFVAE_STR2(x)
#define HALFVAE_CAT2(a, b) a##b
#define HALFVAE_CAT(a, b) HALFVAE_CAT2(a, b)
const Kernels& HALFVAE_CAT(kernels_, CPU_CAPABILITY)() {
  static const Kernels table{&reparam_gmm_kl_forward, &reparam_gmm_kl_backward,
                             &gmm_log_prob_forward,   &gmm_log_prob_backward,
                             &philox_normal,          &latent_rows_update,
                             &empty_output,
                             "cpu-" HALFVAE_STR(CPU_CAPABILITY),
                             /*half_types=*/false,
                             /*backward_steps_rows=*/true};
  return table;
}
}  // namespace halfvae::cpu
