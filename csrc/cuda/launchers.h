// Plain C entry points of the CUDA kernels. They take raw pointers, sizes and a
// cudaStream_t passed as void*, and include no torch header, so nvcc compiles them
// without a CUDA build of torch; csrc/bindings.cpp calls them from the CPU-built extension.
#pragma once
#include <cstdint>

extern "C" {

// dtype codes shared by every launcher
enum KdfastDtype { KDFAST_F32 = 0, KDFAST_F16 = 1, KDFAST_BF16 = 2 };

// Fused logit-distillation loss + gradient, one thread block per row (math: csrc/common/kd_math.h).
// student/teacher/grad: [n_rows, vocab] of `dtype` with unit column stride and the given row strides
// (grad may equal student: in-place mode). labels int64 [n_rows]; row_weight, loss_rows float32 [n_rows];
// mlm_weight float32 [n_rows] or null: the MLM term's own row weights (null: row_weight).
// Returns a cudaError_t (0 on success).
int kdfast_kd_fwd_bwd_cuda(const void* student, int64_t student_row_stride, const void* teacher,
                           int64_t teacher_row_stride, const int64_t* labels, const float* row_weight,
                           const float* mlm_weight, void* grad,
                           int64_t grad_row_stride, float* loss_rows, int64_t n_rows, int64_t vocab, int dtype,
                           float temperature, float alpha_kd, float alpha_mlm, int soft_ce, void* stream);

// Human-readable text of a cudaError_t returned above.
const char* kdfast_cuda_error_string(int error);

// CUDA runtime version this extension was compiled against (e.g. 13000).
int kdfast_cuda_runtime_version(void);
}
