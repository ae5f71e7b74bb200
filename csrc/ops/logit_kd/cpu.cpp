// Fused logit-distillation loss and gradient on the CPU: at::vec over each row,
// at::parallel_for over rows. Math in csrc/common/kd_math.h.
//
// A row (30522 fp32 = 120 KiB per input) stays in L2 while it is processed, so it is
// read from memory once: pass 1 takes both maxima, pass 2 writes e^{x - m} of student and
// teacher into per-thread scratch while summing, pass 3 writes the gradient from scratch.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <vector>

#include "common/rows_cpu.h"
#include "ops/logit_kd/kd_args.h"

namespace kdfast {
namespace {

template <typename scalar_t>
void kd_rows(const at::Tensor& student, const at::Tensor& teacher, const int64_t* labels,
             const kd_acc_t<scalar_t>* weights, const kd_acc_t<scalar_t>* mlm_weights, at::Tensor& grad,
             kd_acc_t<scalar_t>* loss_rows, const KdParams& p) {
  const int64_t N = student.size(0), V = student.size(1);
  const int64_t ss = student.stride(0), ts = teacher.stride(0), gs = grad.stride(0);
  const scalar_t* s_base = student.const_data_ptr<scalar_t>();
  const scalar_t* t_base = teacher.const_data_ptr<scalar_t>();
  scalar_t* g_base = grad.mutable_data_ptr<scalar_t>();
  // fp32 and fp64 rows are used in place; fp16/bf16 rows are widened to fp32 scratch first.
  using acc_t = kd_acc_t<scalar_t>;
  constexpr bool kDirect = std::is_same_v<scalar_t, acc_t>;

  auto row_fn = [&](auto soft_ce_tag) {
    constexpr bool SOFT_CE = decltype(soft_ce_tag)::value;
    at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
      // Scratch: e^{x-m} of student and teacher (+ T=1 student), and, for fp16/bf16, the fp32 rows.
      std::vector<acc_t> scratch(V * (kDirect ? 3 : 6));
      acc_t *es = scratch.data(), *et = es + V, *e1 = et + V;
      acc_t *xs = e1 + V, *xt = xs + V, *xg = xt + V;
      for (int64_t r = begin; r < end; ++r) {
        const acc_t w = weights[r];
        scalar_t* g = g_base + r * gs;
        if (w == 0) {  // masked row: no loss, no gradient
          std::fill(g, g + V, scalar_t(0));
          loss_rows[r] = 0;
          continue;
        }
        const scalar_t* s = s_base + r * ss;
        const scalar_t* t = t_base + r * ts;
        // With MLM row weights m, this row's MLM coefficient relative to w is alpha_mlm m_r / w_r
        // (0 on an unlabelled row: its label is never read and no T=1 statistics are taken).
        KdParams pr = p;
        if (mlm_weights != nullptr) pr.alpha_mlm = p.alpha_mlm * (double(mlm_weights[r]) / double(w));
        const bool need_1 = kd_needs_t1_stats(pr.temperature, pr.alpha_mlm);
        auto run = [&](const acc_t* sr, const acc_t* tr, acc_t* gr) {
          return need_1 ? kd_row<acc_t, SOFT_CE, true>(sr, tr, gr, V, labels[r], w, pr, es, et, e1)
                        : kd_row<acc_t, SOFT_CE, false>(sr, tr, gr, V, labels[r], w, pr, es, et, e1);
        };
        if constexpr (kDirect) {
          loss_rows[r] = run(s, t, g);
        } else {
          at::vec::convert(s, xs, V);
          at::vec::convert(t, xt, V);
          loss_rows[r] = run(xs, xt, xg);
          at::vec::convert(xg, g, V);
        }
      }
    });
  };
  p.soft_ce ? row_fn(std::true_type{}) : row_fn(std::false_type{});
}

}  // namespace

