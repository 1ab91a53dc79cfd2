// CPU kernel of reparam_gmm_kl, forward and backward (compiled once per ISA).
#include <ATen/Dispatch.h>

#include <optional>

#include "../kernel_table.h"
#include "prefetch.h"
#include "row_step.h"
#include "prior_sources.h"

namespace halfvae::cpu {
inline namespace CPU_CAPABILITY {
namespace {

template <typename T>
struct Inputs {
  const T* mu;
  const T* logvar;
  const int64_t* idx = nullptr;  // rows of the tables mu/logvar (reparam_gmm_kl_rows), or null
  int64_t batch_rows = 0;        // length of idx
  int64_t row_stride = 0;        // elements between table rows (ReparamGmmKlProblem::row_stride)
  std::optional<RowStepper<T>> stepper;  // the fused step's (its state rows are prefetched)
  const T* eps = nullptr;        // given eps, or null
  PhiloxSeed seed{0, 0};
  const PhiloxSeed* seed_ptr = nullptr;  // non-null when sampled in the kernel
  explicit Inputs(const ReparamGmmKlProblem& p)
      : mu(p.mu.data_ptr<T>()), logvar(p.logvar.data_ptr<T>()) {
    if (p.gathered()) {
      idx = p.idx.data_ptr<int64_t>();
      batch_rows = p.N;
      row_stride = p.row_stride;
      if (p.row_step != nullptr) stepper.emplace(*p.row_step);
    }
    if (p.sampled()) {
      seed = read_seed(p.seed);
      seed_ptr = &seed;
    } else {
      eps = p.eps.data_ptr<T>();
    }
  }
};

// Per-chunk scratch: in-kernel eps, gathered table rows and the row-reduction buffer.
template <typename T>
struct ChunkScratch {
  NormalFiller<T> filler;
  std::vector<T> eps;
  std::vector<T> mu_rows, logvar_rows;  // this block's table rows, when gathering
  std::vector<T> per_elem;  // kl values (forward) or grad_kl broadcast over k (backward), row mode
  std::vector<T> step_buf;  // fused table step: a row's gradient and parameters, 2K each
  ChunkScratch(const Blocking& b, bool sampled, bool gathered, bool row) {
    if (sampled) eps.resize(normal_buffer_size<T>(b.block_elems));
    if (gathered) {
      mu_rows.resize(b.block_elems + Vectorized<T>::size());
      logvar_rows.resize(b.block_elems + Vectorized<T>::size());
    }
    if (row) per_elem.resize(b.block_elems + Vectorized<T>::size());
  }
  void reserve_step(int64_t K) { step_buf.resize(4 * K); }
  // mu and logvar of elements [start, start+count), indexed by (global - start). Gathering copies
  // the block's rows (a few KB, in L1) rather than the whole batch, then prefetches the next
  // block's rows so that their cache misses overlap this block's arithmetic.
  std::pair<const T*, const T*> block_latents(const Inputs<T>& in, int64_t K, int64_t start,
                                              int64_t count) {
    if (in.idx == nullptr) return {in.mu + start, in.logvar + start};
    const int64_t first = start / K, n = count / K;
    for (int64_t r = 0; r < n; ++r) {
      const int64_t row = in.idx[first + r];
      copy_row(mu_rows.data() + r * K, in.mu + row * in.row_stride, K);
      copy_row(logvar_rows.data() + r * K, in.logvar + row * in.row_stride, K);
    }
    // LatentTable's layout [rows, 2, K]: a row's mu and logvar are adjacent, one span.
    const bool adjacent = in.logvar == in.mu + K;
    for (int64_t r = first + n; r < std::min(in.batch_rows, first + 2 * n); ++r) {
      prefetch_span<false>(in.mu + in.idx[r] * in.row_stride, adjacent ? 2 * K : K);
      if (!adjacent) prefetch_span<false>(in.logvar + in.idx[r] * in.row_stride, K);
      if (in.stepper) in.stepper->prefetch_state(in.idx[r]);  // the step will write these rows
    }
    return {mu_rows.data(), logvar_rows.data()};
  }
  // eps of global elements [start, start+count), indexed by (global - start).
  const T* block_eps(const PhiloxSeed* seed, const T* given, int64_t start, int64_t count) {
    if (seed == nullptr) return given + start;
    filler.fill(*seed, start, count, eps.data());
    return eps.data();
  }
};

// kBound: the closed-form KL bound instead of the Monte-Carlo estimate; Prior: a prior source
// (vec_loop.h).
template <typename T, int CT, bool kBound, typename Prior>
void forward_impl(const ReparamGmmKlProblem& p, const Prior& prior, at::Tensor& z, at::Tensor& kl) {
  using V = Vectorized<T>;
  const Blocking blocking(p.N * p.K, prior.P, 0);
  const Inputs<T> in(p);
  T* z_out = z.data_ptr<T>();
  T* kl_out = kl.data_ptr<T>();
  const bool row = p.reduction == kReductionRow;
  const int C = static_cast<int>(p.C);
  const int64_t K = p.K;

  const auto make_scratch = [&] {
    return std::pair{ChunkScratch<T>(blocking, p.sampled(), p.gathered(), row),
                     prior.template block<false>(blocking)};
  };
  blocking.for_each_chunk(make_scratch, [&](auto& scratch, int64_t, int64_t b0,
                                            int64_t b1) HALFVAE_CHUNK_BODY {
    auto& [s, pb] = scratch;
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t start = blocking.block_start(b), count = blocking.block_count(b);
      const T* eps = s.block_eps(in.seed_ptr, in.eps, start, count);
      const auto [mu, logvar] = s.block_latents(in, K, start, count);
      pb.begin(start, count);
      pb.for_each_vector(start, count, [&](int64_t g, int64_t j, int64_t local, int64_t n) {
        V zv, klv;
        const auto lanes = pb.lanes(j, local);
        if constexpr (kBound)
          reparam_kl_bound_forward<VecMath<T>, CT>(load(mu + local, n), load(logvar + local, n),
                                                   load(eps + local, n), C, lanes, zv, klv);
        else
          reparam_kl_forward<VecMath<T>, CT>(load(mu + local, n), load(logvar + local, n),
                                             load(eps + local, n), C, lanes, zv, klv);
        store(z_out + g, zv, n);
        store(row ? s.per_elem.data() + local : kl_out + g, klv, n);
      });
      if (row) {  // blocks hold whole rows: block_elems is a multiple of P, P of K
        for (int64_t r = 0; r < count / K; ++r) {
          double sum = 0;
          for (int64_t k = 0; k < K; ++k) sum += s.per_elem[r * K + k];
          kl_out[start / K + r] = static_cast<T>(sum);
        }
      }
    }
  });
}

template <typename T, int CT, bool kBound, bool kPriorGrads, typename Prior>
void backward_impl(const ReparamGmmKlProblem& p, const Prior& prior, const at::Tensor& grad_z,
                   const at::Tensor& grad_kl, at::Tensor& grad_mu, at::Tensor& grad_logvar,
                   at::Tensor& prior_sums) {
  using V = Vectorized<T>;
  const int64_t sums_per_chunk = kPriorGrads ? prior.sums_per_chunk() : 0;
  const Blocking blocking(p.N * p.K, prior.P, sums_per_chunk);
  const Inputs<T> in(p);
  const T* gz = grad_z.data_ptr<T>();
  const T* gkl = grad_kl.data_ptr<T>();
  T* gmu_out = grad_mu.data_ptr<T>();
  T* glv_out = grad_logvar.data_ptr<T>();
  const T* extra_mu = p.extra_grad_mu.defined() ? p.extra_grad_mu.data_ptr<T>() : nullptr;
  const T* extra_lv = p.extra_grad_logvar.defined() ? p.extra_grad_logvar.data_ptr<T>() : nullptr;
  const bool row = p.reduction == kReductionRow;
  const int C = static_cast<int>(p.C);
  const int64_t K = p.K;
  ChunkSums chunk_sums(blocking.num_chunks, sums_per_chunk);
  // The fused table step (p.row_step): a row that occurs once in the batch is stepped right after
  // its gradient is computed, while it is still in L1; repeated rows after the whole batch, from
  // their gradients summed in batch order. Each row is stepped once, so nothing else reads it.
  std::optional<RowGroups> groups;
  std::vector<uint8_t> single;
  std::optional<RowStepper<T>> stepper;
  if (p.row_step != nullptr) {
    groups.emplace(in.idx, p.N);
    single = groups->singles();
    stepper.emplace(*p.row_step);
  }

  const auto make_scratch = [&] {
    std::pair scratch{ChunkScratch<T>(blocking, p.sampled(), p.gathered(), row),
                      prior.template block<kPriorGrads>(blocking)};
    if (p.row_step != nullptr) scratch.first.reserve_step(K);
    return scratch;
  };
  blocking.for_each_chunk(make_scratch, [&](auto& scratch, int64_t chunk, int64_t b0,
                                            int64_t b1) HALFVAE_CHUNK_BODY {
    auto& [s, pb] = scratch;
    if constexpr (kPriorGrads) pb.begin_chunk(chunk_sums.begin_chunk(chunk));
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t start = blocking.block_start(b), count = blocking.block_count(b);
      const T* eps = s.block_eps(in.seed_ptr, in.eps, start, count);
      const auto [mu, logvar] = s.block_latents(in, K, start, count);
      const T* gk = gkl + start;
      if (row) {
        for (int64_t r = 0; r < count / K; ++r)
          std::fill_n(s.per_elem.data() + r * K, K, gkl[start / K + r]);
        gk = s.per_elem.data();
      }
      pb.begin(start, count);
      pb.for_each_vector(start, count, [&](int64_t g, int64_t j, int64_t local, int64_t n) {
        const V gk_v = load(gk + local, n);
        auto acc = pb.acc(j, local);
        const auto lanes = pb.lanes(j, local);
        V gmu, glv;
        if constexpr (kBound)
          reparam_kl_bound_backward<VecMath<T>, CT, kPriorGrads>(
              load(mu + local, n), load(logvar + local, n), load(eps + local, n),
              load(gz + g, n), gk_v, C, lanes, acc, gmu, glv);
        else
          reparam_kl_backward<VecMath<T>, CT, kPriorGrads>(
              load(mu + local, n), load(logvar + local, n), load(eps + local, n),
              load(gz + g, n), gk_v, C, lanes, acc, gmu, glv);
        if constexpr (kPriorGrads) acc.add_weight(gk_v);
        store(gmu_out + g, gmu, n);
        store(glv_out + g, glv, n);
      });
      if constexpr (kPriorGrads) pb.end();
      // The rows' gradients from other terms, while this block's are in L1 (the rows are
      // stepped from the totals).
      if (extra_mu != nullptr) add_span(gmu_out + start, extra_mu + start, count);
      if (extra_lv != nullptr) add_span(glv_out + start, extra_lv + start, count);
      if (stepper) {
        for (int64_t r = start / K; r < (start + count) / K; ++r) {
          if (!single[r]) continue;
          copy_row(s.step_buf.data(), gmu_out + r * K, K);
          copy_row(s.step_buf.data() + K, glv_out + r * K, K);
          stepper->step(in.idx[r], s.step_buf.data(), s.step_buf.data() + 2 * K);
        }
      }
    }
    if constexpr (kPriorGrads) pb.end_chunk();
  });
  if (stepper) stepper->step_groups(*groups, in.idx, gmu_out, glv_out, /*only_repeated=*/true);
  if constexpr (kPriorGrads) prior.reduce(chunk_sums.data.get(), blocking.num_chunks, prior_sums);
}

}  // namespace

