// Kernel family mobilebert_blocks (contract: kdfast/ops/mobilebert_blocks/__init__.py), the cpu backend.
// MobileBERT's memory-bound epilogue on the CPU: bias + residual + NoNorm, forward and backward
// in one pass each, and ReLU backward fused with its bias gradient. at::vec over a row,
// at::parallel_for over rows.
//
// Column sums (dgamma, dbeta, the ReLU bias gradient) are reduced in fixed chunks of
// kChunkRows rows: each chunk writes its partial sums to its own slot and the slots are added
// in order at the end. The result does not depend on the number of threads, and each fp32
// partial sums at most kChunkRows terms.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <vector>

#include "cpu.h"

namespace kdfast {
namespace {

constexpr int64_t kChunkRows = 64;

void check_rows(const char* op, const char* name, const at::Tensor& t, const at::Tensor& like) {
  TORCH_CHECK_VALUE(t.dim() == 2 && t.sizes() == like.sizes(), op, ": ", name, " must have shape ", like.sizes(),
                    ", got ", t.sizes());
  TORCH_CHECK_VALUE(t.scalar_type() == like.scalar_type(), op, ": ", name, " must have dtype ", like.scalar_type(),
                    ", got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.size(1) <= 1 || t.stride(1) == 1, op, ": ", name, " must have unit column stride");
  TORCH_CHECK_VALUE(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor");
}

void check_vec(const char* op, const char* name, const at::Tensor& t, const at::Tensor& like) {
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == like.size(1) && t.is_contiguous(), op, ": ", name,
                    " must be contiguous [", like.size(1), "], got ", t.sizes());
  TORCH_CHECK_VALUE(t.scalar_type() == like.scalar_type(), op, ": ", name, " must have dtype ", like.scalar_type());
  TORCH_CHECK_VALUE(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor");
}

void check_inputs(const char* op, const at::Tensor& x, const std::optional<at::Tensor>& bias,
                        const std::optional<at::Tensor>& residual, const at::Tensor& gamma) {
  TORCH_CHECK_VALUE(x.dim() == 2, op, ": x must be 2-D [rows, width], got ", x.sizes());
  check_rows(op, "x", x, x);
  TORCH_CHECK_VALUE(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, op,
                    ": float32 or float64 only, got ", x.scalar_type());
  if (bias) check_vec(op, "bias", *bias, x);
  if (residual) check_rows(op, "residual", *residual, x);
  check_vec(op, "gamma", gamma, x);
}

// s = x + bias + residual for one row, vectorised; f(j, s_vec) / g(j, s_scalar) consume it.
template <typename scalar_t, bool HAS_B, bool HAS_R, typename VecFn, typename ScalarFn>
inline void for_row(const scalar_t* x, const scalar_t* b, const scalar_t* r, int64_t D, VecFn&& f, ScalarFn&& g) {
  using Vec = at::vec::Vectorized<scalar_t>;
  constexpr int64_t kW = Vec::size();
  int64_t j = 0;
  for (; j + kW <= D; j += kW) {
    Vec s = Vec::loadu(x + j);
    if constexpr (HAS_B) s = s + Vec::loadu(b + j);
    if constexpr (HAS_R) s = s + Vec::loadu(r + j);
    f(j, s);
  }
  for (; j < D; ++j) {
    scalar_t s = x[j];
    if constexpr (HAS_B) s += b[j];
    if constexpr (HAS_R) s += r[j];
    g(j, s);
  }
}

template <typename Fn>
void dispatch_br(bool has_b, bool has_r, Fn&& fn) {
  using T = std::true_type;
  using F = std::false_type;
  if (has_b) {
    has_r ? fn(T{}, T{}) : fn(T{}, F{});
  } else {
    has_r ? fn(F{}, T{}) : fn(F{}, F{});
  }
}

template <typename scalar_t>
void fwd_kernel(const at::Tensor& x, const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& residual,
                      const at::Tensor& gamma, const at::Tensor& beta, at::Tensor& out) {
  using Vec = at::vec::Vectorized<scalar_t>;
  const int64_t N = x.size(0), D = x.size(1);
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  const scalar_t* bp = bias ? bias->const_data_ptr<scalar_t>() : nullptr;
  const scalar_t* rp = residual ? residual->const_data_ptr<scalar_t>() : nullptr;
  const scalar_t* gp = gamma.const_data_ptr<scalar_t>();
  const scalar_t* bep = beta.const_data_ptr<scalar_t>();
  scalar_t* op = out.mutable_data_ptr<scalar_t>();
  const int64_t xs = x.stride(0), rs = residual ? residual->stride(0) : 0, os = out.stride(0);
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(D, 1));
  dispatch_br(bias.has_value(), residual.has_value(), [&](auto hb, auto hr) {
    constexpr bool HB = decltype(hb)::value, HR = decltype(hr)::value;
    at::parallel_for(0, N, grain, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        scalar_t* o = op + i * os;
        for_row<scalar_t, HB, HR>(
            xp + i * xs, bp, rp + i * rs, D,
            [&](int64_t j, const Vec& s) { at::vec::fmadd(s, Vec::loadu(gp + j), Vec::loadu(bep + j)).store(o + j); },
            [&](int64_t j, scalar_t s) { o[j] = s * gp[j] + bep[j]; });
      }
    });
  });
}

// Runs body(chunk_begin_row, chunk_end_row, partial) over fixed chunks of rows in parallel, where
// partial points to n_acc * D zeroed accumulators of that chunk; returns the chunk sums reduced
// in chunk order as n_acc rows of [n_acc, D].
template <typename scalar_t, typename Body>
at::Tensor chunked_colsums(int64_t N, int64_t D, int64_t n_acc, const at::TensorOptions& opts, Body&& body) {
  using Vec = at::vec::Vectorized<scalar_t>;
  const int64_t n_chunks = (N + kChunkRows - 1) / kChunkRows;
  std::vector<scalar_t> partial(static_cast<size_t>(std::max<int64_t>(n_chunks, 1) * n_acc * D), scalar_t(0));
  at::parallel_for(0, n_chunks, 1, [&](int64_t cb, int64_t ce) {
    for (int64_t c = cb; c < ce; ++c) {
      body(c * kChunkRows, std::min(N, (c + 1) * kChunkRows), partial.data() + c * n_acc * D);
    }
  });
  at::Tensor sums = at::zeros({n_acc, D}, opts);
  scalar_t* out = sums.mutable_data_ptr<scalar_t>();
  const int64_t len = n_acc * D;
  for (int64_t c = 0; c < n_chunks; ++c) {
    const scalar_t* p = partial.data() + c * len;
    int64_t j = 0;
    for (; j + Vec::size() <= len; j += Vec::size()) (Vec::loadu(out + j) + Vec::loadu(p + j)).store(out + j);
    for (; j < len; ++j) out[j] += p[j];
  }
  return sums;
}

template <typename scalar_t>
std::tuple<at::Tensor, at::Tensor, at::Tensor> bwd_kernel(const at::Tensor& dy, const at::Tensor& x,
                                                                const std::optional<at::Tensor>& bias,
                                                                const std::optional<at::Tensor>& residual,
                                                                const at::Tensor& gamma) {
  using Vec = at::vec::Vectorized<scalar_t>;
  const int64_t N = x.size(0), D = x.size(1);
  at::Tensor dx = at::empty({N, D}, x.options());
  const scalar_t* dyp = dy.const_data_ptr<scalar_t>();
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  const scalar_t* bp = bias ? bias->const_data_ptr<scalar_t>() : nullptr;
  const scalar_t* rp = residual ? residual->const_data_ptr<scalar_t>() : nullptr;
  const scalar_t* gp = gamma.const_data_ptr<scalar_t>();
  scalar_t* dxp = dx.mutable_data_ptr<scalar_t>();
  const int64_t dys = dy.stride(0), xs = x.stride(0), rs = residual ? residual->stride(0) : 0;
  at::Tensor sums;
  dispatch_br(bias.has_value(), residual.has_value(), [&](auto hb, auto hr) {
    constexpr bool HB = decltype(hb)::value, HR = decltype(hr)::value;
    sums = chunked_colsums<scalar_t>(N, D, 2, x.options(), [&](int64_t rb, int64_t re, scalar_t* acc) {
      scalar_t* dg = acc;
      scalar_t* dbeta = acc + D;
      for (int64_t i = rb; i < re; ++i) {
        const scalar_t* d = dyp + i * dys;
        scalar_t* o = dxp + i * D;
        for_row<scalar_t, HB, HR>(
            xp + i * xs, bp, rp + i * rs, D,
            [&](int64_t j, const Vec& s) {
                    const Vec dv = Vec::loadu(d + j);
                    (dv * Vec::loadu(gp + j)).store(o + j);
                    at::vec::fmadd(dv, s, Vec::loadu(dg + j)).store(dg + j);
                    (Vec::loadu(dbeta + j) + dv).store(dbeta + j);
            },
            [&](int64_t j, scalar_t s) {
                    o[j] = d[j] * gp[j];
                    dg[j] += d[j] * s;
                    dbeta[j] += d[j];
            });
      }
    });
  });
  return {dx, sums[0], sums[1]};
}

}  // namespace

