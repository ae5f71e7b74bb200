// Host replay of the CUDA kernel's row algorithm (csrc/ops/logit_kd/cuda.cu), for tests on machines
// without a GPU: kThreads "threads" each fold a strided share of the row with KdRowStats::add,
// the shares are merged in the kernel's order (warp tree, then warps in sequence), and loss and
// gradient come from the same kd_row_coeffs / kd_row_loss / kd_grad_elem the kernel calls.
//
// stdin:  N V temperature alpha_kd alpha_mlm soft_ce, then per row: label weight s[0..V) t[0..V)
// stdout: per row: loss g[0..V)
#include <cstdio>
#include <vector>

#include "../common/kd_math.h"

using kdfast::KdRowStats;

int main() {
  constexpr int kThreads = 256, kWarps = kThreads / 32;
  long n, v;
  float temperature, alpha_kd, alpha_mlm;
  int soft_ce;
  if (std::scanf("%ld %ld %f %f %f %d", &n, &v, &temperature, &alpha_kd, &alpha_mlm, &soft_ce) != 6) return 2;
  const bool need_1 = kdfast::kd_needs_t1_stats(temperature, alpha_mlm);
  std::vector<float> s(v), t(v);
  for (long r = 0; r < n; ++r) {
    long label;
    float w;
    if (std::scanf("%ld %f", &label, &w) != 2) return 2;
    for (auto& x : s) std::scanf("%f", &x);
    for (auto& x : t) std::scanf("%f", &x);
    std::vector<KdRowStats<float>> th(kThreads, KdRowStats<float>::empty());
    for (int i = 0; i < kThreads; ++i)
      for (long j = i; j < v; j += kThreads) th[i].add(s[j], t[j], 1.f / temperature, soft_ce, need_1);
    for (int off = 16; off > 0; off >>= 1)  // __shfl_down_sync tree within each warp
      for (int wp = 0; wp < kWarps; ++wp)
        for (int lane = 0; lane + off < 32; ++lane) th[wp * 32 + lane].merge(th[wp * 32 + lane + off]);
    KdRowStats<float> row = th[0];
    for (int wp = 1; wp < kWarps; ++wp) row.merge(th[wp * 32]);
    const auto c = kdfast::kd_row_coeffs(row, temperature, w, alpha_kd, alpha_mlm);
    const float label_logit = alpha_mlm != 0.f ? s[label] : 0.f;
    float kd = kdfast::kd_row_kd(row, c, soft_ce != 0);
    if (!soft_ce && kd < float(kdfast::kKdStableBelow)) {  // the kernel's small-KL pass, per "thread"
      const float inv_t = 1.f / temperature, dm = (row.r_t - row.r_s) * inv_t;
      const float cm = row.acc / row.z_t - dm;
      const float log_zt = std::log(row.z_t), log_zs = std::log(row.z_s);
      std::vector<float> a(kThreads, 0.f), b(kThreads, 0.f), q(kThreads, 0.f);
      for (int i = 0; i < kThreads; ++i)
        for (long j = i; j < v; j += kThreads) {
          const float xc = (s[j] - row.r_s) * inv_t, yc = (t[j] - row.r_t) * inv_t;
          kdfast::kd_kl_small_add(kdfast::kd_centred_diff((t[j] - s[j]) * inv_t, yc, xc, dm), yc - log_zt,
                                  xc - log_zs, cm, a[i], b[i], q[i]);
        }
      float sa = 0.f, sb = 0.f, sq = 0.f;
      for (int i = 0; i < kThreads; ++i) sa += a[i], sb += b[i], sq += q[i];
      kd = kdfast::kd_kl_small(sa, sb, sq);
    }
    std::printf("%.9g", kdfast::kd_row_loss_from_kd(kd, c, temperature, w, alpha_kd, alpha_mlm, label_logit));
    for (long j = 0; j < v; ++j) {
      float g = kdfast::kd_grad_elem(s[j], t[j], c) - (alpha_mlm != 0.f && j == label ? c.coef_mlm : 0.f);
      std::printf(" %.9g", g);
    }
    std::printf("\n");
  }
  return 0;
}
