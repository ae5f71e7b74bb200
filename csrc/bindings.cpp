// The kdfast library root (torch.ops.kdfast.*) and the module's attributes. Each kernel family registers
// its own ops from csrc/ops/<family>/ with TORCH_LIBRARY_FRAGMENT / TORCH_LIBRARY_IMPL. Compiled against
// the CPU libtorch; the CUDA kernels are reached through the plain C launchers of csrc/ops/<family>/cuda.cu,
// compiled by nvcc and linked in when KDFAST_WITH_CUDA is defined.
#include <torch/extension.h>
#include <torch/library.h>

#ifdef KDFAST_WITH_CUDA
#include "cuda/launchers.h"
#endif

TORCH_LIBRARY(kdfast, m) {}

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
