// Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC'11) and the
// Box-Muller map shared by the CPU and CUDA kernels, so both devices draw the same eps for the same
// (seed, offset): element i of a call takes lane i % 4 of counter block i / 4.
#pragma once
#include <c10/macros/Macros.h>
#include <cstdint>

namespace halfvae {

struct PhiloxBlock {
  uint32_t x[4];
};

C10_HOST_DEVICE inline PhiloxBlock philox4x32_10(uint64_t seed, uint64_t offset, uint64_t block) {
  uint32_t c0 = static_cast<uint32_t>(block), c1 = static_cast<uint32_t>(block >> 32);
  uint32_t c2 = static_cast<uint32_t>(offset), c3 = static_cast<uint32_t>(offset >> 32);
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
#pragma unroll
  for (int round = 0; round < 10; ++round) {
    const uint64_t p0 = static_cast<uint64_t>(0xD2511F53u) * c0;
    const uint64_t p1 = static_cast<uint64_t>(0xCD9E8D57u) * c2;
    const uint32_t hi0 = static_cast<uint32_t>(p0 >> 32), lo0 = static_cast<uint32_t>(p0);
    const uint32_t hi1 = static_cast<uint32_t>(p1 >> 32), lo1 = static_cast<uint32_t>(p1);
    c0 = hi1 ^ c1 ^ k0;
    c1 = lo1;
    c2 = hi0 ^ c3 ^ k1;
    c3 = lo0;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return PhiloxBlock{{c0, c1, c2, c3}};
}

// Box-Muller radius input: u in (0, 1], never 0, so log(u) is finite.
template <typename T>
C10_HOST_DEVICE inline T uniform_open0(uint32_t x);
template <>
C10_HOST_DEVICE inline float uniform_open0<float>(uint32_t x) {
  return (static_cast<float>(x >> 8) + 0.5f) * 5.9604644775390625e-08f;  // 2^-24
}
template <>
C10_HOST_DEVICE inline double uniform_open0<double>(uint32_t x) {
  return (static_cast<double>(x) + 0.5) * 2.3283064365386963e-10;  // 2^-32
}
// Angle input: u in [0, 1).
template <typename T>
C10_HOST_DEVICE inline T uniform_closed0(uint32_t x);
template <>
C10_HOST_DEVICE inline float uniform_closed0<float>(uint32_t x) {
  return static_cast<float>(x >> 8) * 5.9604644775390625e-08f;
}
template <>
C10_HOST_DEVICE inline double uniform_closed0<double>(uint32_t x) {
  return static_cast<double>(x) * 2.3283064365386963e-10;
}

// Seeds arrive as a 2-element int64 tensor drawn from a torch generator: (seed, offset).
struct PhiloxSeed {
  uint64_t seed;
  uint64_t offset;
};

}  // namespace halfvae
