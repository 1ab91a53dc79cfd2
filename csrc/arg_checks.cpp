#include "arg_checks.h"

#include <ATen/ATen.h>

#include "halfvae/gmm_math.h"
#include "kernel_table.h"
#include "prior_tables.h"

namespace halfvae {

std::string dtype_name(at::ScalarType dtype) {
  switch (dtype) {
    case at::kFloat: return "torch.float32";
    case at::kDouble: return "torch.float64";
    case at::kHalf: return "torch.float16";
    case at::kBFloat16: return "torch.bfloat16";
    case at::kLong: return "torch.int64";
    case at::kInt: return "torch.int32";
    case at::kShort: return "torch.int16";
    case at::kChar: return "torch.int8";
    case at::kByte: return "torch.uint8";
    case at::kBool: return "torch.bool";
    default: return c10::toString(dtype);
  }
}

namespace {
void check_floating(const at::Tensor& t, const char* name) {
  TORCH_CHECK_TYPE(at::isFloatingType(t.scalar_type()), name,
                   " must be a floating-point tensor, got dtype ", dtype_name(t.scalar_type()));
}
}  // namespace

void check_prior(const at::Tensor& logits, const at::Tensor& means, const at::Tensor& logvars) {
  using Named = std::pair<const at::Tensor*, const char*>;
  for (const auto& [t, name] : {Named{&logits, "prior_logits"}, Named{&means, "prior_means"},
                                Named{&logvars, "prior_logvars"}}) {
    check_floating(*t, name);
    TORCH_CHECK_VALUE(t->dim() == 2 || t->dim() == 3, name,
                      " must have shape [K, C] (one prior) or [U, K, C] (one per group, chosen "
                      "by prior_index), got ", t->sizes());
  }
  for (const auto& [t, name] : {Named{&means, "prior_means"}, Named{&logvars, "prior_logvars"}})
    TORCH_CHECK_VALUE(t->sizes() == logits.sizes(), name, " must have the shape of prior_logits ",
                      logits.sizes(), " (the prior tensors have one shape), got ",
                      t->sizes());
  const int64_t C = logits.size(-1);
  TORCH_CHECK_VALUE(C >= 1 && C <= kMaxComponents,
                    "prior_logits: the number of components C must be in [1, ", kMaxComponents,
                    "], got ", C);
}

void check_latent(const at::Tensor& t, const char* name, const at::Tensor& prior_logits) {
  check_floating(t, name);
  TORCH_CHECK_VALUE(t.dim() == 2, name, " must have shape [N, K], got ", t.sizes());
  TORCH_CHECK_VALUE(t.size(1) == prior_logits.size(-2), name, " has K = ", t.size(1),
                    " latent dimensions but the prior has K = ", prior_logits.size(-2));
}

void check_prior_index(const c10::optional<at::Tensor>& prior_index, int64_t N,
                       const at::Tensor& prior_logits, const at::Tensor& like) {
  if (prior_logits.dim() == 2) {
    TORCH_CHECK_VALUE(!prior_index.has_value(),
                      "prior_index chooses among groups of priors: it needs prior tables of shape "
                      "[U, K, C], got prior_logits of shape ", prior_logits.sizes());
    return;
  }
  TORCH_CHECK_VALUE(prior_index.has_value(), "prior tables of shape [U, K, C] (got ",
                    prior_logits.sizes(), ") need prior_index, the group of every row");
  const at::Tensor& pi = *prior_index;
  const bool int_type = pi.scalar_type() == at::kLong || pi.scalar_type() == at::kInt;
  TORCH_CHECK_TYPE(int_type, "prior_index must be an int64 or int32 tensor, got dtype ",
                   dtype_name(pi.scalar_type()));
  TORCH_CHECK_VALUE(pi.dim() == 1 && pi.size(0) == N,
                    "prior_index must have shape [N] = [", N, "] (one group per row), got ",
                    pi.sizes());
  TORCH_CHECK_VALUE(pi.device() == like.device(), "prior_index is on ", pi.device(),
                    " but the rows it indexes are on ", like.device());
  const int64_t U = prior_logits.size(0);
  TORCH_CHECK_VALUE(U >= 1, "prior_logits must have at least one group, got shape ",
                    prior_logits.sizes());
}

void check_kl_kind(int64_t kl_kind) {
  TORCH_CHECK_VALUE(kl_kind == kKlMonteCarlo || kl_kind == kKlBound,
                    "kl code must be 0 (Monte-Carlo) or 1 (bound), got ", kl_kind);
}

void check_same(const at::Tensor& t, const char* name, const at::Tensor& ref,
                const char* ref_name) {
  TORCH_CHECK_VALUE(t.device() == ref.device(), name, " is on ", t.device(), " but ", ref_name,
                    " is on ", ref.device(), "; all tensors must be on one device");
  TORCH_CHECK_TYPE(t.scalar_type() == ref.scalar_type(), name, " has dtype ",
                   dtype_name(t.scalar_type()), " but ", ref_name, " has dtype ",
                   dtype_name(ref.scalar_type()), "; all tensors must have one dtype");
}

void check_seed(const at::Tensor& seed, const at::Tensor& like) {
  constexpr const char* kWhat =
      "seed must be an int64 tensor of 2 elements (seed, offset), as drawn by "
      "halfvae_ext.ops.draw_seed; got ";
  TORCH_CHECK_TYPE(seed.scalar_type() == at::kLong, kWhat, "dtype ",
                   dtype_name(seed.scalar_type()));
  TORCH_CHECK_VALUE(seed.numel() == 2, kWhat, seed.numel(), " elements");
  TORCH_CHECK_VALUE(seed.device() == like.device(), "seed is on ", seed.device(),
                    " but the tensors it draws for are on ", like.device());
}

void check_kernel_dtype(const Kernels& kernels, at::ScalarType dtype, const char* what) {
  const bool full = dtype == at::kFloat || dtype == at::kDouble;
  const bool half = dtype == at::kHalf || dtype == at::kBFloat16;
  TORCH_CHECK_TYPE(full || (half && kernels.half_types), what, " ", dtype_name(dtype),
                   ", which the ", kernels.name, " kernels do not support (float32, float64",
                   kernels.half_types ? ", float16, bfloat16)"
                                      : "); float16 and bfloat16 run on CUDA");
}

void check_idx(const at::Tensor& idx, const at::Tensor& table) {
  const bool int_type = idx.scalar_type() == at::kLong || idx.scalar_type() == at::kInt;
  TORCH_CHECK_VALUE(idx.dim() == 1 && int_type,
                    "idx must be a 1-D int64 or int32 tensor of row indices, got dtype ",
                    dtype_name(idx.scalar_type()), " and shape ", idx.sizes());
  TORCH_CHECK_VALUE(idx.device() == table.device(), "idx is on ", idx.device(), " but mu is on ",
                    table.device());
}

namespace {
// min and max of a CPU integer tensor's values, in one loop (no ATen ops: aminmax, reshape, to
// and cat cost ~10 us on a small batch).
template <typename I>
std::pair<int64_t, int64_t> cpu_bounds(const at::Tensor& t) {
  const auto c = t.is_contiguous() ? t : t.contiguous();
  const I* v = c.data_ptr<I>();
  I lo = v[0], hi = v[0];
  for (int64_t i = 1, n = c.numel(); i < n; ++i) {
    lo = std::min(lo, v[i]);
    hi = std::max(hi, v[i]);
  }
  return {static_cast<int64_t>(lo), static_cast<int64_t>(hi)};
}
}  // namespace

void check_index_ranges(std::initializer_list<IndexRange> ranges) {
  bool all_cpu = true;
  for (const auto& r : ranges)
    if (r.values != nullptr && r.values->numel() > 0)
      all_cpu = all_cpu && r.values->device().is_cpu() &&
                (r.values->scalar_type() == at::kLong || r.values->scalar_type() == at::kInt);
  if (all_cpu) {
    for (const auto& r : ranges) {
      if (r.values == nullptr || r.values->numel() == 0) continue;
      const auto [lo, hi] = r.values->scalar_type() == at::kLong ? cpu_bounds<int64_t>(*r.values)
                                                                  : cpu_bounds<int32_t>(*r.values);
      TORCH_CHECK_INDEX(lo >= 0 && hi < r.limit, r.name, " values must be in [0, ", r.limit, ")",
                        r.what, ", got min ", lo, " and max ", hi);
    }
    return;
  }
  std::vector<at::Tensor> bounds;
  for (const auto& r : ranges) {
    if (r.values == nullptr || r.values->numel() == 0) continue;
    const auto [lo, hi] = at::aminmax(*r.values);
    bounds.push_back(lo.reshape({1}).to(at::kLong));
    bounds.push_back(hi.reshape({1}).to(at::kLong));
  }
  if (bounds.empty()) return;
  // One copy to the host for all of them: on CUDA, one synchronization.
  const auto host = at::cat(bounds).cpu();
  const int64_t* v = host.data_ptr<int64_t>();
  for (const auto& r : ranges) {
    if (r.values == nullptr || r.values->numel() == 0) continue;
    const int64_t lo = v[0], hi = v[1];
    v += 2;
    TORCH_CHECK_INDEX(lo >= 0 && hi < r.limit, r.name, " values must be in [0, ", r.limit, ")",
                      r.what, ", got min ", lo, " and max ", hi);
  }
}

void check_idx_range(const at::Tensor& idx, int64_t rows) {
  check_index_ranges({{&idx, rows, "idx", ""}});
}

}  // namespace halfvae
