// CUDA kernels of reparam_gmm_kl, forward and backward. float32/float64, and float16/bfloat16
// inputs computed in float32; in-kernel Philox; 64-bit indexing; the current stream. The
// Monte-Carlo KL against one prior has kernels specialized on every flag; the KL bound and priors
// chosen per row (prior_index) share general kernels with runtime flags (see there).
#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <ATen/Dispatch.h>

#include <numeric>
#include <tuple>

#include "../kernel_table.h"
#include "common.cuh"

namespace halfvae::cuda {
namespace {

// Element i's eps: given, or lane i % 4 of the Philox block this thread generated for its group.
template <typename scalar_t, typename acc_t, bool kSampled>
struct EpsSource {
  const scalar_t* eps;
  uint64_t seed, offset;
  acc_t normals[4];
  __device__ void begin_group(int64_t base) {
    if constexpr (kSampled) philox_normals<acc_t>(seed, offset, static_cast<uint64_t>(base / 4), normals);
  }
  __device__ acc_t at(int64_t i, int q) const {
    if constexpr (kSampled) return normals[q];
    else return static_cast<acc_t>(eps[i]);
  }
};

template <typename scalar_t, typename acc_t, bool kSampled>
__device__ EpsSource<scalar_t, acc_t, kSampled> make_eps(const scalar_t* eps, const int64_t* seed) {
  EpsSource<scalar_t, acc_t, kSampled> e;
  e.eps = eps;
  if constexpr (kSampled) {
    e.seed = static_cast<uint64_t>(seed[0]);
    e.offset = static_cast<uint64_t>(seed[1]);
  }
  return e;
}

// EpsSource with the choice made at run time (the general kernels): eps == nullptr draws.
template <typename scalar_t, typename acc_t>
struct RuntimeEpsSource {
  const scalar_t* eps;
  uint64_t seed, offset;
  acc_t normals[4];
  __device__ RuntimeEpsSource(const scalar_t* eps_, const int64_t* seed_) : eps(eps_) {
    if (eps == nullptr) {
      seed = static_cast<uint64_t>(seed_[0]);
      offset = static_cast<uint64_t>(seed_[1]);
    }
  }
  __device__ void begin_group(int64_t base) {
    if (eps == nullptr)
      philox_normals<acc_t>(seed, offset, static_cast<uint64_t>(base / 4), normals);
  }
  __device__ acc_t at(int64_t i, int q) const {
    return eps == nullptr ? normals[q] : static_cast<acc_t>(eps[i]);
  }
};

// Offset of element i's mu/logvar: i itself, or through the row index when gathering (table rows
// row_stride elements apart).
__device__ __forceinline__ int64_t latent_offset(const int64_t* idx, int64_t i, int64_t K,
                                                 int64_t row_stride) {
  return idx == nullptr ? i : idx[i / K] * row_stride + i % K;
}

// A forward thread's walk over its elements: element(i, q) computes element i (lane q), writes
// its z and returns its kl, stored in kl[i]; or with row_reduction summed into kl_row (a zeroed
// acc_t buffer of N entries) by atomics, one per row a group of 4 touches (at most two: a group
// can straddle a row boundary).
template <typename scalar_t, typename acc_t, class Eps, class Element>
__device__ __forceinline__ void forward_walk(int64_t first, int64_t numel, int64_t K,
                                             int64_t stride, bool row_reduction, Eps& e,
                                             scalar_t* kl, acc_t* kl_row, const Element& element) {
  for (int64_t base = first; base < numel; base += stride) {
    e.begin_group(base);
    acc_t row_sum = 0;
    int64_t row = base / K;
    for_each_lane(base, numel, [&](int64_t i, int q) {
      const acc_t klv = element(i, q);
      if (row_reduction) {
        const int64_t n = i / K;
        if (n != row) {
          atomicAdd(kl_row + row, row_sum);
          row = n;
          row_sum = 0;
        }
        row_sum += klv;
      } else {
        kl[i] = static_cast<scalar_t>(klv);
      }
    });
    if (row_reduction) atomicAdd(kl_row + row, row_sum);
  }
}

// A backward thread's walk over its elements: element(i, q, n) for element i (lane q, latent
// row n).
template <class Eps, class Element>
__device__ __forceinline__ void backward_walk(int64_t first, int64_t numel, int64_t K,
                                              int64_t stride, Eps& e, const Element& element) {
  for (int64_t base = first; base < numel; base += stride) {
    e.begin_group(base);
    for_each_lane(base, numel, [&](int64_t i, int q) { element(i, q, i / K); });
  }
}

template <typename scalar_t, typename acc_t, int CT, bool kSampled, bool kRow>
__global__ void __launch_bounds__(kThreads) forward_kernel(
    const scalar_t* __restrict__ mu, const scalar_t* __restrict__ logvar,
    const int64_t* __restrict__ idx, const scalar_t* __restrict__ eps,
    const int64_t* __restrict__ seed, const acc_t* __restrict__ w, const acc_t* __restrict__ m,
    const acc_t* __restrict__ prec, int64_t numel, int64_t K, int64_t row_stride, int C,
    int64_t stride,
    scalar_t* __restrict__ z,
    scalar_t* __restrict__ kl, acc_t* __restrict__ kl_row) {
  const int64_t first = first_element();
  if (first >= numel) return;
  LanePrior<acc_t, CT> prior[4];
#pragma unroll
  for (int q = 0; q < 4; ++q) prior[q].load(w, m, prec, (first + q) % K, C);
  auto e = make_eps<scalar_t, acc_t, kSampled>(eps, seed);
  forward_walk(first, numel, K, stride, kRow, e, kl, kl_row, [&](int64_t i, int q) {
    acc_t zv, klv;
    const int64_t li = latent_offset(idx, i, K, row_stride);
    reparam_kl_forward<DevMath<acc_t>, CT>(static_cast<acc_t>(mu[li]),
                                           static_cast<acc_t>(logvar[li]), e.at(i, q), C,
                                           prior[q], zv, klv);
    z[i] = static_cast<scalar_t>(zv);
    return klv;
  });
}

// A row gradient from the kernel plus, when given, the same element's gradient from other terms;
// rounded to scalar_t first, as autograd would round the two before summing them.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ scalar_t plus_extra(acc_t g, const scalar_t* extra, int64_t i) {
  if (extra == nullptr) return static_cast<scalar_t>(g);
  return static_cast<scalar_t>(static_cast<acc_t>(static_cast<scalar_t>(g)) +
                               static_cast<acc_t>(extra[i]));
}

template <typename scalar_t, typename acc_t, int CT, bool kSampled, bool kRow, bool kPriorGrads>
__global__ void __launch_bounds__(kThreads) backward_kernel(
    const scalar_t* __restrict__ grad_z, const scalar_t* __restrict__ grad_kl,
    const scalar_t* __restrict__ mu, const scalar_t* __restrict__ logvar,
    const int64_t* __restrict__ idx, const scalar_t* __restrict__ eps,
    const int64_t* __restrict__ seed, const acc_t* __restrict__ w, const acc_t* __restrict__ m,
    const acc_t* __restrict__ prec, int64_t numel, int64_t K, int64_t row_stride, int C,
    int64_t stride,
    SumsTable sums_table, const scalar_t* __restrict__ extra_grad_mu,
    const scalar_t* __restrict__ extra_grad_logvar,
    scalar_t* __restrict__ grad_mu, scalar_t* __restrict__ grad_logvar) {
  backward_frame(sums_table, kPriorGrads, numel, [&](int64_t first, double* table) {
    LanePrior<acc_t, CT> prior[4];
    LaneSums<acc_t, CT, false> sums[4];
    init_lanes<acc_t, CT, kPriorGrads>(prior, sums, w, m, prec, table, first, K, C);
    auto e = make_eps<scalar_t, acc_t, kSampled>(eps, seed);
    backward_walk(first, numel, K, stride, e, [&](int64_t i, int q, int64_t n) {
      const acc_t gk = static_cast<acc_t>(kRow ? grad_kl[n] : grad_kl[i]);
      acc_t gmu, glv;
      const int64_t li = latent_offset(idx, i, K, row_stride);
      reparam_kl_backward<DevMath<acc_t>, CT, kPriorGrads>(
          static_cast<acc_t>(mu[li]), static_cast<acc_t>(logvar[li]), e.at(i, q),
          static_cast<acc_t>(grad_z[i]), gk, C, prior[q], sums[q], gmu, glv);
      if constexpr (kPriorGrads) sums[q].add_weight(gk);
      grad_mu[i] = plus_extra(gmu, extra_grad_mu, i);
      grad_logvar[i] = plus_extra(glv, extra_grad_logvar, i);
    });
    if constexpr (kPriorGrads) {
#pragma unroll
      for (int q = 0; q < 4; ++q) sums[q].flush();
    }
  });
}

// The KL of one element, Monte-Carlo or the bound (gmm_math.h).
template <bool kBound, int CT, typename acc_t, class Prior>
__device__ __forceinline__ void element_forward(acc_t mu, acc_t logvar, acc_t eps, int C,
                                                const Prior& prior, acc_t& z, acc_t& kl) {
  if constexpr (kBound)
    reparam_kl_bound_forward<DevMath<acc_t>, CT>(mu, logvar, eps, C, prior, z, kl);
  else
    reparam_kl_forward<DevMath<acc_t>, CT>(mu, logvar, eps, C, prior, z, kl);
}
template <bool kBound, int CT, typename acc_t, class Prior, class Acc>
__device__ __forceinline__ void element_backward(acc_t mu, acc_t logvar, acc_t eps, acc_t gz,
                                                 acc_t gk, int C, const Prior& prior, Acc& acc,
                                                 acc_t& gmu, acc_t& glv) {
  if constexpr (kBound)
    reparam_kl_bound_backward<DevMath<acc_t>, CT, true>(mu, logvar, eps, gz, gk, C, prior, acc,
                                                        gmu, glv);
  else
    reparam_kl_backward<DevMath<acc_t>, CT, true>(mu, logvar, eps, gz, gk, C, prior, acc, gmu,
                                                  glv);
}

// The general kernels: the KL bound (kBound) and/or a prior chosen per row by prior_index (tables
// [U*K, C]; prior_index == nullptr: one prior). Only kBound and the dtypes are compile-time: eps
// given or drawn (eps == nullptr), the row reduction (kl_row != nullptr) and the prior gradients
// (sums_table.global != nullptr) are uniform branches, so these cases add 16 instantiations per
// kernel instead of multiplying the specialized ones above, which the Monte-Carlo KL against one
// prior keeps.
template <typename scalar_t, typename acc_t, int CT, bool kBound>
__global__ void __launch_bounds__(kThreads) general_forward_kernel(
    const scalar_t* __restrict__ mu, const scalar_t* __restrict__ logvar,
    const int64_t* __restrict__ idx, const scalar_t* __restrict__ eps,
    const int64_t* __restrict__ seed, const int64_t* __restrict__ prior_index,
    const acc_t* __restrict__ w, const acc_t* __restrict__ m, const acc_t* __restrict__ prec,
    int64_t numel, int64_t K, int64_t row_stride, int C, int64_t stride,
    scalar_t* __restrict__ z, scalar_t* __restrict__ kl, acc_t* __restrict__ kl_row) {
  const int64_t first = first_element();
  if (first >= numel) return;
  const GroupTables<acc_t> tables{w, m, prec, prior_index, K, C};
  GroupLanes<acc_t, CT, false> lanes(first, tables, nullptr);
  RuntimeEpsSource<scalar_t, acc_t> e(eps, seed);
  forward_walk(first, numel, K, stride, kl_row != nullptr, e, kl, kl_row,
               [&](int64_t i, int q) {
    lanes[q].follow(i, i / K, tables, nullptr);
    acc_t zv, klv;
    const int64_t li = latent_offset(idx, i, K, row_stride);
    element_forward<kBound, CT>(static_cast<acc_t>(mu[li]), static_cast<acc_t>(logvar[li]),
                                e.at(i, q), C, lanes[q].prior, zv, klv);
    z[i] = static_cast<scalar_t>(zv);
    return klv;
  });
}

template <typename scalar_t, typename acc_t, int CT, bool kBound>
__global__ void __launch_bounds__(kThreads) general_backward_kernel(
    const scalar_t* __restrict__ grad_z, const scalar_t* __restrict__ grad_kl,
    const scalar_t* __restrict__ mu, const scalar_t* __restrict__ logvar,
    const int64_t* __restrict__ idx, const scalar_t* __restrict__ eps,
    const int64_t* __restrict__ seed, const int64_t* __restrict__ prior_index,
    const acc_t* __restrict__ w, const acc_t* __restrict__ m, const acc_t* __restrict__ prec,
    int64_t numel, int64_t K, int64_t row_stride, int C, int64_t stride, bool row_reduction,
    SumsTable sums_table, const scalar_t* __restrict__ extra_grad_mu,
    const scalar_t* __restrict__ extra_grad_logvar,
    scalar_t* __restrict__ grad_mu, scalar_t* __restrict__ grad_logvar) {
  const bool prior_grads = sums_table.global != nullptr;  // uniform, as backward_frame needs
  backward_frame(sums_table, prior_grads, numel, [&](int64_t first, double* table) {
    const GroupTables<acc_t> tables{w, m, prec, prior_index, K, C};
    GroupLanes<acc_t, CT, true> lanes(first, tables, table);
    RuntimeEpsSource<scalar_t, acc_t> e(eps, seed);
    backward_walk(first, numel, K, stride, e, [&](int64_t i, int q, int64_t n) {
      lanes[q].follow(i, n, tables, table);
      const acc_t gk = static_cast<acc_t>(row_reduction ? grad_kl[n] : grad_kl[i]);
      acc_t gmu, glv;
      const int64_t li = latent_offset(idx, i, K, row_stride);
      // The responsibility terms are computed whether or not prior gradients are wanted (a
      // few multiplies; LaneSums writes nothing without a table): one inlined copy of the math.
      element_backward<kBound, CT>(static_cast<acc_t>(mu[li]), static_cast<acc_t>(logvar[li]),
                                   e.at(i, q), static_cast<acc_t>(grad_z[i]), gk, C,
                                   lanes[q].prior, lanes[q].sums, gmu, glv);
      lanes[q].sums.add_weight(gk);
      grad_mu[i] = plus_extra(gmu, extra_grad_mu, i);
      grad_logvar[i] = plus_extra(glv, extra_grad_logvar, i);
    });
    lanes.finish();
  });
}

template <typename F>
void dispatch_bound(bool bound, const F& f) {
  if (bound) f.template operator()<true>();
  else f.template operator()<false>();
}

template <typename F>
void dispatch_flags(bool a, bool b, const F& f) {
  if (a) {
    if (b) f.template operator()<true, true>(); else f.template operator()<true, false>();
  } else {
    if (b) f.template operator()<false, true>(); else f.template operator()<false, false>();
  }
}

// The Monte-Carlo KL against one prior runs the specialized kernels, everything else the general.
bool needs_general_kernels(const ReparamGmmKlProblem& p) {
  return p.bound() || p.prior.conditional();
}

// The arguments all four kernels take, in their order: the latents and eps (or the seed), then
// (the general kernels: after the group index, group_index) the prior's tables and the sizes.
template <typename scalar_t>
std::tuple<const scalar_t*, const scalar_t*, const int64_t*, const scalar_t*, const int64_t*>
latent_args(const ReparamGmmKlProblem& p) {
  return {p.mu.data_ptr<scalar_t>(), p.logvar.data_ptr<scalar_t>(),
          p.gathered() ? p.idx.data_ptr<int64_t>() : nullptr,
          p.sampled() ? nullptr : p.eps.data_ptr<scalar_t>(),
          p.sampled() ? p.seed.data_ptr<int64_t>() : nullptr};
}
std::tuple<const int64_t*> group_index(const ReparamGmmKlProblem& p) {
  return {p.prior.conditional() ? p.prior.index.data_ptr<int64_t>() : nullptr};
}
template <typename acc_t>
std::tuple<const acc_t*, const acc_t*, const acc_t*, int64_t, int64_t, int64_t, int, int64_t>
prior_args(const ReparamGmmKlProblem& p, const Launch& launch) {
  return {p.prior.w.data_ptr<acc_t>(), p.prior.m.data_ptr<acc_t>(), p.prior.prec.data_ptr<acc_t>(),
          p.N * p.K, p.K, p.row_stride, static_cast<int>(p.C), launch.stride};
}

// kernel<<<launch.blocks, kThreads, smem, stream>>>(args...).
template <typename Kernel, typename Args>
void launch_kernel(Kernel kernel, const Launch& launch, size_t smem, cudaStream_t stream,
                   const Args& args) {
  std::apply([&](auto... a) { kernel<<<launch.blocks, kThreads, smem, stream>>>(a...); }, args);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void forward(const ReparamGmmKlProblem& p, at::Tensor& z, at::Tensor& kl) {
  const c10::cuda::CUDAGuard guard(p.mu.device());
  const Launch launch = plan_launch(p.N * p.K, p.K);
  // Row sums by atomics: a row gets one partial sum per group of 4 it touches. Up to two, added
  // onto zero, commute exactly; more (K = 7 or K >= 9) make kl depend on the order the atomics
  // land in. Under torch.use_deterministic_algorithms the kernel then writes every element's kl
  // and a torch reduction sums the rows (for float16/bfloat16 from the rounded elements).
  const bool ordered_rows = p.reduction == kReductionRow && p.K > 4 + std::gcd(p.K, int64_t(4));
  const bool sum_after = ordered_rows && at::globalContext().deterministicAlgorithms();
  const bool row = p.reduction == kReductionRow && !sum_after;
  at::Tensor kl_elements = sum_after ? at::empty({p.N, p.K}, kl.options()) : at::Tensor();
  at::Tensor& kl_out = sum_after ? kl_elements : kl;
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.mu.scalar_type(),
                                  "reparam_gmm_kl_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    // Row sums accumulate in acc_t: in kl itself when it has that dtype, else in a buffer.
    constexpr bool kSameType = std::is_same_v<scalar_t, acc_t>;
    at::Tensor kl_row;
    if (row) kl_row = kSameType ? kl.zero_() : at::zeros({p.N}, kl.options().dtype(
                                                   c10::CppTypeToScalarType<acc_t>::value));
    const auto outputs = std::make_tuple(z.data_ptr<scalar_t>(),
                                         row ? nullptr : kl_out.data_ptr<scalar_t>(),
                                         row ? kl_row.data_ptr<acc_t>() : nullptr);
    dispatch_components(p.C, [&]<int CT>() {
      const auto args_after_group = std::tuple_cat(prior_args<acc_t>(p, launch), outputs);
      if (needs_general_kernels(p)) {
        dispatch_bound(p.bound(), [&]<bool kBound>() {
          launch_kernel(general_forward_kernel<scalar_t, acc_t, CT, kBound>, launch, 0, stream,
                        std::tuple_cat(latent_args<scalar_t>(p), group_index(p),
                                       args_after_group));
        });
        return;
      }
      dispatch_flags(p.sampled(), row, [&]<bool kSampled, bool kRow>() {
        launch_kernel(forward_kernel<scalar_t, acc_t, CT, kSampled, kRow>, launch, 0, stream,
                      std::tuple_cat(latent_args<scalar_t>(p), args_after_group));
      });
    });
    if (row && !kSameType) kl.copy_(kl_row);
  });
  if (sum_after) at::sum_out(kl, kl_elements, at::IntArrayRef{1});
}

