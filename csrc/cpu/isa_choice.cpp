// Which CPU kernel table the ops use: the best instruction set that both torch
// (ATEN_CPU_CAPABILITY) and the CPU itself allow.
#include <ATen/Version.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cctype>
#include <cstdlib>
#include <string>
#include <string_view>
#include <vector>

#include "../kernel_table.h"

namespace halfvae::cpu {
namespace {

// A compiled kernel variant and the instruction-set features it was compiled for: CMakeLists.txt
// passes each variant's list (its -m<feature> flags) as HALFVAE_FEATURES_<ISA>. Ordered from the
// baseline up.
struct Variant {
  const char* isa;
  const char* features;  // comma-separated
  KernelSet table;
};
#ifndef HALFVAE_HAVE_DEFAULT
#error "the DEFAULT CPU kernels are always built: they are what every CPU can run"
#endif
constexpr Variant kVariants[] = {
    {"DEFAULT", HALFVAE_FEATURES_DEFAULT, KernelSet::cpu_DEFAULT},
#ifdef HALFVAE_HAVE_AVX2
    {"AVX2", HALFVAE_FEATURES_AVX2, KernelSet::cpu_AVX2},
#endif
#ifdef HALFVAE_HAVE_AVX512
    {"AVX512", HALFVAE_FEATURES_AVX512, KernelSet::cpu_AVX512},
#endif
};

// Features the query below knows. A variant that needs any other feature is never chosen.
constexpr const char* kKnownFeatures[] = {"avx2",     "fma",      "f16c",    "avx512f",
                                          "avx512bw", "avx512vl", "avx512dq"};

bool known_feature(std::string_view f) {
  return std::find(std::begin(kKnownFeatures), std::end(kKnownFeatures), f) !=
         std::end(kKnownFeatures);
}

// What the CPU reports. GCC's and Clang's __builtin_cpu_supports also require the OS to save the
// registers (XGETBV): a CPU with AVX-512 under an OS that does not enable it reports no avx512f.
bool cpu_reports(std::string_view f) {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();
  if (f == "avx2") return __builtin_cpu_supports("avx2");
  if (f == "fma") return __builtin_cpu_supports("fma");
  if (f == "f16c") return __builtin_cpu_supports("f16c");
  if (f == "avx512f") return __builtin_cpu_supports("avx512f");
  if (f == "avx512bw") return __builtin_cpu_supports("avx512bw");
  if (f == "avx512vl") return __builtin_cpu_supports("avx512vl");
  if (f == "avx512dq") return __builtin_cpu_supports("avx512dq");
#endif
  (void)f;
  return false;
}

std::vector<std::string> split_list(const char* list) {
  std::vector<std::string> items;
  std::string item;
  for (const char* c = list; c != nullptr; ++c) {
    if (*c == ',' || *c == '\0') {
      if (!item.empty()) items.push_back(item);
      item.clear();
      if (*c == '\0') break;
    } else if (!std::isspace(static_cast<unsigned char>(*c))) {
      item.push_back(static_cast<char>(std::tolower(static_cast<unsigned char>(*c))));
    }
  }
  return items;
}

// Test hook: HALFVAE_CPU_HIDE_FEATURES=avx512f,avx2 makes the features listed look absent, so that
// the choice of a lesser variant can be tested on a CPU that has them.
std::vector<std::string> hidden_features() {
  std::vector<std::string> hidden = split_list(std::getenv("HALFVAE_CPU_HIDE_FEATURES"));
  for (const auto& f : hidden) {
    std::string known;
    for (const char* k : kKnownFeatures) known += std::string(known.empty() ? "" : ", ") + k;
    TORCH_CHECK_VALUE(known_feature(f), "HALFVAE_CPU_HIDE_FEATURES: unknown feature '", f,
                      "' (known: ", known, ")");
  }
  return hidden;
}

std::vector<std::string> missing_features(const Variant& v,
                                          const std::vector<std::string>& hidden) {
  std::vector<std::string> missing;
  for (const auto& f : split_list(v.features)) {
    const bool is_hidden = std::find(hidden.begin(), hidden.end(), f) != hidden.end();
    if (is_hidden || !known_feature(f) || !cpu_reports(f)) missing.push_back(f);
  }
  return missing;
}

// Rank of an instruction set name ("DEFAULT" < "AVX2" < "AVX512"); torch's other names (VSX,
// ZVECTOR, ...) rank as DEFAULT, the only variant built there.
int isa_rank(const std::string& isa) {
  if (isa.rfind("AVX512", 0) == 0) return 2;
  if (isa.rfind("AVX2", 0) == 0) return 1;
  return 0;
}

}  // namespace

const Kernels& kernels() {
  // torch's capability honours ATEN_CPU_CAPABILITY without asking the CPU; the CPU's features
  // bound it, so ATEN_CPU_CAPABILITY can narrow the choice but never widen it past the hardware.
  static const Kernels& chosen = []() -> const Kernels& {
    const int torch_rank = isa_rank(at::get_cpu_capability());
    const auto hidden = hidden_features();
    for (auto v = std::rbegin(kVariants); v != std::rend(kVariants); ++v)
      if (isa_rank(v->isa) <= torch_rank && missing_features(*v, hidden).empty())
        return kernel_table(v->table);
    return kernel_table(KernelSet::cpu_DEFAULT);
  }();
  return chosen;
}

std::vector<std::pair<std::string, std::vector<std::string>>> kernel_variants() {
  const auto hidden = hidden_features();
  std::vector<std::pair<std::string, std::vector<std::string>>> out;
  for (const auto& v : kVariants)
    out.emplace_back(std::string("cpu-") + v.isa, missing_features(v, hidden));
  return out;
}

}  // namespace halfvae::cpu
