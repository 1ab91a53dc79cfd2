// Pieces shared by the CUDA kernels.
//
// Thread layout: thread t owns the 4 consecutive elements of one Philox block (4t .. 4t+3) and then
// strides by S elements, where S is a multiple of both 4 and K. So each of a thread's 4 lanes always
// sees the same latent dimension k: the lane's prior parameters and its prior-gradient sums stay in
// registers, and a thread reduces its sums into shared memory once, not once per element.
#pragma once
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <numeric>

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
  __device__ T w(int c) const { return __ldg(w_ + c); }
  __device__ T m(int c) const { return __ldg(m_ + c); }
  __device__ T prec(int c) const { return __ldg(p_ + c); }
  __device__ T half_prec(int c) const { return T(0.5) * __ldg(p_ + c); }
};

// Prior-gradient sums of one lane. CT > 0: registers, flushed once per thread; CT == 0: each
// element adds straight into the block's table (shared memory, or global when it does not fit).
template <typename T, int CT>
struct LaneSums {
  T s_[3 * CT + 1];
  double* table_;  // [K, 3C+1] row of this lane's k
  __device__ void init(double* table, int64_t k, int C) {
    table_ = table + k * (3 * CT + 1);
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
#pragma unroll
    for (int q = 0; q < 3 * CT + 1; ++q)
      if (s_[q] != T(0)) atomicAdd(table_ + q, static_cast<double>(s_[q]));
  }
};
template <typename T>
struct LaneSums<T, 0> {
  double* table_;
  int C_;
  __device__ void init(double* table, int64_t k, int C) {
    table_ = table + k * (3 * C + 1);
    C_ = C;
  }
  __device__ void operator()(int c, T r, T r_dprec, T r_lv) {
    atomicAdd(table_ + c, static_cast<double>(r));
    atomicAdd(table_ + C_ + c, static_cast<double>(r_dprec));
    atomicAdd(table_ + 2 * C_ + c, static_cast<double>(r_lv));
  }
  __device__ void add_weight(T g) { atomicAdd(table_ + 3 * C_, static_cast<double>(g)); }
  __device__ void flush() {}
};

// A thread's 4 lanes: the prior of each lane's latent dimension, and (backward) its sums.
template <typename T, int CT, bool kPriorGrads>
__device__ __forceinline__ void init_lanes(LanePrior<T, CT> (&prior)[4], LaneSums<T, CT> (&sums)[4],
                                           const T* w, const T* m, const T* prec, double* table,
                                           int64_t first, int64_t K, int C) {
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    prior[q].load(w, m, prec, (first + q) % K, C);
    if constexpr (kPriorGrads) sums[q].init(table, (first + q) % K, C);
  }
}

// Shared-memory staging of the [K, 3C+1] sums table when it fits; `global` otherwise.
struct SumsTable {
  double* global;
  int64_t size;    // K * (3C + 1)
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

// Grid whose total thread count * 4 is a multiple of K (see the layout note at the top).
struct Launch {
  int64_t blocks;
  int64_t stride;  // elements between a thread's successive groups
  int device_sms;
};
inline Launch plan_launch(int64_t numel, int64_t K) {
  int device = 0, sms = 1;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  const int64_t groups = (numel + 3) / 4;
  const int64_t q = K / std::gcd(K, int64_t(4) * kThreads);  // blocks must come in multiples of q
  int64_t blocks = std::min<int64_t>((groups + kThreads - 1) / kThreads, int64_t(sms) * 8);
  blocks = std::max<int64_t>(1, (blocks + q - 1) / q) * q;
  return Launch{blocks, blocks * kThreads * 4, sms};
}


}  // namespace halfvae::cuda
