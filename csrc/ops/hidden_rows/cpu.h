#pragma once
#include <ATen/ATen.h>

#include <tuple>

namespace kdfast {

// TinyBERT hidden-MSE epilogue on one chunk of projected rows. y [n, d] (float32, or float64 for
// float64 states) is overwritten in place by dY; t [n, d] any float dtype; w [n] row weights in
// y's dtype. Row r: loss_r = w_r ||y_r - t_r||^2, dY_r = 2 w_r (y_r - t_r); rows with w_r = 0
// give 0 and dY_r = 0 without reading y_r or t_r. Returns the loss rows [n] (y's dtype).
at::Tensor hidden_mse_epilogue_cpu(at::Tensor& y, const at::Tensor& t, const at::Tensor& w);

// DistilBERT cosine loss rows and their gradient. s, t [N, d] of one float dtype, w [N] in the
// accumulation dtype (float32, float64 for float64 rows). With ns = max(|s|, eps),
// nt = max(|t|, eps), cos = s.t / (ns nt):
//   loss_r = w_r (1 - cos_r),   d loss_r / d s_r = -w_r (t / (ns nt) - [|s| > eps] cos s / ns^2)
// Rows with w_r = 0 are never read and give 0. Returns (loss rows [N], grad [N, d] in s's dtype,
// or an empty tensor when need_grad is false).
std::tuple<at::Tensor, at::Tensor> cosine_fwd_bwd_cpu(const at::Tensor& s, const at::Tensor& t, const at::Tensor& w,
                                                      double eps, bool need_grad);

}  // namespace kdfast
