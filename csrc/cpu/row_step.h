// The optimizer step of a latent table's touched rows, as pieces the CPU kernels share (compiled
// once per ISA): grouping a batch's indices by row, and one Adam or SGD step on a row from its
// summed gradient. latent_rows_update_ uses them on a whole batch; the backward of the fused table
// step (reparam_gmm_kl_rows_backward_step_) steps each row that occurs once in the batch right
// after computing its gradient, while the row is still in L1, and the rest afterwards.
#pragma once
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <vector>

#include "../ops/latent_rows_update.h"
#include "halfvae/row_optimizer.h"
#include "prefetch.h"

namespace halfvae::cpu {
inline namespace CPU_CAPABILITY {

// The batch's positions grouped by row. Group g (numbered in order of first occurrence) has
// count[g] positions: first[g], next[first[g]], ... in batch order, so duplicate gradients are
// summed in batch order whatever the thread count.
struct RowGroups {
  std::vector<int32_t> first, count, next;  // next: per position, -1 after a group's last one
  int64_t size() const { return static_cast<int64_t>(first.size()); }

  // One pass over the batch with an open-addressing hash table of rows (load <= 1/2, Fibonacci
  // hashing, linear probing): O(B) whatever the table size, where a radix sort's passes grow with
  // the row count (3 at 10^8 rows; at 4096 rows both cost the same, measured).
  // idx values are valid rows (>= 0): -1 marks an empty slot.
  RowGroups(const int64_t* idx, int64_t B) : next(B, -1) {
    TORCH_CHECK(B < (int64_t(1) << 30), "batches of at most 2^30 rows");
    int bits = 4;
    while ((int64_t(1) << bits) < 2 * B) ++bits;
    const uint64_t mask = (uint64_t(1) << bits) - 1;
    std::vector<int64_t> key(mask + 1, -1);
    std::vector<int32_t> group(mask + 1);
    std::vector<int32_t> last;  // last position of each group so far
    first.reserve(B);
    count.reserve(B);
    last.reserve(B);
    for (int64_t b = 0; b < B; ++b) {
      const int64_t row = idx[b];
      uint64_t h = (static_cast<uint64_t>(row) * 0x9E3779B97F4A7C15ull) >> (64 - bits);
      while (key[h] != -1 && key[h] != row) h = (h + 1) & mask;
      const int32_t pos = static_cast<int32_t>(b);
      if (key[h] == -1) {
        key[h] = row;
        group[h] = static_cast<int32_t>(first.size());
        first.push_back(pos);
        count.push_back(1);
        last.push_back(pos);
      } else {
        const int32_t g = group[h];
        next[last[g]] = pos;
        last[g] = pos;
        ++count[g];
      }
    }
  }

  // single[b]: position b's row occurs only once in the batch.
  std::vector<uint8_t> singles() const {
    std::vector<uint8_t> single(next.size(), 0);
    for (int64_t g = 0; g < size(); ++g)
      if (count[g] == 1) single[first[g]] = 1;
    return single;
  }
};

// Adam (SparseAdam's formula, see row_optimizer.h) on n contiguous elements.
template <typename T>
void adam_span(T* w, T* m, T* v, const T* g, int64_t n, T b1, T b2, T eps, T step_size) {
  using V = at::vec::Vectorized<T>;
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

// One optimizer step on whole rows of mu and logvar (and their Adam state [rows, 4, K]: first
// moments of mu and logvar, then second moments, so a row's moments are 4K contiguous values).
template <typename T>
struct RowStepper {
  T* table[2];  // mu, logvar
  T* state;     // Adam state or null (SGD)
  int64_t K, W, stride;  // W = 2K: a row's mu then its logvar, staged side by side
  T b1, b2, eps, step_size, lr;

  explicit RowStepper(const RowUpdate& u)
      : table{u.mu.data_ptr<T>(), u.logvar.data_ptr<T>()},
        state(u.optimizer == RowOptimizer::kAdam ? u.state.data_ptr<T>() : nullptr),
        K(u.mu.size(1)), W(2 * u.mu.size(1)), stride(u.row_stride), b1(T(u.beta1)),
        b2(T(u.beta2)), eps(T(u.eps)), step_size(T(u.step_size)), lr(T(u.lr)) {}

  void prefetch(int64_t row) const {
    prefetch_span<true>(table[0] + row * stride, K);
    prefetch_span<true>(table[1] + row * stride, K);
    if (state != nullptr) prefetch_span<true>(state + row * 2 * W, 2 * W);
  }

  // Step `row` by the gradient g = [its mu gradient (K), its logvar gradient (K)]. params: W
  // values of scratch.
  void step(int64_t row, const T* g, T* params) const {
    T* w0 = table[0] + row * stride;
    T* w1 = table[1] + row * stride;
    if (state == nullptr) {
      for (int64_t k = 0; k < K; ++k) w0[k] -= lr * g[k];
      for (int64_t k = 0; k < K; ++k) w1[k] -= lr * g[K + k];
      return;
    }
    T* m = state + row * 2 * W;
    if (w1 == w0 + K) {  // LatentTable's layout [rows, 2, K]: the row's mu|logvar are contiguous
      adam_span(w0, m, m + W, g, W, b1, b2, eps, step_size);
      return;
    }
    copy_row(params, w0, K);
    copy_row(params + K, w1, K);
    adam_span(params, m, m + W, g, W, b1, b2, eps, step_size);
    copy_row(w0, params, K);
    copy_row(w1, params + K, K);
  }

  // Step every group of `groups` (only those of 2 or more positions with only_repeated) from the
  // per-position gradients grad_mu, grad_logvar [B, K], summed in batch order. Parallel over
  // groups, in chunks whose rows are prefetched one chunk ahead (random rows of a big table are
  // DRAM misses: this overlaps them).
  void step_groups(const RowGroups& groups, const int64_t* idx, const T* grad_mu,
                   const T* grad_logvar, bool only_repeated) const {
    const T* grad[2] = {grad_mu, grad_logvar};
    std::vector<int32_t> todo;  // group numbers
    todo.reserve(groups.size());
    for (int64_t g = 0; g < groups.size(); ++g)
      if (!only_repeated || groups.count[g] > 1) todo.push_back(static_cast<int32_t>(g));
    auto row_of = [&](int64_t i) { return idx[groups.first[todo[i]]]; };
    constexpr int64_t kChunk = 16;  // rows in flight: ~3-4 cache lines each
    at::parallel_for(0, static_cast<int64_t>(todo.size()), 256, [&](int64_t i0, int64_t i1) {
      std::vector<T> buf(2 * W);
      T* sum = buf.data();
      T* params = sum + W;
      for (int64_t i = i0; i < std::min(i1, i0 + kChunk); ++i) prefetch(row_of(i));
      for (int64_t c0 = i0; c0 < i1; c0 += kChunk) {
        const int64_t c1 = std::min(i1, c0 + kChunk);
        for (int64_t i = c1; i < std::min(i1, c1 + kChunk); ++i) prefetch(row_of(i));
        for (int64_t i = c0; i < c1; ++i) {
          const int32_t head = groups.first[todo[i]];
          for (int t = 0; t < 2; ++t) {
            T* s = sum + t * K;
            copy_row(s, grad[t] + int64_t(head) * K, K);
            for (int32_t j = groups.next[head]; j >= 0; j = groups.next[j]) {
              const T* gj = grad[t] + int64_t(j) * K;
              for (int64_t k = 0; k < K; ++k) s[k] += gj[k];
            }
          }
          step(row_of(i), sum, params);
        }
      }
    });
  }
};

}  // namespace CPU_CAPABILITY
}  // namespace halfvae::cpu
