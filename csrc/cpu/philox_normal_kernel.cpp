// CPU kernel of philox_normal: the eps stream of reparam_gmm_kl, written out (compiled once per ISA).
#include <ATen/Dispatch.h>

#include "../kernel_table.h"
#include "vec_loop.h"

namespace halfvae::cpu {
inline namespace CPU_CAPABILITY {

void philox_normal(const at::Tensor& seed_tensor, at::Tensor& out) {
  const PhiloxSeed seed = read_seed(seed_tensor);
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "philox_normal_cpu", [&] {
    using T = scalar_t;
    const Blocking blocking(out.numel(), 1, 0);
    T* o = out.data_ptr<T>();
    const auto make_scratch = [&] {
      return std::pair{NormalFiller<T>{}, std::vector<T>(normal_buffer_size<T>(blocking.block_elems))};
    };
    blocking.for_each_chunk(make_scratch, [&](auto& scratch, int64_t, int64_t b0, int64_t b1) {
      auto& [filler, buf] = scratch;
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t start = blocking.block_start(b), count = blocking.block_count(b);
        filler.fill(seed, start, count, buf.data());
        std::copy_n(buf.data(), count, o + start);
      }
    });
  });
}

HALFVAE_REGISTER_CPU_KERNEL(philox_normal, &philox_normal);

}  // namespace CPU_CAPABILITY
}  // namespace halfvae::cpu
