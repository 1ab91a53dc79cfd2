// Software prefetch of table rows. Rows of a large latent table are picked at random, so each one
// misses every cache level (and, with 4 KB pages, the TLB). Asking for the next rows early lets
// those misses overlap instead of stalling one after another.
#pragma once
#include <cstdint>

namespace halfvae::cpu {

constexpr int64_t kCacheLine = 64;

// Every cache line of [p, p + n).
template <bool kForWrite, typename T>
inline void prefetch_span(const T* p, int64_t n) {
  const auto first = reinterpret_cast<uintptr_t>(p) & ~uintptr_t(kCacheLine - 1);
  const auto end = reinterpret_cast<uintptr_t>(p + n);
  for (uintptr_t a = first; a < end; a += kCacheLine)
    __builtin_prefetch(reinterpret_cast<const void*>(a), kForWrite ? 1 : 0, 3);
}

}  // namespace halfvae::cpu
