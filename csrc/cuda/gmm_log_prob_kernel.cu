// CUDA kernels of gmm_log_prob, forward and backward (thread layout: see common.cuh), for one
// prior and for priors chosen per row by prior_index.
#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <ATen/Dispatch.h>

#include "../kernel_table.h"
#include "common.cuh"

namespace halfvae::cuda {
namespace {

// f(i, q) for each element i (lane q) of this thread, from its first element on.
template <class F>
__device__ __forceinline__ void for_each_element(int64_t first, int64_t numel, int64_t stride,
                                                 const F& f) {
  for (int64_t base = first; base < numel; base += stride) for_each_lane(base, numel, f);
}

template <typename scalar_t, typename acc_t, int CT>
__global__ void __launch_bounds__(kThreads) forward_kernel(
    const scalar_t* __restrict__ z, const acc_t* __restrict__ w, const acc_t* __restrict__ m,
    const acc_t* __restrict__ prec, int64_t numel, int64_t K, int C, int64_t stride,
    scalar_t* __restrict__ out) {
  const int64_t first = first_element();
  if (first >= numel) return;
  LanePrior<acc_t, CT> prior[4];
#pragma unroll
  for (int q = 0; q < 4; ++q) prior[q].load(w, m, prec, (first + q) % K, C);
  for_each_element(first, numel, stride, [&](int64_t i, int q) {
    out[i] = static_cast<scalar_t>(
        gmm_log_density<DevMath<acc_t>, CT>(static_cast<acc_t>(z[i]), C, prior[q]));
  });
}

template <typename scalar_t, typename acc_t, int CT, bool kPriorGrads>
__global__ void __launch_bounds__(kThreads) backward_kernel(
    const scalar_t* __restrict__ grad, const scalar_t* __restrict__ z,
    const acc_t* __restrict__ w, const acc_t* __restrict__ m, const acc_t* __restrict__ prec,
    int64_t numel, int64_t K, int C, int64_t stride, SumsTable sums_table,
    scalar_t* __restrict__ grad_z) {
  backward_frame(sums_table, kPriorGrads, numel, [&](int64_t first, double* table) {
    LanePrior<acc_t, CT> prior[4];
    LaneSums<acc_t, CT, false> sums[4];
    init_lanes<acc_t, CT, kPriorGrads>(prior, sums, w, m, prec, table, first, K, C);
    for_each_element(first, numel, stride, [&](int64_t i, int q) {
      const acc_t g = static_cast<acc_t>(grad[i]);
      const acc_t score = gmm_score<DevMath<acc_t>, CT, kPriorGrads>(static_cast<acc_t>(z[i]),
                                                                     g, C, prior[q], sums[q]);
      if constexpr (kPriorGrads) sums[q].add_weight(g);
      grad_z[i] = static_cast<scalar_t>(g * score);
    });
    if constexpr (kPriorGrads) {
#pragma unroll
      for (int q = 0; q < 4; ++q) sums[q].flush();
    }
  });
}

// A prior chosen per row (prior_index, tables [U*K, C]): lanes follow their rows' groups
// (GroupLane in common.cuh). The prior gradients are a runtime choice (sums_table.global !=
// nullptr), so this case adds one kernel per dtype and CT for each direction.
template <typename scalar_t, typename acc_t, int CT>
__global__ void __launch_bounds__(kThreads) grouped_forward_kernel(
    const scalar_t* __restrict__ z, const int64_t* __restrict__ prior_index,
    const acc_t* __restrict__ w, const acc_t* __restrict__ m, const acc_t* __restrict__ prec,
    int64_t numel, int64_t K, int C, int64_t stride, scalar_t* __restrict__ out) {
  const int64_t first = first_element();
  if (first >= numel) return;
  const GroupTables<acc_t> tables{w, m, prec, prior_index, K, C};
  GroupLanes<acc_t, CT, false> lanes(first, tables, nullptr);
  for_each_element(first, numel, stride, [&](int64_t i, int q) {
    lanes[q].follow(i, i / K, tables, nullptr);
    out[i] = static_cast<scalar_t>(
        gmm_log_density<DevMath<acc_t>, CT>(static_cast<acc_t>(z[i]), C, lanes[q].prior));
  });
}

template <typename scalar_t, typename acc_t, int CT>
__global__ void __launch_bounds__(kThreads) grouped_backward_kernel(
    const scalar_t* __restrict__ grad, const scalar_t* __restrict__ z,
    const int64_t* __restrict__ prior_index, const acc_t* __restrict__ w,
    const acc_t* __restrict__ m, const acc_t* __restrict__ prec, int64_t numel, int64_t K, int C,
    int64_t stride, SumsTable sums_table, scalar_t* __restrict__ grad_z) {
  const bool prior_grads = sums_table.global != nullptr;  // uniform, as backward_frame needs
  backward_frame(sums_table, prior_grads, numel, [&](int64_t first, double* table) {
    const GroupTables<acc_t> tables{w, m, prec, prior_index, K, C};
    GroupLanes<acc_t, CT, true> lanes(first, tables, table);
    for_each_element(first, numel, stride, [&](int64_t i, int q) {
      lanes[q].follow(i, i / K, tables, table);
      const acc_t g = static_cast<acc_t>(grad[i]);
      // Responsibility terms computed either way (LaneSums drops them without a table).
      const acc_t score = gmm_score<DevMath<acc_t>, CT, true>(static_cast<acc_t>(z[i]), g, C,
                                                              lanes[q].prior, lanes[q].sums);
      lanes[q].sums.add_weight(g);
      grad_z[i] = static_cast<scalar_t>(g * score);
    });
    lanes.finish();
  });
}

void forward(const at::Tensor& z, const PriorTables& prior, at::Tensor& out) {
  const c10::cuda::CUDAGuard guard(z.device());
  const Launch launch = plan_launch(z.numel(), prior.K);
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "gmm_log_prob_cuda",
                                  [&] {
    using acc_t = at::opmath_type<scalar_t>;
    dispatch_components(prior.C, [&]<int CT>() {
      if (prior.conditional()) {
        grouped_forward_kernel<scalar_t, acc_t, CT><<<launch.blocks, kThreads, 0, stream>>>(
            z.data_ptr<scalar_t>(), prior.index.data_ptr<int64_t>(), prior.w.data_ptr<acc_t>(),
            prior.m.data_ptr<acc_t>(), prior.prec.data_ptr<acc_t>(), z.numel(), prior.K,
            static_cast<int>(prior.C), launch.stride, out.data_ptr<scalar_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        return;
      }
      forward_kernel<scalar_t, acc_t, CT><<<launch.blocks, kThreads, 0, stream>>>(
          z.data_ptr<scalar_t>(), prior.w.data_ptr<acc_t>(), prior.m.data_ptr<acc_t>(),
          prior.prec.data_ptr<acc_t>(), z.numel(), prior.K, static_cast<int>(prior.C),
          launch.stride, out.data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

void backward(const at::Tensor& grad, const at::Tensor& z, const PriorTables& prior,
              at::Tensor& grad_z, at::Tensor& prior_sums) {
  const c10::cuda::CUDAGuard guard(z.device());
  const Launch launch = plan_launch(z.numel(), prior.K);
  const bool prior_grads = prior_sums.defined();
  // The prior's gradients are sums over all elements, added by atomics in an order that varies.
  if (prior_grads)
    at::globalContext().alertNotDeterministic(
        "halfvae_ext gmm_log_prob backward on CUDA (the prior's gradients)");
  // [U*K, 3C+1]: one row of sums per (group, latent dimension); U = 1 for one prior.
  const int64_t table_size = prior.U * prior.K * num_prior_sums(static_cast<int>(prior.C));
  const SumsTable table{prior_grads ? prior_sums.data_ptr<double>() : nullptr, table_size,
                        prior_grads && table_size <= kMaxSharedSums};
  const size_t smem = table.in_shared ? table_size * sizeof(double) : 0;
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(),
                                  "gmm_log_prob_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    dispatch_components(prior.C, [&]<int CT>() {
      if (prior.conditional()) {
        grouped_backward_kernel<scalar_t, acc_t, CT><<<launch.blocks, kThreads, smem, stream>>>(
            grad.data_ptr<scalar_t>(), z.data_ptr<scalar_t>(), prior.index.data_ptr<int64_t>(),
            prior.w.data_ptr<acc_t>(), prior.m.data_ptr<acc_t>(), prior.prec.data_ptr<acc_t>(),
            z.numel(), prior.K, static_cast<int>(prior.C), launch.stride, table,
            grad_z.data_ptr<scalar_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        return;
      }
      auto launch_with = [&](auto kernel) {
        kernel<<<launch.blocks, kThreads, smem, stream>>>(
            grad.data_ptr<scalar_t>(), z.data_ptr<scalar_t>(), prior.w.data_ptr<acc_t>(),
            prior.m.data_ptr<acc_t>(), prior.prec.data_ptr<acc_t>(), z.numel(), prior.K,
            static_cast<int>(prior.C), launch.stride, table, grad_z.data_ptr<scalar_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      };
      if (prior_grads) launch_with(backward_kernel<scalar_t, acc_t, CT, true>);
      else launch_with(backward_kernel<scalar_t, acc_t, CT, false>);
    });
  });
}

}  // namespace

HALFVAE_REGISTER_KERNEL(KernelSet::cuda, gmm_log_prob_forward, &forward);
HALFVAE_REGISTER_KERNEL(KernelSet::cuda, gmm_log_prob_backward, &backward);

}  // namespace halfvae::cuda
