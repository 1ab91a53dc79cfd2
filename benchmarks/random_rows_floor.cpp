// The memory floor of a fused table step on this machine, without PyTorch: per step, 4096 random
// rows, each one 64-byte table line (mu|logvar, K = 8 float32) updated and its two 64-byte lines
// of Adam state read and written (the bytes LatentTable(fused_optimizer="adam") moves per row),
// with the least arithmetic. Compares prefetch patterns.
//
//   g++ -O2 -march=native -o /tmp/random_rows_floor benchmarks/random_rows_floor.cpp
//   /tmp/random_rows_floor 2 2000 19000   # MiB of table + state: ~1e4, 1e7 and 1e8 rows
//
// The increase from the smallest size to a large one is what any step touching these bytes pays
// at that table size (one thread): the floor under the fused step's growth with N.
//
// The last two columns read one line per row (a forward's gather of a row's table values, the
// kernels' prefetch pattern), and the cost of reading the same rows a second time right after:
// their lines are in L2 then (4096 x 64 bytes), so what the second pass pays over a small table
// is address translation (TLB misses: 2 MiB pages cover 6400 x 2 MiB at 1e8 compact rows).
#include <sys/mman.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>

namespace {

constexpr int kBatch = 4096, kSteps = 100, kRepeats = 5;
constexpr size_t kRowBytes = 64, kStateBytes = 128;

struct Tables {
  char* table;
  char* state;
  void update(size_t r) const {  // one Adam-like step on a row: 3 lines read and written
    auto* w = reinterpret_cast<float*>(table + r * kRowBytes);
    auto* m = reinterpret_cast<float*>(state + r * kStateBytes);
    for (int k = 0; k < 16; ++k) {
      m[k] = 0.9f * m[k] + 0.1f;
      m[16 + k] = 0.999f * m[16 + k] + 0.001f;
      w[k] -= 1e-3f * m[k];
    }
  }
  // Always inlined: a function made only of prefetches is "const" to GCC, which deletes its calls.
  __attribute__((always_inline)) void prefetch(size_t r) const {
    __builtin_prefetch(table + r * kRowBytes, 1, 3);
    __builtin_prefetch(state + r * kStateBytes, 1, 3);
    __builtin_prefetch(state + r * kStateBytes + 64, 1, 3);
  }
};

template <typename Step>
double best_us(const std::vector<size_t>& idx, const Step& step) {
  double best = 1e30;
  for (int rep = 0; rep < kRepeats; ++rep) {
    const auto t0 = std::chrono::steady_clock::now();
    for (int s = 0; s < kSteps; ++s) step(idx.data() + size_t(s) * kBatch);
    const double us =
        std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count();
    best = std::min(best, us / kSteps);
  }
  return best;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) {
    std::fprintf(stderr, "usage: %s MiB [MiB ...]  (table + Adam state sizes)\n", argv[0]);
    return 2;
  }
  std::printf("%10s %12s %12s %16s %14s %12s %12s\n", "MiB", "rows", "no prefetch",
              "next block (128)", "stream (32)", "read 1 line", "again");
  for (int a = 1; a < argc; ++a) {
    const size_t bytes = size_t(std::strtoull(argv[a], nullptr, 10)) << 20;
    const size_t rows = bytes / (kRowBytes + kStateBytes);
    char* p = static_cast<char*>(std::aligned_alloc(size_t(2) << 20, (bytes + (2 << 20) - 1) &
                                                                         ~size_t((2 << 20) - 1)));
    if (p == nullptr || rows == 0) {
      std::fprintf(stderr, "cannot allocate %s MiB\n", argv[a]);
      return 1;
    }
    madvise(p, bytes, MADV_HUGEPAGE);  // as LatentTable's tables (table_memory.py)
    std::memset(p, 0, bytes);
    const Tables t{p, p + rows * kRowBytes};
    std::mt19937_64 rng(1);
    std::vector<size_t> idx(size_t(kBatch) * kSteps);
    for (auto& x : idx) x = rng() % rows;

    const double none = best_us(idx, [&](const size_t* ix) {
      for (int b = 0; b < kBatch; ++b) t.update(ix[b]);
    });
    // The CPU kernels' pattern: at the start of each block of 128 rows, prefetch the next block.
    const double block = best_us(idx, [&](const size_t* ix) {
      for (int b0 = 0; b0 < kBatch; b0 += 128) {
        for (int b = b0 + 128; b < std::min(kBatch, b0 + 256); ++b) t.prefetch(ix[b]);
        for (int b = b0; b < b0 + 128; ++b) t.update(ix[b]);
      }
    });
    const double stream = best_us(idx, [&](const size_t* ix) {
      for (int b = 0; b < kBatch; ++b) {
        if (b + 32 < kBatch) t.prefetch(ix[b + 32]);
        t.update(ix[b]);
      }
    });
    volatile float sink = 0;
    const auto read_rows = [&](const size_t* ix, int passes) {
      float acc = 0;
      for (int pass = 0; pass < passes; ++pass)
        for (int b0 = 0; b0 < kBatch; b0 += 128) {
          for (int b = b0 + 128; b < std::min(kBatch, b0 + 256); ++b)
            __builtin_prefetch(t.table + ix[b] * kRowBytes, 0, 3);
          for (int b = b0; b < b0 + 128; ++b)
            acc += *reinterpret_cast<const float*>(t.table + ix[b] * kRowBytes);
        }
      sink = acc;
    };
    const double once = best_us(idx, [&](const size_t* ix) { read_rows(ix, 1); });
    const double twice = best_us(idx, [&](const size_t* ix) { read_rows(ix, 2); });
    std::printf("%10s %12zu %9.1f us %13.1f us %11.1f us %9.1f us %9.1f us\n", argv[a], rows,
                none, block, stream, once, twice - once);
    std::free(p);
  }
  return 0;
}
