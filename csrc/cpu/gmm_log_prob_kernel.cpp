// CPU kernel of gmm_log_prob, forward and backward (compiled once per ISA).
#include <ATen/Dispatch.h>

#include "../kernel_table.h"
#include "vec_loop.h"

namespace halfvae::cpu {
inline namespace CPU_CAPABILITY {
namespace {

template <typename T, int CT>
void forward_impl(const at::Tensor& z, const PriorTables& prior, at::Tensor& out) {
  const PriorPattern<T> pat(prior);
  const Blocking blocking(z.numel(), pat.P, 0);
  const T* zp = z.data_ptr<T>();
  T* o = out.data_ptr<T>();
  const int C = static_cast<int>(prior.C);
  blocking.for_each_chunk([&](int64_t, int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b)
      for_each_vector<T>(blocking.block_start(b), blocking.block_count(b), pat.P,
                         [&](int64_t g, int64_t j, int64_t, int64_t n) {
                           store(o + g,
                                 gmm_log_density<VecMath<T>, CT>(load(zp + g, n), C,
                                                                 PriorLanes<T>{pat, j}),
                                 n);
                         });
  });
}

template <typename T, int CT, bool kPriorGrads>
void backward_impl(const at::Tensor& grad, const at::Tensor& z, const PriorTables& prior,
                   at::Tensor& grad_z, at::Tensor& prior_sums) {
  using V = Vectorized<T>;
  const PriorPattern<T> pat(prior);
  const int C = static_cast<int>(prior.C);
  const int64_t nsums = num_prior_sums(C);
  const Blocking blocking(z.numel(), pat.P, kPriorGrads ? nsums : 0);
  const T* zp = z.data_ptr<T>();
  const T* gp = grad.data_ptr<T>();
  T* gz = grad_z.data_ptr<T>();
  std::vector<double> chunk_sums(kPriorGrads ? blocking.num_chunks * nsums * pat.P : 0, 0.0);
  dispatch_sums_in_registers<T, CT>(pat, [&]<bool kInRegisters>() {
    using Sums = PriorSums<T, CT, kInRegisters>;
    blocking.for_each_chunk([&] { return Sums(pat); }, [&](Sums& sums, int64_t chunk, int64_t b0,
                                                          int64_t b1) {
      sums.chunk = kPriorGrads ? chunk_sums.data() + chunk * nsums * pat.P : nullptr;
      for (int64_t b = b0; b < b1; ++b) {
        if constexpr (kPriorGrads) sums.begin_block();
        for_each_vector<T>(blocking.block_start(b), blocking.block_count(b), pat.P,
                           [&](int64_t g, int64_t j, int64_t, int64_t n) {
          const V gv = load(gp + g, n);
          auto acc = sums.at(j);
          const V score = gmm_score<VecMath<T>, CT, kPriorGrads>(load(zp + g, n), gv, C,
                                                                 PriorLanes<T>{pat, j}, acc);
          if constexpr (kPriorGrads) acc.add_weight(gv);
          store(gz + g, gv * score, n);
        });
        if constexpr (kPriorGrads) sums.end_block();
      }
    });
  });
  if constexpr (kPriorGrads)
    reduce_prior_sums(chunk_sums, blocking.num_chunks, nsums, pat.P, prior.K, prior_sums);
}

}  // namespace

void gmm_log_prob_forward(const at::Tensor& z, const PriorTables& prior, at::Tensor& out) {
  TORCH_CHECK(!prior.conditional(), "TODO(issue 11): not implemented");
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "gmm_log_prob_cpu", [&] {
    dispatch_components(prior.C, [&]<int CT>() { forward_impl<scalar_t, CT>(z, prior, out); });
  });
}

void gmm_log_prob_backward(const at::Tensor& grad, const at::Tensor& z, const PriorTables& prior,
                           at::Tensor& grad_z, at::Tensor& prior_sums) {
  TORCH_CHECK(!prior.conditional(), "TODO(issue 11): not implemented");
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "gmm_log_prob_backward_cpu", [&] {
    dispatch_components(prior.C, [&]<int CT>() {
      if (prior_sums.defined())
        backward_impl<scalar_t, CT, true>(grad, z, prior, grad_z, prior_sums);
      else
        backward_impl<scalar_t, CT, false>(grad, z, prior, grad_z, prior_sums);
    });
  });
}

HALFVAE_REGISTER_CPU_KERNEL(gmm_log_prob_forward, &gmm_log_prob_forward);
HALFVAE_REGISTER_CPU_KERNEL(gmm_log_prob_backward, &gmm_log_prob_backward);

}  // namespace CPU_CAPABILITY
}  // namespace halfvae::cpu
