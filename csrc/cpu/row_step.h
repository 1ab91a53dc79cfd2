// The optimizer step of a latent table's touched rows, as pieces the CPU kernels share (compiled
// once per ISA): grouping a batch's indices by row, and one Adam or SGD step on a row from its
// summed gradient. latent_rows_update_ uses them on a whole batch; the backward of the fused table
// step (reparam_gmm_kl_rows_backward_step_) steps each row that occurs once in the batch right
// after computing its gradient, while the row is still in L1, and the rest afterwards.
#pragma once
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#ifdef __AVX2__
#include <immintrin.h>
#endif

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

#include "../kernel_args.h"
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

// sum_k g[k]^2 in four running sums: a dependency chain of n/4 + 2 additions instead of n (the
// per-row scalars of the row-wise rules are one long chain; its latency, not arithmetic, is what a
// row costs).
inline float sum_squares(const float* g, int64_t n) {
  float s[4] = {0, 0, 0, 0};
  int64_t k = 0;
  for (; k + 4 <= n; k += 4)
    for (int j = 0; j < 4; ++j) s[j] += g[k + j] * g[k + j];
  for (; k < n; ++k) s[k % 4] += g[k] * g[k];
  return (s[0] + s[1]) + (s[2] + s[3]);
}

// rowwise_adam (row_optimizer.h) on a float row with bfloat16 moments: mu's and logvar's
// scalars side by side (two independent chains), then each table's elements 8 at a time with
// AVX2 (the moment's update and its stochastic rounding, the hash from a per-row base), the rest
// one at a time. The generic rule, element by element, cost 2.3x exact Adam's step at 10^4 rows
// (benchmarks/bench_row_update.py): GCC kept its loop scalar.
inline void rowwise_adam_bf16_row(float* const* w, c10::BFloat16* m, float* rs, const float* g,
                                  int64_t K, const BiasCorrections<float>& bc,
                                  const RowwiseConstants<float>& c, int64_t row) {
  const float sq0 = sum_squares(g, K), sq1 = sum_squares(g + K, K);
  const float v0 = rs[0] + (1.0f - c.beta2) * (sq0 / float(K) - rs[0]);
  const float v1 = rs[1] + (1.0f - c.beta2) * (sq1 / float(K) - rs[1]);
  rs[0] = v0;
  rs[1] = v1;
  const float lr_bc = c.lr / bc.first;
  const float scale[2] = {lr_bc / (sqrt_of(v0 / bc.second) + c.eps),
                          lr_bc / (sqrt_of(v1 / bc.second) + c.eps)};
#ifdef __AVX2__
  const float one_b1 = 1.0f - c.beta1;
  const uint32_t base = rounding_base(row, c.step);
#endif
  for (int h = 0; h < 2; ++h) {
    float* __restrict__ wh = w[h];
    const float* __restrict__ gh = g + h * K;
    const float sh = scale[h];
    int64_t k = 0;
#ifdef __AVX2__
    uint16_t* __restrict__ bits16 = reinterpret_cast<uint16_t*>(m + h * K);
    const uint32_t base_h = base + static_cast<uint32_t>(h * K) * kRoundingElementMix;
    // 8 elements at a time (also in the AVX-512 build: a row of K = 8 is one such vector). The
    // compiler leaves the generic element loop scalar; this is it, lane for lane, with the same
    // FMAs and rounding bits.
    const __m256 one_b1_v = _mm256_set1_ps(one_b1), sh_v = _mm256_set1_ps(sh);
    const __m256i mix = _mm256_set1_epi32(static_cast<int>(kRoundingElementMix));
    const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    const __m256i exponent = _mm256_set1_epi32(0x7F800000);
    for (; k + 8 <= K; k += 8) {
      const __m256i old_bits = _mm256_slli_epi32(
          _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(bits16 + k))), 16);
      __m256 mk = _mm256_castsi256_ps(old_bits);
      mk = _mm256_fmadd_ps(_mm256_sub_ps(_mm256_loadu_ps(gh + k), mk), one_b1_v, mk);
      _mm256_storeu_ps(wh + k, _mm256_fnmadd_ps(sh_v, mk, _mm256_loadu_ps(wh + k)));
      __m256i r = _mm256_add_epi32(
          _mm256_set1_epi32(static_cast<int>(base_h)),
          _mm256_mullo_epi32(_mm256_add_epi32(_mm256_set1_epi32(static_cast<int>(k)), lanes), mix));
      r = _mm256_xor_si256(r, _mm256_srli_epi32(r, 16));
      r = _mm256_mullo_epi32(r, _mm256_set1_epi32(static_cast<int>(0x85EBCA6Bu)));
      r = _mm256_xor_si256(r, _mm256_srli_epi32(r, 13));
      r = _mm256_mullo_epi32(r, _mm256_set1_epi32(static_cast<int>(0xC2B2AE35u)));
      r = _mm256_xor_si256(r, _mm256_srli_epi32(r, 16));
      __m256i u = _mm256_castps_si256(mk);
      const __m256i not_finite = _mm256_cmpeq_epi32(_mm256_and_si256(u, exponent), exponent);
      r = _mm256_andnot_si256(not_finite, _mm256_and_si256(r, _mm256_set1_epi32(0xFFFF)));
      u = _mm256_srli_epi32(_mm256_add_epi32(u, r), 16);
      // 8 values < 2^16 in 32-bit lanes to 8 uint16: pack within each 128-bit half, then join
      const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(u, u), 0x08);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(bits16 + k), _mm256_castsi256_si128(packed));
    }
