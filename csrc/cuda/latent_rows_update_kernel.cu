// CUDA kernel of latent_rows_update_: indices grouped by a stable sort (ATen), then the first
// thread of each run of equal indices (one per k for the element-wise rules, one per row for the
// row-wise ones) sums that row's gradient in batch order and takes the step on mu and logvar.
// Deterministic: no atomics. No host synchronization: the grid covers the worst case (every index
// its own row), so the number of distinct rows is never needed on the host; threads that do not
// start a run return at once.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include "../kernel_table.h"
#include "common.cuh"
#include "halfvae/row_optimizer.h"

namespace halfvae::cuda {
namespace {

// Element-wise rules (adam, sgd): one thread per (position in the sorted indices, k). S: the type
// of Adam's moments (scalar_t or bfloat16).
template <typename scalar_t, typename acc_t, typename S, bool kAdam>
__global__ void __launch_bounds__(kThreads) update_kernel(
    const int64_t* __restrict__ sorted, const int64_t* __restrict__ perm,
    const scalar_t* __restrict__ grad_mu, const scalar_t* __restrict__ grad_logvar, int64_t B,
    int64_t K, int64_t row_stride, scalar_t* __restrict__ mu, scalar_t* __restrict__ logvar,
    S* __restrict__ state, int64_t state_stride, acc_t lr, acc_t b1, acc_t b2, acc_t eps,
    acc_t step_size, int64_t table_step, int64_t row_offset) {
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
      using IO = StateIO<acc_t, S>;
      const int64_t e = which * K + k;
      S* m = state + row * state_stride + e;
      S* v = m + 2 * K;
      acc_t wi = w[i], mi = IO::load(m), vi = IO::load(v);
      adam_element(&wi, &mi, &vi, sum, b1, b2, eps, step_size);
      w[i] = static_cast<scalar_t>(wi);
      IO::store(m, mi, row + row_offset, e, table_step);
      IO::store(v, vi, row + row_offset, 2 * K + e, table_step);
    } else {
      w[i] = static_cast<scalar_t>(static_cast<acc_t>(w[i]) - lr * sum);
    }
  }
}

// A touched row's summed gradient, element k of table `which`, in batch order.
template <typename T>
__device__ T run_sum(const T* __restrict__ grad, const int64_t* __restrict__ perm, int64_t j,
                     int64_t end, int64_t K, int64_t k) {
  T sum = 0;
  for (int64_t r = j; r < end; ++r) sum += grad[perm[r] * K + k];
  return sum;
}

// Row-wise rules (rowwise_adam, rowwise_adagrad): one thread per position in the sorted indices;
// the first of each run steps the whole row (its per-row moment needs all K gradients). Tables
// are float32 or float64 (T), moments T or bfloat16 (S). K <= kMaxRowwiseCudaLatents (checked by
// make_row_update): the row's gradient is staged in a per-thread array (local memory, cached:
// it is indexed at run time, so it does not live in registers).
template <typename T, typename S, bool kAdamRule>
__global__ void __launch_bounds__(kThreads) rowwise_kernel(
    const int64_t* __restrict__ sorted, const int64_t* __restrict__ perm,
    const T* __restrict__ grad_mu, const T* __restrict__ grad_logvar, int64_t B, int64_t K,
    int64_t row_stride, T* __restrict__ mu, T* __restrict__ logvar, S* __restrict__ state,
    int64_t state_stride, T* __restrict__ row_state, int64_t row_state_stride,
    RowwiseConstants<T> c, int64_t row_offset) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j >= B) return;
  const int64_t row = sorted[j];
  if (j > 0 && sorted[j - 1] == row) return;  // not the first of its run
  int64_t end = j + 1;
  while (end < B && sorted[end] == row) ++end;
  T* rs = row_state + row * row_state_stride;
  T g[kMaxRowwiseCudaLatents];
  if constexpr (kAdamRule) {
    const T t = rs[2] + T(1);  // the row's step count
    rs[2] = t;
    const BiasCorrections<T> bc(c, t);
    for (int which = 0; which < 2; ++which) {
      const T* grad = which == 0 ? grad_mu : grad_logvar;
      for (int64_t k = 0; k < K; ++k) g[k] = run_sum(grad, perm, j, end, K, k);
      rowwise_adam_row<T, S>((which == 0 ? mu : logvar) + row * row_stride,
                             state + row * state_stride + which * K, rs + which, g, K, bc, c,
                             row + row_offset, which * K);
    }
  } else {
    for (int which = 0; which < 2; ++which) {
      const T* grad = which == 0 ? grad_mu : grad_logvar;
      for (int64_t k = 0; k < K; ++k) g[k] = run_sum(grad, perm, j, end, K, k);
      rowwise_adagrad_row((which == 0 ? mu : logvar) + row * row_stride, rs + which, g, K, c);
    }
  }
}

