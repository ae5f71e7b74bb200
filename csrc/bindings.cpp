// Registers kdfast ops with the dispatcher (torch.ops.kdfast.*): the library root here, and the ops of the
// families not yet in csrc/ops/<family>/ (those register their own with TORCH_LIBRARY_FRAGMENT). Compiled
// against the CPU libtorch; the CUDA kernels are reached through the plain C launchers of csrc/cuda/ and
// csrc/ops/<family>/cuda.cu, compiled by nvcc and linked in when KDFAST_WITH_CUDA is defined.
#include <torch/extension.h>
#include <torch/library.h>

#include "cpu/hidden_cpu.h"
#include "cpu/nonorm_cpu.h"

#ifdef KDFAST_WITH_CUDA
#include "cuda/launchers.h"
#endif

TORCH_LIBRARY(kdfast, m) {
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
  m.impl("nonorm_fwd", &kdfast::nonorm_fwd_cpu);
  m.impl("nonorm_bwd", &kdfast::nonorm_bwd_cpu);
  m.impl("relu_bwd_colsum", &kdfast::relu_bwd_colsum_cpu);
  m.impl("hidden_mse_epilogue", &kdfast::hidden_mse_epilogue_cpu);
  m.impl("cosine_fwd_bwd", &kdfast::cosine_fwd_bwd_cpu);
}

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
