// Pieces shared by the CUDA kernels.
//
// Thread layout: thread t owns the 4 consecutive elements of one Philox block (4t .. 4t+3) and then
// strides by S elements, where S is a multiple of both 4 and K. So each of a thread's 4 lanes always
// sees the same latent dimension k: the lane's prior parameters stay in registers, and with C = 3
// (unrolled) so do its prior-gradient sums, which a thread reduces into shared memory once, not
// once per element. Other C add each element's 3C + 1 sums into the block's table (shared memory
// when it fits, else global memory): registers for up to 64 components would not fit.
#pragma once
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>
#include <memory>

#include "../launch_plan.h"

#include "halfvae/gmm_math.h"
#include "halfvae/philox.h"

namespace halfvae::cuda {

constexpr int kThreads = 256;

template <typename T>
struct DevMath;
template <>
struct DevMath<float> {
  static __device__ __forceinline__ float exp(float x) { return ::expf(x); }
  static __device__ __forceinline__ float log(float x) { return ::logf(x); }
  static __device__ __forceinline__ float exp_nonpos(float x) { return ::expf(x); }
  static __device__ __forceinline__ float max(float a, float b) { return ::fmaxf(a, b); }
};
template <>
struct DevMath<double> {
  static __device__ __forceinline__ double exp(double x) { return ::exp(x); }
  static __device__ __forceinline__ double log(double x) { return ::log(x); }
  static __device__ __forceinline__ double exp_nonpos(double x) { return ::exp(x); }
  static __device__ __forceinline__ double max(double a, double b) { return ::fmax(a, b); }
};

__device__ __forceinline__ void sincos_2pi(float u, float* s, float* c) { ::sincospif(2.f * u, s, c); }
__device__ __forceinline__ void sincos_2pi(double u, double* s, double* c) { ::sincospi(2.0 * u, s, c); }

// The 4 normals of Philox block `block` (same map as the CPU's NormalFiller).
template <typename T>
__device__ __forceinline__ void philox_normals(uint64_t seed, uint64_t offset, uint64_t block,
                                               T out[4]) {
  const PhiloxBlock x = philox4x32_10(seed, offset, block);
  T s, c;
  const T r0 = ::sqrt(T(-2) * DevMath<T>::log(uniform_open0<T>(x.x[0])));
  sincos_2pi(uniform_closed0<T>(x.x[1]), &s, &c);
  out[0] = r0 * c;
  out[1] = r0 * s;
  const T r1 = ::sqrt(T(-2) * DevMath<T>::log(uniform_open0<T>(x.x[2])));
  sincos_2pi(uniform_closed0<T>(x.x[3]), &s, &c);
  out[2] = r1 * c;
  out[3] = r1 * s;
}

// Prior of one latent dimension k. CT > 0: copied into registers; CT == 0: read through the cache.
template <typename T, int CT>
struct LanePrior {
  T w_[CT], m_[CT], p_[CT];
  __device__ void load(const T* w, const T* m, const T* prec, int64_t k, int C) {
#pragma unroll
    for (int c = 0; c < CT; ++c) {
      w_[c] = w[k * CT + c];
      m_[c] = m[k * CT + c];
      p_[c] = prec[k * CT + c];
    }
  }
  // The same through the read-only cache (the general kernels reload lanes while they run).
  __device__ void load_ldg(const T* w, const T* m, const T* prec, int64_t k, int C) {
#pragma unroll
    for (int c = 0; c < CT; ++c) {
      w_[c] = __ldg(w + k * CT + c);
      m_[c] = __ldg(m + k * CT + c);
      p_[c] = __ldg(prec + k * CT + c);
    }
  }
  __device__ T w(int c) const { return w_[c]; }
  __device__ T m(int c) const { return m_[c]; }
  __device__ T prec(int c) const { return p_[c]; }
  __device__ T half_prec(int c) const { return T(0.5) * p_[c]; }
};
template <typename T>
struct LanePrior<T, 0> {
  const T *w_, *m_, *p_;
  __device__ void load(const T* w, const T* m, const T* prec, int64_t k, int C) {
    w_ = w + k * C;
    m_ = m + k * C;
    p_ = prec + k * C;
  }
  // Already read through the read-only cache (the accessors below).
  __device__ void load_ldg(const T* w, const T* m, const T* prec, int64_t k, int C) {
    load(w, m, prec, k, C);
  }
  __device__ T w(int c) const { return __ldg(w_ + c); }
  __device__ T m(int c) const { return __ldg(m_ + c); }
  __device__ T prec(int c) const { return __ldg(p_ + c); }
  __device__ T half_prec(int c) const { return T(0.5) * __ldg(p_ + c); }
};

// Prior-gradient sums of one lane for table row `row` of the [rows, 3C+1] sums table. CT > 0:
// registers, added into the row by flush() (the specialized kernels flush once per thread, the
// general ones also when a lane's row changes); CT == 0: each element adds straight into the
// table (shared memory, or global when it does not fit): registers for up to 64 components would
// not fit. kOptional: the table may be absent (nullptr: prior gradients not wanted, nothing is
// written), a test the specialized kernels, which take sums only with a table, do not pay.
template <typename T, int CT, bool kOptional>
struct LaneSums {
  T s_[3 * CT + 1];
  double* row_;
  __device__ void init(double* table, int64_t row, int C) {
    row_ = kOptional && table == nullptr ? nullptr : table + row * (3 * CT + 1);
#pragma unroll
    for (int q = 0; q < 3 * CT + 1; ++q) s_[q] = T(0);
  }
  __device__ void operator()(int c, T r, T r_dprec, T r_lv) {
    s_[c] += r;
    s_[CT + c] += r_dprec;
    s_[2 * CT + c] += r_lv;
  }
  __device__ void add_weight(T g) { s_[3 * CT] += g; }
  __device__ void flush() {
    if (kOptional && row_ == nullptr) return;
#pragma unroll
    for (int q = 0; q < 3 * CT + 1; ++q)
      if (s_[q] != T(0)) atomicAdd(row_ + q, static_cast<double>(s_[q]));
  }
};
template <typename T, bool kOptional>
struct LaneSums<T, 0, kOptional> {
  double* row_;
  int C_;
  __device__ void init(double* table, int64_t row, int C) {
    row_ = kOptional && table == nullptr ? nullptr : table + row * (3 * C + 1);
    C_ = C;
  }
  __device__ void operator()(int c, T r, T r_dprec, T r_lv) {
    if (kOptional && row_ == nullptr) return;
    atomicAdd(row_ + c, static_cast<double>(r));
    atomicAdd(row_ + C_ + c, static_cast<double>(r_dprec));
    atomicAdd(row_ + 2 * C_ + c, static_cast<double>(r_lv));
  }
  __device__ void add_weight(T g) {
    if (!kOptional || row_ != nullptr) atomicAdd(row_ + 3 * C_, static_cast<double>(g));
  }
  __device__ void flush() {}
};

// A thread's 4 lanes: the prior of each lane's latent dimension, and (backward) its sums.
template <typename T, int CT, bool kPriorGrads>
__device__ __forceinline__ void init_lanes(LanePrior<T, CT> (&prior)[4],
                                           LaneSums<T, CT, false> (&sums)[4],
                                           const T* w, const T* m, const T* prec, double* table,
                                           int64_t first, int64_t K, int C) {
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    prior[q].load(w, m, prec, (first + q) % K, C);
    if constexpr (kPriorGrads) sums[q].init(table, (first + q) % K, C);
  }
}

