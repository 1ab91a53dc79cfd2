// CPU kernels of philox_normal (the eps stream of reparam_gmm_kl, written out) and
// philox_normal_rows (that stream read at rows of an [N, K] table). Compiled once per ISA.
#include <ATen/Dispatch.h>

#include <algorithm>
#include <vector>

#include "../kernel_table.h"
#include "vec_loop.h"

namespace halfvae::cpu {
inline namespace CPU_CAPABILITY {

void philox_normal(const at::Tensor& seed_tensor, at::Tensor& out) {
  const PhiloxSeed seed = read_seed(seed_tensor);
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "philox_normal_cpu", [&] {
    using T = scalar_t;
    const Blocking blocking(out.numel(), 1, 0);
    T* o = out.data_ptr<T>();
    const auto make_scratch = [&] {
      return std::pair{NormalFiller<T>{}, std::vector<T>(normal_buffer_size<T>(blocking.block_elems))};
    };
    blocking.for_each_chunk(make_scratch, [&](auto& scratch, int64_t, int64_t b0, int64_t b1) {
      auto& [filler, buf] = scratch;
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t start = blocking.block_start(b), count = blocking.block_count(b);
        filler.fill(seed, start, count, buf.data());
        std::copy_n(buf.data(), count, o + start);
      }
    });
  });
}

// A row's elements [r K, r K + K) lie in Philox blocks first..last (4 elements each; K need not be
// a multiple of 4). The uniforms of all the blocks of a run of rows are laid side by side, one
// vectorized Box-Muller pass turns them into normals (the same expression, lane for lane, as
// NormalFiller, so the values are those of philox_normal bit for bit), then each row copies out
// its K elements. Rows cost O(K) each, whatever their ids.
template <typename T>
struct RowsScratch {
  std::vector<T> radius_u, angle_u, normals;
  std::vector<int64_t> pair_start;
};

template <typename T>
void normal_rows_run(const PhiloxSeed& s, const int64_t* rows, int64_t n, int64_t K, T* out,
                     RowsScratch<T>& sc) {
  using V = Vectorized<T>;
  const int64_t W = V::size();
  const int64_t max_pairs = n * 2 * (K / 4 + 2);
  const int64_t cap = (max_pairs + W - 1) / W * W;
  if (static_cast<int64_t>(sc.radius_u.size()) < cap) {
    sc.radius_u.resize(cap);
    sc.angle_u.resize(cap);
    sc.normals.resize(2 * cap);
  }
  sc.pair_start.resize(n);
  int64_t pairs = 0;
  for (int64_t j = 0; j < n; ++j) {
    const uint64_t e0 = static_cast<uint64_t>(rows[j]) * static_cast<uint64_t>(K);
    const uint64_t first = e0 / 4, last = (e0 + K - 1) / 4;
    sc.pair_start[j] = pairs;
    for (uint64_t blk = first; blk <= last; ++blk) {
      const PhiloxBlock x = philox4x32_10(s.seed, s.offset, blk);
      sc.radius_u[pairs] = uniform_open0<T>(x.x[0]);
      sc.angle_u[pairs] = uniform_closed0<T>(x.x[1]);
      sc.radius_u[pairs + 1] = uniform_open0<T>(x.x[2]);
      sc.angle_u[pairs + 1] = uniform_closed0<T>(x.x[3]);
      pairs += 2;
    }
  }
  const int64_t padded = (pairs + W - 1) / W * W;
  std::fill(sc.radius_u.begin() + pairs, sc.radius_u.begin() + padded, T(1));  // log(1) = 0
  std::fill(sc.angle_u.begin() + pairs, sc.angle_u.begin() + padded, T(0));
  const V two_pi(static_cast<T>(2.0 * M_PI));
  T* normals = sc.normals.data();
  for (int64_t p = 0; p < padded; p += W) {
    const V r = (V(T(-2)) * V::loadu(sc.radius_u.data() + p).log()).sqrt();
    const V theta = two_pi * V::loadu(sc.angle_u.data() + p);
    const auto [lo, hi] = at::vec::interleave2(r * theta.cos(), r * theta.sin());
    lo.store(normals + 2 * p);
    hi.store(normals + 2 * p + W);
  }
  for (int64_t j = 0; j < n; ++j) {
    const uint64_t e0 = static_cast<uint64_t>(rows[j]) * static_cast<uint64_t>(K);
    // pair p holds elements 2p, 2p + 1: the row's first block starts at element 2 pair_start.
    const T* src = normals + 2 * sc.pair_start[j] + static_cast<int64_t>(e0 % 4);
    std::copy_n(src, K, out + j * K);
  }
}

void philox_normal_rows(const at::Tensor& seed_tensor, const at::Tensor& rows, at::Tensor& out) {
  const PhiloxSeed seed = read_seed(seed_tensor);
  const int64_t n = rows.numel(), K = out.size(1);
  const int64_t* r = rows.data_ptr<int64_t>();
  // Runs of about kBlockElems elements: buffers stay in L1/L2, one Box-Muller pass per run.
  const int64_t run = std::max<int64_t>(1, kBlockElems / K);
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "philox_normal_rows_cpu", [&] {
    using T = scalar_t;
    T* o = out.data_ptr<T>();
    const int64_t grain = std::max<int64_t>(1, kParallelGrainElems / (run * K));
    at::parallel_for(0, (n + run - 1) / run, grain, [&](int64_t c0, int64_t c1) {
      RowsScratch<T> scratch;
      for (int64_t c = c0; c < c1; ++c) {
        const int64_t j0 = c * run, m = std::min(run, n - j0);
        normal_rows_run<T>(seed, r + j0, m, K, o + j0 * K, scratch);
      }
    });
  });
}

HALFVAE_REGISTER_CPU_KERNEL(philox_normal, &philox_normal);
HALFVAE_REGISTER_CPU_KERNEL(philox_normal_rows, &philox_normal_rows);

}  // namespace CPU_CAPABILITY
}  // namespace halfvae::cpu
