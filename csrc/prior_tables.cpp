#include "prior_tables.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/EmptyTensor.h>
#include <c10/util/irange.h>

#include <algorithm>
#include <cmath>
#include <cstring>

#include "halfvae/gmm_math.h"

namespace halfvae {

at::ScalarType compute_dtype(at::ScalarType input_dtype) {
  return input_dtype == at::kDouble ? at::kDouble : at::kFloat;
}

namespace {

// A CPU tensor of `dt`, contiguous: t itself when it is one already (no dispatcher call).
at::Tensor as_contiguous(const at::Tensor& t, at::ScalarType dt) {
  if (t.scalar_type() == dt && t.is_contiguous()) return t;
  return t.to(dt).contiguous();
}

// An uninitialized CPU tensor, allocated without the dispatcher.
at::Tensor empty_cpu(at::IntArrayRef sizes, at::ScalarType dt) {
  return at::Tensor(at::detail::empty_cpu(sizes, at::TensorOptions().dtype(dt)));
}

// [U*K, C] tensor over `numel` values at `data` inside `owner`'s storage (keeps it alive), made
// without the dispatcher.
at::Tensor alias_rows(const at::Tensor& owner, void* data, int64_t rows, int64_t C) {
  return at::from_blob(
      data, {rows, C}, [keep = owner](void*) mutable { keep.reset(); }, owner.options());
}

// log_softmax of R rows of C: (x - max) - log(sum exp(x - max)), ATen's order of operations. A
// loop here rather than at::_log_softmax, whose vectorized row routine costs ~20 ns a row of 3
// (at 40 prior groups x 16 dimensions, a quarter of a 4096-element forward).
template <typename T>
void log_softmax_rows(const T* x, int64_t R, int64_t C, T* out) {
  for (int64_t r = 0; r < R; ++r) {
    const T* row = x + r * C;
    T mx = row[0];
    for (int64_t c = 1; c < C; ++c) mx = std::max(mx, row[c]);
    T sum = 0;
    for (int64_t c = 0; c < C; ++c) sum += std::exp(row[c] - mx);
    const T log_sum = std::log(sum);
    for (int64_t c = 0; c < C; ++c) out[r * C + c] = (row[c] - mx) - log_sum;
  }
}

// The CPU tables with one ATen call in all (an exp over both exp tables), the rest in plain
// loops: the arithmetic of the ATen expression of the general path below (one rounding per +, -,
// * as ATen's element-wise kernels make it), for ~2 us instead of ~20 (a dozen small ATen ops,
// each through the dispatcher). The log_softmax's exp and log are libm's: the tables agree with
// that path's to an ulp or so, not bit for bit.
template <typename T>
void fill_cpu_tables(PriorTables& t, const at::Tensor& logits, const at::Tensor& means,
                     const at::Tensor& logvars, at::ScalarType dt) {
  const int64_t R = t.U * t.K, C = t.C, n = R * C;
  const auto lg_t = as_contiguous(logits, dt);
  const auto lv_t = as_contiguous(logvars, dt);
  const auto m_t = as_contiguous(means, dt);
  // w and m in one buffer, exp(-lv) and pi = exp(log_pi) in another (exp'd in place at once).
  auto wm = empty_cpu({2, R, C}, dt);
  auto ex = empty_cpu({2, R, C}, dt);
  auto log_pi = empty_cpu({R, C}, dt);
  log_softmax_rows(lg_t.data_ptr<T>(), R, C, log_pi.data_ptr<T>());
  const T* lp = log_pi.data_ptr<T>();
  const T* lv = lv_t.data_ptr<T>();
  T* w = wm.data_ptr<T>();
  T* e = ex.data_ptr<T>();
  const T log2pi = static_cast<T>(kLog2Pi);  // ATen's scalar operand, in the tensor's dtype
  for (int64_t i = 0; i < n; ++i) {
    const T a = lv[i] + log2pi;
    const T b = T(0.5) * a;
    w[i] = lp[i] - b;
    e[i] = -lv[i];
    e[n + i] = lp[i];
  }
  std::memcpy(w + n, m_t.data_ptr<T>(), n * sizeof(T));
  ex.exp_();
  t.w = alias_rows(wm, w, R, C);
  t.m = alias_rows(wm, w + n, R, C);
  t.prec = alias_rows(ex, e, R, C);
  t.pi = alias_rows(ex, e + n, R, C);
}

}  // namespace

PriorTables make_prior_tables(const at::Tensor& logits, const at::Tensor& means,
                              const at::Tensor& logvars,
                              const c10::optional<at::Tensor>& prior_index) {
  const auto dt = compute_dtype(logits.scalar_type());
  PriorTables t;
  t.K = logits.size(-2);
  t.C = logits.size(-1);
  t.U = logits.dim() == 3 ? logits.size(0) : 1;
  if (prior_index.has_value()) {
    const auto& pi = *prior_index;
    t.index = pi.scalar_type() == at::kLong && pi.is_contiguous() ? pi : pi.to(at::kLong).contiguous();
  }
  if (logits.device().is_cpu() && means.device().is_cpu() && logvars.device().is_cpu()) {
    if (dt == at::kDouble) fill_cpu_tables<double>(t, logits, means, logvars, dt);
    else fill_cpu_tables<float>(t, logits, means, logvars, dt);
    return t;
  }
  const auto lg = logits.to(dt).reshape({t.U * t.K, t.C});
  const auto lv = logvars.to(dt).reshape({t.U * t.K, t.C});
  const auto log_pi = at::log_softmax(lg, 1);
  t.w = (log_pi - 0.5 * (lv + kLog2Pi)).contiguous();
  t.m = means.to(dt).reshape({t.U * t.K, t.C}).contiguous();
  t.prec = at::exp(-lv).contiguous();
  t.pi = at::exp(log_pi).contiguous();
  return t;
}

namespace {

std::vector<int64_t> prior_shape(const PriorTables& tables) {
  return tables.U > 1 || tables.conditional()
             ? std::vector<int64_t>{tables.U, tables.K, tables.C}
             : std::vector<int64_t>{tables.K, tables.C};
}

// CPU: the expression of prior_grads_from_sums in plain loops, the same roundings (the float64
// sums rounded to the tables' dtype first, then one rounding per operation, then to out_dtype),
// written straight into the three outputs.
template <typename T, typename Out>
void cpu_prior_grads(const at::Tensor& sums, const PriorTables& tables, double sign,
                     at::Tensor& gl, at::Tensor& gm, at::Tensor& gv) {
  const int64_t R = tables.U * tables.K, C = tables.C, ns = 3 * C + 1;
  const auto sc = sums.is_contiguous() ? sums : sums.contiguous();
  const double* s = sc.data_ptr<double>();
  const T* pi = tables.pi.data_ptr<T>();
  Out* ol = gl.data_ptr<Out>();
  Out* om = gm.data_ptr<Out>();
  Out* ov = gv.data_ptr<Out>();
  const T sg = static_cast<T>(sign);
  for (int64_t r = 0; r < R; ++r) {
    const double* row = s + r * ns;
    const T weight = static_cast<T>(row[3 * C]);
    for (int64_t c = 0; c < C; ++c) {
      const int64_t i = r * C + c;
      const T pw = pi[i] * weight;
      const T d = static_cast<T>(row[c]) - pw;
      ol[i] = static_cast<Out>(static_cast<T>(d * sg));
      om[i] = static_cast<Out>(static_cast<T>(static_cast<T>(row[C + c]) * sg));
      ov[i] = static_cast<Out>(static_cast<T>(static_cast<T>(row[2 * C + c]) * sg));
    }
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> prior_grads_from_sums(const at::Tensor& sums,
                                                                      const PriorTables& tables,
                                                                      double sign,
                                                                      at::ScalarType out_dtype) {
  const int64_t C = tables.C;
  const auto shape = prior_shape(tables);
  if (sums.device().is_cpu() && tables.pi.device().is_cpu()) {
    auto gl = empty_cpu(shape, out_dtype);
    auto gm = empty_cpu(shape, out_dtype);
    auto gv = empty_cpu(shape, out_dtype);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out_dtype, "prior_grads", [&] {
      using Out = scalar_t;
      if (tables.pi.scalar_type() == at::kDouble)
        cpu_prior_grads<double, Out>(sums, tables, sign, gl, gm, gv);
      else
        cpu_prior_grads<float, Out>(sums, tables, sign, gl, gm, gv);
    });
    return {gl, gm, gv};
  }
  const auto s = sums.to(tables.pi.scalar_type());
  const auto weighted_r = s.narrow(1, 0, C);
  const auto weighted_r_dprec = s.narrow(1, C, C);
  const auto weighted_r_lv = s.narrow(1, 2 * C, C);
  const auto weight = s.narrow(1, 3 * C, 1);
  auto grad_logits = (weighted_r - tables.pi * weight) * sign;
  auto grad_means = weighted_r_dprec * sign;
  auto grad_logvars = weighted_r_lv * sign;
  return {grad_logits.to(out_dtype).reshape(shape), grad_means.to(out_dtype).reshape(shape),
          grad_logvars.to(out_dtype).reshape(shape)};
}

at::Tensor zero_prior_sums(const PriorTables& tables, const at::Tensor& like) {
  const int64_t n = tables.U * tables.K * (3 * tables.C + 1);
  if (like.device().is_cpu()) {
    auto s = empty_cpu({tables.U * tables.K, 3 * tables.C + 1}, at::kDouble);
    std::fill_n(s.data_ptr<double>(), n, 0.0);
    return s;
  }
  return at::zeros({tables.U * tables.K, 3 * tables.C + 1}, like.options().dtype(at::kDouble));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> prior_grads_or_zeros(
    const at::Tensor& sums, const PriorTables& tables, double sign,
    const at::Tensor& prior_logits, const at::Tensor& prior_means,
    const at::Tensor& prior_logvars) {
  if (!sums.defined())
    return {at::zeros_like(prior_logits), at::zeros_like(prior_means),
            at::zeros_like(prior_logvars)};
  return prior_grads_from_sums(sums, tables, sign, prior_logits.scalar_type());
}

}  // namespace halfvae