void backward(const ReparamGmmKlProblem& p, const at::Tensor& grad_z, const at::Tensor& grad_kl,
              at::Tensor& grad_mu, at::Tensor& grad_logvar, at::Tensor& prior_sums) {
  const c10::cuda::CUDAGuard guard(p.mu.device());
  const Launch launch = plan_launch(p.N * p.K, p.K);
  const bool row = p.reduction == kReductionRow;
  const bool prior_grads = prior_sums.defined();
  // The prior's gradients are sums over all elements, added by atomics in an order that varies.
  if (prior_grads)
    at::globalContext().alertNotDeterministic(
        "halfvae_ext reparam_gmm_kl backward on CUDA (the prior's gradients)");
  // [U*K, 3C+1]: one row of sums per (group, latent dimension); U = 1 for one prior.
  const int64_t table_size = p.prior.U * p.K * num_prior_sums(static_cast<int>(p.C));
  const SumsTable table{prior_grads ? prior_sums.data_ptr<double>() : nullptr, table_size,
                        prior_grads && table_size <= kMaxSharedSums};
  const size_t smem = table.in_shared ? table_size * sizeof(double) : 0;
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.mu.scalar_type(),
                                  "reparam_gmm_kl_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto grads_in =
        std::make_tuple(grad_z.data_ptr<scalar_t>(), grad_kl.data_ptr<scalar_t>());
    const auto extra = [](const at::Tensor& g) {
      return g.defined() ? g.data_ptr<scalar_t>() : nullptr;
    };
    const auto sums_and_outputs =
        std::make_tuple(table, extra(p.extra_grad_mu), extra(p.extra_grad_logvar),
                        grad_mu.data_ptr<scalar_t>(), grad_logvar.data_ptr<scalar_t>());
    dispatch_components(p.C, [&]<int CT>() {
      const auto prior = prior_args<acc_t>(p, launch);
      if (needs_general_kernels(p)) {
        dispatch_bound(p.bound(), [&]<bool kBound>() {
          launch_kernel(general_backward_kernel<scalar_t, acc_t, CT, kBound>, launch, smem, stream,
                        std::tuple_cat(grads_in, latent_args<scalar_t>(p), group_index(p), prior,
                                       std::make_tuple(row), sums_and_outputs));
        });
        return;
      }
      const auto args = std::tuple_cat(grads_in, latent_args<scalar_t>(p), prior, sums_and_outputs);
      dispatch_flags(p.sampled(), row, [&]<bool kSampled, bool kRow>() {
        if (prior_grads)
          launch_kernel(backward_kernel<scalar_t, acc_t, CT, kSampled, kRow, true>, launch, smem,
                        stream, args);
        else
          launch_kernel(backward_kernel<scalar_t, acc_t, CT, kSampled, kRow, false>, launch, smem,
                        stream, args);
      });
    });
  });
  if (p.row_step != nullptr) {  // the fused table step: then the update kernel, on this stream
    RowUpdate u = *p.row_step;
    u.grad_mu = grad_mu;
    u.grad_logvar = grad_logvar;
    kernel_table(KernelSet::cuda).latent_rows_update(u);
  }
}

}  // namespace

HALFVAE_REGISTER_KERNEL(KernelSet::cuda, reparam_gmm_kl_forward, &forward);
HALFVAE_REGISTER_KERNEL(KernelSet::cuda, reparam_gmm_kl_backward, &backward);

}  // namespace halfvae::cuda
