// The logit_kd family's argument checks, shared by its CPU (cpu.cpp) and CUDA (cuda_host.cpp) entry
// points; they raise c10::ValueError (Python ValueError) through TORCH_CHECK_VALUE.
#pragma once
#include <ATen/ATen.h>

namespace kdfast {

// Shape, dtype, layout and device checks shared by the CPU and CUDA entry points.
void check_kd_args(const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& labels,
                   const at::Tensor& row_weight, const at::Tensor& grad, double temperature, double alpha_mlm);

// Loss rows (float32 [N], weighted) and, written into grad, d(sum of loss rows)/d(student).
at::Tensor kd_fwd_bwd_cpu(const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& labels,
                          const at::Tensor& row_weight, at::Tensor& grad, double temperature, double alpha_kd,
                          double alpha_mlm, bool soft_ce, int64_t cuda_stream);

}  // namespace kdfast
