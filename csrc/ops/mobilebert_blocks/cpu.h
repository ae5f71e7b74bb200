#pragma once
#include <ATen/ATen.h>

#include <optional>
#include <tuple>

namespace kdfast {

// y = (x + bias + residual) * gamma + beta over rows of [N, D] (bias, residual optional).
at::Tensor nonorm_fwd_cpu(const at::Tensor& x, const std::optional<at::Tensor>& bias,
                          const std::optional<at::Tensor>& residual, const at::Tensor& gamma, const at::Tensor& beta);

// One pass over dy and the saved inputs: dx = dy * gamma (also the residual's gradient),
// dgamma = sum_rows dy * (x + bias + residual), dbeta = sum_rows dy, dbias = gamma * dbeta.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> nonorm_bwd_cpu(
    const at::Tensor& dy, const at::Tensor& x, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& residual, const at::Tensor& gamma);

// ReLU backward fused with the preceding bias's gradient: dh *= (h > 0) in place, returns sum_rows dh.
at::Tensor relu_bwd_colsum_cpu(at::Tensor& dh, const at::Tensor& h);

}  // namespace kdfast
