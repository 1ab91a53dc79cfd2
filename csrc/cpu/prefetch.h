// Access to random rows of a latent table: software prefetch and short copies.
// Rows of a large latent table are picked at random, so each one misses every cache level (and,
// with 4 KB pages, the TLB). Asking for the next rows early lets those misses overlap instead of
// stalling one after another.
#pragma once
#include <cstdint>
#include <cstring>

#include <c10/macros/Macros.h>

// Compiled once per ISA like the kernels that include it: a helper outside CPU_CAPABILITY would be
// one shared (baseline, out-of-line) copy for every variant.
namespace halfvae::cpu {
inline namespace CPU_CAPABILITY {

constexpr int64_t kCacheLine = 64;

// Every cache line of [p, p + n). The empty volatile asm (no instruction) gives it an effect GCC
// must keep: to GCC 12 a function made only of __builtin_prefetch calls is const, and it deleted
// every call of one (RowStepper::prefetch: latent_rows_update_ ran with no prefetch at all).
template <bool kForWrite, typename T>
C10_ALWAYS_INLINE void prefetch_span(const T* p, int64_t n) {
  const auto first = reinterpret_cast<uintptr_t>(p) & ~uintptr_t(kCacheLine - 1);
  const auto end = reinterpret_cast<uintptr_t>(p + n);
  for (uintptr_t a = first; a < end; a += kCacheLine)
    __builtin_prefetch(reinterpret_cast<const void*>(a), kForWrite ? 1 : 0, 3);
  asm volatile("");
}

// Copies the n values of a row (a few dozen bytes). std::copy_n with a run-time n is a call to
// memmove, which cost more than the copy itself (~8% of the gathering forward, tens of thousands of
// calls). Up to 64 bytes: two constant-size copies that may overlap, plain vector moves, no loop
// (GCC turns a loop of copies back into a memmove call).
template <typename T>
C10_ALWAYS_INLINE void copy_row(T* __restrict dst, const T* __restrict src, int64_t n) {
  auto* d = reinterpret_cast<char*>(dst);
  auto* s = reinterpret_cast<const char*>(src);
  const int64_t bytes = n * static_cast<int64_t>(sizeof(T));
  if (bytes > 64) {
    std::memcpy(d, s, bytes);
  } else if (bytes >= 32) {
    std::memcpy(d, s, 32);
    std::memcpy(d + bytes - 32, s + bytes - 32, 32);
  } else if (bytes >= 16) {
    std::memcpy(d, s, 16);
    std::memcpy(d + bytes - 16, s + bytes - 16, 16);
  } else if (bytes >= 8) {
    std::memcpy(d, s, 8);
    std::memcpy(d + bytes - 8, s + bytes - 8, 8);
  } else if (bytes >= 4) {
    std::memcpy(d, s, 4);  // sizeof(T) >= 4: a 4-byte row
  }
}

}  // namespace CPU_CAPABILITY
}  // namespace halfvae::cpu