#endif
    // The rest (all of it without AVX2): the generic element step, the same bits.
    rowwise_adam_elements(wh, m + h * K, gh, k, K, sh, c, row, h * K);
  }
}

// One optimizer step on whole rows of mu and logvar and their state (RowUpdate; the rules:
// row_optimizer.h).
template <typename T>
struct RowStepper {
  T* table[2];  // mu, logvar
  int64_t K, W, stride;  // W = 2K: a row's mu then its logvar, staged side by side
  RowOptimizer kind;
  char* state;  // per-element moments (adam, rowwise_adam), or null
  int64_t state_stride_bytes, state_row_bytes;
  bool bf16;  // moments in bfloat16 (else T)
  T* row_state;  // per-row state (rowwise_*), or null
  int64_t row_state_stride, row_state_size;
  T b1, b2, eps, step_size, lr;
  int64_t table_step;
  int64_t row_offset;  // global number of row 0 (bfloat16 rounding bits)
  RowwiseConstants<T> rowwise;  // (logs of the betas computed once per step)

  explicit RowStepper(const RowUpdate& u)
      : table{u.mu.data_ptr<T>(), u.logvar.data_ptr<T>()}, K(u.mu.size(1)), W(2 * u.mu.size(1)),
        stride(u.row_stride), kind(u.optimizer),
        state(u.state.defined() ? static_cast<char*>(u.state.data_ptr()) : nullptr),
        state_stride_bytes(u.state.defined() ? u.state_stride * u.state.element_size() : 0),
        state_row_bytes(u.state.defined() ? u.state.size(1) * K * u.state.element_size() : 0),
        bf16(u.bf16_state),
        row_state(u.row_state.defined() ? u.row_state.data_ptr<T>() : nullptr),
        row_state_stride(u.row_state_stride),
        row_state_size(u.row_state.defined() ? u.row_state.size(1) : 0), b1(T(u.beta1)),
        b2(T(u.beta2)), eps(T(u.eps)), step_size(T(u.step_size)), lr(T(u.lr)),
        table_step(u.step), row_offset(u.row_offset), rowwise(lr, b1, b2, eps, table_step) {}

