// CPU kernel of latent_rows_update_: each touched row's gradient summed in batch order, then one
// Adam or SGD step on that row (compiled once per ISA; the loop is simple enough to leave to the
// compiler).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <vector>

#include "halfvae/row_optimizer.h"
#include "isa_kernels.h"

namespace halfvae::cpu {
inline namespace CPU_CAPABILITY {

void latent_rows_update(const RowUpdate& u) {
  AT_DISPATCH_FLOATING_TYPES(u.table.scalar_type(), "latent_rows_update_cpu", [&] {
    using T = scalar_t;
    const int64_t K = u.table.size(1);
    const int64_t U = u.unique_rows.numel();
    const int64_t* rows = u.unique_rows.data_ptr<int64_t>();
    const int64_t* off = u.offsets.data_ptr<int64_t>();
    const T* g = u.grad_sorted.data_ptr<T>();
    T* w = u.table.data_ptr<T>();
    const bool adam = u.optimizer == RowOptimizer::kAdam;
    T* m = adam ? u.exp_avg.data_ptr<T>() : nullptr;
    T* v = adam ? u.exp_avg_sq.data_ptr<T>() : nullptr;
    const T b1 = T(u.beta1), b2 = T(u.beta2), eps = T(u.eps), step_size = T(u.step_size);
    const T lr = T(u.lr);
    at::parallel_for(0, U, 256, [&](int64_t u0, int64_t u1) {
      std::vector<T> sum(K);
      for (int64_t r = u0; r < u1; ++r) {
        std::fill(sum.begin(), sum.end(), T(0));
        for (int64_t j = off[r]; j < off[r + 1]; ++j)
          for (int64_t k = 0; k < K; ++k) sum[k] += g[j * K + k];
        const int64_t base = rows[r] * K;
        if (adam) {
          for (int64_t k = 0; k < K; ++k)
            adam_element(w + base + k, m + base + k, v + base + k, sum[k], b1, b2, eps, step_size);
        } else {
          for (int64_t k = 0; k < K; ++k) w[base + k] -= lr * sum[k];
        }
      }
    });
  });
}

}  // namespace CPU_CAPABILITY
}  // namespace halfvae::cpu
