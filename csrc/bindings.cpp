// Registers every kdfast op with the dispatcher (torch.ops.kdfast.*). Compiled against the
// CPU libtorch; the CUDA kernels are reached through the plain C launchers of csrc/cuda/,
// compiled by nvcc and linked in when KDFAST_WITH_CUDA is defined.
#include <torch/extension.h>
#include <torch/library.h>

#include "cpu/hidden_cpu.h"
#include "cpu/kd_loss_cpu.h"
#include "cpu/nonorm_cpu.h"

#ifdef KDFAST_WITH_CUDA
#include "cuda/launchers.h"

namespace kdfast {

int cuda_dtype_code(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return KDFAST_F32;
    case at::kHalf: return KDFAST_F16;
    case at::kBFloat16: return KDFAST_BF16;
    default: TORCH_CHECK(false, "kdfast CUDA kernels support float32, float16 and bfloat16, got ", t);
  }
}

at::Tensor kd_fwd_bwd_cuda(const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& labels,
                           const at::Tensor& row_weight, at::Tensor& grad, double temperature, double alpha_kd,
                           double alpha_mlm, bool soft_ce, int64_t cuda_stream) {
  check_kd_args(student, teacher, labels, row_weight, grad, temperature, alpha_mlm);
  TORCH_CHECK(student.is_cuda(), "kd_fwd_bwd (CUDA): tensors must be CUDA tensors, got ", student.device());
  at::Tensor loss_rows = at::empty({student.size(0)}, row_weight.options());
  const int err = kdfast_kd_fwd_bwd_cuda(
      student.const_data_ptr(), student.stride(0), teacher.const_data_ptr(), teacher.stride(0),
      labels.const_data_ptr<int64_t>(), row_weight.const_data_ptr<float>(), grad.mutable_data_ptr(), grad.stride(0),
      loss_rows.mutable_data_ptr<float>(), student.size(0), student.size(1), cuda_dtype_code(student.scalar_type()),
      static_cast<float>(temperature), static_cast<float>(alpha_kd), static_cast<float>(alpha_mlm), soft_ce ? 1 : 0,
      reinterpret_cast<void*>(cuda_stream));
  TORCH_CHECK(err == 0, "kd_fwd_bwd (CUDA) launch failed: ", kdfast_cuda_error_string(err));
  return loss_rows;
}

}  // namespace kdfast
#endif

TORCH_LIBRARY(kdfast, m) {
  // Loss rows and, written into `grad`, the gradient of their sum with respect to `student`.
  m.def(
      "kd_fwd_bwd(Tensor student, Tensor teacher, Tensor labels, Tensor row_weight, Tensor(a!) grad, "
      "float temperature, float alpha_kd, float alpha_mlm, bool soft_ce, int cuda_stream=0) -> Tensor");
  // MobileBERT epilogue: y = (x + bias + residual) * gamma + beta on [rows, width], and its one-pass backward
  // returning (dx = dresidual, dbias, dgamma, dbeta).
  m.def("nonorm_fwd(Tensor x, Tensor? bias, Tensor? residual, Tensor gamma, Tensor beta) -> Tensor");
  m.def("nonorm_bwd(Tensor dy, Tensor x, Tensor? bias, Tensor? residual, Tensor gamma) -> (Tensor, Tensor, Tensor, Tensor)");
  // ReLU backward in place (dh *= h > 0) fused with the column sum that is the preceding bias's gradient.
  m.def("relu_bwd_colsum(Tensor(a!) dh, Tensor h) -> Tensor");
  // Hidden-MSE epilogue: loss rows w ||y - t||^2, and y overwritten by dY = 2 w (y - t).
  m.def("hidden_mse_epilogue(Tensor(a!) y, Tensor t, Tensor w) -> Tensor");
  // Cosine loss rows w (1 - cos(s, t)) and d/ds (empty unless need_grad).
  m.def("cosine_fwd_bwd(Tensor s, Tensor t, Tensor w, float eps, bool need_grad) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(kdfast, CPU, m) {
  m.impl("kd_fwd_bwd", &kdfast::kd_fwd_bwd_cpu);
  m.impl("nonorm_fwd", &kdfast::nonorm_fwd_cpu);
  m.impl("nonorm_bwd", &kdfast::nonorm_bwd_cpu);
  m.impl("relu_bwd_colsum", &kdfast::relu_bwd_colsum_cpu);
  m.impl("hidden_mse_epilogue", &kdfast::hidden_mse_epilogue_cpu);
  m.impl("cosine_fwd_bwd", &kdfast::cosine_fwd_bwd_cpu);
}

#ifdef KDFAST_WITH_CUDA
TORCH_LIBRARY_IMPL(kdfast, CUDA, m) { m.impl("kd_fwd_bwd", &kdfast::kd_fwd_bwd_cuda); }
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
#ifdef KDFAST_WITH_CUDA
  m.attr("with_cuda") = true;
  m.attr("cuda_runtime_version") = kdfast_cuda_runtime_version();
#else
  m.attr("with_cuda") = false;
  m.attr("cuda_runtime_version") = 0;
#endif
  m.attr("cpu_capability") = KDFAST_CPU_CAPABILITY_NAME;
}
