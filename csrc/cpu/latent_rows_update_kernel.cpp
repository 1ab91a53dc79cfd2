// CPU kernel of latent_rows_update_: group the batch's indices by row (duplicates summed in batch
// order), then one Adam or SGD step per touched row of mu and logvar and their moments
// (row_step.h). Compiled once per ISA.
#include <ATen/Dispatch.h>

#include "../kernel_table.h"
#include "row_step.h"

namespace halfvae::cpu {
inline namespace CPU_CAPABILITY {

void latent_rows_update(const RowUpdate& u) {
  const int64_t B = u.idx.numel();
  const int64_t* idx = u.idx.data_ptr<int64_t>();
  const RowGroups groups(idx, B);
  AT_DISPATCH_FLOATING_TYPES(u.mu.scalar_type(), "latent_rows_update_cpu", [&] {
    RowStepper<scalar_t>(u).step_groups(groups, idx, u.grad_mu.data_ptr<scalar_t>(),
                                        u.grad_logvar.data_ptr<scalar_t>(),
                                        /*only_repeated=*/false);
  });
}

HALFVAE_REGISTER_CPU_KERNEL(latent_rows_update, &latent_rows_update);

}  // namespace CPU_CAPABILITY
}  // namespace halfvae::cpu
