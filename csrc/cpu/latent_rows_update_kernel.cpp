// CPU kernel of latent_rows_update_: group the batch's indices (a stable sort by row, so
// duplicates are summed in batch order), then, in parallel over touched rows, one Adam or SGD
// step on that row of mu and logvar and their moments. Compiled once per ISA.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "halfvae/row_optimizer.h"
#include "isa_kernels.h"

namespace halfvae::cpu {
inline namespace CPU_CAPABILITY {
namespace {

// Batch positions ordered by row, ties in batch order: an LSD radix sort on the row index (stable
// by construction), 11 bits a pass, as many passes as the table's row count needs. For a batch of
// 4096 it is ~10x cheaper than std::sort of (row, position) pairs.
std::vector<int32_t> positions_by_row(const int64_t* idx, int64_t B, int64_t rows) {
  std::vector<int32_t> order(B), tmp(B);
  for (int64_t b = 0; b < B; ++b) order[b] = static_cast<int32_t>(b);
  constexpr int kBits = 11, kBuckets = 1 << kBits;
  int key_bits = 1;
  while (key_bits < 63 && (int64_t(1) << key_bits) < rows) ++key_bits;
  std::vector<int32_t> count(kBuckets);
  for (int shift = 0; shift < key_bits; shift += kBits) {
    std::fill(count.begin(), count.end(), 0);
    for (int64_t b = 0; b < B; ++b) ++count[(idx[order[b]] >> shift) & (kBuckets - 1)];
    int32_t sum = 0;
    for (auto& c : count) {
      const int32_t n = c;
      c = sum;
      sum += n;
    }
    for (int64_t b = 0; b < B; ++b) tmp[count[(idx[order[b]] >> shift) & (kBuckets - 1)]++] = order[b];
    order.swap(tmp);
  }
  return order;
}

}  // namespace

void latent_rows_update(const RowUpdate& u) {
  const int64_t B = u.idx.numel();
  TORCH_CHECK(B < (int64_t(1) << 31), "latent_rows_update_: batches of at most 2^31 rows");
  const int64_t* idx = u.idx.data_ptr<int64_t>();
  const std::vector<int32_t> order = positions_by_row(idx, B, u.mu.size(0));
  std::vector<int64_t> group_start;  // first entry of each touched row in `order`, then B
  group_start.reserve(B + 1);
  for (int64_t b = 0; b < B; ++b)
    if (b == 0 || idx[order[b]] != idx[order[b - 1]]) group_start.push_back(b);
  group_start.push_back(B);
  const int64_t groups = static_cast<int64_t>(group_start.size()) - 1;

  AT_DISPATCH_FLOATING_TYPES(u.mu.scalar_type(), "latent_rows_update_cpu", [&] {
    using T = scalar_t;
    const int64_t K = u.mu.size(1);
    const int64_t table = u.mu.numel();
    T* w[2] = {u.mu.data_ptr<T>(), u.logvar.data_ptr<T>()};
    const T* g[2] = {u.grad_mu.data_ptr<T>(), u.grad_logvar.data_ptr<T>()};
    const bool adam = u.optimizer == RowOptimizer::kAdam;
    T* state = adam ? u.state.data_ptr<T>() : nullptr;
    const T b1 = T(u.beta1), b2 = T(u.beta2), eps = T(u.eps), step_size = T(u.step_size);
    const T lr = T(u.lr);
    at::parallel_for(0, groups, 64, [&](int64_t g0, int64_t g1) {
      std::vector<T> sum_buf(K);
      T* __restrict__ sum = sum_buf.data();
      for (int64_t r = g0; r < g1; ++r) {
        const int64_t base = idx[order[group_start[r]]] * K;
        for (int t = 0; t < 2; ++t) {  // mu, then logvar
          const T* first = g[t] + int64_t(order[group_start[r]]) * K;
          for (int64_t k = 0; k < K; ++k) sum[k] = first[k];
          for (int64_t j = group_start[r] + 1; j < group_start[r + 1]; ++j) {
            const T* gj = g[t] + int64_t(order[j]) * K;
            for (int64_t k = 0; k < K; ++k) sum[k] += gj[k];
          }
          T* __restrict__ wr = w[t] + base;
          if (adam) {
            T* __restrict__ m = state + (2 * t) * table + base;
            T* __restrict__ v = state + (2 * t + 1) * table + base;
            for (int64_t k = 0; k < K; ++k)
              adam_element(wr + k, m + k, v + k, sum[k], b1, b2, eps, step_size);
          } else {
            for (int64_t k = 0; k < K; ++k) wr[k] -= lr * sum[k];
          }
        }
      }
    });
  });
}

}  // namespace CPU_CAPABILITY
}  // namespace halfvae::cpu
