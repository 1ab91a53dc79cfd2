// The prior sources of the CPU kernels (included only by ISA-compiled files): how the block loop
// of vec_loop.h reads each vector's prior values and where its prior-gradient terms go.
#pragma once
#include "vec_loop.h"

namespace halfvae::cpu {
inline namespace CPU_CAPABILITY {

// Prior sources: the kernels' block loop, written once, reads each vector's prior values and adds
// its prior-gradient terms through one of
//   PatternSource: one prior [K, C], repeated into the pattern;
//   GroupSource:   a conditional prior, one [K, C] mixture per group of rows (PriorTables::index).
// A source has P (blocks hold whole patterns, a pattern whole rows), sums_per_chunk() (doubles of
// one chunk's partial prior sums), reduce(chunks, num_chunks, out) (adds the chunks' sums,
// combined in chunk order, into the zeros of out [U*K, 3C+1]) and block<kSums>(blocking), a
// thread's scratch:
//   begin_chunk(chunk)   with kSums, before a chunk's first block: its zeroed sums;
//   begin(start, count)  before the vectors of the block [start, start + count);
//   for_each_vector(start, count, body)
//                        body(global index, j, local, lanes) for the block's vectors, as
//                        cpu::for_each_vector;
//   lanes(j, local)      the prior lanes of the vector at pattern offset j, block offset local;
//   acc(j, local)        with kSums, where that vector's prior-gradient terms go;
//   end()                with kSums, after the block's vectors;
//   end_chunk()          with kSums, after the chunk's last block.
template <typename T, int CT, bool kInRegisters>
struct PatternSource {
  PriorPattern<T> pat;
  int64_t P, C;

  explicit PatternSource(const PriorTables& t) : pat(t), P(pat.P), C(t.C) {}
  int64_t sums_per_chunk() const { return num_prior_sums(static_cast<int>(pat.C)) * P; }

  template <bool kSums>
  struct Block {
    const PriorPattern<T>& pat;
    PriorSums<T, CT, kInRegisters> sums;
    void begin_chunk(double* chunk) { sums.chunk = chunk; }
    void begin(int64_t, int64_t) {
      if constexpr (kSums) sums.begin_block();
    }
    template <typename Body>
    void for_each_vector(int64_t start, int64_t count, const Body& body) const {
      cpu::for_each_vector<T>(start, count, pat.P, body);
    }
    PriorLanes<T> lanes(int64_t j, int64_t) const { return {pat, j}; }
    auto acc(int64_t j, int64_t) { return sums.at(j); }
    void end() { sums.end_block(); }
    void end_chunk() {}
  };
  template <bool kSums>
  Block<kSums> block(const Blocking&) const {
    return Block<kSums>{pat, PriorSums<T, CT, kInRegisters>(pat)};
  }

  void reduce(const double* chunks, int64_t num_chunks, at::Tensor& out) const {
    reduce_prior_sums(chunks, num_chunks, num_prior_sums(static_cast<int>(pat.C)), P, pat.K, out);
  }
};

// How a conditional prior's vectors find their groups' tables (GroupSource).
enum GroupLayout : int {
  kVectorRows = 3,  // K == W: a vector is a row (and runs of one group's rows sum in registers)
  kRowVectors = 0,  // K % W == 0: a vector lies inside one row, it reads its group's tables
  kPackedRows = 1,  // K < W, W % K == 0: a vector holds W/K whole rows, it blends their tables
  kCopiedRows = 2,  // otherwise: a block's rows' values are copied into a buffer like its elements
};

template <typename T>
constexpr int group_layout(int64_t K) {
  constexpr int64_t W = Vectorized<T>::size();
  if (K == W) return kVectorRows;
  if (K % W == 0) return kRowVectors;
  if (K < W && W % K == 0) return kPackedRows;
  return kCopiedRows;
}

template <typename T, int CT, int kLayout, bool kSums>
struct GroupBlock;
template <typename T, int CT, bool kSums>
struct PackedBlock;

// A conditional prior. Group u's mixture for dimension k is table row u*K + k, row n's group
// index[n]. The tables are rearranged per group into [K/W][4][C][W] blocks (k rounded up to whole
// vectors; the four quantities w, m, prec, half_prec), so that the 4C vectors of W consecutive k
// lie together at offsets known at compile time. Prior sums per group likewise, [K/W][3C+1][W].
//
// kRowVectors: a vector lies inside one row and reads its group's tables directly.
// kPackedRows: lane l of a group's tables holds dimension l % K (the K values repeated W/K times),
//   so that each of a vector's rows finds its lanes' values at the same offset of its own group's
//   tables: a vector's values are W/K loads blended by lane masks (one load when its rows share a
//   group), its terms added into each row's group under that row's mask. K = 4 and 8 in float32 on
//   AVX-512 (K = 4 on AVX2): the copy path below made these 2.3-4.4x the unconditional op.
// kCopiedRows (K = 12, 20, ...): vectors span rows irregularly: each block first copies its rows'
//   values into a buffer laid out like its elements, and its terms come back through a buffer of
//   the same layout.
//
// When the tables are larger than the batch (4*U*K*C > N: 10^5 groups for a few hundred rows) only
// the groups present are kept, numbered in order of first occurrence: then the copy, the per-chunk
// sums and their reduction are O(N + U) (a U-entry map), not O(U*K*C) (the op's own [U*K, 3C+1]
// output aside).
template <typename T, int CT, int kLayout>
struct GroupSource {
  static constexpr int64_t W = Vectorized<T>::size();
  int64_t K, C, U, G = 0, P, nsums;
  int64_t KB;         // vectors per row: K / W rounded up
  int64_t group_len;  // values of a group's tables, 4 * C * KB * W
  int64_t sums_len;   // sums of a group, nsums * KB * W
  const int64_t* index;
  std::vector<int32_t> compact;  // u -> g when only the groups present are kept; empty: g = u
  std::vector<int64_t> group_u;  // g -> u when compacted
  std::vector<T> tables;         // [G][KB][4][C][W]

  GroupSource(const PriorTables& t, int64_t N)
      : K(t.K), C(t.C), U(t.U), P(pattern_length<T>(t.K)),
        nsums(num_prior_sums(static_cast<int>(t.C))), KB((t.K + W - 1) / W),
        group_len(4 * t.C * KB * W), sums_len(nsums * KB * W),
        index(t.index.data_ptr<int64_t>()) {
    TORCH_CHECK(N < (int64_t(1) << 31), "a conditional prior takes at most 2^31 - 1 rows");
    if (4 * U * K * C > N) {
      compact.assign(U, -1);
      for (int64_t n = 0; n < N; ++n) {
        int32_t& g = compact[index[n]];
        if (g < 0) {
          g = static_cast<int32_t>(G++);
          group_u.push_back(index[n]);
        }
      }
    } else {
      G = U;
    }
    // Padding lanes (k >= K, kRowVectors and kCopiedRows) hold finite values: w = m = 0, prec = 1.
    tables.resize(G * group_len);
    const T* w = t.w.data_ptr<T>();
    const T* m = t.m.data_ptr<T>();
    const T* prec = t.prec.data_ptr<T>();
    for (int64_t g = 0; g < G; ++g)
      for (int64_t kb = 0; kb < KB; ++kb) {
        T* dst = tables.data() + g * group_len + kb * 4 * C * W;
        for (int64_t c = 0; c < C; ++c)
          for (int64_t l = 0; l < W; ++l) {
            const int64_t k = kLayout == kPackedRows ? l % K : kb * W + l;
            const int64_t i = (u_of(g) * K + k) * C + c;
            dst[c * W + l] = k < K ? w[i] : T(0);
            dst[(C + c) * W + l] = k < K ? m[i] : T(0);
            dst[(2 * C + c) * W + l] = k < K ? prec[i] : T(1);
            dst[(3 * C + c) * W + l] = k < K ? T(0.5) * prec[i] : T(0.5);
          }
      }
  }
  int64_t group(int64_t row) const { return compact.empty() ? index[row] : compact[index[row]]; }
  int64_t u_of(int64_t g) const { return compact.empty() ? g : group_u[g]; }
  const T* table(int64_t g) const { return tables.data() + g * group_len; }
  int64_t sums_per_chunk() const { return G * sums_len; }

  template <bool kSums>
  auto block(const Blocking& b) const {
    if constexpr (kLayout == kPackedRows) return PackedBlock<T, CT, kSums>(*this);
    else return GroupBlock<T, CT, kLayout, kSums>(*this, b);
  }

  void reduce(const double* chunks, int64_t num_chunks, at::Tensor& out) const {
    double* o = out.data_ptr<double>();
    const int64_t n = sums_len;
    const int64_t grain =
        std::max<int64_t>(1, (int64_t(1) << 14) / std::max<int64_t>(1, num_chunks * n));
    at::parallel_for(0, G, grain, [&](int64_t g0, int64_t g1) {
      std::vector<double> total(n);
      for (int64_t g = g0; g < g1; ++g) {
        std::fill(total.begin(), total.end(), 0.0);
        for (int64_t c = 0; c < num_chunks; ++c)
          add_span(total.data(), chunks + (c * G + g) * n, n);
        double* row = o + u_of(g) * K * nsums;
        // Lane l of vector kb holds dimension kb * W + l (l % K when packed; lanes past K pad).
        for (int64_t kb = 0; kb < KB; ++kb)
          for (int64_t q = 0; q < nsums; ++q)
            for (int64_t l = 0; l < W; ++l) {
              const int64_t k = kLayout == kPackedRows ? l % K : kb * W + l;
              if (k < K) row[k * nsums + q] += total[(kb * nsums + q) * W + l];
            }
      }
    });
  }
};

// A thread's float accumulators of a conditional prior's sums, one set per group (the layout of
// GroupSource's sums), added into the chunk's float64 sums when the group has taken fold_rows rows
// since its last fold (short sums, as PriorSums' over a block) and at the end of the chunk. Folding
// at every block's end instead cost ~30% of the conditional backward at 40 groups: a block of 128
// rows touches nearly all of them, with ~3 rows each.
template <typename T>
struct GroupSums {
  int64_t len = 0;
  int64_t fold_rows = kBlockElems / Vectorized<T>::size();  // the most terms a PriorSums lane takes
  std::vector<T> sums;                   // [G][len]
  std::vector<int32_t> rows_since_fold;  // [G]
  std::vector<int32_t> touched;          // groups that took rows in this chunk (repeats allowed)
  double* chunk = nullptr;

  GroupSums() = default;
  GroupSums(int64_t G, int64_t len_) : len(len_), sums(G * len_, T(0)), rows_since_fold(G, 0) {}
  T* of(int64_t g) { return sums.data() + g * len; }
  void begin_chunk(double* c) { chunk = c; }
  // A row of group g, before its terms are added: a fold here loses none. (On the copy path the
  // terms of a block's rows are added after all of them are counted: a fold may then hold up to
  // one block's rows more than fold_rows.)
  void took_row(int64_t g) {
    int32_t& n = rows_since_fold[g];
    if (n == 0) touched.push_back(static_cast<int32_t>(g));
    if (n == fold_rows) fold(g);
    ++n;
  }
  // Whether g's next row folds it first.
  bool full(int64_t g) const { return rows_since_fold[g] == fold_rows; }
  void end_chunk() {
    for (const int32_t g : touched)
      if (rows_since_fold[g] > 0) fold(g);
    touched.clear();
  }

 private:
  void fold(int64_t g) {
    double* c = chunk + g * len;
    T* a = of(g);
    for (int64_t i = 0; i < len; ++i) c[i] += static_cast<double>(a[i]);
    std::fill_n(a, len, T(0));
    rows_since_fold[g] = 0;
  }
};

// The terms of a run of vectors whose rows are all of one group, in registers (a compile-time C):
// added into the group's accumulators once, when the group changes. Rows in time order with a
// group per segment (nonstationary ICA) come in such runs; a read-modify-write of the same
// accumulators at every vector made the conditional backward with one group ~1.5x that with 40
// random groups (AVX-512 Xeon, N*K = 2^18, K = 16).
template <typename T, int CT>
struct RunSums {
  using V = Vectorized<T>;
  static constexpr int kN = CT > 0 ? num_prior_sums(CT) : 1;
  V regs[kN];
  T* target = nullptr;  // the run's group's accumulators; null: no run
  int64_t group = -1;

  // Row of group g (with the group's accumulators at t) about to add its terms: flushes the run
  // when it is of another group, or when the group is about to fold (a fold takes every term of
  // the rows it counts).
  template <typename Sums>
  void row(int64_t g, Sums& sums) {
    if (g == group && !sums.full(g)) return;
    flush();
    group = g;
    target = sums.of(g);
    for (auto& r : regs) r = V(T(0));
  }
  void flush() {
    if (target == nullptr) return;
    for (int q = 0; q < kN; ++q) {
      T* p = target + q * V::size();
      (V::loadu(p) + regs[q]).store(p);
    }
    target = nullptr;
    group = -1;
  }
  // The accumulator interface of gmm_math.h (as SumLanes).
  struct Lanes {
    RunSums& run;
    void operator()(int c, const V& r, const V& r_dprec, const V& r_lv) const {
      run.regs[c] = run.regs[c] + r;
      run.regs[CT + c] = run.regs[CT + c] + r_dprec;
      run.regs[2 * CT + c] = run.regs[2 * CT + c] + r_lv;
    }
    void add_weight(const V& g) const { run.regs[3 * CT] = run.regs[3 * CT] + g; }
  };
};

// A thread's scratch for GroupSource, kRowVectors or kCopiedRows.
template <typename T, int CT, int kLayout, bool kSums>
struct GroupBlock {
  using V = Vectorized<T>;
  static constexpr int64_t W = V::size();
  static constexpr bool kDirect = kLayout == kRowVectors || kLayout == kVectorRows;
  static constexpr bool kRun = kSums && kLayout == kVectorRows && CT > 0;
  const GroupSource<T, CT, kLayout>& src;
  // Direct path: the tables and accumulators of the row being walked.
  const T* row_table = nullptr;
  T* row_sums = nullptr;
  // Copy path: [4][C][buf_stride], the block's prior values per element.
  int64_t buf_stride = 0;
  std::vector<T> buffer;
  GroupSums<T> sums;                // kSums
  RunSums<T, CT> run;               // kRun
  std::vector<T> terms;             // copy path: [nsums][buf_stride], each element's terms
  std::vector<int32_t> row_group;   // copy path: the group of each of the block's rows
  int64_t rows = 0;

  GroupBlock(const GroupSource<T, CT, kLayout>& s, const Blocking& b) : src(s) {
    if constexpr (!kDirect) {
      buf_stride = b.block_elems + W;
      // Lanes past the end of a partial vector read these: finite values (w = m = 0, prec = 1).
      buffer.assign(4 * s.C * buf_stride, T(0));
      std::fill(buffer.begin() + 2 * s.C * buf_stride, buffer.begin() + 3 * s.C * buf_stride, T(1));
      std::fill(buffer.begin() + 3 * s.C * buf_stride, buffer.end(), T(0.5));
      if constexpr (kSums) terms.resize(s.nsums * buf_stride);
    }
    if constexpr (kSums) {
      sums = GroupSums<T>(s.G, s.sums_len);
      if constexpr (!kDirect) row_group.resize(b.block_elems / s.K);
    }
  }

  void begin_chunk(double* c) { sums.begin_chunk(c); }

  // Copy path: the block's prior values into the buffer, a row at a time.
  void begin(int64_t start, int64_t count) {
    if constexpr (!kDirect) {
      const int64_t K = src.K, C4 = 4 * src.C, first = start / K;
      rows = count / K;  // blocks hold whole rows
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t g = src.group(first + r);
        const T* table = src.table(g);
        if constexpr (kSums) {
          row_group[r] = static_cast<int32_t>(g);
          sums.took_row(g);  // before end() adds the block's terms
        }
        for (int64_t kb = 0; kb < src.KB; ++kb) {
          const int64_t len = std::min(W, K - kb * W);
          for (int64_t i = 0; i < C4; ++i)
            copy_row(buffer.data() + i * buf_stride + r * K + kb * W, table + (kb * C4 + i) * W,
                     len);
        }
      }
      if constexpr (kSums)
        for (int64_t q = 0; q < src.nsums; ++q)
          std::fill_n(terms.data() + q * buf_stride, count, T(0));
    }
  }

  // body(global index, pattern offset, block offset, lanes) for each vector of the block, as
  // cpu::for_each_vector. The direct path walks the rows itself: a row's group is looked up once
  // for its vectors, and they are whole (n = W known at compile time). With a per-vector table of
  // pointers filled in begin() instead, the conditional forward was ~10% slower than the
  // unconditional one; now it is not.
  template <typename Body>
  void for_each_vector(int64_t start, int64_t count, const Body& body) {
    if constexpr (kDirect) {
      const int64_t K = src.K, first = start / K;
      for (int64_t r = 0, local = 0; r < count / K; ++r) {
        const int64_t g = src.group(first + r);
        row_table = src.table(g);
        if constexpr (kRun) run.row(g, sums);
        if constexpr (kSums) {
          sums.took_row(g);  // before the row's terms
          row_sums = sums.of(g);
        }
        for (int64_t j = 0; j < K; j += W, local += W) body(start + local, j, local, W);
      }
    } else {
      cpu::for_each_vector<T>(start, count, src.P, body);
    }
  }

  TableLanes<T> lanes(int64_t j, int64_t local) const {
    const int64_t C = CT > 0 ? CT : src.C;
    if constexpr (kDirect) return {row_table + j / W * 4 * C * W, W, C * W};
    else return {buffer.data() + local, buf_stride, C * buf_stride};
  }
  auto acc(int64_t j, int64_t local) {
    if constexpr (kRun) return typename RunSums<T, CT>::Lanes{run};
    else return sum_lanes(j, local);
  }
  SumLanes<T, CT> sum_lanes(int64_t j, int64_t local) {
    const int C = static_cast<int>(src.C);
    if constexpr (!kSums) return {nullptr, 0, C};
    else if constexpr (kDirect) return {row_sums + j / W * src.nsums * W, W, C};
    else return {terms.data() + local, buf_stride, C};
  }

  // Copy path: each row's terms into its group's accumulators.
  void end() {
    if constexpr (!kDirect) {
      const int64_t K = src.K;
      for (int64_t r = 0; r < rows; ++r) {
        T* a = sums.of(row_group[r]);
        for (int64_t kb = 0; kb < src.KB; ++kb)
          for (int64_t q = 0; q < src.nsums; ++q)
            add_span(a + (kb * src.nsums + q) * W, terms.data() + q * buf_stride + r * K + kb * W,
                     std::min(W, K - kb * W));
      }
    }
  }

  void end_chunk() {
    if constexpr (kRun) run.flush();
    sums.end_chunk();
  }
};

// A set of a vector's lanes: select(a, b) takes b's lanes in the set and a's elsewhere;
// add_into(p, v) adds v's lanes in the set into the vector at p. On AVX-512 an opmask (one
// instruction each: a masked blend, a masked add), elsewhere a vector of all-ones lanes (blendv;
// an and and an add).
template <typename T>
struct LaneMask {
  using V = Vectorized<T>;
  V bits;
  static LaneMask range(int64_t lo, int64_t hi) {
    using I = std::conditional_t<sizeof(T) == 4, int32_t, int64_t>;
    alignas(64) I b[V::size()];
    for (int64_t l = 0; l < V::size(); ++l) b[l] = l >= lo && l < hi ? I(-1) : I(0);
    return {V::loadu(b)};
  }
  V select(const V& a, const V& b) const { return V::blendv(a, b, bits); }
  void add_into(T* p, const V& v) const { (V::loadu(p) + (v & bits)).store(p); }
};

#if defined(CPU_CAPABILITY_AVX512)
template <>
struct LaneMask<float> {
  using V = Vectorized<float>;
  __mmask16 k;
  static LaneMask range(int64_t lo, int64_t hi) {
    return {static_cast<__mmask16>(((1u << hi) - 1) & ~((1u << lo) - 1))};
  }
  V select(const V& a, const V& b) const { return _mm512_mask_blend_ps(k, a, b); }
  void add_into(float* p, const V& v) const {
    const __m512 a = _mm512_loadu_ps(p);
    _mm512_storeu_ps(p, _mm512_mask_add_ps(a, k, a, v));
  }
};
template <>
struct LaneMask<double> {
  using V = Vectorized<double>;
  __mmask8 k;
  static LaneMask range(int64_t lo, int64_t hi) {
    return {static_cast<__mmask8>(((1u << hi) - 1) & ~((1u << lo) - 1))};
  }
  V select(const V& a, const V& b) const { return _mm512_mask_blend_pd(k, a, b); }
  void add_into(double* p, const V& v) const {
    const __m512d a = _mm512_loadu_pd(p);
    _mm512_storeu_pd(p, _mm512_mask_add_pd(a, k, a, v));
  }
};
#endif

// The prior of a packed vector's lanes (kPackedRows): the value of row r's group's table for lanes
// from r*K on, for r < R.
template <typename T>
struct PackedLanes {
  using V = Vectorized<T>;
  const T* const* tables;    // [R], each row's group's tables
  const LaneMask<T>* from;  // [R], from[r]: lanes >= r * K
  int R;
  int C;
  V value(int64_t offset) const {
    V v = V::loadu(tables[0] + offset);
    for (int r = 1; r < R; ++r) v = from[r].select(v, V::loadu(tables[r] + offset));
    return v;
  }
  V w(int c) const { return value(c * V::size()); }
  V m(int c) const { return value((C + c) * V::size()); }
  V prec(int c) const { return value((2 * C + c) * V::size()); }
  V half_prec(int c) const { return value((3 * C + c) * V::size()); }
};

// A packed vector's terms into each row's group's accumulators, under that row's lanes (one
// unmasked add when its rows share a group: the lanes past a partial vector's rows hold zero terms).
template <typename T, int CT>
struct PackedSumLanes {
  using V = Vectorized<T>;
  T* const* sums;              // [R], each row's group's accumulators
  const LaneMask<T>* row_mask;  // [R], lanes [r * K, (r + 1) * K)
  int R;
  int C;
  RunSums<T, CT>* run;  // with a compile-time C: where a vector of one group adds its terms
  void add(int64_t q, const V& v) const {
    const int64_t o = q * V::size();
    if (R == 1) {
      if constexpr (CT > 0) run->regs[q] = run->regs[q] + v;
      else (V::loadu(sums[0] + o) + v).store(sums[0] + o);
      return;
    }
    for (int r = 0; r < R; ++r) row_mask[r].add_into(sums[r] + o, v);
  }
  void operator()(int c, const V& r, const V& r_dprec, const V& r_lv) const {
    const int n = CT > 0 ? CT : C;
    add(c, r);
    add(n + c, r_dprec);
    add(2 * n + c, r_lv);
  }
  void add_weight(const V& g) const { add(3 * (CT > 0 ? CT : C), g); }
};

// A thread's scratch for GroupSource, kPackedRows: the vector being walked, its rows' tables and
// accumulators (R = W/K rows; fewer when its rows share a group or the vector is partial).
template <typename T, int CT, bool kSums>
struct PackedBlock {
  using V = Vectorized<T>;
  static constexpr int64_t W = V::size();
  const GroupSource<T, CT, kPackedRows>& src;
  LaneMask<T> from[W], row_mask[W];
  const T* tables[W];
  T* row_sums[W];
  int R = 1;
  GroupSums<T> sums;   // kSums
  RunSums<T, CT> run;  // kSums, CT > 0: the terms of a run of vectors of one group

