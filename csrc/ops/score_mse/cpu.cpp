// TinyBERT score MSE on materialised [B, H, L, L] maps on the CPU: torch.ops.kdfast.score_mse_fwd /
// score_mse_bwd, the row contract of kdfast/ops/score_mse (the Triton kernels' too).
// s, t [B, H, L, L] of one float dtype (fp32 / fp64 / fp16 / bf16), mask [B, L] int8 (nonzero =
// real token; any int8 tensor, e.g. one element, when has_mask is false). Element j of row
// r = (b, h, i) is counted when
//     s_j > threshold  and  t_j > threshold  and  (!has_mask  or  mask[b, i] != 0 and mask[b, j] != 0)
// score_mse_fwd: (row sums of counted (s_j - t_j)^2 [B*H*L] in the accumulation dtype, float32 or
//   float64 for float64 maps; row counts of counted elements [B*H*L] int32).
// score_mse_bwd: d loss / d s = 2 coef (s - t) on counted elements, 0 elsewhere, [B, H, L, L]
//   contiguous in s's dtype; coef is a one-element float32 / float64 tensor (upstream gradient /
//   total count).
// window >= 0 counts only the elements of the band |i - j| <= window, and reads nothing else of the
// row (the gradient is 0 outside it); window = -1: the whole row.
// Rows of masked query tokens are never read (they may hold anything).
//
// Same split as the Triton kernels: forward keeps nothing but a sum and a count per score row,
// backward reads the maps again and recomputes the gradient (the total count, and so the scale,
// is only known once every row has been read). Eager torch materialises several L x L
// temporaries instead (widened copies, the counted mask, the difference, its square).
//
// Rows are split over threads with at::parallel_for; inside a row at::vec works on whole
// vectors, the last partial one included: it is loaded with a lane count, and lanes past the row
// end read 0 from the key-keep row, so they are never counted and need no scalar tail loop.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <utility>
#include <vector>

#include <torch/library.h>

#include "common/rows_cpu.h"