at::Tensor nonorm_fwd_cpu(const at::Tensor& x, const std::optional<at::Tensor>& bias,
                                const std::optional<at::Tensor>& residual, const at::Tensor& gamma, const at::Tensor& beta) {
  check_inputs("nonorm_fwd", x, bias, residual, gamma);
  check_vec("nonorm_fwd", "beta", beta, x);
  at::Tensor out = at::empty(x.sizes(), x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "nonorm_fwd_cpu",
                                   [&] { fwd_kernel<scalar_t>(x, bias, residual, gamma, beta, out); });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> nonorm_bwd_cpu(
    const at::Tensor& dy, const at::Tensor& x, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& residual, const at::Tensor& gamma) {
  check_inputs("nonorm_bwd", x, bias, residual, gamma);
  check_rows("nonorm_bwd", "dy", dy, x);
  std::tuple<at::Tensor, at::Tensor, at::Tensor> r;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "nonorm_bwd_cpu",
                                   [&] { r = bwd_kernel<scalar_t>(dy, x, bias, residual, gamma); });
  auto& [dx, dgamma, dbeta] = r;
  // sum_rows(dy * gamma) == gamma * sum_rows(dy): no third accumulator needed.
  return {dx, gamma * dbeta, dgamma, dbeta};
}

at::Tensor relu_bwd_colsum_cpu(at::Tensor& dh, const at::Tensor& h) {
  TORCH_CHECK_VALUE(dh.dim() == 2 && dh.is_contiguous(), "relu_bwd_colsum: dh must be contiguous 2-D, got ",
                    dh.sizes());
  check_rows("relu_bwd_colsum", "h", h, dh);
  TORCH_CHECK_VALUE(dh.scalar_type() == at::kFloat || dh.scalar_type() == at::kDouble,
                    "relu_bwd_colsum: float32 or float64 only, got ", dh.scalar_type());
  const int64_t N = dh.size(0), D = dh.size(1);
  at::Tensor db;
  AT_DISPATCH_FLOATING_TYPES(dh.scalar_type(), "relu_bwd_colsum_cpu", [&] {
    using Vec = at::vec::Vectorized<scalar_t>;
    scalar_t* dp = dh.mutable_data_ptr<scalar_t>();
    const scalar_t* hp = h.const_data_ptr<scalar_t>();
    const int64_t hs = h.stride(0);
    db = chunked_colsums<scalar_t>(N, D, 1, dh.options(), [&](int64_t rb, int64_t re, scalar_t* acc) {
      const Vec zero(0);
      for (int64_t i = rb; i < re; ++i) {
        scalar_t* d = dp + i * D;
        const scalar_t* hr = hp + i * hs;
        int64_t j = 0;
        for (; j + Vec::size() <= D; j += Vec::size()) {
          const Vec g = Vec::blendv(zero, Vec::loadu(d + j), Vec::loadu(hr + j) > zero);
          g.store(d + j);
          (Vec::loadu(acc + j) + g).store(acc + j);
        }
        for (; j < D; ++j) {
          const scalar_t g = hr[j] > 0 ? d[j] : scalar_t(0);
          d[j] = g;
          acc[j] += g;
        }
      }
    })[0];
  });
  return db;
}

}  // namespace kdfast

// The family's schemas and CPU kernels (torch.ops.kdfast.*; the library root is in csrc/bindings.cpp).
TORCH_LIBRARY_FRAGMENT(kdfast, m) {
  // y = (x + bias + residual) * gamma + beta on [rows, width], and its one-pass backward
  // returning (dx = dresidual, dbias, dgamma, dbeta).
  m.def("nonorm_fwd(Tensor x, Tensor? bias, Tensor? residual, Tensor gamma, Tensor beta) -> Tensor");
  m.def("nonorm_bwd(Tensor dy, Tensor x, Tensor? bias, Tensor? residual, Tensor gamma) -> (Tensor, Tensor, Tensor, Tensor)");
  // ReLU backward in place (dh *= h > 0) fused with the column sum that is the preceding bias's gradient.
  m.def("relu_bwd_colsum(Tensor(a!) dh, Tensor h) -> Tensor");
}

TORCH_LIBRARY_IMPL(kdfast, CPU, m) {
  m.impl("nonorm_fwd", &kdfast::nonorm_fwd_cpu);
  m.impl("nonorm_bwd", &kdfast::nonorm_bwd_cpu);
  m.impl("relu_bwd_colsum", &kdfast::relu_bwd_colsum_cpu);
}
