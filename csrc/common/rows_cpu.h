// Vectorised row functions shared by the CPU kernels (at::vec inside one row; the callers
// parallelise over rows): the logit-distillation row of csrc/ops/logit_kd/cpu.cpp, which the flash
// attention transfer also runs on each row of a score strip, and the weighted squared-error
// row that is both the hidden-MSE epilogue and the attention MSE; plus the row bookkeeping
// (task grain, strided [B, H, L, d] rows, dtype widening) that every kernel shares.
#pragma once

#include <ATen/ATen.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cstdint>
#include <limits>
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

// p phi(u) of kd_math.h's small-KL form on a vector of lanes (see kd_p_phi); lanes outside the
// teacher's support (live false: p == 0) give 0, and so does their p u, returned through pu.
template <typename acc_t>
at::vec::Vectorized<acc_t> kd_p_phi_vec(const at::vec::Vectorized<acc_t>& log_p, const at::vec::Vectorized<acc_t>& p,
                                        const at::vec::Vectorized<acc_t>& u, const at::vec::Vectorized<acc_t>& live,
                                        at::vec::Vectorized<acc_t>& pu) {
  using Vec = at::vec::Vectorized<acc_t>;
  constexpr int kTerms = sizeof(acc_t) == 8 ? 16 : 9;
  acc_t inv_fact = acc_t(1);
  for (int k = 2; k <= kTerms + 1; ++k) inv_fact /= acc_t(k);
  const Vec neg_u = Vec(0) - u;
  Vec poly(0);
  for (int k = kTerms - 1; k >= 0; --k) {
    poly = at::vec::fmadd(poly, neg_u, Vec(inv_fact));
    inv_fact *= acc_t(k + 2);
  }
  const Vec series = p * u * u * poly;
  const Vec direct = (log_p - u).exp() - p + p * u;  // Sleef exp: exp_u20's 20 ulp would show here
  const Vec small = (u <= Vec(0.5)) & (u >= Vec(-0.5));
  pu = Vec::blendv(Vec(0), p * u, live);
  return Vec::blendv(Vec(0), Vec::blendv(direct, series, small), live);
}

