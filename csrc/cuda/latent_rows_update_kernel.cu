// CUDA kernel of latent_rows_update_: one thread per (touched row, k) sums that row's gradient in
// batch order and takes the Adam or SGD step. Deterministic: no atomics.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include "../kernel_table.h"
#include "common.cuh"
#include "halfvae/row_optimizer.h"

namespace halfvae::cuda {
namespace {

template <typename scalar_t, typename acc_t, bool kAdam>
__global__ void __launch_bounds__(kThreads) update_kernel(
    const int64_t* __restrict__ rows, const int64_t* __restrict__ off,
    const scalar_t* __restrict__ g, int64_t U, int64_t K, scalar_t* __restrict__ w,
    scalar_t* __restrict__ m, scalar_t* __restrict__ v, acc_t lr, acc_t b1, acc_t b2, acc_t eps,
    acc_t step_size) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t >= U * K) return;
  const int64_t r = t / K, k = t % K;
  acc_t sum = 0;
  for (int64_t j = off[r]; j < off[r + 1]; ++j) sum += static_cast<acc_t>(g[j * K + k]);
  const int64_t i = rows[r] * K + k;
  if constexpr (kAdam) {
    acc_t wi = w[i], mi = m[i], vi = v[i];
    adam_element(&wi, &mi, &vi, sum, b1, b2, eps, step_size);
    w[i] = static_cast<scalar_t>(wi);
    m[i] = static_cast<scalar_t>(mi);
    v[i] = static_cast<scalar_t>(vi);
  } else {
    w[i] = static_cast<scalar_t>(static_cast<acc_t>(w[i]) - lr * sum);
  }
}

void latent_rows_update(const RowUpdate& u) {
  const c10::cuda::CUDAGuard guard(u.table.device());
  const int64_t K = u.table.size(1), U = u.unique_rows.numel();
  const int64_t blocks = (U * K + kThreads - 1) / kThreads;
  if (blocks == 0) return;
  auto stream = c10::cuda::getCurrentCUDAStream();
  const bool adam = u.optimizer == RowOptimizer::kAdam;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, u.table.scalar_type(),
                                  "latent_rows_update_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    auto launch = [&](auto kernel) {
      kernel<<<blocks, kThreads, 0, stream>>>(
          u.unique_rows.data_ptr<int64_t>(), u.offsets.data_ptr<int64_t>(),
          u.grad_sorted.data_ptr<scalar_t>(), U, K, u.table.data_ptr<scalar_t>(),
          adam ? u.exp_avg.data_ptr<scalar_t>() : nullptr,
          adam ? u.exp_avg_sq.data_ptr<scalar_t>() : nullptr, acc_t(u.lr), acc_t(u.beta1),
          acc_t(u.beta2), acc_t(u.eps), acc_t(u.step_size));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (adam) launch(update_kernel<scalar_t, acc_t, true>);
    else launch(update_kernel<scalar_t, acc_t, false>);
  });
}

}  // namespace

void register_latent_rows_update(Kernels& k) { k.latent_rows_update = &latent_rows_update; }

}  // namespace halfvae::cuda