namespace kdfast {
namespace {

// Per key column, 1 where it may be counted and 0 where it is padding: one row per batch item
// with a mask, a single row of ones without (every row then goes through the same vector code).
template <typename acc_t>
std::vector<acc_t> key_keep_rows(const at::Tensor& mask, bool has_mask, int64_t B, int64_t L) {
  if (!has_mask) return std::vector<acc_t>(L, acc_t(1));
  std::vector<acc_t> keep(B * L);
  const int8_t* m = mask.const_data_ptr<int8_t>();
  for (int64_t k = 0; k < B * L; ++k) keep[k] = m[k] != 0 ? acc_t(1) : acc_t(0);
  return keep;
}

// Lanes [j, j + n) of one row (n <= vector width): (s - t where counted else exactly 0, the
// counted lanes as an all-ones bit mask). A NaN score fails `> threshold` and is not counted; the
// bitwise and then zeroes whatever the difference held there (NaN or Inf of padding).
template <typename acc_t>
std::pair<at::vec::Vectorized<acc_t>, at::vec::Vectorized<acc_t>> counted_diff(
    const acc_t* s, const acc_t* t, const acc_t* keep, int64_t j, int64_t n,
    const at::vec::Vectorized<acc_t>& thr) {
  using Vec = at::vec::Vectorized<acc_t>;
  const Vec sv = Vec::loadu(s + j, n), tv = Vec::loadu(t + j, n), kv = Vec::loadu(keep + j, n);
  const Vec on = (sv > thr) & (tv > thr) & (kv > Vec(0));
  return {(sv - tv) & on, on};
}

void check_maps(const char* op, const at::Tensor& s, const at::Tensor& t, const at::Tensor& mask, bool has_mask,
                int64_t window) {
  TORCH_CHECK_VALUE(window >= -1, op, ": window must be >= 0 (or -1: the whole row), got ", window);
  TORCH_CHECK_VALUE(s.dim() == 4 && s.size(2) == s.size(3), op, ": s must be [B, H, L, L], got shape ", s.sizes());
  TORCH_CHECK_VALUE(t.sizes() == s.sizes(), op, ": t has shape ", t.sizes(), " but s has shape ", s.sizes());
  TORCH_CHECK_VALUE(is_kernel_float_dtype(s.scalar_type()), op,
                    ": s must be float32, float16, bfloat16 or float64, got ", s.scalar_type());
  TORCH_CHECK_VALUE(t.scalar_type() == s.scalar_type(), op, ": t has dtype ", t.scalar_type(), " but s has dtype ",
                    s.scalar_type());
  TORCH_CHECK_VALUE(s.device().is_cpu() && t.device().is_cpu(), op, ": s and t must be CPU tensors, got ",
                    s.device(), " and ", t.device());
  TORCH_CHECK_VALUE(mask.scalar_type() == at::kChar && mask.device().is_cpu(), op,
                    ": mask must be an int8 CPU tensor, got ", mask.scalar_type(), " on ", mask.device());
  if (has_mask) {
    TORCH_CHECK_VALUE(mask.dim() == 2 && mask.size(0) == s.size(0) && mask.size(1) == s.size(2), op,
                      ": mask must have shape [B, L] = [", s.size(0), ", ", s.size(2), "], got ", mask.sizes());
  }
}

// The row walk both ops share: f(r, j0, n, s row, t row, key-keep row, spare) for every row
// r = (b, h, i) whose query token is kept, skip(r) for the others. The rows cover the columns
// [j0, j0 + n): the band of a windowed map, the whole row otherwise, and are passed from column
// j0 on, widened to acc_t; for fp16 / bf16, spare is one more row of per-task scratch (null otherwise).
template <typename scalar_t, typename F, typename Skip>
void for_each_row(const at::Tensor& s, const at::Tensor& t, const at::Tensor& mask, bool has_mask, int64_t window,
                  F&& f, Skip&& skip) {
  using acc_t = kd_acc_t<scalar_t>;
  constexpr bool kWiden = !std::is_same_v<scalar_t, acc_t>;
  const int64_t B = s.size(0), H = s.size(1), L = s.size(2);
  const Rows<scalar_t> s_rows(s), t_rows(t);
  const std::vector<acc_t> keep = key_keep_rows<acc_t>(mask, has_mask, B, L);
  const int8_t* m = has_mask ? mask.const_data_ptr<int8_t>() : nullptr;
  const int64_t width = window >= 0 ? std::min<int64_t>(L, 2 * window + 1) : L;
  at::parallel_for(0, B * H * L, row_grain(width), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> scratch(kWiden ? 3 * L : 0);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t b = r / (H * L), h = r / L % H, i = r % L;
      if (has_mask && m[b * L + i] == 0) {
        skip(r);
        continue;
      }
      const int64_t j0 = window >= 0 ? std::max<int64_t>(0, i - window) : 0;
      const int64_t n = (window >= 0 ? std::min<int64_t>(L, i + window + 1) : L) - j0;
      const acc_t* sr = widen_row<acc_t>(s_rows.at(b, h, i) + j0, n, scratch.data());
      const acc_t* tr = widen_row<acc_t>(t_rows.at(b, h, i) + j0, n, scratch.data() + (kWiden ? L : 0));
      f(r, j0, n, sr, tr, keep.data() + (has_mask ? b * L : 0) + j0, kWiden ? scratch.data() + 2 * L : nullptr);
    }
  });
}

at::Tensor unit_last_stride(const at::Tensor& x) { return x.stride(3) == 1 ? x : x.contiguous(); }

}  // namespace

std::tuple<at::Tensor, at::Tensor> score_mse_fwd_cpu(const at::Tensor& s_in, const at::Tensor& t_in,
                                                     const at::Tensor& mask_in, double threshold, bool has_mask,
                                                     int64_t window) {
  check_maps("score_mse_fwd", s_in, t_in, mask_in, has_mask, window);
  const at::Tensor s = unit_last_stride(s_in), t = unit_last_stride(t_in), mask = mask_in.contiguous();
  const int64_t L = s.size(2), rows = s.size(0) * s.size(1) * L;
  const auto acc_type = s.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor sums = at::empty({rows}, s.options().dtype(acc_type));
  at::Tensor counts = at::empty({rows}, s.options().dtype(at::kInt));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "score_mse_fwd_cpu", [&] {
    using acc_t = kd_acc_t<scalar_t>;
    using Vec = at::vec::Vectorized<acc_t>;
    constexpr int64_t kW = Vec::size();
    acc_t* sum_p = sums.mutable_data_ptr<acc_t>();
    int32_t* cnt_p = counts.mutable_data_ptr<int32_t>();
    const Vec thr(static_cast<acc_t>(threshold)), one(1);
    auto hsum = [](const Vec& v) { return at::vec::vec_reduce_all<acc_t>([](Vec& a, Vec& b) { return a + b; }, v); };
    for_each_row<scalar_t>(
        s, t, mask, has_mask, window,
        [&](int64_t r, int64_t, int64_t n, const acc_t* sr, const acc_t* tr, const acc_t* keep, acc_t*) {
          Vec v_sum(0), v_cnt(0);
          for (int64_t j = 0; j < n; j += kW) {
            const auto [d, on] = counted_diff<acc_t>(sr, tr, keep, j, std::min(kW, n - j), thr);
            v_sum = at::vec::fmadd(d, d, v_sum);
            v_cnt += on & one;  // 1 in counted lanes: exact, a lane counts at most L / kW < 2^24
          }
          sum_p[r] = hsum(v_sum);
          cnt_p[r] = static_cast<int32_t>(hsum(v_cnt));
        },
        [&](int64_t r) {
          sum_p[r] = 0;
          cnt_p[r] = 0;
        });
  });
  return {sums, counts};
}

