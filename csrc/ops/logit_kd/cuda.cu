// Fused logit-distillation loss and gradient on the GPU: one block per row.
//
// Pass 1: each thread folds its strided share of the row into online soft-max statistics
// (KdRowStats::add, vectorised 16-byte loads when the row is aligned); the block merges them
// with warp shuffles and shared memory. A row whose KL is small (below kKdStableBelow) is read
// once more for the small-KL form of kd_math.h (no cancellation at large T). Pass 2: every
// thread re-reads its share (the row was just read, so it comes from L2) and writes the
// gradient; thread 0 writes the row loss.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "../../common/kd_math.h"
#include "../../cuda/launchers.h"

namespace kdfast {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

__device__ __forceinline__ KdRowStats<float> shfl_down(const KdRowStats<float>& st, int offset) {
  KdRowStats<float> o;
  o.m_s = __shfl_down_sync(0xffffffffu, st.m_s, offset);
  o.z_s = __shfl_down_sync(0xffffffffu, st.z_s, offset);
  o.m_t = __shfl_down_sync(0xffffffffu, st.m_t, offset);
  o.z_t = __shfl_down_sync(0xffffffffu, st.z_t, offset);
  o.acc = __shfl_down_sync(0xffffffffu, st.acc, offset);
  o.m_1 = __shfl_down_sync(0xffffffffu, st.m_1, offset);
  o.z_1 = __shfl_down_sync(0xffffffffu, st.z_1, offset);
  o.r_s = __shfl_down_sync(0xffffffffu, st.r_s, offset);
  o.r_t = __shfl_down_sync(0xffffffffu, st.r_t, offset);
  return o;
}

// Merge the statistics of all threads; every thread gets the row's result.
__device__ KdRowStats<float> block_merge(KdRowStats<float> st) {
  __shared__ KdRowStats<float> warp_stats[kWarps];
  for (int off = 16; off > 0; off >>= 1) st.merge(shfl_down(st, off));
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) warp_stats[warp] = st;
  __syncthreads();
  KdRowStats<float> row = warp_stats[0];
  for (int w = 1; w < kWarps; ++w) row.merge(warp_stats[w]);
  return row;
}

