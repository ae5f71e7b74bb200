// Kernel family hidden_rows (contract: kdfast/ops/hidden_rows/__init__.py), the cpu backend.
// Hidden-state transfer rows on the CPU: the TinyBERT MSE epilogue (the projection GEMM stays a
// library call; this turns its output into loss rows and dY in place) and the DistilBERT cosine
// loss with its gradient in one pass over the rows. at::vec inside a row, at::parallel_for over
// rows; fp16 / bf16 rows are widened to fp32 in per-thread scratch.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "cpu.h"
#include "common/rows_cpu.h"

namespace kdfast {
namespace {

// 2-D [rows, d] CPU float tensor with unit column stride.
void check_rows_2d(const char* op, const char* name, const at::Tensor& x) {
  TORCH_CHECK_VALUE(x.dim() == 2, op, ": ", name, " must be 2-D [rows, d], got shape ", x.sizes());
  TORCH_CHECK_VALUE(is_kernel_float_dtype(x.scalar_type()), op, ": ", name,
                    " must be float32, float16, bfloat16 or float64, got ", x.scalar_type());
  TORCH_CHECK_VALUE(x.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got ", x.device());
  TORCH_CHECK_VALUE(x.size(1) <= 1 || x.stride(1) == 1, op, ": ", name, " must have unit column stride");
}

// Row weights: contiguous [rows] of the accumulation dtype, on the CPU.
void check_weights(const char* op, const at::Tensor& w, int64_t rows, at::ScalarType acc) {
  TORCH_CHECK_VALUE(w.dim() == 1 && w.size(0) == rows, op, ": w must have shape [", rows, "], got ", w.sizes());
  TORCH_CHECK_VALUE(w.scalar_type() == acc, op, ": w must have dtype ", acc, ", got ", w.scalar_type());
  TORCH_CHECK_VALUE(w.device().is_cpu() && w.is_contiguous(), op, ": w must be a contiguous CPU tensor");
}

}  // namespace

at::Tensor hidden_mse_epilogue_cpu(at::Tensor& y, const at::Tensor& t, const at::Tensor& w) {
  constexpr const char* op = "hidden_mse_epilogue";
  check_rows_2d(op, "y", y);
  check_rows_2d(op, "t", t);
  TORCH_CHECK_VALUE(y.scalar_type() == at::kFloat || y.scalar_type() == at::kDouble, op,
                    ": y must be float32 or float64 (the accumulation dtype), got ", y.scalar_type());
  TORCH_CHECK_VALUE(t.sizes() == y.sizes(), op, ": t has shape ", t.sizes(), " but y has shape ", y.sizes());
  check_weights(op, w, y.size(0), y.scalar_type());
  const int64_t N = y.size(0), D = y.size(1);
  at::Tensor rows = at::empty({N}, w.options());
  AT_DISPATCH_FLOATING_TYPES(y.scalar_type(), "hidden_mse_epilogue_cpu", [&] {
    using acc_t = scalar_t;
    acc_t* yp = y.mutable_data_ptr<acc_t>();
    const acc_t* wp = w.const_data_ptr<acc_t>();
    acc_t* lp = rows.mutable_data_ptr<acc_t>();
    const int64_t ys = y.stride(0), ts = t.stride(0);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.scalar_type(), "hidden_mse_epilogue_cpu_t", [&] {
      const scalar_t* tp = t.const_data_ptr<scalar_t>();
      at::parallel_for(0, N, row_grain(D), [&](int64_t begin, int64_t end) {
        std::vector<acc_t> t_row(std::is_same_v<scalar_t, acc_t> ? 0 : D);
        for (int64_t r = begin; r < end; ++r) {
          acc_t* yr = yp + r * ys;
          if (wp[r] == 0) {  // padding: Y and t may hold anything there
            std::fill(yr, yr + D, acc_t(0));
            lp[r] = 0;
            continue;
          }
          lp[r] = mse_row<acc_t>(yr, widen_row<acc_t>(tp + r * ts, D, t_row.data()), D, wp[r]);
        }
      });
    });
  });
  return rows;
}

std::tuple<at::Tensor, at::Tensor> cosine_fwd_bwd_cpu(const at::Tensor& s, const at::Tensor& t, const at::Tensor& w,
                                                      double eps, bool need_grad) {
  constexpr const char* op = "cosine_fwd_bwd";
  check_rows_2d(op, "s", s);
  check_rows_2d(op, "t", t);
  TORCH_CHECK_VALUE(t.sizes() == s.sizes(), op, ": t has shape ", t.sizes(), " but s has shape ", s.sizes());
  TORCH_CHECK_VALUE(t.scalar_type() == s.scalar_type(), op, ": t has dtype ", t.scalar_type(), " but s has dtype ",
                    s.scalar_type());
  const auto acc_type = s.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  check_weights(op, w, s.size(0), acc_type);
  TORCH_CHECK_VALUE(eps > 0 && std::isfinite(eps), op, ": eps must be > 0 and finite, got ", eps);
  const int64_t N = s.size(0), D = s.size(1);
  at::Tensor rows = at::empty({N}, w.options());
  at::Tensor grad = need_grad ? at::empty({N, D}, s.options()) : at::empty({0}, s.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "cosine_fwd_bwd_cpu", [&] {
    using acc_t = kd_acc_t<scalar_t>;
    using Vec = at::vec::Vectorized<acc_t>;
    constexpr int64_t kW = Vec::size();
    constexpr bool kWiden = !std::is_same_v<scalar_t, acc_t>;
    const scalar_t* sp = s.const_data_ptr<scalar_t>();
    const scalar_t* tp = t.const_data_ptr<scalar_t>();
    const acc_t* wp = w.const_data_ptr<acc_t>();
    acc_t* lp = rows.mutable_data_ptr<acc_t>();
    scalar_t* gp = need_grad ? grad.mutable_data_ptr<scalar_t>() : nullptr;
    const int64_t ss = s.stride(0), ts = t.stride(0);
    const acc_t eps_a = static_cast<acc_t>(eps);
    auto hsum = [](const Vec& v) { return at::vec::vec_reduce_all<acc_t>([](Vec& a, Vec& b) { return a + b; }, v); };
    at::parallel_for(0, N, row_grain(D), [&](int64_t begin, int64_t end) {
      std::vector<acc_t> scratch(kWiden ? 3 * D : D);
      acc_t* s_buf = scratch.data() + (kWiden ? D : 0);
      acc_t* t_buf = s_buf + (kWiden ? D : 0);
      acc_t* g_buf = scratch.data();
      for (int64_t r = begin; r < end; ++r) {
        const acc_t wr = wp[r];
        if (wr == 0) {  // padding may hold anything, even NaN: never read
          lp[r] = 0;
          if (need_grad) std::fill(gp + r * D, gp + (r + 1) * D, scalar_t(0));
          continue;
        }
        const acc_t* x = widen_row<acc_t>(sp + r * ss, D, s_buf);
        const acc_t* y = widen_row<acc_t>(tp + r * ts, D, t_buf);
        Vec v_ss(0), v_tt(0), v_st(0);
        int64_t j = 0;
        for (; j + kW <= D; j += kW) {
          const Vec a = Vec::loadu(x + j), b = Vec::loadu(y + j);
          v_ss = at::vec::fmadd(a, a, v_ss);
          v_tt = at::vec::fmadd(b, b, v_tt);
          v_st = at::vec::fmadd(a, b, v_st);
        }
        acc_t s2 = hsum(v_ss), t2 = hsum(v_tt), st = hsum(v_st);
        for (; j < D; ++j) {
          s2 += x[j] * x[j];
          t2 += y[j] * y[j];
          st += x[j] * y[j];
        }
        const acc_t norm_s = std::sqrt(s2);
        const acc_t ns = std::max(norm_s, eps_a), nt = std::max(std::sqrt(t2), eps_a);
        const acc_t cos = st / (ns * nt);
        lp[r] = wr * (1 - cos);
        if (!need_grad) continue;
        // g = a s + b t: the radial term a vanishes where |s| was clamped to eps
        const acc_t a = norm_s > eps_a ? wr * cos / (ns * ns) : acc_t(0);
        const acc_t b = -wr / (ns * nt);
        // (the cast only ever applies when scalar_t is acc_t: fp32 / fp64 rows are written in place)
        acc_t* g = kWiden ? g_buf : reinterpret_cast<acc_t*>(gp + r * D);
        const Vec va(a), vb(b);
        j = 0;
        for (; j + kW <= D; j += kW) at::vec::fmadd(Vec::loadu(x + j), va, Vec::loadu(y + j) * vb).store(g + j);
        for (; j < D; ++j) g[j] = a * x[j] + b * y[j];
        if constexpr (kWiden) at::vec::convert(g_buf, gp + r * D, D);
      }
    });
  });
  return {rows, grad};
}

}  // namespace kdfast

// The family's schemas and CPU kernels (torch.ops.kdfast.*; the library root is in csrc/bindings.cpp).
TORCH_LIBRARY_FRAGMENT(kdfast, m) {
  // Hidden-MSE epilogue: loss rows w ||y - t||^2, and y overwritten by dY = 2 w (y - t).
  m.def("hidden_mse_epilogue(Tensor(a!) y, Tensor t, Tensor w) -> Tensor");
  // Cosine loss rows w (1 - cos(s, t)) and d/ds (empty unless need_grad).
  m.def("cosine_fwd_bwd(Tensor s, Tensor t, Tensor w, float eps, bool need_grad) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(kdfast, CPU, m) {
  m.impl("hidden_mse_epilogue", &kdfast::hidden_mse_epilogue_cpu);
  m.impl("cosine_fwd_bwd", &kdfast::cosine_fwd_bwd_cpu);
}
