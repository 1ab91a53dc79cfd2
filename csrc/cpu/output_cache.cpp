#include "output_cache.h"

#include <ATen/ATen.h>
#include <ATen/EmptyTensor.h>
#include <c10/core/Allocator.h>
#include <sys/mman.h>

#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>

namespace halfvae::cpu {
namespace {

constexpr size_t kMinCachedBytes = size_t(1) << 22;  // smaller tensors: glibc reuses them fine
constexpr size_t kAlignment = size_t(2) << 20;       // huge-page size

size_t default_limit() {
  const char* env = std::getenv("HALFVAE_CPU_OUTPUT_CACHE_MB");
  if (env != nullptr && *env != '\0') return static_cast<size_t>(std::strtoull(env, nullptr, 10)) << 20;
  return size_t(2048) << 20;
}

class OutputCache final : public c10::Allocator {
 public:
  c10::DataPtr allocate(size_t n) override {
    const size_t size = round_up(std::max<size_t>(n, 1));
    void* p = take(size);
    if (p == nullptr) {
      p = std::aligned_alloc(kAlignment, size);
      if (p == nullptr) TORCH_CHECK_NOT_IMPLEMENTED(false, "out of memory allocating ", size, " bytes");
#ifdef MADV_HUGEPAGE
      madvise(p, size, MADV_HUGEPAGE);
#endif
    }
    report(p, static_cast<int64_t>(size));
    return {p, new Block{size, p}, &OutputCache::release, c10::Device(c10::DeviceType::CPU)};
  }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    std::memcpy(dest, src, count);
  }

  OutputCacheInfo info() {
    std::lock_guard<std::mutex> lock(mutex_);
    return {limit_, cached_, in_use_, hits_, misses_};
  }

  void set_limit(size_t bytes) {
    std::lock_guard<std::mutex> lock(mutex_);
    limit_ = bytes;
    trim_locked();
  }

 private:
  struct Block {
    size_t size;
    void* ptr;
  };

  static size_t round_up(size_t n) { return (n + kAlignment - 1) / kAlignment * kAlignment; }

  void* take(size_t size) {
    std::lock_guard<std::mutex> lock(mutex_);
    in_use_ += size;
    auto it = free_.find(size);
    if (it == free_.end()) {
      ++misses_;
      return nullptr;
    }
    ++hits_;
    void* p = it->second;
    free_.erase(it);
    cached_ -= size;
    return p;
  }

  void give_back(Block* b) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      in_use_ -= b->size;
      if (cached_ + b->size <= limit_) {
        free_.emplace(b->size, b->ptr);
        cached_ += b->size;
        b->ptr = nullptr;
      }
    }
    if (b->ptr != nullptr) std::free(b->ptr);
  }

  void trim_locked() {
    while (cached_ > limit_ && !free_.empty()) {
      auto it = std::prev(free_.end());  // largest first
      cached_ -= it->first;
      std::free(it->second);
      free_.erase(it);
    }
  }

  void report(void* p, int64_t delta) {
    size_t in_use, cached;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      in_use = in_use_;
      cached = cached_;
    }
    c10::reportMemoryUsageToProfiler(p, delta, in_use, in_use + cached,
                                     c10::Device(c10::DeviceType::CPU));
  }

  static void release(void* ctx) {
    auto* b = static_cast<Block*>(ctx);
    void* p = b->ptr;
    instance().report(p, -static_cast<int64_t>(b->size));
    instance().give_back(b);
    delete b;
  }

 public:
  static OutputCache& instance() {
    static auto* cache = new OutputCache();  // leaked: tensors may die during static destruction
    return *cache;
  }

 private:
  std::mutex mutex_;
  std::multimap<size_t, void*> free_;
  size_t limit_ = default_limit();
  size_t cached_ = 0, in_use_ = 0, hits_ = 0, misses_ = 0;
};

}  // namespace

at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  int64_t numel = 1;
  for (auto s : sizes) numel *= s;
  const size_t bytes = static_cast<size_t>(numel) * c10::elementSize(options.dtype().toScalarType());
  auto& cache = OutputCache::instance();
  if (bytes < kMinCachedBytes || bytes > cache.info().limit_bytes) return at::empty(sizes, options);
  return at::Tensor(at::detail::empty_generic(sizes, &cache, c10::DispatchKeySet(c10::DispatchKey::CPU),
                                      options.dtype().toScalarType(), c10::nullopt));
}

OutputCacheInfo output_cache_info() { return OutputCache::instance().info(); }
void set_output_cache_limit(size_t bytes) { OutputCache::instance().set_limit(bytes); }

}  // namespace halfvae::cpu
