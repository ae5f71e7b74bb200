#pragma once
#include <ATen/ATen.h>

#include <tuple>

namespace kdfast {

// Flash attention transfer on the CPU: the contract of
// kdfast.kernels.reference.attention_transfer_fwd_bwd_torch without any L x L map.
// q_s, k_s [B, H, L, ds], q_t, k_t [B, H, L, dt] (one float dtype), key_valid [B, L] bool,
// row_weight [B, L] (float32, float64 for float64 inputs; w_i = 0 on uncounted query rows).
// Scores s = scale_s q_s k_s^T, t = scale_t q_t k_t^T over the valid keys j of each row i:
//   kl:  row_i = sum_j A_t,ij (log A_t,ij - log A_s,ij),  dS_ij = w_i (A_s,ij - A_t,ij)
//   mse: row_i = sum_j (s_ij - t_ij)^2,                    dS_ij = 2 w_i (s_ij - t_ij)
//   dq_s = scale_s dS k_s,  dk_s = scale_s dS^T q_s
// Returns (loss rows w_i row_i [B, H, L] in the accumulation dtype, dq_s, dk_s in the inputs'
// dtype; the last two empty unless need_grad). Padded keys and uncounted rows are never read.
std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_transfer_fwd_bwd_cpu(
    const at::Tensor& q_s, const at::Tensor& k_s, const at::Tensor& q_t, const at::Tensor& k_t,
    const at::Tensor& key_valid, const at::Tensor& row_weight, double scale_s, double scale_t, bool mse,
    bool need_grad);

}  // namespace kdfast