void check_kd_args(const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& labels,
                   const at::Tensor& row_weight, const at::Tensor& grad, double temperature, double alpha_mlm,
                   const std::optional<at::Tensor>& mlm_weight) {
  TORCH_CHECK_VALUE(student.dim() == 2 && teacher.dim() == 2, "kd_fwd_bwd: student and teacher must be 2-D [rows, vocab]");
  TORCH_CHECK_VALUE(student.sizes() == teacher.sizes() && student.sizes() == grad.sizes(),
              "kd_fwd_bwd: student ", student.sizes(), ", teacher ", teacher.sizes(), " and grad ", grad.sizes(),
              " must have the same shape");
  TORCH_CHECK_VALUE(student.scalar_type() == teacher.scalar_type() && student.scalar_type() == grad.scalar_type(),
              "kd_fwd_bwd: student, teacher and grad must share a dtype");
  TORCH_CHECK_VALUE(student.stride(1) == 1 && teacher.stride(1) == 1 && grad.stride(1) == 1,
              "kd_fwd_bwd: the vocabulary dimension must be contiguous (stride 1)");
  TORCH_CHECK_VALUE(labels.scalar_type() == at::kLong && labels.dim() == 1 && labels.size(0) == student.size(0) &&
                  labels.is_contiguous(),
              "kd_fwd_bwd: labels must be contiguous int64 [rows]");
  const auto acc_type = student.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK_VALUE(row_weight.scalar_type() == acc_type && row_weight.dim() == 1 &&
                  row_weight.size(0) == student.size(0) && row_weight.is_contiguous(),
              "kd_fwd_bwd: row_weight must be contiguous [rows] of dtype ", acc_type);
  if (mlm_weight.has_value()) {
    const at::Tensor& m = *mlm_weight;
    TORCH_CHECK_VALUE(m.scalar_type() == acc_type && m.dim() == 1 && m.size(0) == student.size(0) &&
                          m.is_contiguous() && m.device() == student.device(),
                      "kd_fwd_bwd: mlm_weight must be contiguous [rows] of dtype ", acc_type, " on the logits' device");
  }
  TORCH_CHECK_VALUE(temperature > 0, "kd_fwd_bwd: temperature must be > 0, got ", temperature);
  TORCH_CHECK_VALUE(student.device() == teacher.device() && student.device() == grad.device() &&
                  student.device() == labels.device() && student.device() == row_weight.device(),
              "kd_fwd_bwd: all tensors must be on one device");
  (void)alpha_mlm;
}

at::Tensor kd_fwd_bwd_cpu(const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& labels,
                          const at::Tensor& row_weight, at::Tensor& grad, double temperature, double alpha_kd,
                          double alpha_mlm, bool soft_ce, int64_t cuda_stream,
                          const std::optional<at::Tensor>& mlm_weight) {
  (void)cuda_stream;
  check_kd_args(student, teacher, labels, row_weight, grad, temperature, alpha_mlm, mlm_weight);
  TORCH_CHECK_VALUE(student.device().is_cpu(), "kd_fwd_bwd_cpu: tensors must be on the CPU");
  const int64_t V = student.size(1);
  const int64_t* lab = labels.const_data_ptr<int64_t>();
  if (alpha_mlm != 0.0) {
    at::Tensor labelled = row_weight != 0;
    if (mlm_weight.has_value()) labelled = labelled & (*mlm_weight != 0);
    const at::Tensor bad = labelled & ((labels < 0) | (labels >= V));
    TORCH_CHECK_VALUE(!bad.any().item<bool>(), "kd_fwd_bwd: labels of counted rows must lie in [0, ", V, ")");
  }
  at::Tensor loss_rows = at::empty({student.size(0)}, row_weight.options());
  const KdParams p{temperature, alpha_kd, alpha_mlm, soft_ce};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, student.scalar_type(), "kd_fwd_bwd_cpu", [&] {
    using acc_t = kd_acc_t<scalar_t>;
    kd_rows<scalar_t>(student, teacher, lab, row_weight.const_data_ptr<acc_t>(),
                      mlm_weight.has_value() ? mlm_weight->const_data_ptr<acc_t>() : nullptr, grad,
                      loss_rows.mutable_data_ptr<acc_t>(), p);
  });
  return loss_rows;
}

}  // namespace kdfast

// The family's op: its schema and CPU kernel (the CUDA kernel registers in cuda_host.cpp).
TORCH_LIBRARY_FRAGMENT(kdfast, m) {
  // Loss rows and, written into `grad`, the gradient of their sum with respect to `student`.
  m.def(
      "kd_fwd_bwd(Tensor student, Tensor teacher, Tensor labels, Tensor row_weight, Tensor(a!) grad, "
      "float temperature, float alpha_kd, float alpha_mlm, bool soft_ce, int cuda_stream=0, "
      "Tensor? mlm_weight=None) -> Tensor");
}

TORCH_LIBRARY_IMPL(kdfast, CPU, m) { m.impl("kd_fwd_bwd", &kdfast::kd_fwd_bwd_cpu); }
