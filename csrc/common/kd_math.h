// Row math shared by the CPU (C++) and CUDA kernels of the logit-distillation loss.
//
// For one row of student logits s and teacher logits t over a vocabulary of V, with
// temperature T, x = s / T and y = t / T:
//
//   p_s = softmax(x), p_t = softmax(y), q_s = softmax(s)            (q_s: T = 1, for MLM CE)
//   kl      = sum_j p_t,j (log p_t,j - log p_s,j) = A / Z_t - lse_t + lse_s,  A = sum_j e^{y_j - m_t} (y_j - x_j)
//   soft_ce = -sum_j p_t,j log p_s,j             = A'/ Z_t + lse_s,          A' = sum_j e^{y_j - m_t} (-x_j)
//   ce      = lse(s) - s_label
//   loss    = w * (alpha_kd * T^2 * kd + alpha_mlm * ce)
//   dloss/ds_j = w * (alpha_kd * T * (p_s,j - p_t,j) + alpha_mlm * (q_s,j - [j == label]))
//
// (soft_ce and kl differ by the teacher entropy, a constant, so their gradients agree.)
// Every statistic is a running (max, sum of exponentials) pair so that partial rows,
// computed by different threads or chunks, merge exactly: see KdRowStats::merge.
#pragma once

#include <cmath>
#include <cstdint>


#if defined(__CUDACC__)
#define KD_HD __host__ __device__ __forceinline__
#else
#define KD_HD inline
#endif

namespace kdfast {

#if !defined(__CUDACC__)
using std::exp;
using std::log;
using std::log1p;
#endif

// exp(a - m) that treats an empty partition (m == -inf) as contributing nothing.
template <typename acc_t>
KD_HD acc_t kd_scaled_exp(acc_t a, acc_t m) { return m == -INFINITY ? acc_t(0) : exp(a - m); }

// Online soft-max statistics of one (partial) row; acc_t is float, or double for gradcheck.
template <typename acc_t>
struct KdRowStats {
  acc_t m_s, z_s;  // max and sum e^{x - m_s} of the student at temperature T
  acc_t m_t, z_t;  // max and sum e^{y - m_t} of the teacher at temperature T
  acc_t acc;       // sum e^{y - m_t} * (y - x)   [kl]   or   * (-x)   [soft_ce]
  acc_t m_1, z_1;  // max and sum e^{s - m_1} of the student at T = 1 (MLM term)
  acc_t r_s, r_t;  // max of the raw logits s and t: the small-KL pass centres on them before / T

  KD_HD static KdRowStats empty() { return {-INFINITY, 0, -INFINITY, 0, 0, -INFINITY, 0, -INFINITY, -INFINITY}; }

  // Add one element (student logit s, teacher logit t); rescale only when a max moves.
  KD_HD void add(acc_t s, acc_t t, acc_t inv_t, bool soft_ce, bool need_1) {
    acc_t x = s * inv_t, y = t * inv_t;
    if (s > r_s) r_s = s;
    if (t > r_t) r_t = t;
    if (x > m_s) { z_s *= kd_scaled_exp(m_s, x); m_s = x; }
    z_s += kd_scaled_exp(x, m_s);  // (a row may start with -inf logits)
    if (y > m_t) { acc_t r = kd_scaled_exp(m_t, y); z_t *= r; acc *= r; m_t = y; }
    acc_t e = kd_scaled_exp(y, m_t);
    z_t += e;
    if (e != acc_t(0)) acc += e * (soft_ce ? -x : y - x);  // p = 0 (t = -inf) adds nothing, not 0 * inf
    if (need_1) {
      if (s > m_1) { z_1 *= kd_scaled_exp(m_1, s); m_1 = s; }
      z_1 += kd_scaled_exp(s, m_1);
    }
  }

