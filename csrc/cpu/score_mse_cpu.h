#pragma once
#include <ATen/ATen.h>

#include <tuple>

namespace kdfast {

// TinyBERT score MSE on materialised maps, the contract of the Triton row kernels in
// kdfast/kernels/triton/score_mse.py. s, t [B, H, L, L] of one float dtype (fp32 / fp64 / fp16 /
// bf16), mask [B, L] int8 (nonzero = real token; any int8 tensor, e.g. one element, when has_mask
// is false). Element j of row r = (b, h, i) is counted when
//     s_j > threshold  and  t_j > threshold  and  (!has_mask  or  mask[b, i] != 0 and mask[b, j] != 0)
// score_mse_fwd: (row sums of counted (s_j - t_j)^2 [B*H*L] in the accumulation dtype, float32 or
//   float64 for float64 maps; row counts of counted elements [B*H*L] int32).
// score_mse_bwd: d loss / d s = 2 coef (s - t) on counted elements, 0 elsewhere, [B, H, L, L]
//   contiguous in s's dtype; coef is a one-element float32 / float64 tensor (upstream gradient /
//   total count).
// Rows of masked query tokens are never read (they may hold anything).
std::tuple<at::Tensor, at::Tensor> score_mse_fwd_cpu(const at::Tensor& s, const at::Tensor& t, const at::Tensor& mask,
                                                     double threshold, bool has_mask);
at::Tensor score_mse_bwd_cpu(const at::Tensor& s, const at::Tensor& t, const at::Tensor& mask, const at::Tensor& coef,
                             double threshold, bool has_mask);

}  // namespace kdfast