// Sum of one float over the block; every thread gets the result.
__device__ float block_sum(float v) {
  __shared__ float warp_sums[kWarps];
  for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads();  // warp_sums may still be read by a previous call
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  float total = warp_sums[0];
  for (int w = 1; w < kWarps; ++w) total += warp_sums[w];
  return total;
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    kd_fwd_bwd_kernel(const T* __restrict__ student, int64_t ss, const T* __restrict__ teacher, int64_t ts,
                      const int64_t* __restrict__ labels, const float* __restrict__ row_weight,
                      const float* __restrict__ mlm_weight, T* grad, int64_t gs, float* __restrict__ loss_rows,
                      int64_t V, float temperature, float alpha_kd, float alpha_mlm_arg, bool soft_ce) {
  constexpr int kVec = 16 / sizeof(T);  // elements per 16-byte load
  const int64_t row = blockIdx.x;
  const float w = row_weight[row];
  // Not __restrict__: in-place mode passes grad == student.
  const T* s = student + row * ss;
  const T* t = teacher + row * ts;
  T* g = grad + row * gs;
  if (w == 0.f) {  // masked row: no loss, zero gradient
    for (int64_t j = threadIdx.x; j < V; j += kThreads) g[j] = from_float<T>(0.f);
    if (threadIdx.x == 0) loss_rows[row] = 0.f;
    return;
  }
  // With MLM row weights m, the row's MLM coefficient relative to w is alpha_mlm m_r / w_r (0 on an
  // unlabelled row: its label is never read and no T = 1 statistics are taken).
  const float alpha_mlm = mlm_weight != nullptr ? alpha_mlm_arg * (mlm_weight[row] / w) : alpha_mlm_arg;
  const bool need_1 = kd_needs_t1_stats(temperature, alpha_mlm);
  const float inv_t = 1.f / temperature;
  const int64_t label = labels[row];
  // Read before pass 2 can overwrite it (in-place mode).
  const float label_logit = alpha_mlm != 0.f ? to_float(s[label]) : 0.f;

  const bool aligned = (reinterpret_cast<uintptr_t>(s) % 16 == 0) && (reinterpret_cast<uintptr_t>(t) % 16 == 0) &&
                       (reinterpret_cast<uintptr_t>(g) % 16 == 0);
  const int64_t v_vec = aligned ? (V / kVec) * kVec : 0;  // elements covered by vector loads

  KdRowStats<float> st = KdRowStats<float>::empty();
  for (int64_t j = threadIdx.x * kVec; j < v_vec; j += kThreads * kVec) {
    uint4 sv = *reinterpret_cast<const uint4*>(s + j), tv = *reinterpret_cast<const uint4*>(t + j);
    const T* sp = reinterpret_cast<const T*>(&sv);
    const T* tp = reinterpret_cast<const T*>(&tv);
#pragma unroll
    for (int k = 0; k < kVec; ++k) st.add(to_float(sp[k]), to_float(tp[k]), inv_t, soft_ce, need_1);
  }
  for (int64_t j = v_vec + threadIdx.x; j < V; j += kThreads)
    st.add(to_float(s[j]), to_float(t[j]), inv_t, soft_ce, need_1);

  const KdRowStats<float> row_st = block_merge(st);
  const KdRowCoeffs<float> c = kd_row_coeffs(row_st, temperature, w, alpha_kd, alpha_mlm);
  float kd = kd_row_kd(row_st, c, soft_ce);
  if (!soft_ce && kd < float(kKdStableBelow)) {  // same for every thread: row_st is the block's
    // small KL (kd_math.h): one more pass over the row, before pass 2 may overwrite it
    const float dm = (row_st.r_t - row_st.r_s) * inv_t;
    const float cm = row_st.acc / row_st.z_t - dm;
    const float log_zt = logf(row_st.z_t), log_zs = logf(row_st.z_s);  // not lse - m: m may be 1e6
    float a = 0.f, b = 0.f, q_out = 0.f;
    for (int64_t j = threadIdx.x; j < V; j += kThreads) {
      const float sj = to_float(s[j]), tj = to_float(t[j]);
      const float xc = (sj - row_st.r_s) * inv_t, yc = (tj - row_st.r_t) * inv_t;
      kd_kl_small_add(kd_centred_diff((tj - sj) * inv_t, yc, xc, dm), yc - log_zt, xc - log_zs, cm, a, b, q_out);
    }
    a = block_sum(a);
    b = block_sum(b);
    q_out = block_sum(q_out);
    kd = kd_kl_small(a, b, q_out);
  }
  __syncthreads();  // every thread has read its share before pass 2 writes (in place: over s)

  for (int64_t j = threadIdx.x * kVec; j < v_vec; j += kThreads * kVec) {
    uint4 sv = *reinterpret_cast<const uint4*>(s + j), tv = *reinterpret_cast<const uint4*>(t + j), gv;
    const T* sp = reinterpret_cast<const T*>(&sv);
    const T* tp = reinterpret_cast<const T*>(&tv);
    T* gp = reinterpret_cast<T*>(&gv);
#pragma unroll
    for (int k = 0; k < kVec; ++k) gp[k] = from_float<T>(kd_grad_elem(to_float(sp[k]), to_float(tp[k]), c));
    *reinterpret_cast<uint4*>(g + j) = gv;
  }
  for (int64_t j = v_vec + threadIdx.x; j < V; j += kThreads)
    g[j] = from_float<T>(kd_grad_elem(to_float(s[j]), to_float(t[j]), c));

  if (alpha_mlm != 0.f) {
    __syncthreads();  // the label's gradient was written by some thread above
    if (threadIdx.x == 0) g[label] = from_float<T>(to_float(g[label]) - c.coef_mlm);
  }
  if (threadIdx.x == 0)
    loss_rows[row] = kd_row_loss_from_kd(kd, c, temperature, w, alpha_kd, alpha_mlm, label_logit);
}

template <typename T>
cudaError_t launch(const void* s, int64_t ss, const void* t, int64_t ts, const int64_t* labels, const float* w,
                   const float* mw, void* g, int64_t gs, float* loss, int64_t n, int64_t V, float temperature,
                   float alpha_kd, float alpha_mlm, int soft_ce, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  if (n > 2147483647LL) return cudaErrorInvalidValue;
  kd_fwd_bwd_kernel<T><<<static_cast<unsigned>(n), kThreads, 0, stream>>>(
      static_cast<const T*>(s), ss, static_cast<const T*>(t), ts, labels, w, mw, static_cast<T*>(g), gs, loss, V,
      temperature, alpha_kd, alpha_mlm, soft_ce != 0);
  return cudaGetLastError();
}

}  // namespace
}  // namespace kdfast

extern "C" int kdfast_kd_fwd_bwd_cuda(const void* student, int64_t student_row_stride, const void* teacher,
                                      int64_t teacher_row_stride, const int64_t* labels, const float* row_weight,
                                      const float* mlm_weight, void* grad, int64_t grad_row_stride, float* loss_rows, int64_t n_rows,
                                      int64_t vocab, int dtype, float temperature, float alpha_kd, float alpha_mlm,
                                      int soft_ce, void* stream) {
  auto st = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case KDFAST_F32:
      return kdfast::launch<float>(student, student_row_stride, teacher, teacher_row_stride, labels, row_weight,
                                   mlm_weight, grad,
                                   grad_row_stride, loss_rows, n_rows, vocab, temperature, alpha_kd, alpha_mlm,
                                   soft_ce, st);
    case KDFAST_F16:
      return kdfast::launch<__half>(student, student_row_stride, teacher, teacher_row_stride, labels, row_weight,
                                    mlm_weight, grad, grad_row_stride, loss_rows, n_rows, vocab, temperature, alpha_kd,
                                    alpha_mlm, soft_ce, st);
    case KDFAST_BF16:
      return kdfast::launch<__nv_bfloat16>(student, student_row_stride, teacher, teacher_row_stride, labels,
                                           row_weight, mlm_weight, grad, grad_row_stride, loss_rows, n_rows, vocab, temperature,
                                           alpha_kd, alpha_mlm, soft_ce, st);
    default:
      return cudaErrorInvalidValue;
  }
}
