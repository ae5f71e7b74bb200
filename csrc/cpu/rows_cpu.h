// Vectorised row functions shared by the CPU kernels (at::vec inside one row; the callers
// parallelise over rows): the logit-distillation row of kd_loss_cpu.cpp, which the flash
// attention transfer also runs on each row of a score strip, and the weighted squared-error
// row that is both the hidden-MSE epilogue and the attention MSE; plus the row bookkeeping
// (task grain, strided [B, H, L, d] rows, dtype widening) that every kernel shares.
#pragma once

#include <ATen/ATen.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "../common/kd_math.h"

namespace kdfast {

struct KdParams {
  double temperature, alpha_kd, alpha_mlm;
  bool soft_ce;
};

template <typename acc_t>
acc_t row_max(const acc_t* x, int64_t n) {
  using Vec = at::vec::Vectorized<acc_t>;
  return at::vec::reduce_all<acc_t>([](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, x, n);
}

// One row computed in acc_t (float; double only for fp64 inputs, so gradcheck can run on it).
// es/et/e1 are scratch rows of length V; g receives the gradient; returns the weighted row loss.
// g may alias s (in-place mode): s is only read before g is written.
template <typename acc_t, bool SOFT_CE, bool NEED_1>
acc_t kd_row(const acc_t* s, const acc_t* t, acc_t* g, int64_t V, int64_t label, acc_t w, const KdParams& p,
             acc_t* es, acc_t* et, acc_t* e1) {
  using Vec = at::vec::Vectorized<acc_t>;
  const acc_t T = static_cast<acc_t>(p.temperature), a_kd = static_cast<acc_t>(p.alpha_kd),
              a_mlm = static_cast<acc_t>(p.alpha_mlm);
  const acc_t inv_t = acc_t(1) / T;
  const acc_t max_s = row_max(s, V), max_t = row_max(t, V);
  KdRowStats<acc_t> st = KdRowStats<acc_t>::empty();
  st.m_s = max_s * inv_t;
  st.m_t = max_t * inv_t;
  st.m_1 = max_s;
  const acc_t label_logit = a_mlm != 0 ? s[label] : acc_t(0);

  const Vec v_inv(inv_t), v_ms(st.m_s), v_mt(st.m_t), v_m1(st.m_1);
  Vec v_zs(0), v_zt(0), v_acc(0), v_z1(0);
  constexpr int64_t kW = Vec::size();
  int64_t j = 0;
  for (; j + kW <= V; j += kW) {
    const Vec sv = Vec::loadu(s + j), tv = Vec::loadu(t + j);
    const Vec x = sv * v_inv, y = tv * v_inv;
    const Vec a = (x - v_ms).exp_u20(), b = (y - v_mt).exp_u20();
    a.store(es + j);
    b.store(et + j);
    v_zs += a;
    v_zt += b;
    v_acc = at::vec::fmadd(b, SOFT_CE ? Vec(0) - x : y - x, v_acc);
    if constexpr (NEED_1) {
      const Vec c = (sv - v_m1).exp_u20();
      c.store(e1 + j);
      v_z1 += c;
    }
  }
  auto hsum = [](const Vec& v) { return at::vec::vec_reduce_all<acc_t>([](Vec& a, Vec& b) { return a + b; }, v); };
  st.z_s = hsum(v_zs);
  st.z_t = hsum(v_zt);
  st.acc = hsum(v_acc);
  st.z_1 = hsum(v_z1);
  for (; j < V; ++j) {  // tail, same maxima so no rescaling
    const acc_t x = s[j] * inv_t, y = t[j] * inv_t;
    es[j] = std::exp(x - st.m_s);
    et[j] = std::exp(y - st.m_t);
    st.z_s += es[j];
    st.z_t += et[j];
    st.acc += et[j] * (SOFT_CE ? -x : y - x);
    if constexpr (NEED_1) {
      e1[j] = std::exp(s[j] - st.m_1);
      st.z_1 += e1[j];
    }
  }

  const KdRowCoeffs<acc_t> c = kd_row_coeffs(st, T, w, a_kd, a_mlm);
  const acc_t loss = kd_row_loss(st, c, T, w, a_kd, a_mlm, SOFT_CE, label_logit);

  // p_s = es / z_s; when T == 1 and the MLM term is on, q_s == p_s and folds into the same coefficient.
  const acc_t cs = (c.coef_kd + (NEED_1 ? acc_t(0) : c.coef_mlm)) / st.z_s;
  const acc_t ct = c.coef_kd / st.z_t;
  const acc_t c1 = NEED_1 ? c.coef_mlm / st.z_1 : acc_t(0);
  const Vec v_cs(cs), v_ct(ct), v_c1(c1);
  j = 0;
  for (; j + kW <= V; j += kW) {
    Vec gv = Vec::loadu(es + j) * v_cs - Vec::loadu(et + j) * v_ct;
    if constexpr (NEED_1) gv = at::vec::fmadd(Vec::loadu(e1 + j), v_c1, gv);
    gv.store(g + j);
  }
  for (; j < V; ++j) g[j] = es[j] * cs - et[j] * ct + (NEED_1 ? e1[j] * c1 : acc_t(0));
  if (a_mlm != 0) g[label] -= c.coef_mlm;
  return loss;
}

// Accumulation type: float, or double for fp64 inputs (row weights and loss rows use it too).
template <typename scalar_t>
using kd_acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

// Weighted squared error of one row, gradient written over y:
//   returns w * sum_j (y_j - t_j)^2   and sets   y_j <- 2 w (y_j - t_j).
template <typename acc_t>
acc_t mse_row(acc_t* y, const acc_t* t, int64_t n, acc_t w) {
  using Vec = at::vec::Vectorized<acc_t>;
  constexpr int64_t kW = Vec::size();
  const Vec v_2w(2 * w);
  Vec v_acc(0);
  int64_t j = 0;
  for (; j + kW <= n; j += kW) {
    const Vec d = Vec::loadu(y + j) - Vec::loadu(t + j);
    v_acc = at::vec::fmadd(d, d, v_acc);
    (d * v_2w).store(y + j);
  }
  acc_t acc = at::vec::vec_reduce_all<acc_t>([](Vec& a, Vec& b) { return a + b; }, v_acc);
  for (; j < n; ++j) {
    const acc_t d = y[j] - t[j];
    acc += d * d;
    y[j] = 2 * w * d;
  }
  return w * acc;
}

// Rows per at::parallel_for task for rows of n elements: about 16K elements a task, so short rows
// are not handed out one by one (scheduling would cost more than the row).
inline int64_t row_grain(int64_t n) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(n, 1)); }

// Row (b, h, l, :) of a [B, H, L, d] tensor with unit last stride: head views of a wider tensor
// are read in place instead of being copied to contiguous memory first.
template <typename scalar_t>
struct Rows {
  const scalar_t* p;
  int64_t sb, sh, sl;
  explicit Rows(const at::Tensor& x)
      : p(x.const_data_ptr<scalar_t>()), sb(x.stride(0)), sh(x.stride(1)), sl(x.stride(2)) {}
  const scalar_t* at(int64_t b, int64_t h, int64_t l) const { return p + b * sb + h * sh + l * sl; }
};

// The input dtypes the CPU kernels dispatch over (fp32 / fp64 / fp16 / bf16).
inline bool is_kernel_float_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

// Row x (any float type) as acc_t: x itself when the types agree, else widened into scratch.
template <typename acc_t, typename scalar_t>
const acc_t* widen_row(const scalar_t* x, int64_t n, acc_t* scratch) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    (void)n;
    (void)scratch;
    return x;
  } else {
    at::vec::convert(x, scratch, n);
    return scratch;
  }
}

}  // namespace kdfast
