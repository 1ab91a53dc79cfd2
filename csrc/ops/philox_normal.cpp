// philox_normal: the standard normal draws reparam_gmm_kl makes in-kernel for a seed, exposed so
// tests can check the stream and users can reproduce eps. philox_normal_rows: the same stream read
// at rows of an [N, K] table, so that a draw is keyed by the global row id (a sharded table draws
// the same eps for a row whichever rank owns it and wherever it sits in a batch). Schemas, bodies
// and registration.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <limits>

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
  if (numel > 0) kernels.philox_normal(seed.contiguous(), out);  // kernels read seed[0], seed[1]
  return out;
}

at::Tensor philox_normal_rows(const at::Tensor& seed, const at::Tensor& rows, int64_t K,
                              at::ScalarType dtype) {
  const Kernels& kernels = kernels_for(seed);
  check_seed(seed, seed);
  TORCH_CHECK_VALUE(K >= 1, "K must be positive, got ", K);
  check_kernel_dtype(kernels, dtype, "dtype is");
  const bool int_type = rows.scalar_type() == at::kLong || rows.scalar_type() == at::kInt;
  TORCH_CHECK_VALUE(rows.dim() == 1 && int_type,
                    "rows must be a 1-D int64 or int32 tensor of row ids, got dtype ",
                    dtype_name(rows.scalar_type()), " and shape ", rows.sizes());
  TORCH_CHECK_VALUE(rows.device() == seed.device(), "rows is on ", rows.device(),
                    " but seed is on ", seed.device());
  auto out = at::empty({rows.size(0), K}, seed.options().dtype(dtype));
  if (rows.numel() == 0) return out;
  const auto r = rows.to(at::kLong).contiguous();
  // Element r * K + k must be a valid stream position: r >= 0 and r * K + K without overflow.
  const auto [lo, hi] = at::aminmax(r);
  const int64_t min_r = lo.item<int64_t>(), max_r = hi.item<int64_t>();
  const int64_t limit = std::numeric_limits<int64_t>::max() / K - 1;
  TORCH_CHECK_INDEX(min_r >= 0 && max_r < limit, "rows values must be in [0, ", limit,
                    ") (row ids; element rows[b] * K + k of the stream), got min ", min_r,
                    " and max ", max_r);
  kernels.philox_normal_rows(seed.contiguous(), r, out);
  return out;
}

void impls(torch::Library& m) {
  m.impl("philox_normal", TORCH_FN(philox_normal));
  m.impl("philox_normal_rows", TORCH_FN(philox_normal_rows));
}

}  // namespace
}  // namespace halfvae

TORCH_LIBRARY_FRAGMENT(halfvae_ext, m) {
  m.def("philox_normal(Tensor seed, int numel, ScalarType dtype) -> Tensor");
  // out[b, k] = philox_normal(seed, (max(rows) + 1) * K, dtype)[rows[b] * K + k], without drawing
  // the rows in between: [len(rows), K].
  m.def("philox_normal_rows(Tensor seed, Tensor rows, int K, ScalarType dtype) -> Tensor");
}

TORCH_LIBRARY_IMPL(halfvae_ext, CPU, m) { halfvae::impls(m); }
#ifdef HALFVAE_WITH_CUDA
TORCH_LIBRARY_IMPL(halfvae_ext, CUDA, m) { halfvae::impls(m); }
#endif
