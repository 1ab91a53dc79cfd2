// CPU kernel of gmm_log_prob, forward and backward (compiled once per ISA).
#include <ATen/Dispatch.h>

#include "../kernel_table.h"
#include "prior_sources.h"

namespace halfvae::cpu {
inline namespace CPU_CAPABILITY {
namespace {

// Prior: a prior source (vec_loop.h).
template <typename T, int CT, typename Prior>
void forward_impl(const at::Tensor& z, const Prior& prior, at::Tensor& out) {
  const Blocking blocking(z.numel(), prior.P, 0);
  const T* zp = z.data_ptr<T>();
  T* o = out.data_ptr<T>();
  const int C = static_cast<int>(prior.C);
  const auto make_scratch = [&] { return prior.template block<false>(blocking); };
  blocking.for_each_chunk(make_scratch, [&](auto& pb, int64_t, int64_t b0,
                                            int64_t b1) HALFVAE_CHUNK_BODY {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t start = blocking.block_start(b), count = blocking.block_count(b);
      pb.begin(start, count);
      pb.for_each_vector(start, count, [&](int64_t g, int64_t j, int64_t local, int64_t n) {
        store(o + g, gmm_log_density<VecMath<T>, CT>(load(zp + g, n), C, pb.lanes(j, local)), n);
      });
    }
  });
}

template <typename T, int CT, bool kPriorGrads, typename Prior>
void backward_impl(const at::Tensor& grad, const at::Tensor& z, const Prior& prior,
                   at::Tensor& grad_z, at::Tensor& prior_sums) {
  using V = Vectorized<T>;
  const int C = static_cast<int>(prior.C);
  const int64_t sums_per_chunk = kPriorGrads ? prior.sums_per_chunk() : 0;
  const Blocking blocking(z.numel(), prior.P, sums_per_chunk);
  const T* zp = z.data_ptr<T>();
  const T* gp = grad.data_ptr<T>();
  T* gz = grad_z.data_ptr<T>();
  ChunkSums chunk_sums(blocking.num_chunks, sums_per_chunk);
  const auto make_scratch = [&] { return prior.template block<kPriorGrads>(blocking); };
  blocking.for_each_chunk(make_scratch, [&](auto& pb, int64_t chunk, int64_t b0,
                                            int64_t b1) HALFVAE_CHUNK_BODY {
    if constexpr (kPriorGrads) pb.begin_chunk(chunk_sums.begin_chunk(chunk));
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t start = blocking.block_start(b), count = blocking.block_count(b);
      pb.begin(start, count);
      pb.for_each_vector(start, count, [&](int64_t g, int64_t j, int64_t local, int64_t n) {
        const V gv = load(gp + g, n);
        auto acc = pb.acc(j, local);
        const V score = gmm_score<VecMath<T>, CT, kPriorGrads>(load(zp + g, n), gv, C,
                                                               pb.lanes(j, local), acc);
        if constexpr (kPriorGrads) acc.add_weight(gv);
        store(gz + g, gv * score, n);
      });
      if constexpr (kPriorGrads) pb.end();
    }
    if constexpr (kPriorGrads) pb.end_chunk();
  });
  if constexpr (kPriorGrads) prior.reduce(chunk_sums.data.get(), blocking.num_chunks, prior_sums);
}

}  // namespace

void gmm_log_prob_forward(const at::Tensor& z, const PriorTables& prior, at::Tensor& out) {
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "gmm_log_prob_cpu", [&] {
    dispatch_components(prior.C, [&]<int CT>() {
      with_prior_source<scalar_t, CT, false>(prior, z.size(0), [&](const auto& source) {
        forward_impl<scalar_t, CT>(z, source, out);
      });
    });
  });
}

void gmm_log_prob_backward(const at::Tensor& grad, const at::Tensor& z, const PriorTables& prior,
                           at::Tensor& grad_z, at::Tensor& prior_sums) {
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "gmm_log_prob_backward_cpu", [&] {
    dispatch_components(prior.C, [&]<int CT>() {
      dispatch_bool(prior_sums.defined(), [&]<bool kPriorGrads>() {
        with_prior_source<scalar_t, CT, kPriorGrads>(prior, z.size(0), [&](const auto& source) {
          backward_impl<scalar_t, CT, kPriorGrads>(grad, z, source, grad_z, prior_sums);
        });
      });
    });
  });
}

HALFVAE_REGISTER_CPU_KERNEL(gmm_log_prob_forward, &gmm_log_prob_forward);
HALFVAE_REGISTER_CPU_KERNEL(gmm_log_prob_backward, &gmm_log_prob_backward);

}  // namespace CPU_CAPABILITY
}  // namespace halfvae::cpu
