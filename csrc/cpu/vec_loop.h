// The CPU loop shared by the element-wise kernels (included only by ISA-compiled files).
//
// Elements are walked in flattened [N, K] order, W = vector width at a time. The per-k prior tables
// are repeated into a "pattern" of P = r*K elements, r chosen so that P is a multiple of W; a vector
// starting at pattern offset j then reads its per-lane prior values with one load at j. Work is cut
// into blocks of a fixed size and blocks into at most kMaxChunks chunks: the chunking depends only on
// the problem size, never on the thread count, so per-chunk partial sums combined in chunk order make
// the prior-gradient reduction bit-for-bit deterministic.
//
// A conditional prior (one mixture per group of rows) replaces the pattern by per-group tables; the
// loop stays the same (see the prior sources below).
#pragma once
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <memory>
#include <numeric>
#include <vector>

#include "../kernel_args.h"
#include "halfvae/gmm_math.h"
#include "halfvae/philox.h"
#include "prefetch.h"

namespace halfvae::cpu {
inline namespace CPU_CAPABILITY {

using at::vec::Vectorized;

// Natural log of positive, finite float32 lanes (Cephes logf: frexp by bit manipulation, then a
// degree-9 polynomial; about 1 ulp); NaN lanes give NaN. Inlined, it costs a fraction of the Sleef
// call it replaces, which took ~30% of the forward. The kernels only take logs of sums of
// exponentials >= 1, or of NaN: a NaN prior parameter or latent reaches the log-sum-exp's sum.
inline Vectorized<float> fast_logf(const Vectorized<float>& x) {
  using VF = Vectorized<float>;
  using VI = Vectorized<int32_t>;
  const VI bits = at::vec::cast<int32_t>(x);
  const VF exponent = at::vec::convert_to_fp_of_same_size<float>(
      (bits >> VI(23)) - VI(126));  // x = m * 2^e, m in [0.5, 1)
  VF m = at::vec::cast<float>((bits & VI(static_cast<int32_t>(0x807FFFFF))) | VI(0x3F000000));
  const VF below = m < VF(0.707106781186547524f);  // all-ones lanes where m < sqrt(1/2)
  const VF e = exponent - (below & VF(1.0f));
  m = VF::blendv(m - VF(1.0f), m + m - VF(1.0f), below);
  // Cephes' degree-8 polynomial by Estrin's scheme: a dependency chain of 4 multiply-adds instead
  // of Horner's 9, so the out-of-order core overlaps it with the component exps around it.
  const VF z = m * m;
  const VF z2 = z * z;
  const VF q0 = at::vec::fmadd(VF(-2.4999993993E-1f), m, VF(3.3333331174E-1f));
  const VF q1 = at::vec::fmadd(VF(-1.6668057665E-1f), m, VF(2.0000714765E-1f));
  const VF q2 = at::vec::fmadd(VF(-1.2420140846E-1f), m, VF(1.4249322787E-1f));
  const VF q3 = at::vec::fmadd(VF(-1.1514610310E-1f), m, VF(1.1676998740E-1f));
  const VF r0 = at::vec::fmadd(q1, z, q0);
  const VF r1 = at::vec::fmadd(q3, z, q2);
  VF y = at::vec::fmadd(at::vec::fmadd(VF(7.0376836292E-2f), z2, r1), z2, r0);
  y = y * m * z;
  y = at::vec::fmadd(e, VF(-2.12194440e-4f), y);
  y = at::vec::fmadd(z, VF(-0.5f), y);
  // The bit manipulation above reads a NaN's bits as a finite number's (about 2^129): x * 0 +
  // ln2_hi is ln2_hi exactly for finite x and NaN for NaN, which hands the NaN on at the cost of
  // one multiply-add off the critical path.
  const VF ln2_hi = at::vec::fmadd(x, VF(0.0f), VF(0.693359375f));
  return at::vec::fmadd(e, ln2_hi, m + y);
}

// exp of float32 lanes x <= 0 (NaN passes through), for the shifted log-sum-exp terms
// a_c - max_c a_c. torch's exp_u20 polynomial and argument reduction (same ~20 ulp), without its
// overflow and underflow branches: arguments below ln(FLT_MIN) are clamped there (exp = 1.2e-38
// instead of 0, a responsibility negligible either way), and n = round(x log2 e) comes from the
// low bits of one fused multiply-add with 1.5 * 2^23 + 127, which are also the bits of 2^n once
// shifted into the exponent field. 11 vector operations against exp_u20's 18: the kernels take
// C of these per element in each direction.
inline Vectorized<float> exp_nonpos_f32(const Vectorized<float>& x) {
  using VF = Vectorized<float>;
  using VI = Vectorized<int32_t>;
  constexpr float kShift = 12582912.0f + 127.0f;  // 1.5 * 2^23 + exponent bias
  const VF xc = at::vec::clamp_min(x, VF(-87.3365447505530f));  // ln(FLT_MIN)
  const VF t = at::vec::fmadd(xc, VF(1.44269504088896341f), VF(kShift));
  const VF n = t - VF(kShift);
  const VF r = at::vec::fnmadd(n, VF(0.693147180559945f), xc);
  VF p = at::vec::fmadd(r, VF(0.00828929059f), VF(0.0418978221f));
  p = at::vec::fmadd(r, p, VF(0.166676521f));
  p = at::vec::fmadd(r, p, VF(0.499991506f));
  p = at::vec::fmadd(r, p, VF(0.999999701f));
  p = at::vec::fmadd(r, p, VF(1.0f));
  return p * at::vec::cast<float>(at::vec::cast<int32_t>(t) << VI(23));
}

template <typename T>
struct VecMath {
  using V = Vectorized<T>;
  // float32: torch's inlined polynomial exp (max error 20 ulp, ~1e-6 relative) instead of a Sleef
  // call; it is the kernels' most frequent operation. float64 keeps the 1-ulp Sleef exp.
  static V exp(const V& x) {
    if constexpr (std::is_same_v<T, float>) return x.exp_u20();
    else return x.exp();
  }
  static V log(const V& x) {
    if constexpr (std::is_same_v<T, float>) return fast_logf(x);
    else return x.log();
  }
  static V exp_nonpos(const V& x) {
    if constexpr (std::is_same_v<T, float>) return exp_nonpos_f32(x);
    else return x.exp();
  }
  // max(a, b) in one instruction (at::vec::maximum spends two more on NaN): a NaN lane still
  // reaches the result, through exp_nonpos(a_c - max) of the NaN term and the log of the sum.
  static V max(const V& a, const V& b) { return at::vec::clamp_min(b, a); }
};

// Loads n <= W lanes; lanes past n are zero (the kernels rely on zero upstream gradients there).
template <typename T>
inline Vectorized<T> load(const T* p, int64_t n) {
  using V = Vectorized<T>;
  return n == V::size() ? V::loadu(p) : V::set(V(T(0)), V::loadu(p, n), n);
}
template <typename T>
inline void store(T* p, const Vectorized<T>& v, int64_t n) {
  if (n == Vectorized<T>::size()) v.store(p); else v.store(p, static_cast<int>(n));
}

constexpr int64_t kMaxPattern = 4096;
constexpr int64_t kBlockElems = 1024;  // also the span of a float32 partial sum: keep it short
constexpr int64_t kMaxChunks = 256;
constexpr int64_t kMinSumChunks = 8;
// The least work (elements) worth a thread of its own: smaller problems run on the calling
// thread, without an OpenMP fork and join (~10 us on 2 busy cores, more than the whole kernel of
// a 4096-element batch). Only how chunks are shared out depends on it, never the chunking: the
// results are the same bit for bit whatever it is.
constexpr int64_t kParallelGrainElems = 8192;

// P = r*K, the shortest run of whole rows that is a multiple of W (K itself past kMaxPattern).
template <typename T>
inline int64_t pattern_length(int64_t K) {
  const int64_t W = Vectorized<T>::size();
  const int64_t rows = W / std::gcd(K, W);
  return rows * K <= kMaxPattern ? rows * K : K;
}

template <typename T>
struct PriorPattern {
  using V = Vectorized<T>;
  int64_t K = 0, C = 0, P = 0, stride = 0;  // stride: P rounded up to W (padding keeps loads in bounds)
  std::vector<T> w, m, prec, half_prec;     // [C][stride]

  explicit PriorPattern(const PriorTables& t) : K(t.K), C(t.C), P(pattern_length<T>(t.K)) {
    const int64_t W = V::size();
    stride = (P + W - 1) / W * W + W;
    w.assign(C * stride, T(0));
    m.assign(C * stride, T(0));
    prec.assign(C * stride, T(1));
    half_prec.assign(C * stride, T(0.5));
    const T* tw = t.w.data_ptr<T>();
    const T* tm = t.m.data_ptr<T>();
    const T* tp = t.prec.data_ptr<T>();
    for (int64_t c = 0; c < C; ++c)
      for (int64_t j = 0; j < P; ++j) {
        const int64_t k = j % K;
        w[c * stride + j] = tw[k * C + c];
        m[c * stride + j] = tm[k * C + c];
        prec[c * stride + j] = tp[k * C + c];
        half_prec[c * stride + j] = T(0.5) * tp[k * C + c];
      }
  }
};

// The prior of the W lanes starting at pattern offset j.
template <typename T>
struct PriorLanes {
  using V = Vectorized<T>;
  const PriorPattern<T>& pat;
  int64_t j;
  V w(int c) const { return V::loadu(pat.w.data() + c * pat.stride + j); }
  V m(int c) const { return V::loadu(pat.m.data() + c * pat.stride + j); }
  V prec(int c) const { return V::loadu(pat.prec.data() + c * pat.stride + j); }
  V half_prec(int c) const { return V::loadu(pat.half_prec.data() + c * pat.stride + j); }
};

// The prior of W lanes read from a table [4][C][stride] (w, m, prec, half_prec): a conditional
// prior's per-group tables (stride W) or a block's copy of them (a column per element). The pattern
// keeps its own PriorLanes: read through this layout, the unconditional backward took ~10% longer
// (builds alternated, one thread, N*K = 2^23).
template <typename T>
struct TableLanes {
  using V = Vectorized<T>;
  const T* base;
  int64_t stride;   // between components
  int64_t qstride;  // between the four quantities: C * stride
  V w(int c) const { return V::loadu(base + c * stride); }
  V m(int c) const { return V::loadu(base + qstride + c * stride); }
  V prec(int c) const { return V::loadu(base + 2 * qstride + c * stride); }
  V half_prec(int c) const { return V::loadu(base + 3 * qstride + c * stride); }
};

// On a kernel's per-chunk lambda (Blocking::for_each_chunk's f): inlined into the loop over the
// chunks, the thread's scratch is a local variable there, and PriorSums' register accumulators stay
// in registers (or stack slots). GCC 12 left the backward's lambda out of line once the kernels
// took a prior source, and read and wrote them through a pointer at every vector (perf annotate).
#define HALFVAE_CHUNK_BODY __attribute__((always_inline))

struct Blocking {
  int64_t numel = 0, P = 1, block_elems = 0, num_blocks = 0, num_chunks = 0, blocks_per_chunk = 0;

  // sums_per_chunk: doubles of one chunk's partial sums (0 = none); bounds the chunk count so that
  // the partial sums stay under ~64 MB for huge K*C (or U*K*C): one chunk at worst, whose sums are
  // no larger than the prior sums the op returns.
  Blocking(int64_t numel_, int64_t P_, int64_t sums_per_chunk) : numel(numel_), P(P_) {
    int64_t patterns = std::max<int64_t>(1, kBlockElems / P);
    patterns = (patterns + 3) / 4 * 4;  // block starts stay multiples of 4 (one Philox block)
    block_elems = patterns * P;
    num_blocks = (numel + block_elems - 1) / block_elems;
    int64_t max_chunks = kMaxChunks;
    if (sums_per_chunk > 0) {
      // A chunk's sums are zeroed, folded into and reduced whatever it holds, a few scalar
      // operations each: keep them under 1/16 of its elements (at 40 prior groups, 6400 doubles a
      // chunk; 256 chunks of one block each cost more than the kernel), but give the threads up
      // to kMinSumChunks chunks of at least kParallelGrainElems elements to share.
      const int64_t shared = std::min(kMinSumChunks, numel / kParallelGrainElems);
      const int64_t by_work = std::max<int64_t>({1, shared, numel / (16 * sums_per_chunk)});
      const int64_t by_memory = std::max<int64_t>(1, (int64_t(1) << 23) / sums_per_chunk);
      max_chunks = std::min({kMaxChunks, by_work, by_memory});
    }
    num_chunks = std::min(num_blocks, max_chunks);
    blocks_per_chunk = num_chunks > 0 ? (num_blocks + num_chunks - 1) / num_chunks : 0;
    if (blocks_per_chunk > 0) num_chunks = (num_blocks + blocks_per_chunk - 1) / blocks_per_chunk;
  }

  // Chunks per thread at least: kParallelGrainElems elements of work.
  int64_t chunk_grain() const {
    const int64_t per_chunk = std::max<int64_t>(1, blocks_per_chunk * block_elems);
    return std::max<int64_t>(1, (kParallelGrainElems + per_chunk - 1) / per_chunk);
  }
  // f(chunk, first_block, end_block) for every chunk, chunks in parallel; a chunk's blocks are
  // walked in order by one thread.
  template <typename F>
  void for_each_chunk(const F& f) const {
    at::parallel_for(0, num_chunks, chunk_grain(), [&](int64_t c0, int64_t c1) {
      for (int64_t chunk = c0; chunk < c1; ++chunk)
        f(chunk, chunk * blocks_per_chunk, std::min(num_blocks, (chunk + 1) * blocks_per_chunk));
    });
  }
  // The same with f(scratch, chunk, first_block, end_block): make() builds a thread's scratch
  // once for all the chunks it walks (one per chunk, the allocations were ~5% of a step on a
  // 4096-row batch).
  template <typename Make, typename F>
  void for_each_chunk(const Make& make, const F& f) const {
    at::parallel_for(0, num_chunks, chunk_grain(), [&](int64_t c0, int64_t c1) {
      auto scratch = make();
      for (int64_t chunk = c0; chunk < c1; ++chunk)
        f(scratch, chunk, chunk * blocks_per_chunk,
          std::min(num_blocks, (chunk + 1) * blocks_per_chunk));
    });
  }
  int64_t block_start(int64_t b) const { return b * block_elems; }
  int64_t block_count(int64_t b) const { return std::min(block_elems, numel - b * block_elems); }
};

// body(global index, pattern offset, offset in block, lanes) over one block.
template <typename T, typename Body>
inline void for_each_vector(int64_t start, int64_t count, int64_t P, const Body& body) {
  constexpr int64_t W = Vectorized<T>::size();
  for (int64_t off = 0; off < count; off += P) {
    const int64_t seg = std::min(P, count - off);
    for (int64_t j = 0; j < seg; j += W) body(start + off + j, j, off + j, std::min(W, seg - j));
  }
}

// a[i] += b[i], i < n.
template <typename T>
inline void add_span(T* a, const T* b, int64_t n) {
  using V = Vectorized<T>;
  int64_t i = 0;
  for (; i + V::size() <= n; i += V::size()) (V::loadu(a + i) + V::loadu(b + i)).store(a + i);
  for (; i < n; ++i) a[i] += b[i];
}

// The (seed, offset) of an in-kernel draw, from its int64[2] tensor.
inline PhiloxSeed read_seed(const at::Tensor& seed) {
  const auto s = seed.to(at::kCPU).contiguous();
  const int64_t* v = s.data_ptr<int64_t>();
  return PhiloxSeed{static_cast<uint64_t>(v[0]), static_cast<uint64_t>(v[1])};
}

// Standard normals of global elements [start, start + count), start a multiple of 4, into out
// (room for count rounded up to 2W). Philox fills the uniforms, Box-Muller runs vectorized. The
// buffers grow once and are reused: one filler serves every block a thread draws.
template <typename T>
struct NormalFiller {
  using V = Vectorized<T>;
  std::vector<T> radius_u, angle_u;

  void fill(const PhiloxSeed& s, int64_t start, int64_t count, T* out) {
    const int64_t W = V::size();
    const int64_t blocks = (count + 3) / 4;
    const int64_t pairs = 2 * blocks;
    const int64_t padded = (pairs + W - 1) / W * W;
    if (static_cast<int64_t>(radius_u.size()) < padded) {
      radius_u.resize(padded);
      angle_u.resize(padded);
    }
    std::fill(radius_u.begin() + pairs, radius_u.begin() + padded, T(1));  // log(1) = 0: finite
    std::fill(angle_u.begin() + pairs, angle_u.begin() + padded, T(0));
    const uint64_t first = static_cast<uint64_t>(start / 4);
    for (int64_t b = 0; b < blocks; ++b) {
      const PhiloxBlock x = philox4x32_10(s.seed, s.offset, first + b);
      radius_u[2 * b] = uniform_open0<T>(x.x[0]);
      angle_u[2 * b] = uniform_closed0<T>(x.x[1]);
      radius_u[2 * b + 1] = uniform_open0<T>(x.x[2]);
      angle_u[2 * b + 1] = uniform_closed0<T>(x.x[3]);
    }
    const V two_pi(static_cast<T>(2.0 * M_PI));
    for (int64_t p = 0; p < padded; p += W) {
      const V r = (V(T(-2)) * V::loadu(radius_u.data() + p).log()).sqrt();
      const V theta = two_pi * V::loadu(angle_u.data() + p);
      const auto [lo, hi] = at::vec::interleave2(r * theta.cos(), r * theta.sin());
      lo.store(out + 2 * p);
      hi.store(out + 2 * p + W);
    }
  }
};

template <typename T>
inline size_t normal_buffer_size(int64_t block_elems) {
  return static_cast<size_t>(block_elems + 2 * Vectorized<T>::size() + 8);
}

// Per-block prior-gradient accumulators (in T, short sums), folded into per-chunk float64 sums.
// kInRegisters: the pattern is a single vector (P == W, e.g. K = 8 in float32 on AVX-512) and C is
// known at compile time, so every vector adds into the same 3C+1 accumulators: keep them in registers.
template <typename T, int CT, bool kInRegisters>
struct PriorSums {
  using V = Vectorized<T>;
  static_assert(!kInRegisters || CT > 0, "register sums need a compile-time C");
  int64_t C = 0, nsums = 0, stride = 0, P = 0;
  std::vector<T> block;     // [nsums][stride]
  double* chunk = nullptr;  // [nsums][P] of this chunk
  V regs[kInRegisters ? 3 * CT + 1 : 1];

  explicit PriorSums(const PriorPattern<T>& pat)
      : C(pat.C), nsums(num_prior_sums(pat.C)), stride(pat.stride), P(pat.P),
        block(nsums * stride) {}
  void begin_block() {
    if constexpr (kInRegisters) {
      for (auto& r : regs) r = V(T(0));
    } else {
      std::fill(block.begin(), block.end(), T(0));
    }
  }
  void add(int64_t q, int64_t j, const V& v) {
    if constexpr (kInRegisters) {
      regs[q] = regs[q] + v;
    } else {
      T* p = block.data() + q * stride + j;
      (V::loadu(p) + v).store(p);
    }
  }
  void end_block() {
    if constexpr (kInRegisters)
      for (int64_t q = 0; q < nsums; ++q) regs[q].store(block.data() + q * stride);
    for (int64_t q = 0; q < nsums; ++q)
      for (int64_t j = 0; j < P; ++j) chunk[q * P + j] += static_cast<double>(block[q * stride + j]);
  }
  // The accumulator gmm_score hands its per-component terms to, for the lanes at pattern offset j.
  struct Lanes {
    PriorSums& s;
    int64_t j;
    void operator()(int c, const V& r, const V& r_dprec, const V& r_lv) {
      const int64_t C = CT > 0 ? CT : s.C;
      s.add(c, j, r);
      s.add(C + c, j, r_dprec);
      s.add(2 * C + c, j, r_lv);
    }
    void add_weight(const V& g) { s.add(3 * (CT > 0 ? CT : s.C), j, g); }
  };
  Lanes at(int64_t j) { return Lanes{*this, j}; }
};

// Per-chunk partial prior sums, [num_chunks][per_chunk] float64. Left uninitialized here: each
// chunk's worker zeroes its own part when it starts the chunk (in parallel; at 40 prior groups
// these are ~6 MB).
struct ChunkSums {
  int64_t per_chunk;
  std::unique_ptr<double[]> data;
  ChunkSums(int64_t num_chunks, int64_t per_chunk_)
      : per_chunk(per_chunk_),
        data(per_chunk_ > 0 ? new double[num_chunks * per_chunk_] : nullptr) {}
  // The zeroed sums of chunk c (null without sums).
  double* begin_chunk(int64_t c) {
    if (per_chunk == 0) return nullptr;
    double* p = data.get() + c * per_chunk;
    std::fill_n(p, per_chunk, 0.0);
    return p;
  }
};

// Per-chunk sums -> [K, 3C+1] float64, combining chunks in order (deterministic).
inline void reduce_prior_sums(const double* chunks, int64_t num_chunks, int64_t nsums,
                              int64_t P, int64_t K, at::Tensor& out) {
  double* o = out.data_ptr<double>();
  std::fill(o, o + K * nsums, 0.0);
  std::vector<double> total(nsums * P, 0.0);
  for (int64_t c = 0; c < num_chunks; ++c)
    for (int64_t i = 0; i < nsums * P; ++i) total[i] += chunks[c * nsums * P + i];
  for (int64_t q = 0; q < nsums; ++q)
    for (int64_t j = 0; j < P; ++j) o[(j % K) * nsums + q] += total[q * P + j];
}

// Accumulates a vector's prior-gradient terms (the `acc` of gmm_math.h) at base[q * stride], q the
// sum's number in the layout of num_prior_sums.
template <typename T, int CT>
struct SumLanes {
  using V = Vectorized<T>;
  T* base;
  int64_t stride;
  int C;
  void add(int64_t q, const V& v) const {
    T* p = base + q * stride;
    (V::loadu(p) + v).store(p);
  }
  void operator()(int c, const V& r, const V& r_dprec, const V& r_lv) const {
    const int n = CT > 0 ? CT : C;
    add(c, r);
    add(n + c, r_dprec);
    add(2 * n + c, r_lv);
  }
  void add_weight(const V& g) const { add(3 * (CT > 0 ? CT : C), g); }
};

// Calls f.template operator()<b>().
template <typename F>
inline void dispatch_bool(bool b, const F& f) {
  if (b) f.template operator()<true>();
  else f.template operator()<false>();
}

}  // namespace CPU_CAPABILITY
}  // namespace halfvae::cpu