// The general kernels (the KL bound, and priors chosen per row by a group index, tables [U*K, C])
// keep this layout with one difference: a lane's latent dimension k is fixed, but its table row
// u*K + k follows the group u of the row it is at. GroupLane reloads the lane's prior, through
// the read-only cache (the tables are small and hot: no shared-memory copy per block, whatever U),
// and moves its sums to the new row only when the group changes, so a run of rows of one group
// costs what one prior costs. Without a group index, lanes never move: the layout above.

// The prior tables of the general kernels: [U*K, C] each, and the group of every row (nullptr:
// one prior, U = 1).
template <typename T>
struct GroupTables {
  const T* w;
  const T* m;
  const T* prec;
  const int64_t* index;
  int64_t K;
  int C;
};

// One lane of a general kernel: its prior (and, with kSums, its sums) for table row `row`.
template <typename T, int CT, bool kSums>
struct GroupLane {
  LanePrior<T, CT> prior;
  LaneSums<T, CT, true> sums;
  int64_t row;  // the table row its prior and sums are for; -1 before the first row's group
  __device__ void start(int64_t first, int q, const GroupTables<T>& t, double* table) {
    // One prior: the lane's row (its latent dimension) never changes, load it once. A group
    // index: load at the first element (follow), not here.
    row = t.index == nullptr ? (first + q) % t.K : -1;
    if (row >= 0) prior.load_ldg(t.w, t.m, t.prec, row, t.C);
    if constexpr (kSums) sums.init(row >= 0 ? table : nullptr, row >= 0 ? row : 0, t.C);
  }
  // Before element i, of latent row n = i / K.
  __device__ void follow(int64_t i, int64_t n, const GroupTables<T>& t, double* table) {
    if (t.index == nullptr) return;
    const int64_t r = __ldg(t.index + n) * t.K + (i - n * t.K);
    if (r == row) return;
    row = r;
    prior.load_ldg(t.w, t.m, t.prec, r, t.C);
    if constexpr (kSums) {
      sums.flush();
      sums.init(table, r, t.C);
    }
  }
  __device__ void finish() {
    if constexpr (kSums) sums.flush();
  }
};

