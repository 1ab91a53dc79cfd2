// Large CPU outputs (z, kl, gradients) come from a small cache of recently freed buffers.
//
// Why: glibc serves allocations above its mmap threshold (at most 32 MB) with fresh mmap'ed pages,
// so every call that returns a large tensor pays one page fault per 4 KB on first touch; measured
// here that doubled the forward time at N*K = 2^23. A training loop allocates the same sizes every
// step, so reusing the previous step's buffers removes the faults. Buffers are 2 MB-aligned and
// advised as huge pages, so even a first use faults 512x less. Bounded (HALFVAE_CPU_OUTPUT_CACHE_MB,
// default 2048; 0 disables) and reported to the torch profiler like any allocation.
#pragma once
#include <ATen/core/Tensor.h>

#include <cstddef>

namespace halfvae::cpu {

at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options);

struct OutputCacheInfo {
  size_t limit_bytes, cached_bytes, in_use_bytes, hits, misses;
};
OutputCacheInfo output_cache_info();
void set_output_cache_limit(size_t bytes);  // frees cached buffers above the new limit

}  // namespace halfvae::cpu