  explicit PackedBlock(const GroupSource<T, CT, kPackedRows>& s) : src(s) {
    const int64_t K = s.K;
    for (int64_t r = 0; r < W / K; ++r) {
      from[r] = LaneMask<T>::range(r * K, W);
      row_mask[r] = LaneMask<T>::range(r * K, (r + 1) * K);
    }
    if constexpr (kSums) sums = GroupSums<T>(s.G, s.sums_len);
  }

  void begin_chunk(double* c) { sums.begin_chunk(c); }
  void begin(int64_t, int64_t) {}

  template <typename Body>
  void for_each_vector(int64_t start, int64_t count, const Body& body) {
    const int64_t K = src.K;
    for (int64_t local = 0; local < count; local += W) {
      const int64_t n = std::min(W, count - local);
      const int64_t first = (start + local) / K, rows = n / K;  // blocks hold whole rows
      const int64_t g0 = src.group(first);
      bool shared = true;
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t g = r == 0 ? g0 : src.group(first + r);
        shared = shared && g == g0;
        tables[r] = src.table(g);
      }
      R = shared ? 1 : static_cast<int>(rows);
      if constexpr (kSums) {
        if constexpr (CT > 0) {
          if (shared) run.row(g0, sums);
          else run.flush();
        }
        for (int64_t r = 0; r < rows; ++r) {
          const int64_t g = src.group(first + r);
          if constexpr (CT > 0) {  // a fold of the run's group takes its pending terms first
            if (shared && r > 0 && sums.full(g)) run.row(g, sums);
          }
          sums.took_row(g);  // before the row's terms
          row_sums[r] = sums.of(g);
        }
      }
      body(start + local, 0, local, n);
    }
  }