void latent_rows_update(const RowUpdate& u) {
  const int64_t B = u.idx.numel(), K = u.mu.size(1);
  if (B * K == 0) return;  // nothing to step (and a grid of 0 blocks is an invalid launch)
  const c10::cuda::CUDAGuard guard(u.mu.device());
  const auto [sorted, perm] = at::sort(u.idx, /*stable=*/true, /*dim=*/0, /*descending=*/false);
  auto stream = c10::cuda::getCurrentCUDAStream();
  if (u.optimizer == RowOptimizer::kRowwiseAdam || u.optimizer == RowOptimizer::kRowwiseAdagrad) {
    AT_DISPATCH_FLOATING_TYPES(u.mu.scalar_type(), "latent_rows_update_cuda_rowwise", [&] {
      const RowwiseConstants<scalar_t> c{scalar_t(u.lr), scalar_t(u.beta1), scalar_t(u.beta2),
                                         scalar_t(u.eps), u.step};
      auto launch = [&](auto kernel, auto* state) {
        kernel<<<grid_for(B), kThreads, 0, stream>>>(
            sorted.data_ptr<int64_t>(), perm.data_ptr<int64_t>(),
            u.grad_mu.data_ptr<scalar_t>(), u.grad_logvar.data_ptr<scalar_t>(), B, K,
            u.row_stride, u.mu.data_ptr<scalar_t>(), u.logvar.data_ptr<scalar_t>(), state,
            u.state_stride, u.row_state.data_ptr<scalar_t>(), u.row_state_stride, c, u.row_offset);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      };
      if (u.optimizer == RowOptimizer::kRowwiseAdagrad)
        launch(rowwise_kernel<scalar_t, scalar_t, false>, static_cast<scalar_t*>(nullptr));
      else if (u.bf16_state)
        launch(rowwise_kernel<scalar_t, c10::BFloat16, true>,
               u.state.data_ptr<c10::BFloat16>());
      else
        launch(rowwise_kernel<scalar_t, scalar_t, true>, u.state.data_ptr<scalar_t>());
    });
    return;
  }
  const unsigned int blocks = grid_for(B * K);
  const bool adam = u.optimizer == RowOptimizer::kAdam;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, u.mu.scalar_type(),
                                  "latent_rows_update_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    auto launch = [&](auto kernel, auto* state) {
      kernel<<<blocks, kThreads, 0, stream>>>(
          sorted.data_ptr<int64_t>(), perm.data_ptr<int64_t>(), u.grad_mu.data_ptr<scalar_t>(),
          u.grad_logvar.data_ptr<scalar_t>(), B, K, u.row_stride, u.mu.data_ptr<scalar_t>(),
          u.logvar.data_ptr<scalar_t>(), state, u.state_stride, acc_t(u.lr), acc_t(u.beta1),
          acc_t(u.beta2), acc_t(u.eps), acc_t(u.step_size), u.step, u.row_offset);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (!adam)
      launch(update_kernel<scalar_t, acc_t, scalar_t, false>, static_cast<scalar_t*>(nullptr));
    else if (u.bf16_state)
      launch(update_kernel<scalar_t, acc_t, c10::BFloat16, true>,
             u.state.data_ptr<c10::BFloat16>());
    else
      launch(update_kernel<scalar_t, acc_t, scalar_t, true>, u.state.data_ptr<scalar_t>());
  });
}

}  // namespace

HALFVAE_REGISTER_KERNEL(KernelSet::cuda, latent_rows_update, &latent_rows_update);

}  // namespace halfvae::cuda