// One row computed in acc_t (float; double only for fp64 inputs, so gradcheck can run on it).
// es/et/e1 are scratch rows of length V; g receives the gradient; returns the weighted row loss.
// g may alias s (in-place mode): s is only read before g is written.
//
// Logits are centred on their row maxima before the division by T, x = (s - max s) / T and
// y = (t - max t) / T, so no term carries a max / T of 1e6 at small T. kl = A / Z_t + log Z_s -
// log Z_t with A = sum e^y (y - x); a row whose kl is below kKdStableBelow is recomputed in the
// small-KL form of kd_math.h (one more pass over the row, only then).
template <typename acc_t, bool SOFT_CE, bool NEED_1>
acc_t kd_row(const acc_t* s, const acc_t* t, acc_t* g, int64_t V, int64_t label, acc_t w, const KdParams& p,
             acc_t* es, acc_t* et, acc_t* e1) {
  using Vec = at::vec::Vectorized<acc_t>;
  const acc_t T = static_cast<acc_t>(p.temperature), a_kd = static_cast<acc_t>(p.alpha_kd),
              a_mlm = static_cast<acc_t>(p.alpha_mlm);
  const acc_t inv_t = acc_t(1) / T;
  const acc_t max_s = row_max(s, V), max_t = row_max(t, V);
  const acc_t label_logit = a_mlm != 0 ? s[label] : acc_t(0);

  const Vec v_inv(inv_t), v_max_s(max_s), v_max_t(max_t), v_m1(max_s);
  Vec v_zs(0), v_zt(0), v_acc(0), v_z1(0);
  constexpr int64_t kW = Vec::size();
  int64_t j = 0;
  for (; j + kW <= V; j += kW) {
    const Vec sv = Vec::loadu(s + j), tv = Vec::loadu(t + j);
    const Vec x = (sv - v_max_s) * v_inv, y = (tv - v_max_t) * v_inv;
    const Vec a = x.exp_u20(), b = y.exp_u20();
    a.store(es + j);
    b.store(et + j);
    v_zs += a;
    v_zt += b;
    // p = 0 (t = -inf) adds nothing, not 0 * inf
    v_acc += Vec::blendv(Vec(0), b * (SOFT_CE ? Vec(0) - x : y - x), b != Vec(0));
    if constexpr (NEED_1) {
      const Vec c = (sv - v_m1).exp_u20();
      c.store(e1 + j);
      v_z1 += c;
    }
  }
  auto hsum = [](const Vec& v) { return at::vec::vec_reduce_all<acc_t>([](Vec& a, Vec& b) { return a + b; }, v); };
  acc_t z_s = hsum(v_zs), z_t = hsum(v_zt), acc = hsum(v_acc), z_1 = hsum(v_z1);
  for (; j < V; ++j) {  // tail, same maxima so no rescaling
    const acc_t x = (s[j] - max_s) * inv_t, y = (t[j] - max_t) * inv_t;
    es[j] = std::exp(x);
    et[j] = std::exp(y);
    z_s += es[j];
    z_t += et[j];
    if (et[j] != acc_t(0)) acc += et[j] * (SOFT_CE ? -x : y - x);
    if constexpr (NEED_1) {
      e1[j] = std::exp(s[j] - max_s);
      z_1 += e1[j];
    }
  }

  const acc_t log_zs = std::log(z_s), log_zt = std::log(z_t);
  acc_t kd = acc / z_t + log_zs - (SOFT_CE ? acc_t(0) : log_zt);
  if (!SOFT_CE && kd < acc_t(kKdStableBelow)) {
    // c = E_p[d] for the centred d = ((t - max t) - (s - max s)) / T
    const acc_t cm = acc / z_t;
    const acc_t dm = (max_t - max_s) * inv_t;
    const Vec v_cm(cm), v_log_zt(log_zt), v_inv_zs(acc_t(1) / z_s), v_dm(dm);
    Vec v_a(0), v_b(0), v_q(0);
    j = 0;
    for (; j + kW <= V; j += kW) {
      const Vec sv = Vec::loadu(s + j), tv = Vec::loadu(t + j);
      const Vec yc = (tv - v_max_t) * v_inv, xc = (sv - v_max_s) * v_inv, ts = (tv - sv) * v_inv;
      // kd_centred_diff, lane by lane
      const Vec close = (ts.abs() + v_dm.abs()) <= (yc.abs() + xc.abs());
      const Vec d = Vec::blendv(yc - xc, ts - v_dm, close);
      const Vec log_p = yc - v_log_zt;
      const Vec p = log_p.exp();  // Sleef's exp, not exp_u20's et: the direct branch of phi would show it
      const Vec live = p != Vec(0);
      Vec pu;
      v_b += kd_p_phi_vec<acc_t>(log_p, p, d - v_cm, live, pu);
      v_a += pu;
      v_q += Vec::blendv(Vec::loadu(es + j) * v_inv_zs, Vec(0), live);
    }
    acc_t sum_a = hsum(v_a), sum_b = hsum(v_b), sum_q = hsum(v_q);
    for (; j < V; ++j)
      kd_kl_small_add<acc_t>(kd_centred_diff((t[j] - s[j]) * inv_t, (t[j] - max_t) * inv_t, (s[j] - max_s) * inv_t, dm),
                             (t[j] - max_t) * inv_t - log_zt, (s[j] - max_s) * inv_t - log_zs, cm, sum_a, sum_b,
                             sum_q);
    kd = kd_kl_small(sum_a, sum_b, sum_q);
  }
  KdRowCoeffs<acc_t> c{};
  c.lse_1 = NEED_1 ? max_s + std::log(z_1) : max_s + log_zs;  // T = 1: the student's own soft-max
  c.coef_kd = w * a_kd * T;
  c.coef_mlm = w * a_mlm;
  const acc_t loss = kd_row_loss_from_kd(kd, c, T, w, a_kd, a_mlm, label_logit);

  // p_s = es / z_s; when T == 1 and the MLM term is on, q_s == p_s and folds into the same coefficient.
  const acc_t cs = (c.coef_kd + (NEED_1 ? acc_t(0) : c.coef_mlm)) / z_s;
  const acc_t ct = c.coef_kd / z_t;
  const acc_t c1 = NEED_1 ? c.coef_mlm / z_1 : acc_t(0);
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

// KL(A_t || A_s) of one attention row at T = 1, for the flash attention transfer's score strips:
// s, t the row's n student / teacher scores (finite: only real keys are passed), w its weight.
// Returns w kl and writes the gradient g_j = w (A_s,j - A_t,j) over s; es, et are scratch rows of n.
//
// Three passes over the row, which stays in cache: (1) both maxima; (2) e^x and e^y (x = s - max s,
// y = t - max t), kept in es / et, their sums Z_s, Z_t and A = sum e^y (y - x), so that
// kl = A / Z_t + log Z_s - log Z_t; (3) the gradient. Both forms of kl below give the same
// gradient; only the loss value's digits differ. A row whose kl is below kAttentionKlStableBelow
// takes kd_math.h's small-KL form in that same third pass, from the stored exponentials, with no
// further exponential:
//   p_j = e^{y_j} / Z_t,  u_j = d_j - c (d_j = y_j - x_j, c = A / Z_t),  p_j e^{-u_j} = e^{x_j} e^c / Z_t,
//   p_j phi(u_j) = p_j u_j^2 sum_k (-u_j)^k / (k + 2)!  for |u_j| <= kSeriesBelow (no cancellation),
//                = p_j e^{-u_j} - p_j + p_j u_j         beyond it,
// with kSeriesBelow = 2 in float (phi(u) >= 1.1 beyond it, so the direct form keeps its digits even
// with exp_u20's 20 ulp in e^x and e^y: each term of b = sum p phi(u) within about 50 ulp) and 1/2
// in double (kd_p_phi's split; the exponentials are then Sleef's, 1 ulp). Then
// kl = a + log1p(b - a) - log1p(-Q_out), where a = sum p u enters at second order only.
// The direct kl = A / Z_t + log Z_s - log Z_t loses about 1e-9 absolute (float, a mean over 1,024-row
// heads against float64), so it keeps 1e-7 of a kl above 1/16; the series pass, a 15-term polynomial
// per score, costs a tenth of the whole fused step at L = 4,096 and is kept for the rows that need it
// (logit KD's rows use kKdStableBelow = 1: a vocabulary row is cheap next to its GEMM).
constexpr double kAttentionKlStableBelow = 1.0 / 16;

template <typename acc_t>
acc_t attention_kl_row(acc_t* s, const acc_t* t, int64_t n, acc_t w, acc_t* es, acc_t* et) {
  using Vec = at::vec::Vectorized<acc_t>;
  constexpr int64_t kW = Vec::size();
  // float: 15 terms (truncation below 1e-8 relative at |u| = 2); double: kd_p_phi's 16 at |u| <= 1/2
  constexpr bool kFloat = sizeof(acc_t) == 4;
  constexpr int kTerms = kFloat ? 15 : 16;
  const acc_t kSeriesBelow = kFloat ? acc_t(2) : acc_t(0.5);
  auto hsum = [](const Vec& v) { return at::vec::vec_reduce_all<acc_t>([](Vec& a, Vec& b) { return a + b; }, v); };
  auto hmax = [](const Vec& v) {
    return at::vec::vec_reduce_all<acc_t>([](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, v);
  };

  // (1) maxima
  Vec v_ms(-std::numeric_limits<acc_t>::infinity()), v_mt(v_ms);
  int64_t j = 0;
  for (; j + kW <= n; j += kW) {
    v_ms = at::vec::maximum(v_ms, Vec::loadu(s + j));
    v_mt = at::vec::maximum(v_mt, Vec::loadu(t + j));
  }
  acc_t max_s = hmax(v_ms), max_t = hmax(v_mt);
  for (; j < n; ++j) {
    max_s = std::max(max_s, s[j]);
    max_t = std::max(max_t, t[j]);
  }

  // (2) exponentials and sums
  const Vec ms(max_s), mt(max_t);
  Vec v_zs(0), v_zt(0), v_acc(0);
  for (j = 0; j + kW <= n; j += kW) {
    const Vec x = Vec::loadu(s + j) - ms, y = Vec::loadu(t + j) - mt;
    const Vec a = x.exp_u20(), b = y.exp_u20();
    a.store(es + j);
    b.store(et + j);
    v_zs += a;
    v_zt += b;
    v_acc = at::vec::fmadd(b, y - x, v_acc);
  }
  acc_t z_s = hsum(v_zs), z_t = hsum(v_zt), acc = hsum(v_acc);
  for (; j < n; ++j) {
    const acc_t x = s[j] - max_s, y = t[j] - max_t;
    es[j] = std::exp(x);
    et[j] = std::exp(y);
    z_s += es[j];
    z_t += et[j];
    acc += et[j] * (y - x);
  }
  const acc_t cm = acc / z_t, log_zs = std::log(z_s), log_zt = std::log(z_t);
  const acc_t kl = cm + log_zs - log_zt;
  const acc_t cs = w / z_s, ct = w / z_t;

  // (3) the gradient ...
  if (!(kl < acc_t(kAttentionKlStableBelow))) {
    const Vec v_cs(cs), v_ct(ct);
    for (j = 0; j + kW <= n; j += kW) (Vec::loadu(es + j) * v_cs - Vec::loadu(et + j) * v_ct).store(s + j);
    for (; j < n; ++j) s[j] = es[j] * cs - et[j] * ct;
    return w * kl;
  }
  // ... and the small-KL form (kd_math.h's names: d from kd_centred_diff, a, b, Q_out)
  const acc_t dm = max_t - max_s, inv_zt = acc_t(1) / z_t, inv_zs = acc_t(1) / z_s;
  const acc_t k_direct = std::exp(cm) * inv_zt;  // p e^{-u} = e^x e^c / Z_t
  acc_t coef[kTerms];  // coef[k] = 1 / (k + 2)!
  coef[0] = acc_t(0.5);
  for (int k = 1; k < kTerms; ++k) coef[k] = coef[k - 1] / acc_t(k + 2);
  const Vec v_cs(cs), v_ct(ct), v_dm(dm), v_abs_dm(std::abs(dm)), v_cm(cm), v_inv_zt(inv_zt), v_inv_zs(inv_zs),
      v_k(k_direct), v_lim(kSeriesBelow), one(1), zero(0);
  Vec v_a(0), v_b(0), v_q(0);
  for (j = 0; j + kW <= n; j += kW) {
    const Vec sv = Vec::loadu(s + j), tv = Vec::loadu(t + j), ea = Vec::loadu(es + j), eb = Vec::loadu(et + j);
    const Vec yc = tv - mt, xc = sv - ms, ts = tv - sv;
    const Vec close = (ts.abs() + v_abs_dm) <= (yc.abs() + xc.abs());
    const Vec u = Vec::blendv(yc - xc, ts - v_dm, close) - v_cm;
    const Vec p = eb * v_inv_zt;
    const Vec live = p != zero;
    const Vec neg_u = zero - u;
    Vec poly(coef[kTerms - 1]);
    for (int k = kTerms - 2; k >= 0; --k) poly = at::vec::fmadd(poly, neg_u, Vec(coef[k]));
    const Vec pu = p * u;
    const Vec series = pu * u * poly;
    const Vec direct = at::vec::fmadd(ea, v_k, p * (u - one));
    v_b += Vec::blendv(zero, Vec::blendv(direct, series, u.abs() <= v_lim), live);
    v_a += pu;
    v_q += Vec::blendv(ea * v_inv_zs, zero, live);
    (ea * v_cs - eb * v_ct).store(s + j);
  }
  acc_t sum_a = hsum(v_a), sum_b = hsum(v_b), sum_q = hsum(v_q);
  for (; j < n; ++j) {
    kd_kl_small_add<acc_t>(kd_centred_diff(t[j] - s[j], t[j] - max_t, s[j] - max_s, dm), t[j] - max_t - log_zt,
                           s[j] - max_s - log_zs, cm, sum_a, sum_b, sum_q);
    s[j] = es[j] * cs - et[j] * ct;
  }
  return w * kd_kl_small(sum_a, sum_b, sum_q);
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
