// Argument checks shared by the ops: the only place they are checked (the Python functions only
// check what the ops cannot see). Through torch.ops they raise ValueError (shapes, devices,
// values), TypeError (dtypes) and IndexError (indices), each naming the argument.
#pragma once
#include <ATen/core/Tensor.h>

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
// tensor on the device of `like` with values in [0, U) (one reduction; on CUDA one sync).
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
// All values of idx (int64, contiguous) in [0, rows): one reduction, and on CUDA one
// synchronization, which keeps a bad index from reading (or, in the optimizer, writing) outside a
// table.
void check_idx_range(const at::Tensor& idx, int64_t rows);

}  // namespace halfvae
