// Argument checks shared by the ops: the only place they are checked (the Python functions only
// check what the ops cannot see). Through torch.ops they raise ValueError (shapes, devices,
// values), TypeError (dtypes) and IndexError (indices), each naming the argument.
#pragma once
#include <ATen/core/Tensor.h>

#include <initializer_list>
#include <string>

namespace halfvae {

struct Kernels;

// "torch.float32" and so on: the name Python users know.
std::string dtype_name(at::ScalarType dtype);

// prior_logits, prior_means, prior_logvars: floating point, one shape [K, C] or [U, K, C],
// 1 <= C <= 64.
void check_prior(const at::Tensor& logits, const at::Tensor& means, const at::Tensor& logvars);
// t: a floating-point [N, K] tensor with the prior's K.
void check_latent(const at::Tensor& t, const char* name, const at::Tensor& prior_logits);
// prior_index: given exactly when the prior tables are [U, K, C]; then a 1-D int64/int32 [N]
// tensor on the device of `like`. Its values are checked by check_index_ranges (limit U).
void check_prior_index(const c10::optional<at::Tensor>& prior_index, int64_t N,
                       const at::Tensor& prior_logits, const at::Tensor& like);
// kl_kind: kKlMonteCarlo or kKlBound.
void check_kl_kind(int64_t kl_kind);
// t has the dtype and the device of ref.
void check_same(const at::Tensor& t, const char* name, const at::Tensor& ref, const char* ref_name);
// seed: int64[2] (seed, offset) on the device of `like`.
void check_seed(const at::Tensor& seed, const at::Tensor& like);
// The kernels compute in `dtype`; what: "mu has dtype", "dtype is", ...
void check_kernel_dtype(const Kernels& kernels, at::ScalarType dtype, const char* what);
// idx: 1-D int64 or int32 row indices on the device of `table`.
void check_idx(const at::Tensor& idx, const at::Tensor& table);
// Index tensors whose values must lie in [0, limit): a bad index would read (or, in the
// optimizer, write) outside a table. All of them cost one reduction each and one copy to the
// host, which on CUDA is a synchronization: the ops check once per call, and the backward ops
// skip it when autograd tells them the forward checked the same (saved, unmodified) tensors.
struct IndexRange {
  const at::Tensor* values;  // nullptr or empty: nothing to check
  int64_t limit;
  const char* name;  // "idx", "prior_index"
  const char* what;  // after the range in the message: " (the number of prior groups)"
};
void check_index_ranges(std::initializer_list<IndexRange> ranges);
void check_idx_range(const at::Tensor& idx, int64_t rows);

}  // namespace halfvae