  // Merge the statistics of another disjoint part of the same row.
  KD_HD void merge(const KdRowStats& o) {
    acc_t ms = m_s > o.m_s ? m_s : o.m_s;
    z_s = z_s * kd_scaled_exp(m_s, ms) + o.z_s * kd_scaled_exp(o.m_s, ms);
    m_s = ms;
    acc_t mt = m_t > o.m_t ? m_t : o.m_t;
    acc_t ra = kd_scaled_exp(m_t, mt), rb = kd_scaled_exp(o.m_t, mt);
    z_t = z_t * ra + o.z_t * rb;
    acc = acc * ra + o.acc * rb;
    m_t = mt;
    acc_t m1 = m_1 > o.m_1 ? m_1 : o.m_1;
    z_1 = z_1 * kd_scaled_exp(m_1, m1) + o.z_1 * kd_scaled_exp(o.m_1, m1);
    m_1 = m1;
    r_s = r_s > o.r_s ? r_s : o.r_s;
    r_t = r_t > o.r_t ? r_t : o.r_t;
  }
};

// Per-row constants for the loss and the gradient, derived from finished statistics.
// Whether the MLM term needs its own T = 1 soft-max statistics.
KD_HD bool kd_needs_t1_stats(double temperature, double alpha_mlm) { return alpha_mlm != 0 && temperature != 1; }

template <typename acc_t>
struct KdRowCoeffs {
  acc_t inv_t;     // 1 / T
  acc_t lse_s;     // log-sum-exp of x
  acc_t lse_t;     // log-sum-exp of y
  acc_t lse_1;     // log-sum-exp of s (valid when the MLM term is on)
  acc_t coef_kd;   // w * alpha_kd * T
  acc_t coef_mlm;  // w * alpha_mlm
};

template <typename acc_t>
KD_HD KdRowCoeffs<acc_t> kd_row_coeffs(const KdRowStats<acc_t>& st, acc_t temperature, acc_t weight,
                                       acc_t alpha_kd, acc_t alpha_mlm) {
  KdRowCoeffs<acc_t> c;
  c.inv_t = acc_t(1) / temperature;
  c.lse_s = st.m_s + log(st.z_s);
  c.lse_t = st.m_t + log(st.z_t);
  // At T = 1 the MLM soft-max is the student's own: no separate statistics are kept.
  c.lse_1 = alpha_mlm == 0 ? acc_t(0) : (temperature == 1 ? c.lse_s : st.m_1 + log(st.z_1));
  c.coef_kd = weight * alpha_kd * temperature;
  c.coef_mlm = weight * alpha_mlm;
  return c;
}

// Unweighted KD term of a finished row: kl = A / Z_t + lse_s - lse_t, or soft_ce = A' / Z_t + lse_s.
template <typename acc_t>
KD_HD acc_t kd_row_kd(const KdRowStats<acc_t>& st, const KdRowCoeffs<acc_t>& c, bool soft_ce) {
  return st.acc / st.z_t + c.lse_s - (soft_ce ? acc_t(0) : c.lse_t);
}

// Weighted row loss from its KD term; label_logit is s_label (ignored when alpha_mlm == 0).
// T (T kd), not T^2 kd: T^2 alone could overflow where the product does not.
template <typename acc_t>
KD_HD acc_t kd_row_loss_from_kd(acc_t kd, const KdRowCoeffs<acc_t>& c, acc_t temperature, acc_t weight,
                                acc_t alpha_kd, acc_t alpha_mlm, acc_t label_logit) {
  acc_t loss = alpha_kd * temperature * (temperature * kd);
  if (alpha_mlm != 0) loss += alpha_mlm * (c.lse_1 - label_logit);
  return weight * loss;
}

// Weighted loss of a finished row from kd_row_kd (callers switch to kd_kl_small when that is
// below kKdStableBelow).
template <typename acc_t>
KD_HD acc_t kd_row_loss(const KdRowStats<acc_t>& st, const KdRowCoeffs<acc_t>& c, acc_t temperature, acc_t weight,
                        acc_t alpha_kd, acc_t alpha_mlm, bool soft_ce, acc_t label_logit) {
  return kd_row_loss_from_kd(kd_row_kd(st, c, soft_ce), c, temperature, weight, alpha_kd, alpha_mlm, label_logit);
}

// --- the KL of rows whose KL is small (large T, student close to teacher) ---------------------
// kl = c + lse_s - lse_t (c = A / Z_t = E_p[d], d = y - x) cancels when kl is small next to its
// parts: at T = 1e4 the parts are ~10 and kl ~ 1e-7. Over the teacher's support S = {j : p_t,j > 0},
// with u = d - c (so E_p[u] ~ 0 up to rounding) and Q_out = sum_{j not in S} p_s,j,
//   kl = E_p[u] + log E_p[e^{-u}] - log(1 - Q_out) = a + log1p(b - a) - log1p(-Q_out),
//   a = sum p_j u_j,   b = sum p_j phi(u_j),   phi(u) = e^{-u} - 1 + u >= 0:
// b is a sum of non-negative terms (no cancellation) and a only enters at second order, as does
// any constant error in c: d may be shifted by a per-row constant (kd_centred_diff). Used when
// kl < kKdStableBelow; there every p_j e^{-u_j} <= e^{kl} stays small, so nothing overflows.
constexpr double kKdStableBelow = 1.0;

// p phi(u) from log p: a series where phi cancels (|u| <= 1/2; truncation < 1e-17 relative for
// double with 16 terms, < 1e-9 for float with 9), else e^{log p - u} - p + p u (right even where
// p underflows to 0 while p e^{-u} does not).
template <typename acc_t>
KD_HD acc_t kd_p_phi(acc_t log_p, acc_t p, acc_t u) {
  if (u <= acc_t(0.5) && u >= acc_t(-0.5)) {
    acc_t poly = acc_t(0);
    // phi(u) = u^2 sum_{k>=0} (-u)^k / (k + 2)!, Horner from the last term down
    const int kTerms = sizeof(acc_t) == 8 ? 16 : 9;
    acc_t inv_fact = acc_t(1);  // 1 / (kTerms + 1)!, then 1 / (k + 2)! at step k
    for (int k = 2; k <= kTerms + 1; ++k) inv_fact /= acc_t(k);
    for (int k = kTerms - 1; k >= 0; --k) {
      poly = poly * (-u) + inv_fact;
      inv_fact *= acc_t(k + 2);
    }
    return p * u * u * poly;
  }
  return exp(log_p - u) - p + p * u;
}

// d = ((t - s) - (r_t - r_s)) / T for the small-KL form (r: the raw row maxima), formed the way
// that loses fewer digits: from ts = (t - s) / T (t - s is exact for close logits: a student near
// its teacher) when the logits are close, else from the centred yc = (t - r_t) / T and
// xc = (s - r_s) / T (a finfo.min mask in one of them would swallow the other in t - s);
// dm = (r_t - r_s) / T. Subtracting before dividing by T rounds once, on the small result.
template <typename acc_t>
KD_HD acc_t kd_centred_diff(acc_t ts, acc_t yc, acc_t xc, acc_t dm) {
  auto mag = [](acc_t v) { return v < acc_t(0) ? -v : v; };
  return mag(ts) + mag(dm) <= mag(yc) + mag(xc) ? ts - dm : yc - xc;
}

// One element's contribution to (a, b, Q_out) above: d from kd_centred_diff, log_p = log p_t,j,
// log_q = log p_s,j, c = E_p[d] (A / Z_t shifted like d). The support is where p does not
// underflow to 0 (t = -inf, or a finfo.min mask): the identity holds for any such split, and u is
// finite on it.
template <typename acc_t>
KD_HD void kd_kl_small_add(acc_t d, acc_t log_p, acc_t log_q, acc_t c, acc_t& a, acc_t& b, acc_t& q_out) {
  const acc_t p = exp(log_p);
  if (p == acc_t(0)) {
    q_out += exp(log_q);
    return;
  }
  const acc_t u = d - c;
  a += p * u;
  b += kd_p_phi(log_p, p, u);
}

template <typename acc_t>
KD_HD acc_t kd_kl_small(acc_t a, acc_t b, acc_t q_out) { return a + log1p(b - a) - log1p(-q_out); }

// Gradient of the weighted row loss with respect to one student logit (the -coef_mlm
// of the label position is added by the caller).
template <typename acc_t>
KD_HD acc_t kd_grad_elem(acc_t s, acc_t t, const KdRowCoeffs<acc_t>& c) {
  acc_t g = c.coef_kd * (exp(s * c.inv_t - c.lse_s) - exp(t * c.inv_t - c.lse_t));
  if (c.coef_mlm != 0) g += c.coef_mlm * exp(s - c.lse_1);
  return g;
}

}  // namespace kdfast