  void prefetch(int64_t row) const {
    prefetch_span<true>(table[0] + row * stride, K);
    prefetch_span<true>(table[1] + row * stride, K);
    prefetch_state(row);
  }

  // The row's optimizer state (in a record: the cache lines after the row's table values).
  void prefetch_state(int64_t row) const {
    if (state != nullptr) prefetch_span<true>(state + row * state_stride_bytes, state_row_bytes);
    if (row_state != nullptr) prefetch_span<true>(row_state + row * row_state_stride, row_state_size);
  }

  // Step `row` by the gradient g = [its mu gradient (K), its logvar gradient (K)]. params: W
  // values of scratch.
  void step(int64_t row, const T* g, T* params) const {
    T* w[2] = {table[0] + row * stride, table[1] + row * stride};
    switch (kind) {
      case RowOptimizer::kSgd:
        for (int h = 0; h < 2; ++h)
          for (int64_t k = 0; k < K; ++k) w[h][k] -= lr * g[h * K + k];
        return;
      case RowOptimizer::kAdam:
        if (bf16) return adam_bf16(row, w, g);
        return adam(row, w, g, params);
      case RowOptimizer::kRowwiseAdam:
        if (bf16) return rowwise_adam<c10::BFloat16>(row, w, g);
        return rowwise_adam<T>(row, w, g);
      case RowOptimizer::kRowwiseAdagrad: {
        T* rs = row_state + row * row_state_stride;
        for (int h = 0; h < 2; ++h) rowwise_adagrad_row(w[h], rs + h, g + h * K, K, rowwise);
        return;
      }
    }
  }

  void adam(int64_t row, T* const* w, const T* g, T* params) const {
    T* m = reinterpret_cast<T*>(state + row * state_stride_bytes);
    if (w[1] == w[0] + K) {  // LatentTable's layout [rows, 2, K]: the row's mu|logvar are contiguous
      adam_span(w[0], m, m + W, g, W, b1, b2, eps, step_size);
      return;
    }
    copy_row(params, w[0], K);
    copy_row(params + K, w[1], K);
    adam_span(params, m, m + W, g, W, b1, b2, eps, step_size);
    copy_row(w[0], params, K);
    copy_row(w[1], params + K, K);
  }

  // Adam with bfloat16 moments: each element in T, the moments stored rounded stochastically.
  void adam_bf16(int64_t row, T* const* w, const T* g) const {
    using IO = StateIO<T, c10::BFloat16>;
    auto* s = reinterpret_cast<c10::BFloat16*>(state + row * state_stride_bytes);
    const int64_t global_row = row + row_offset;
    for (int64_t e = 0; e < W; ++e) {
      T* we = w[e / K] + e % K;
      T m = IO::load(s + e), v = IO::load(s + W + e);
      adam_element(we, &m, &v, g[e], b1, b2, eps, step_size);
      IO::store(s + e, m, global_row, e, table_step);
      IO::store(s + W + e, v, global_row, W + e, table_step);
    }
  }

  template <typename S>
  void rowwise_adam(int64_t row, T* const* w, const T* g) const {
    const RowwiseConstants<T>& c = rowwise;
    auto* m = reinterpret_cast<S*>(state + row * state_stride_bytes);
    T* rs = row_state + row * row_state_stride;  // v of mu, v of logvar, the row's step count
    const T t = rs[2] + T(1);
    rs[2] = t;
    const BiasCorrections<T> bc(c, t);
    const int64_t global_row = row + row_offset;
    if constexpr (std::is_same_v<T, float> && std::is_same_v<S, c10::BFloat16>) {
      rowwise_adam_bf16_row(w, m, rs, g, K, bc, c, global_row);
    } else {
      for (int h = 0; h < 2; ++h)
        rowwise_adam_row<T, S>(w[h], m + h * K, rs + h, g + h * K, K, bc, c, global_row, h * K);
    }
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
    constexpr int64_t kChunk = 16;  // rows in flight: 2-4 cache lines each
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
