// CUDA kernel of latent_rows_update_: indices grouped by a stable sort (ATen), then the first
// thread of each run of equal indices, one per k, sums that row's gradient in batch order and takes
// the Adam or SGD step on mu and logvar. Deterministic: no atomics. No host synchronization: the
// grid covers the worst case (every index its own row), so the number of distinct rows is never
// needed on the host; threads that do not start a run return at once.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include "../kernel_table.h"
#include "common.cuh"
#include "halfvae/row_optimizer.h"

namespace halfvae::cuda {
namespace {

template <typename scalar_t, typename acc_t, bool kAdam>
__global__ void __launch_bounds__(kThreads) update_kernel(
    const int64_t* __restrict__ sorted, const int64_t* __restrict__ perm,
    const scalar_t* __restrict__ grad_mu, const scalar_t* __restrict__ grad_logvar, int64_t B,
    int64_t K, int64_t row_stride, scalar_t* __restrict__ mu, scalar_t* __restrict__ logvar,
    scalar_t* __restrict__ state, acc_t lr, acc_t b1, acc_t b2, acc_t eps, acc_t step_size) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t >= B * K) return;
  const int64_t j = t / K, k = t % K;  // position j in the sorted indices
  const int64_t row = sorted[j];
  if (j > 0 && sorted[j - 1] == row) return;  // not the first of its run
  int64_t end = j + 1;
  while (end < B && sorted[end] == row) ++end;
  const int64_t i = row * row_stride + k;  // in mu and in logvar
#pragma unroll
  for (int which = 0; which < 2; ++which) {
    const scalar_t* g = which == 0 ? grad_mu : grad_logvar;
    scalar_t* w = which == 0 ? mu : logvar;
    acc_t sum = 0;
    for (int64_t r = j; r < end; ++r) sum += static_cast<acc_t>(g[perm[r] * K + k]);
    if constexpr (kAdam) {
      // state [rows, 4, K]: m of mu, m of logvar, v of mu, v of logvar
      scalar_t* m = state + row * 4 * K + which * K + k;
      scalar_t* v = m + 2 * K;
      acc_t wi = w[i], mi = *m, vi = *v;
      adam_element(&wi, &mi, &vi, sum, b1, b2, eps, step_size);
      w[i] = static_cast<scalar_t>(wi);
      *m = static_cast<scalar_t>(mi);
      *v = static_cast<scalar_t>(vi);
    } else {
      w[i] = static_cast<scalar_t>(static_cast<acc_t>(w[i]) - lr * sum);
    }
  }
}

void latent_rows_update(const RowUpdate& u) {
  const int64_t B = u.idx.numel(), K = u.mu.size(1);
  if (B * K == 0) return;  // nothing to step (and a grid of 0 blocks is an invalid launch)
  const c10::cuda::CUDAGuard guard(u.mu.device());
  const auto [sorted, perm] = at::sort(u.idx, /*stable=*/true, /*dim=*/0, /*descending=*/false);
  const unsigned int blocks = grid_for(B * K);
  auto stream = c10::cuda::getCurrentCUDAStream();
  const bool adam = u.optimizer == RowOptimizer::kAdam;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, u.mu.scalar_type(),
                                  "latent_rows_update_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    auto launch = [&](auto kernel) {
      kernel<<<blocks, kThreads, 0, stream>>>(
          sorted.data_ptr<int64_t>(), perm.data_ptr<int64_t>(), u.grad_mu.data_ptr<scalar_t>(),
          u.grad_logvar.data_ptr<scalar_t>(), B, K, u.row_stride, u.mu.data_ptr<scalar_t>(),
          u.logvar.data_ptr<scalar_t>(), adam ? u.state.data_ptr<scalar_t>() : nullptr,
          acc_t(u.lr), acc_t(u.beta1), acc_t(u.beta2), acc_t(u.eps), acc_t(u.step_size));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (adam) launch(update_kernel<scalar_t, acc_t, true>);
    else launch(update_kernel<scalar_t, acc_t, false>);
  });
}

}  // namespace

HALFVAE_REGISTER_KERNEL(KernelSet::cuda, latent_rows_update, &latent_rows_update);

}  // namespace halfvae::cuda
