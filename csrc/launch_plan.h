// The grid of the CUDA kernels' thread layout (cuda/common.cuh), as plain host arithmetic so that
// the CPU tests can check it: thread t starts at element 4t and strides by S = blocks * threads * 4.
#pragma once
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <numeric>

namespace halfvae {

struct LaunchPlan {
  int64_t blocks;  // fits a grid's x dimension (checked)
  int64_t stride;  // elements between a thread's successive groups of 4
};

// threads: per block; cap: the most blocks wanted (a few per SM), the rest done by striding.
//  - One pass (blocks * threads * 4 >= numel): exactly the blocks needed; each thread handles one
//    group of 4, so the lanes' latent dimensions never change whatever K is.
//  - Several passes: S must be a multiple of K (a lane keeps its latent dimension k from pass to
//    pass), so blocks come in multiples of q = K / gcd(K, 4 * threads): the largest multiple of q
//    up to the cap, at least q (a large prime K), and never more than one pass needs.
inline LaunchPlan plan_launch_blocks(int64_t numel, int64_t K, int64_t threads, int64_t cap) {
  TORCH_CHECK(numel >= 0 && K >= 1 && threads >= 1 && cap >= 1,
              "plan_launch_blocks: bad arguments");
  const int64_t groups = (numel + 3) / 4;
  const int64_t needed = std::max<int64_t>(1, (groups + threads - 1) / threads);
  int64_t blocks = needed;
  if (needed > cap) {
    const int64_t q = K / std::gcd(K, int64_t(4) * threads);
    blocks = std::min(needed, std::max(q, cap / q * q));
  }
  // A grid's x dimension holds at most 2^31 - 1 blocks; a kernel launch narrows it to unsigned.
  TORCH_CHECK(blocks <= std::numeric_limits<int32_t>::max(), "a CUDA launch of ", blocks,
              " blocks exceeds the grid limit (numel ", numel, ", K ", K, ")");
  return LaunchPlan{blocks, blocks * threads * 4};
}

// Blocks of `threads` for one thread per item (no striding), checked against the grid limit.
inline int64_t blocks_for(int64_t items, int64_t threads) {
  const int64_t blocks = std::max<int64_t>(1, (items + threads - 1) / threads);
  TORCH_CHECK(blocks <= std::numeric_limits<int32_t>::max(), "a CUDA launch of ", blocks,
              " blocks exceeds the grid limit (", items, " threads)");
  return blocks;
}

}  // namespace halfvae
