// CPU registration: the op wrappers with the kernel table of the best instruction set.
#include <ATen/ATen.h>
#include <ATen/Version.h>
#include <torch/library.h>

#include "../op_wrappers.h"

namespace halfvae::cpu {

const Kernels& kernels() {
  static const Kernels& chosen = []() -> const Kernels& {
    // torch's own choice, which honours ATEN_CPU_CAPABILITY.
    const std::string cap = at::get_cpu_capability();
#ifdef HALFVAE_HAVE_AVX512
    if (cap.rfind("AVX512", 0) == 0) return kernels_AVX512();
#endif
#ifdef HALFVAE_HAVE_AVX2
    if (cap.rfind("AVX2", 0) == 0 || cap.rfind("AVX512", 0) == 0) return kernels_AVX2();
#endif
    return kernels_DEFAULT();
  }();
  return chosen;
}

PhiloxSeed read_seed(const at::Tensor& seed) {
  const auto s = seed.to(at::kCPU).contiguous();
  const int64_t* v = s.data_ptr<int64_t>();
  return PhiloxSeed{static_cast<uint64_t>(v[0]), static_cast<uint64_t>(v[1])};
}

}  // namespace halfvae::cpu

HALFVAE_REGISTER_OPS(CPU, halfvae::cpu::kernels)
