// Registers kdfast ops with the dispatcher (torch.ops.kdfast.*): the library root here, and the ops of the
// families not yet in csrc/ops/<family>/ (those register their own with TORCH_LIBRARY_FRAGMENT). Compiled
// against the CPU libtorch; the CUDA kernels are reached through the plain C launchers of csrc/cuda/ and
// csrc/ops/<family>/cuda.cu, compiled by nvcc and linked in when KDFAST_WITH_CUDA is defined.
#include <torch/extension.h>
#include <torch/library.h>

#include "cpu/attention_transfer_cpu.h"
#include "cpu/score_mse_cpu.h"

#ifdef KDFAST_WITH_CUDA
#include "cuda/launchers.h"
#endif

TORCH_LIBRARY(kdfast, m) {
  // Flash attention transfer from Q and K (KL or score MSE): loss rows [B, H, L] and, when need_grad,
  // the gradients of their sum with respect to q_s and k_s; never an L x L map.
  m.def(
      "attention_transfer_fwd_bwd(Tensor q_s, Tensor k_s, Tensor q_t, Tensor k_t, Tensor key_valid, "
      "Tensor row_weight, float scale_s, float scale_t, bool mse, bool need_grad) -> (Tensor, Tensor, Tensor)");
  // TinyBERT score MSE on [B, H, L, L] maps, the Triton row kernels' contract: per-row sums of counted
  // squared differences and counts; then the gradient 2 coef (s - t) on counted elements, recomputed.
  m.def("score_mse_fwd(Tensor s, Tensor t, Tensor mask, float threshold, bool has_mask) -> (Tensor, Tensor)");
  m.def("score_mse_bwd(Tensor s, Tensor t, Tensor mask, Tensor coef, float threshold, bool has_mask) -> Tensor");
}

TORCH_LIBRARY_IMPL(kdfast, CPU, m) {
  m.impl("attention_transfer_fwd_bwd", &kdfast::attention_transfer_fwd_bwd_cpu);
  m.impl("score_mse_fwd", &kdfast::score_mse_fwd_cpu);
  m.impl("score_mse_bwd", &kdfast::score_mse_bwd_cpu);
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