void reparam_gmm_kl_forward(const ReparamGmmKlProblem& p, at::Tensor& z, at::Tensor& kl) {
  AT_DISPATCH_FLOATING_TYPES(p.mu.scalar_type(), "reparam_gmm_kl_cpu", [&] {
    dispatch_components(p.C, [&]<int CT>() {
      dispatch_bool(p.bound(), [&]<bool kBound>() {
        with_prior_source<scalar_t, CT, false>(p.prior, p.N, [&](const auto& prior) {
          forward_impl<scalar_t, CT, kBound>(p, prior, z, kl);
        });
      });
    });
  });
}

void reparam_gmm_kl_backward(const ReparamGmmKlProblem& p, const at::Tensor& grad_z,
                             const at::Tensor& grad_kl, at::Tensor& grad_mu,
                             at::Tensor& grad_logvar, at::Tensor& prior_sums) {
  AT_DISPATCH_FLOATING_TYPES(p.mu.scalar_type(), "reparam_gmm_kl_backward_cpu", [&] {
    dispatch_components(p.C, [&]<int CT>() {
      dispatch_bool(p.bound(), [&]<bool kBound>() {
        dispatch_bool(prior_sums.defined(), [&]<bool kPriorGrads>() {
          with_prior_source<scalar_t, CT, kPriorGrads>(p.prior, p.N, [&](const auto& prior) {
            backward_impl<scalar_t, CT, kBound, kPriorGrads>(p, prior, grad_z, grad_kl, grad_mu,
                                                             grad_logvar, prior_sums);
          });
        });
      });
    });
  });
}

HALFVAE_REGISTER_CPU_KERNEL(reparam_gmm_kl_forward, &reparam_gmm_kl_forward);
HALFVAE_REGISTER_CPU_KERNEL(reparam_gmm_kl_backward, &reparam_gmm_kl_backward);

}  // namespace CPU_CAPABILITY
}  // namespace halfvae::cpu