// The 4 lanes of a general kernel's thread, started at its first element.
template <typename T, int CT, bool kSums>
struct GroupLanes {
  GroupLane<T, CT, kSums> lane[4];
  __device__ GroupLanes(int64_t first, const GroupTables<T>& t, double* table) {
#pragma unroll
    for (int q = 0; q < 4; ++q) lane[q].start(first, q, t, table);
  }
  __device__ GroupLane<T, CT, kSums>& operator[](int q) { return lane[q]; }
  __device__ void finish() {
#pragma unroll
    for (int q = 0; q < 4; ++q) lane[q].finish();
  }
};

// Shared-memory staging of the [U*K, 3C+1] sums table when it fits; `global` otherwise.
struct SumsTable {
  double* global;
  int64_t size;    // U * K * (3C + 1)
  bool in_shared;  // staged in dynamic shared memory
};
constexpr int64_t kMaxSharedSums = 6144;  // doubles: 48 KB

__device__ __forceinline__ double* begin_sums(const SumsTable& t, double* smem) {
  if (!t.in_shared) return t.global;
  for (int64_t i = threadIdx.x; i < t.size; i += blockDim.x) smem[i] = 0.0;
  __syncthreads();
  return smem;
}
__device__ __forceinline__ void end_sums(const SumsTable& t, double* smem) {
  if (!t.in_shared) return;
  __syncthreads();
  for (int64_t i = threadIdx.x; i < t.size; i += blockDim.x)
    if (smem[i] != 0.0) atomicAdd(t.global + i, smem[i]);
}

// The first element of this thread's first group of 4 (the layout above).
__device__ __forceinline__ int64_t first_element() {
  return 4 * (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x);
}

// f(i, q) for the elements i = base + q (lane q) of the group at `base` that are below numel.
template <class F>
__device__ __forceinline__ void for_each_lane(int64_t base, int64_t numel, const F& f) {
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    const int64_t i = base + q;
    if (i >= numel) break;
    f(i, q);
  }
}

// The frame of a backward kernel: with sums (uniform across the block: begin_sums and end_sums
// synchronize it), the block's table is staged first and added into the global one last; between,
// body(first, table) runs on a thread that has elements (table: nullptr without sums).
template <class Body>
__device__ __forceinline__ void backward_frame(const SumsTable& sums_table, bool with_sums,
                                               int64_t numel, const Body& body) {
  extern __shared__ double smem[];
  double* table = with_sums ? begin_sums(sums_table, smem) : nullptr;
  const int64_t first = first_element();
  if (first < numel) body(first, table);
  if (with_sums) end_sums(sums_table, smem);
}

// The number of SMs of `device`, queried once per device (the query costs microseconds, and
// every launch plans its grid).
inline int sm_count(int device) {
  static const int devices = c10::cuda::device_count();
  static std::unique_ptr<std::atomic<int>[]> cache(new std::atomic<int>[devices]());
  TORCH_CHECK(device >= 0 && device < devices, "sm_count: no CUDA device ", device);
  int sms = cache[device].load(std::memory_order_relaxed);
  if (sms == 0) {
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
    cache[device].store(sms, std::memory_order_relaxed);
  }
  return sms;
}

// The grid of the layout above for the current device (launch_plan.h): at most 8 blocks per SM,
// the rest by striding.
struct Launch {
  unsigned int blocks;  // checked to fit a grid
  int64_t stride;       // elements between a thread's successive groups
};
inline Launch plan_launch(int64_t numel, int64_t K) {
  const int64_t cap = int64_t(sm_count(c10::cuda::current_device())) * 8;
  const LaunchPlan plan = plan_launch_blocks(numel, K, kThreads, cap);
  return Launch{static_cast<unsigned int>(plan.blocks), plan.stride};
}

// Blocks of kThreads for one thread per item, checked to fit a grid.
inline unsigned int grid_for(int64_t items) {
  return static_cast<unsigned int>(blocks_for(items, kThreads));
}

}  // namespace halfvae::cuda
