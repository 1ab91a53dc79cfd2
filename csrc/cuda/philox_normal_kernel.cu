// CUDA kernels of philox_normal (the eps stream of reparam_gmm_kl, written out) and
// philox_normal_rows (that stream read at rows of an [N, K] table).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include <algorithm>

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

// One thread per (row b, Philox block of that row): a row's elements [r K, r K + K) lie in
// blocks r K / 4 .. (r K + K - 1) / 4, at most K / 4 + 2 of them; a thread writes the lanes of its
// block that belong to the row.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads) philox_normal_rows_kernel(
    const int64_t* __restrict__ seed, const int64_t* __restrict__ rows, int64_t n, int64_t K,
    int64_t blocks_per_row, scalar_t* __restrict__ out) {
  const uint64_t s = static_cast<uint64_t>(seed[0]), offset = static_cast<uint64_t>(seed[1]);
  const int64_t total = n * blocks_per_row;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; t < total;
       t += stride) {
    const int64_t b = t / blocks_per_row, j = t % blocks_per_row;
    const uint64_t e0 = static_cast<uint64_t>(rows[b]) * static_cast<uint64_t>(K);
    const uint64_t blk = e0 / 4 + static_cast<uint64_t>(j);
    if (blk > (e0 + K - 1) / 4) continue;  // this row spans fewer blocks
    acc_t v[4];
    philox_normals<acc_t>(s, offset, blk, v);
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      const uint64_t e = 4 * blk + q;
      if (e >= e0 && e < e0 + K) out[b * K + static_cast<int64_t>(e - e0)] =
          static_cast<scalar_t>(v[q]);
    }
  }
}

void philox_normal_rows(const at::Tensor& seed, const at::Tensor& rows, at::Tensor& out) {
  const c10::cuda::CUDAGuard guard(out.device());
  const int64_t n = rows.numel(), K = out.size(1), blocks_per_row = K / 4 + 2;
  const int64_t threads_needed = n * blocks_per_row;
  const int64_t cap = int64_t(sm_count(c10::cuda::current_device())) * 8;
  const unsigned int blocks = static_cast<unsigned int>(
      std::min(blocks_for(threads_needed, kThreads), cap));
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(),
                                  "philox_normal_rows_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    philox_normal_rows_kernel<scalar_t, acc_t><<<blocks, kThreads, 0, stream>>>(
        seed.data_ptr<int64_t>(), rows.data_ptr<int64_t>(), n, K, blocks_per_row,
        out.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace

HALFVAE_REGISTER_KERNEL(KernelSet::cuda, philox_normal, &philox_normal);
HALFVAE_REGISTER_KERNEL(KernelSet::cuda, philox_normal_rows, &philox_normal_rows);

}  // namespace halfvae::cuda
