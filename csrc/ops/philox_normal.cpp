// philox_normal: the standard normal draws reparam_gmm_kl makes in-kernel for a seed, exposed so
// tests can check the stream and users can reproduce eps. Schema, body and registration.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "../arg_checks.h"
#include "../kernel_table.h"

namespace halfvae {
namespace {

at::Tensor philox_normal(const at::Tensor& seed, int64_t numel, at::ScalarType dtype) {
  const Kernels& kernels = kernels_for(seed);
  check_seed(seed, seed);
  TORCH_CHECK_VALUE(numel >= 0, "numel must be non-negative, got ", numel);
  check_kernel_dtype(kernels, dtype, "dtype is");
  auto out = at::empty({numel}, seed.options().dtype(dtype));
  if (numel > 0) kernels.philox_normal(seed, out);
  return out;
}

void impls(torch::Library& m) { m.impl("philox_normal", TORCH_FN(philox_normal)); }

}  // namespace
}  // namespace halfvae

TORCH_LIBRARY_FRAGMENT(halfvae_ext, m) {
  m.def("philox_normal(Tensor seed, int numel, ScalarType dtype) -> Tensor");
}

TORCH_LIBRARY_IMPL(halfvae_ext, CPU, m) { halfvae::impls(m); }
#ifdef HALFVAE_WITH_CUDA
TORCH_LIBRARY_IMPL(halfvae_ext, CUDA, m) { halfvae::impls(m); }
#endif