at::Tensor score_mse_bwd_cpu(const at::Tensor& s_in, const at::Tensor& t_in, const at::Tensor& mask_in,
                             const at::Tensor& coef, double threshold, bool has_mask, int64_t window) {
  constexpr const char* op = "score_mse_bwd";
  check_maps(op, s_in, t_in, mask_in, has_mask, window);
  TORCH_CHECK_VALUE(coef.numel() == 1 && (coef.scalar_type() == at::kFloat || coef.scalar_type() == at::kDouble) &&
                        coef.device().is_cpu(),
                    op, ": coef must be a one-element float32 or float64 CPU tensor, got ", coef.scalar_type(), " ",
                    coef.sizes(), " on ", coef.device());
  const at::Tensor s = unit_last_stride(s_in), t = unit_last_stride(t_in), mask = mask_in.contiguous();
  const int64_t L = s.size(2);
  at::Tensor grad = at::empty(s.sizes(), s.options().memory_format(at::MemoryFormat::Contiguous));
  const double coef_value = coef.item<double>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "score_mse_bwd_cpu", [&] {
    using acc_t = kd_acc_t<scalar_t>;
    using Vec = at::vec::Vectorized<acc_t>;
    constexpr int64_t kW = Vec::size();
    constexpr bool kWiden = !std::is_same_v<scalar_t, acc_t>;
    scalar_t* g_p = grad.mutable_data_ptr<scalar_t>();
    const Vec thr(static_cast<acc_t>(threshold)), two_coef(static_cast<acc_t>(2 * coef_value));
    for_each_row<scalar_t>(
        s, t, mask, has_mask, window,
        [&](int64_t r, int64_t j0, int64_t n, const acc_t* sr, const acc_t* tr, const acc_t* keep, acc_t* spare) {
          // fp16 / bf16: the row is computed in acc_t and narrowed once; fp32 / fp64 are written in
          // place (the cast only ever applies when scalar_t is acc_t)
          scalar_t* g_row = g_p + r * L;
          acc_t* g = kWiden ? spare : reinterpret_cast<acc_t*>(g_row + j0);
          for (int64_t j = 0; j < n; j += kW) {
            const int64_t m = std::min(kW, n - j);
            (counted_diff<acc_t>(sr, tr, keep, j, m, thr).first * two_coef).store(g + j, m);
          }
          if constexpr (kWiden) at::vec::convert(g, g_row + j0, n);
          std::fill(g_row, g_row + j0, scalar_t(0));  // outside the band
          std::fill(g_row + j0 + n, g_row + L, scalar_t(0));
        },
        [&](int64_t r) { std::fill(g_p + r * L, g_p + (r + 1) * L, scalar_t(0)); });
  });
  return grad;
}

}  // namespace kdfast

TORCH_LIBRARY_FRAGMENT(kdfast, m) {
  // TinyBERT score MSE on [B, H, L, L] maps, the Triton row kernels' contract: per-row sums of counted
  // squared differences and counts; then the gradient 2 coef (s - t) on counted elements, recomputed.
  // window >= 0: only the band |i - j| <= window of each row; -1: the whole row.
  m.def("score_mse_fwd(Tensor s, Tensor t, Tensor mask, float threshold, bool has_mask, int window) -> "
        "(Tensor, Tensor)");
  m.def("score_mse_bwd(Tensor s, Tensor t, Tensor mask, Tensor coef, float threshold, bool has_mask, "
        "int window) -> Tensor");
}

TORCH_LIBRARY_IMPL(kdfast, CPU, m) {
  m.impl("score_mse_fwd", &kdfast::score_mse_fwd_cpu);
  m.impl("score_mse_bwd", &kdfast::score_mse_bwd_cpu);
}