  PackedLanes<T> lanes(int64_t, int64_t) const {
    return {tables, from, R, static_cast<int>(CT > 0 ? CT : src.C)};
  }
  PackedSumLanes<T, CT> acc(int64_t, int64_t) {
    return {row_sums, row_mask, R, static_cast<int>(src.C), &run};
  }
  void end() {}
  void end_chunk() {
    if constexpr (kSums) {
      run.flush();
      sums.end_chunk();
    }
  }
};

// Calls f(source) with the source of prior t (N rows): the group tables of a conditional prior, or
// the pattern of one [K, C] prior (with kSums, a one-vector pattern and a compile-time C: sums in
// registers, see PriorSums).
template <typename T, int CT, bool kSums, typename F>
inline void with_prior_source(const PriorTables& t, int64_t N, const F& f) {
  if (t.conditional()) {
    switch (group_layout<T>(t.K)) {
      case kVectorRows: return f(GroupSource<T, CT, kVectorRows>(t, N));
      case kRowVectors: return f(GroupSource<T, CT, kRowVectors>(t, N));
      case kPackedRows: return f(GroupSource<T, CT, kPackedRows>(t, N));
      default: return f(GroupSource<T, CT, kCopiedRows>(t, N));
    }
  }
  if constexpr (kSums && CT > 0) {
    if (pattern_length<T>(t.K) == Vectorized<T>::size()) return f(PatternSource<T, CT, true>(t));
  }
  f(PatternSource<T, CT, false>(t));
}

}  // namespace CPU_CAPABILITY
}  // namespace halfvae::cpu
