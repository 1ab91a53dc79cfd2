// latent_rows_update_: the optimizer step of a latent table (mu and logvar) for the rows a batch
// touched, applied in place without ever forming a gradient of the whole table. Duplicate indices
// are summed first, in batch order, so the result is deterministic.
#pragma once
#include <ATen/core/Tensor.h>

#include "../kernel_args.h"

namespace halfvae {

struct Kernels;

// Checks the tables and the optimizer's arguments and fills everything of a RowUpdate
// (kernel_args.h) but idx and the gradients.
RowUpdate make_row_update(const Kernels& kernels, const at::Tensor& mu, const at::Tensor& logvar,
                          const at::Tensor& state, c10::string_view optimizer, double lr,
                          double beta1, double beta2, double eps, int64_t step,
                          const c10::optional<at::Tensor>& row_state, int64_t row_offset);

}  // namespace halfvae
