// The logit_kd family's argument checks, shared by its CPU (cpu.cpp) and CUDA (cuda_host.cpp) entry
// points; they raise c10::ValueError (Python ValueError) through TORCH_CHECK_VALUE.
#pragma once
#include <ATen/ATen.h>

#include <optional>

namespace kdfast {

// Shape, dtype, layout and device checks shared by the CPU and CUDA entry points.
void check_kd_args(const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& labels,
                   const at::Tensor& row_weight, const at::Tensor& grad, double temperature, double alpha_mlm,
                   const std::optional<at::Tensor>& mlm_weight);

// Loss rows (float32 [N], weighted) and, written into grad, d(sum of loss rows)/d(student).
// mlm_weight (optional, [N]): the MLM term's own row weights m (loss_r = w_r alpha_kd T^2 kd_r +
// m_r alpha_mlm ce_r); rows with w_r == 0 are skipped whatever m_r.
at::Tensor kd_fwd_bwd_cpu(const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& labels,
                          const at::Tensor& row_weight, at::Tensor& grad, double temperature, double alpha_kd,
                          double alpha_mlm, bool soft_ce, int64_t cuda_stream,
                          const std::optional<at::Tensor>& mlm_weight);

}  // namespace kdfast
