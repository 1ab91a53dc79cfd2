// CUDA kernel of philox_normal: the eps stream of reparam_gmm_kl, written out.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include "../kernel_table.h"
#include "common.cuh"

namespace halfvae::cuda {
namespace {

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads) philox_normal_kernel(const int64_t* __restrict__ seed,
                                                                 int64_t numel, int64_t stride,
                                                                 scalar_t* __restrict__ out) {
  const uint64_t s = static_cast<uint64_t>(seed[0]), offset = static_cast<uint64_t>(seed[1]);
  for (int64_t base = 4 * (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x);
       base < numel; base += stride) {
    acc_t n[4];
    philox_normals<acc_t>(s, offset, static_cast<uint64_t>(base / 4), n);
#pragma unroll
    for (int q = 0; q < 4; ++q)
      if (base + q < numel) out[base + q] = static_cast<scalar_t>(n[q]);
  }
}

void philox_normal(const at::Tensor& seed, at::Tensor& out) {
  const c10::cuda::CUDAGuard guard(out.device());
  const Launch launch = plan_launch(out.numel(), 1);
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(),
                                  "philox_normal_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    philox_normal_kernel<scalar_t, acc_t><<<launch.blocks, kThreads, 0, stream>>>(
        seed.data_ptr<int64_t>(), out.numel(), launch.stride, out.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace

HALFVAE_REGISTER_KERNEL(KernelSet::cuda, philox_normal, &philox_normal);

}  // namespace halfvae::cuda
