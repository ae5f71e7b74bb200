// The CUDA runtime entry points every kernel family's launcher shares (declared in launchers.h).
#include <cuda_runtime.h>

#include "launchers.h"

extern "C" const char* kdfast_cuda_error_string(int error) {
  return cudaGetErrorString(static_cast<cudaError_t>(error));
}

extern "C" int kdfast_cuda_runtime_version(void) { return CUDART_VERSION; }
