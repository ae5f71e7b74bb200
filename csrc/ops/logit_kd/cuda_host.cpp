// The CUDA entry point of kd_fwd_bwd: checks the arguments and calls the plain C launcher of cuda.cu
// (compiled by nvcc, linked in when KDFAST_WITH_CUDA is defined) on the caller's stream.
#ifdef KDFAST_WITH_CUDA
#include <ATen/ATen.h>
#include <torch/library.h>

#include "cuda/launchers.h"
#include "ops/logit_kd/kd_args.h"

namespace kdfast {
namespace {

int cuda_dtype_code(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return KDFAST_F32;
    case at::kHalf: return KDFAST_F16;
    case at::kBFloat16: return KDFAST_BF16;
    default: TORCH_CHECK_VALUE(false, "kdfast CUDA kernels support float32, float16 and bfloat16, got ", t);
  }
}

at::Tensor kd_fwd_bwd_cuda(const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& labels,
                           const at::Tensor& row_weight, at::Tensor& grad, double temperature, double alpha_kd,
                           double alpha_mlm, bool soft_ce, int64_t cuda_stream,
                           const std::optional<at::Tensor>& mlm_weight) {
  check_kd_args(student, teacher, labels, row_weight, grad, temperature, alpha_mlm, mlm_weight);
  TORCH_CHECK_VALUE(student.is_cuda(), "kd_fwd_bwd (CUDA): tensors must be CUDA tensors, got ", student.device());
  at::Tensor loss_rows = at::empty({student.size(0)}, row_weight.options());
  const int err = kdfast_kd_fwd_bwd_cuda(
      student.const_data_ptr(), student.stride(0), teacher.const_data_ptr(), teacher.stride(0),
      labels.const_data_ptr<int64_t>(), row_weight.const_data_ptr<float>(),
      mlm_weight.has_value() ? mlm_weight->const_data_ptr<float>() : nullptr, grad.mutable_data_ptr(), grad.stride(0),
      loss_rows.mutable_data_ptr<float>(), student.size(0), student.size(1), cuda_dtype_code(student.scalar_type()),
      static_cast<float>(temperature), static_cast<float>(alpha_kd), static_cast<float>(alpha_mlm), soft_ce ? 1 : 0,
      reinterpret_cast<void*>(cuda_stream));
  TORCH_CHECK(err == 0, "kd_fwd_bwd (CUDA) launch failed: ", kdfast_cuda_error_string(err));
  return loss_rows;
}

}  // namespace
}  // namespace kdfast

TORCH_LIBRARY_IMPL(kdfast, CUDA, m) { m.impl("kd_fwd_bwd", &kdfast::kd_fwd_bwd_cuda); }
#endif
