// CPU kernel of latent_rows_update_: group the batch's indices (a stable sort by row, so
// duplicates are summed in batch order), then, in parallel over touched rows, one Adam or SGD
// step on that row of mu and logvar and their moments. Compiled once per ISA.
//
// Touched rows are handled in small chunks: the rows of the next chunk are prefetched while this
// chunk is summed and stepped (random rows of a big table are DRAM misses; this overlaps them),
// and a row's mu and logvar are staged side by side so that Adam runs on whole vectors (K = 8
// floats is only half an AVX-512 register per table).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <vector>

#include "halfvae/row_optimizer.h"
#include "isa_kernels.h"
#include "prefetch.h"

namespace halfvae::cpu {
inline namespace CPU_CAPABILITY {
namespace {

using at::vec::Vectorized;

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

// Adam (SparseAdam's formula, see row_optimizer.h) on n contiguous elements.
template <typename T>
void adam_span(T* w, T* m, T* v, const T* g, int64_t n, T b1, T b2, T eps, T step_size) {
  using V = Vectorized<T>;
  const V one_b1(T(1) - b1), one_b2(T(1) - b2), eps_v(eps), step_v(step_size);
  int64_t k = 0;
  for (; k + V::size() <= n; k += V::size()) {
    const V gv = V::loadu(g + k);
    V mv = V::loadu(m + k), vv = V::loadu(v + k);
    mv = mv + one_b1 * (gv - mv);
    vv = vv + one_b2 * (gv * gv - vv);
    mv.store(m + k);
    vv.store(v + k);
    (V::loadu(w + k) - step_v * mv / (vv.sqrt() + eps_v)).store(w + k);
  }
  for (; k < n; ++k) adam_element(w + k, m + k, v + k, g[k], b1, b2, eps, step_size);
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
    const int64_t K = u.mu.size(1), W = 2 * K;  // a row's parameters: its mu, then its logvar
    const int64_t stride = u.row_stride;
    T* table[2] = {u.mu.data_ptr<T>(), u.logvar.data_ptr<T>()};
    const T* grad[2] = {u.grad_mu.data_ptr<T>(), u.grad_logvar.data_ptr<T>()};
    const bool adam = u.optimizer == RowOptimizer::kAdam;
    // Adam state [rows, 4, K]: a row's first moments (mu, logvar) then its second moments, so the
    // moments of a row are 2W contiguous values.
    T* state = adam ? u.state.data_ptr<T>() : nullptr;
    const T b1 = T(u.beta1), b2 = T(u.beta2), eps = T(u.eps), step_size = T(u.step_size);
    const T lr = T(u.lr);
    auto row_of = [&](int64_t r) { return idx[order[group_start[r]]]; };
    auto prefetch_rows = [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t row = row_of(r);
        prefetch_span<true>(table[0] + row * stride, K);
        prefetch_span<true>(table[1] + row * stride, K);
        if (adam) prefetch_span<true>(state + row * 2 * W, 2 * W);
      }
    };
    constexpr int64_t kChunk = 16;  // rows in flight: ~4 cache lines each
    at::parallel_for(0, groups, 256, [&](int64_t g0, int64_t g1) {
      std::vector<T> buf(2 * kChunk * W);
      T* __restrict__ sum = buf.data();            // [chunk rows, W] summed gradients
      T* __restrict__ params = sum + kChunk * W;   // [chunk rows, W] staged mu | logvar
      prefetch_rows(g0, std::min(g1, g0 + kChunk));
      for (int64_t c0 = g0; c0 < g1; c0 += kChunk) {
        const int64_t c1 = std::min(g1, c0 + kChunk);
        prefetch_rows(c1, std::min(g1, c1 + kChunk));
        for (int64_t r = c0; r < c1; ++r) {
          T* s = sum + (r - c0) * W;
          for (int t = 0; t < 2; ++t) {
            const T* first = grad[t] + int64_t(order[group_start[r]]) * K;
            std::copy_n(first, K, s + t * K);
            for (int64_t j = group_start[r] + 1; j < group_start[r + 1]; ++j) {
              const T* gj = grad[t] + int64_t(order[j]) * K;
              for (int64_t k = 0; k < K; ++k) s[t * K + k] += gj[k];
            }
          }
        }
        if (!adam) {
          for (int64_t r = c0; r < c1; ++r)
            for (int t = 0; t < 2; ++t) {
              T* __restrict__ w = table[t] + row_of(r) * stride;
              const T* s = sum + (r - c0) * W + t * K;
              for (int64_t k = 0; k < K; ++k) w[k] -= lr * s[k];
            }
          continue;
        }
        for (int64_t r = c0; r < c1; ++r) {
          const int64_t row = row_of(r);
          T* p = params + (r - c0) * W;
          std::copy_n(table[0] + row * stride, K, p);
          std::copy_n(table[1] + row * stride, K, p + K);
          T* m = state + row * 2 * W;
          adam_span(p, m, m + W, sum + (r - c0) * W, W, b1, b2, eps, step_size);
          std::copy_n(p, K, table[0] + row * stride);
          std::copy_n(p + K, K, table[1] + row * stride);
        }
      }
    });
  });
}

}  // namespace CPU_CAPABILITY
}  // namespace halfvae::cpu
