// Flash attention transfer on the CPU: torch.ops.kdfast.attention_transfer_fwd_bwd, the contract
// of kdfast/ops/attention_transfer (its torch.py without any L x L map).
// q_s, k_s [B, H, L, ds], q_t, k_t [B, H, L, dt] (one float dtype), key_valid [B, L] bool,
// row_weight [B, L] (float32, float64 for float64 inputs; w_i = 0 on uncounted query rows).
// Scores s = scale_s q_s k_s^T, t = scale_t q_t k_t^T over the valid keys j of each row i:
//   kl:  row_i = sum_j A_t,ij (log A_t,ij - log A_s,ij),  dS_ij = w_i (A_s,ij - A_t,ij)
//   mse: row_i = sum_j (s_ij - t_ij)^2,                    dS_ij = 2 w_i (s_ij - t_ij)
//   dq_s = scale_s dS k_s,  dk_s = scale_s dS^T q_s
// window >= 0 restricts every row to the band |i - j| <= window (keys outside it are not part of
// the row: probability 0, no loss, no gradient); window = -1 is global attention.
// Returns (loss rows w_i row_i [B, H, L] in the accumulation dtype, dq_s, dk_s in the inputs'
// dtype; the last two empty unless need_grad). Padded keys and uncounted rows are never read.
//
// Work items are (b, h, query block of BM rows), split into one contiguous range per thread.
// For an item, the counted query rows (w_i != 0) and, once per (b, h), the valid keys are
// gathered into packed fp32 (fp64) buffers, so padding is never read and never multiplied
// (0 * NaN) and masked keys cost nothing. Then, holding one BM x n_keys strip of each model's
// scores per thread (BM shrinks as L grows: the strip stays within kStripElems, never L x L):
//   0. with a window, only the packed keys whose positions lie in [first row - window, last row
//      + window] are part of the strip (found by binary search in the sorted valid positions),
//      so a local layer costs O(L window), and each row of the strip is cut to its own band;
//   1. S = scale_s Qs Ks^T, T = scale_t Qt Kt^T                      (two BLAS GEMMs)
//   2. per row, passes over the strip in cache: loss and dS written over S (kl: rows_cpu.h's
//      attention_kl_row, three passes: the maxima, the exponentials and sums, then dS with the
//      small-KL form of a row whose KL is below 1/16 in the same pass; mse: the squared-error row)
//   3. dQ = scale_s dS Ks (written out), dK += scale_s dS^T Qs (packed accumulator), dS being 0
//      outside each row's band.
// Keeping the strip instead of re-forming it (the Triton kernel recomputes its register tiles
// for the gradient pass) saves two of the six GEMMs.
//
// dK of one (b, h) is a sum over all its query blocks. A thread whose range holds every block
// of a (b, h) owns its dK and writes it directly; the (at most two) partially covered (b, h) at
// the ends of a range leave their packed partial sums in per-range slots, added in range order
// after the parallel loop: no races, and the same bits on every run with the same thread count.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <map>
#include <vector>

#include <torch/library.h>

#include "common/rows_cpu.h"

namespace kdfast {
namespace {

// Elements of one score strip (BM x L) per model and thread: 1 MiB in fp32. Up to L = 4,096 a strip
// holds 64 query rows; a longer row shrinks it (32 rows at 8,192), rather than down to 4 rows, so
// that the GEMMs stay wide enough for their fixed cost and the packed keys' re-reads per block to
// be spread over many rows.
constexpr int64_t kStripElems = 1 << 18;
constexpr int64_t kMaxBlockRows = 64;

}  // namespace
}  // namespace kdfast

// The BLAS that torch itself calls (column-major Fortran interface, 32-bit sizes), where the library
// torch links exports it (MKL, OpenBLAS); weak, so that a torch without it still loads this
// extension, whose GEMMs then go through at::addmm_out.
extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const float* alpha,
            const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c,
            const int* ldc) __attribute__((weak));
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const double* alpha,
            const double* a, const int* lda, const double* b, const int* ldb, const double* beta, double* c,
            const int* ldc) __attribute__((weak));
}

namespace kdfast {
namespace {

// Row-major c[m, n] = alpha op(a) op(b) + beta c (op: 'N' as stored, 'T' transposed; a row-major
// matrix has leading dimension lda, ldb, ldc; beta = 0 never reads c). Called once per query block
// and model, up to four times: the BLAS directly (as column-major c^T = op(b)^T op(a)^T) where it
// is exported, so that the small GEMMs of a local layer do not pay for tensors and dispatch.
template <typename acc_t>
void gemm(char op_a, char op_b, int64_t m, int64_t n, int64_t k, acc_t alpha, const acc_t* a, int64_t lda,
          const acc_t* b, int64_t ldb, acc_t beta, acc_t* c, int64_t ldc) {
  constexpr bool kFloat = std::is_same_v<acc_t, float>;
  if ((kFloat ? sgemm_ != nullptr : dgemm_ != nullptr) && std::max({m, n, k, lda, ldb, ldc}) <= INT32_MAX) {
    const int im = static_cast<int>(m), in = static_cast<int>(n), ik = static_cast<int>(k);
    const int ia = static_cast<int>(lda), ib = static_cast<int>(ldb), ic = static_cast<int>(ldc);
    if constexpr (kFloat) {
      sgemm_(&op_b, &op_a, &in, &im, &ik, &alpha, b, &ib, a, &ia, &beta, c, &ic);
    } else {
      dgemm_(&op_b, &op_a, &in, &im, &ik, &alpha, b, &ib, a, &ia, &beta, c, &ic);
    }
    return;
  }
  const auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<acc_t>::value);
  // op(x) [rows, cols] of a row-major buffer with leading dimension ld
  auto view = [&](const acc_t* x, char op, int64_t rows, int64_t cols, int64_t ld) {
    return op == 'N' ? at::from_blob(const_cast<acc_t*>(x), {rows, cols}, {ld, 1}, opts)
                     : at::from_blob(const_cast<acc_t*>(x), {rows, cols}, {1, ld}, opts);
  };
  at::Tensor tc = at::from_blob(c, {m, n}, {ldc, 1}, opts);
  at::addmm_out(tc, tc, view(a, op_a, m, k, lda), view(b, op_b, k, n, ldb), beta, alpha);
}

template <typename acc_t>
struct PartialDk {
  int64_t bh = -1;
  std::vector<acc_t> dk;  // packed [n_keys of b, ds]
};

template <typename scalar_t>
void run_kernel(const at::Tensor& q_s, const at::Tensor& k_s, const at::Tensor& q_t, const at::Tensor& k_t,
                const bool* key_valid, const kd_acc_t<scalar_t>* row_weight, double scale_s, double scale_t,
                bool mse, int64_t window, bool need_grad, at::Tensor& loss_rows, at::Tensor& dq, at::Tensor& dk) {
  using acc_t = kd_acc_t<scalar_t>;
  const int64_t B = q_s.size(0), H = q_s.size(1), L = q_s.size(2), DS = q_s.size(3), DT = q_t.size(3);
  const Rows<scalar_t> qs_rows(q_s), ks_rows(k_s), qt_rows(q_t), kt_rows(k_t);
  acc_t* loss_p = loss_rows.mutable_data_ptr<acc_t>();
  scalar_t* dq_p = need_grad ? dq.mutable_data_ptr<scalar_t>() : nullptr;
  scalar_t* dk_p = need_grad ? dk.mutable_data_ptr<scalar_t>() : nullptr;
  const acc_t sc_s = static_cast<acc_t>(scale_s), sc_t = static_cast<acc_t>(scale_t);

  // a strip spans at most BM - 1 + 2 window + 1 keys of a local layer
  const bool banded = window >= 0 && window < L - 1;
  const int64_t width = banded ? std::min<int64_t>(L, kMaxBlockRows + 2 * window) : L;
  const int64_t BM = std::clamp<int64_t>(kStripElems / width, 1, kMaxBlockRows);
  const int64_t strip_cols = banded ? std::min<int64_t>(L, BM + 2 * window) : L;
  const int64_t nqb = (L + BM - 1) / BM;
  const int64_t items = B * H * nqb;
  const int64_t n_ranges = std::max<int64_t>(1, std::min<int64_t>(items, at::get_num_threads()));
  std::vector<std::array<PartialDk<acc_t>, 2>> partials(n_ranges);

  // valid key positions of batch b
  auto valid_keys = [&](int64_t b, std::vector<int64_t>& idx) {
    idx.clear();
    for (int64_t j = 0; j < L; ++j)
      if (key_valid[b * L + j]) idx.push_back(j);
  };
  // write packed dK rows (acc) of (b, h) to dk at the valid key positions
  auto store_dk = [&](int64_t bh, const std::vector<int64_t>& idx, const acc_t* packed) {
    scalar_t* base = dk_p + bh * L * DS;
    for (size_t j = 0; j < idx.size(); ++j) {
      at::vec::convert(packed + j * DS, base + idx[j] * DS, DS);
    }
  };

  at::parallel_for(0, n_ranges, 1, [&](int64_t r_begin, int64_t r_end) {
    std::vector<int64_t> key_idx, q_idx(BM);
    key_idx.reserve(L);
    std::vector<acc_t> ks(L * DS), kt(L * DT), qs(BM * DS), qt(BM * DT), s(BM * strip_cols),
        t(BM * strip_cols), es(strip_cols), et(strip_cols);
    std::vector<acc_t> dq_blk(need_grad ? BM * DS : 0), dk_acc(need_grad ? L * DS : 0);
    for (int64_t range = r_begin; range < r_end; ++range) {
      const int64_t i_begin = range * items / n_ranges, i_end = (range + 1) * items / n_ranges;
      int64_t cur_bh = -1, seg_first_qb = 0, last_qb = 0, n_keys = 0;
      int n_partial = 0;
      // end of the (b, h) segment [seg_first_qb, last_qb]: write dK or park it in a slot
      auto finish_segment = [&]() {
        if (cur_bh < 0 || !need_grad || n_keys == 0) return;
        if (seg_first_qb == 0 && last_qb == nqb - 1) {
          store_dk(cur_bh, key_idx, dk_acc.data());
        } else {
          auto& slot = partials[range][n_partial++];
          slot.bh = cur_bh;
          slot.dk.assign(dk_acc.begin(), dk_acc.begin() + n_keys * DS);
        }
      };
      for (int64_t item = i_begin; item < i_end; ++item) {
        const int64_t bh = item / nqb, qb = item % nqb, b = bh / H, h = bh % H;
        if (bh != cur_bh) {
          finish_segment();
          cur_bh = bh;
          seg_first_qb = qb;
          valid_keys(b, key_idx);
          n_keys = static_cast<int64_t>(key_idx.size());
          for (int64_t j = 0; j < n_keys; ++j) {
            const int64_t l = key_idx[j];
            at::vec::convert(ks_rows.at(b, h, l), ks.data() + j * DS, DS);
            at::vec::convert(kt_rows.at(b, h, l), kt.data() + j * DT, DT);
          }
          if (need_grad) std::fill(dk_acc.begin(), dk_acc.begin() + n_keys * DS, acc_t(0));
        }
        last_qb = qb;
        if (n_keys == 0) continue;  // no valid key: every row of b is 0 (loss_rows and dq start at 0)
        // counted query rows of the block, packed
        int64_t M = 0;
        for (int64_t l = qb * BM; l < std::min(L, (qb + 1) * BM); ++l) {
          if (row_weight[b * L + l] == 0) continue;
          at::vec::convert(qs_rows.at(b, h, l), qs.data() + M * DS, DS);
          at::vec::convert(qt_rows.at(b, h, l), qt.data() + M * DT, DT);
          q_idx[M++] = l;
        }
        if (M == 0) continue;
        // the strip's keys: packed indices [k0, k0 + n) (every valid key of a global layer)
        int64_t k0 = 0, n = n_keys;
        if (banded) {
          const auto first = std::lower_bound(key_idx.begin(), key_idx.end(), q_idx[0] - window);
          const auto last = std::upper_bound(key_idx.begin(), key_idx.end(), q_idx[M - 1] + window);
          k0 = first - key_idx.begin();
          n = last - first;
          if (n == 0) continue;  // no valid key near any row of the block: loss 0, gradient 0
        }
        const acc_t* ks_k = ks.data() + k0 * DS;
        const acc_t* kt_k = kt.data() + k0 * DT;
        // S = scale_s Qs Ks^T, T = scale_t Qt Kt^T  (Ks^T: the packed keys read column-wise)
        gemm<acc_t>('N', 'T', M, n, DS, sc_s, qs.data(), DS, ks_k, DS, acc_t(0), s.data(), n);
        gemm<acc_t>('N', 'T', M, n, DT, sc_t, qt.data(), DT, kt_k, DT, acc_t(0), t.data(), n);
        for (int64_t m = 0; m < M; ++m) {
          const acc_t w = row_weight[b * L + q_idx[m]];
          acc_t* srow = s.data() + m * n;
          const acc_t* trow = t.data() + m * n;
          // the row's own band within the strip: [lo, hi)
          int64_t lo = 0, hi = n;
          if (banded) {
            const auto keys_begin = key_idx.begin() + k0, keys_end = keys_begin + n;
            lo = std::lower_bound(keys_begin, keys_end, q_idx[m] - window) - keys_begin;
            hi = std::upper_bound(keys_begin, keys_end, q_idx[m] + window) - keys_begin;
            std::fill(srow, srow + lo, acc_t(0));  // dS = 0 outside the band
            std::fill(srow + hi, srow + n, acc_t(0));
          }
          if (hi <= lo) {  // no valid key in the band: no loss, no gradient
            loss_p[bh * L + q_idx[m]] = 0;
            std::fill(srow, srow + n, acc_t(0));
            continue;
          }
          // dS is written over the student's scores (both row functions allow it)
          const acc_t loss = mse ? mse_row<acc_t>(srow + lo, trow + lo, hi - lo, w)
                                 : attention_kl_row<acc_t>(srow + lo, trow + lo, hi - lo, w, es.data(), et.data());
          loss_p[bh * L + q_idx[m]] = loss;
        }
        if (!need_grad) continue;
        // dQ = scale_s dS Ks;  dK += scale_s dS^T Qs
        gemm<acc_t>('N', 'N', M, DS, n, sc_s, s.data(), n, ks_k, DS, acc_t(0), dq_blk.data(), DS);
        gemm<acc_t>('T', 'N', n, DS, M, sc_s, s.data(), n, qs.data(), DS, acc_t(1), dk_acc.data() + k0 * DS, DS);
        for (int64_t m = 0; m < M; ++m) at::vec::convert(dq_blk.data() + m * DS, dq_p + (bh * L + q_idx[m]) * DS, DS);
      }
      finish_segment();
    }
  });

  if (!need_grad) return;
  // partially covered (b, h): add the parked sums in range order, then write them
  std::map<int64_t, std::vector<acc_t>> sums;
  for (auto& slots : partials) {
    for (auto& slot : slots) {
      if (slot.bh < 0) continue;
      auto& acc = sums[slot.bh];
      if (acc.empty()) {
        acc = std::move(slot.dk);
      } else {
        for (size_t i = 0; i < acc.size(); ++i) acc[i] += slot.dk[i];
      }
    }
  }
  std::vector<int64_t> key_idx;
  for (auto& [bh, acc] : sums) {
    valid_keys(bh / H, key_idx);
    store_dk(bh, key_idx, acc.data());
  }
}

// The per-token inputs of both ops: key_valid [B, L] bool and row_weight [B, L] in the accumulation
// dtype of `dtype` (float64 for float64 inputs, else float32), on the CPU.
void check_key_valid_and_row_weight(const char* op, const at::Tensor& key_valid, const at::Tensor& row_weight,
                                    int64_t B, int64_t L, at::ScalarType dtype) {
  TORCH_CHECK_VALUE(key_valid.scalar_type() == at::kBool && key_valid.dim() == 2 && key_valid.size(0) == B &&
                        key_valid.size(1) == L && key_valid.device().is_cpu(),
                    op, ": key_valid must be a bool CPU tensor of shape [B, L] = [", B, ", ", L, "], got ",
                    key_valid.scalar_type(), " ", key_valid.sizes());
  const auto acc_type = dtype == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK_VALUE(row_weight.scalar_type() == acc_type && row_weight.dim() == 2 && row_weight.size(0) == B &&
                        row_weight.size(1) == L && row_weight.device().is_cpu(),
                    op, ": row_weight must be a ", acc_type, " CPU tensor of shape [B, L] = [", B, ", ", L, "], got ",
                    row_weight.scalar_type(), " ", row_weight.sizes());
}

void check_args(const at::Tensor& q_s, const at::Tensor& k_s, const at::Tensor& q_t, const at::Tensor& k_t,
                const at::Tensor& key_valid, const at::Tensor& row_weight, double scale_s, double scale_t,
                int64_t window) {
  constexpr const char* op = "attention_transfer_fwd_bwd";
  TORCH_CHECK_VALUE(window >= -1, op, ": window must be >= 0 (or -1: global attention), got ", window);
  const std::pair<const char*, const at::Tensor*> inputs[] = {{"q_s", &q_s}, {"k_s", &k_s}, {"q_t", &q_t},
                                                              {"k_t", &k_t}};
  for (const auto& [name, x] : inputs) {
    TORCH_CHECK_VALUE(x->dim() == 4, op, ": ", name, " must be [B, H, L, d], got shape ", x->sizes());
    TORCH_CHECK_VALUE(x->device().is_cpu(), op, ": ", name, " must be a CPU tensor, got ", x->device());
    TORCH_CHECK_VALUE(x->scalar_type() == q_s.scalar_type(), op, ": ", name, " has dtype ", x->scalar_type(),
                      " but q_s has dtype ", q_s.scalar_type());
  }
  TORCH_CHECK_VALUE(is_kernel_float_dtype(q_s.scalar_type()), op,
                    ": q_s must be float32, float16, bfloat16 or float64, got ", q_s.scalar_type());
  TORCH_CHECK_VALUE(q_s.numel() > 0 && q_t.numel() > 0, op, ": q_s is empty (shape ", q_s.sizes(), ")");
  TORCH_CHECK_VALUE(k_s.sizes() == q_s.sizes(), op, ": k_s has shape ", k_s.sizes(), " but q_s has shape ",
                    q_s.sizes());
  TORCH_CHECK_VALUE(k_t.sizes() == q_t.sizes(), op, ": k_t has shape ", k_t.sizes(), " but q_t has shape ",
                    q_t.sizes());
  TORCH_CHECK_VALUE(q_t.sizes().slice(0, 3) == q_s.sizes().slice(0, 3), op, ": q_t has shape ", q_t.sizes(),
                    " but q_s has shape ", q_s.sizes(), " (B, H and L must agree)");
  const int64_t B = q_s.size(0), L = q_s.size(2);
  check_key_valid_and_row_weight(op, key_valid, row_weight, B, L, q_s.scalar_type());
  TORCH_CHECK_VALUE(scale_s > 0 && std::isfinite(scale_s), op, ": scale_s must be > 0 and finite, got ", scale_s);
  TORCH_CHECK_VALUE(scale_t > 0 && std::isfinite(scale_t), op, ": scale_t must be > 0 and finite, got ", scale_t);
}

at::Tensor unit_last_stride(const at::Tensor& x) { return x.stride(3) == 1 ? x : x.contiguous(); }

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_transfer_fwd_bwd_cpu(
    const at::Tensor& q_s, const at::Tensor& k_s, const at::Tensor& q_t, const at::Tensor& k_t,
    const at::Tensor& key_valid, const at::Tensor& row_weight, double scale_s, double scale_t, bool mse,
    int64_t window, bool need_grad) {
  check_args(q_s, k_s, q_t, k_t, key_valid, row_weight, scale_s, scale_t, window);
  // the GEMMs below run on scratch views: keep autograd out of them
  at::AutoDispatchBelowADInplaceOrView guard;
  const at::Tensor qs = unit_last_stride(q_s), ks = unit_last_stride(k_s);
  const at::Tensor qt = unit_last_stride(q_t), kt = unit_last_stride(k_t);
  const at::Tensor kv = key_valid.contiguous(), rw = row_weight.contiguous();
  at::Tensor loss_rows = at::zeros({q_s.size(0), q_s.size(1), q_s.size(2)}, rw.options());
  at::Tensor dq = need_grad ? at::zeros(q_s.sizes(), q_s.options()) : at::empty({0}, q_s.options());
  at::Tensor dk = need_grad ? at::zeros(k_s.sizes(), k_s.options()) : at::empty({0}, k_s.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q_s.scalar_type(), "attention_transfer_fwd_bwd_cpu", [&] {
    run_kernel<scalar_t>(qs, ks, qt, kt, kv.const_data_ptr<bool>(), rw.const_data_ptr<kd_acc_t<scalar_t>>(), scale_s,
                         scale_t, mse, window, need_grad, loss_rows, dq, dk);
  });
  return {loss_rows, dq, dk};
}

}  // namespace kdfast

// --- attention KL on materialised [B, H, L, L] score maps ---------------------------------------
// torch.ops.kdfast.attention_kl_maps_fwd_bwd: s, t [B, H, L, L] (one float dtype), key_valid [B, L]
// bool, row_weight [B, L] (accumulation dtype; w_i = 0 on uncounted query rows). Over the valid keys
// K_b of each row (b, h, i):
//   row = w_i sum_{j in K_b} A_t,j (log A_t,j - log A_s,j),   A = softmax over j in K_b,
//   grad_j = w_i (A_s,j - A_t,j) on K_b, 0 on the other keys and on uncounted rows,
// where, for window >= 0, K_b holds only the valid keys with |i - j| <= window (read alone: a row
// of a local layer costs O(window)); window = -1: every valid key,
// the logit-KD row of rows_cpu.h at T = 1 (with its small-KL form) run on the valid keys only:
// padded keys are never read, so no masked copy of either map is made. Returns (loss rows
// [B, H, L] in the accumulation dtype, grad [B, H, L, L] contiguous in the maps' dtype, or an empty
// tensor when need_grad is false).
namespace kdfast {
namespace {

template <typename scalar_t>
void attention_kl_maps_kernel(const at::Tensor& s, const at::Tensor& t, const bool* key_valid,
                              const kd_acc_t<scalar_t>* row_weight, int64_t window, bool need_grad,
                              at::Tensor& loss_rows, at::Tensor& grad) {
  using acc_t = kd_acc_t<scalar_t>;
  const int64_t B = s.size(0), H = s.size(1), L = s.size(2);
  const Rows<scalar_t> s_rows(s), t_rows(t);
  acc_t* loss_p = loss_rows.mutable_data_ptr<acc_t>();
  scalar_t* g_p = need_grad ? grad.mutable_data_ptr<scalar_t>() : nullptr;
  const KdParams kl_params{1.0, 1.0, 0.0, false};
  // Per sequence: its valid keys, and whether they are a prefix (right padding: rows used in place).
  std::vector<std::vector<int64_t>> keys(B);
  std::vector<char> prefix(B);
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t j = 0; j < L; ++j)
      if (key_valid[b * L + j]) keys[b].push_back(j);
    const int64_t n = static_cast<int64_t>(keys[b].size());
    prefix[b] = n == 0 || keys[b][n - 1] == n - 1;
  }
  const bool banded = window >= 0 && window < L - 1;
  const int64_t width = banded ? std::min<int64_t>(L, 2 * window + 1) : L;
  at::parallel_for(0, B * H * L, row_grain(width), [&](int64_t begin, int64_t end) {
    // e^{x - m} of both rows (+ kd_row's unused third), then the packed / widened rows and gradient
    std::vector<acc_t> scratch(6 * width);
    acc_t *es = scratch.data(), *et = es + width, *e1 = et + width, *xs = e1 + width, *xt = xs + width,
          *xg = xt + width;
    for (int64_t r = begin; r < end; ++r) {
      const int64_t b = r / (H * L), h = r / L % H, i = r % L;
      const acc_t w = row_weight[b * L + i];
      scalar_t* g_row = need_grad ? g_p + r * L : nullptr;
      // the row's keys: valid keys keys[b][k0 .. k1) (positions j0 .. j1 in place for a prefix), those
      // within the band |i - j| <= window when there is one
      const auto& kb = keys[b];
      int64_t k0 = 0, k1 = static_cast<int64_t>(kb.size());
      if (banded) {
        k0 = std::lower_bound(kb.begin(), kb.end(), i - window) - kb.begin();
        k1 = std::upper_bound(kb.begin(), kb.end(), i + window) - kb.begin();
      }
      const int64_t n = k1 - k0;
      if (w == 0 || n <= 0) {  // uncounted row: no loss, no gradient, never read
        loss_p[r] = 0;
        if (g_row) std::fill(g_row, g_row + L, scalar_t(0));
        continue;
      }
      const scalar_t* s_in = s_rows.at(b, h, i);
      const scalar_t* t_in = t_rows.at(b, h, i);
      const int64_t j0 = prefix[b] ? k0 : 0;  // (a prefix's packed index is its position)
      const acc_t *sr, *tr;
      acc_t* g;
      bool direct_g = false;
      if (prefix[b]) {  // keys j0 .. j0 + n - 1: the row itself (widened for fp16 / bf16)
        sr = widen_row<acc_t>(s_in + j0, n, xs);
        tr = widen_row<acc_t>(t_in + j0, n, xt);
        direct_g = std::is_same_v<scalar_t, acc_t> && g_row != nullptr;
      } else {  // scattered valid keys: packed
        for (int64_t k = 0; k < n; ++k) {
          xs[k] = static_cast<acc_t>(s_in[kb[k0 + k]]);
          xt[k] = static_cast<acc_t>(t_in[kb[k0 + k]]);
        }
        sr = xs;
        tr = xt;
      }
      g = direct_g ? reinterpret_cast<acc_t*>(g_row + j0) : xg;
      loss_p[r] = kd_row<acc_t, false, false>(sr, tr, g, n, 0, w, kl_params, es, et, e1);
      if (!g_row) continue;
      if (prefix[b]) {
        if (!direct_g) at::vec::convert(xg, g_row + j0, n);
        std::fill(g_row, g_row + j0, scalar_t(0));
        std::fill(g_row + j0 + n, g_row + L, scalar_t(0));
      } else {
        std::fill(g_row, g_row + L, scalar_t(0));
        for (int64_t k = 0; k < n; ++k) g_row[kb[k0 + k]] = static_cast<scalar_t>(xg[k]);
      }
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> attention_kl_maps_fwd_bwd_cpu(const at::Tensor& s_in, const at::Tensor& t_in,
                                                                 const at::Tensor& key_valid,
                                                                 const at::Tensor& row_weight, int64_t window,
                                                                 bool need_grad) {
  constexpr const char* op = "attention_kl_maps_fwd_bwd";
  TORCH_CHECK_VALUE(window >= -1, op, ": window must be >= 0 (or -1: global attention), got ", window);
  TORCH_CHECK_VALUE(s_in.dim() == 4 && s_in.size(2) == s_in.size(3), op, ": s must be [B, H, L, L], got shape ",
                    s_in.sizes());
  TORCH_CHECK_VALUE(t_in.sizes() == s_in.sizes(), op, ": t has shape ", t_in.sizes(), " but s has shape ",
                    s_in.sizes());
  TORCH_CHECK_VALUE(is_kernel_float_dtype(s_in.scalar_type()), op,
                    ": s must be float32, float16, bfloat16 or float64, got ", s_in.scalar_type());
  TORCH_CHECK_VALUE(t_in.scalar_type() == s_in.scalar_type(), op, ": t has dtype ", t_in.scalar_type(),
                    " but s has dtype ", s_in.scalar_type());
  TORCH_CHECK_VALUE(s_in.device().is_cpu() && t_in.device().is_cpu(), op, ": s and t must be CPU tensors, got ",
                    s_in.device(), " and ", t_in.device());
  TORCH_CHECK_VALUE(s_in.numel() > 0, op, ": s is empty (shape ", s_in.sizes(), ")");
  const int64_t B = s_in.size(0), L = s_in.size(2);
  check_key_valid_and_row_weight(op, key_valid, row_weight, B, L, s_in.scalar_type());
  const at::Tensor s = unit_last_stride(s_in), t = unit_last_stride(t_in);
  const at::Tensor kv = key_valid.contiguous(), rw = row_weight.contiguous();
  at::Tensor loss_rows = at::empty({B, s.size(1), L}, rw.options());
  at::Tensor grad = need_grad ? at::empty(s.sizes(), s.options().memory_format(at::MemoryFormat::Contiguous))
                              : at::empty({0}, s.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "attention_kl_maps_fwd_bwd_cpu", [&] {
    attention_kl_maps_kernel<scalar_t>(s, t, kv.const_data_ptr<bool>(), rw.const_data_ptr<kd_acc_t<scalar_t>>(),
                                       window, need_grad, loss_rows, grad);
  });
  return {loss_rows, grad};
}

}  // namespace kdfast

TORCH_LIBRARY_FRAGMENT(kdfast, m) {
  // Flash attention transfer from Q and K (KL or score MSE): loss rows [B, H, L] and, when need_grad,
  // the gradients of their sum with respect to q_s and k_s; never an L x L map. window >= 0: each
  // row sees only the keys j with |i - j| <= window; -1: every key.
  m.def(
      "attention_transfer_fwd_bwd(Tensor q_s, Tensor k_s, Tensor q_t, Tensor k_t, Tensor key_valid, "
      "Tensor row_weight, float scale_s, float scale_t, bool mse, int window, bool need_grad) -> "
      "(Tensor, Tensor, Tensor)");
  // Attention KL on materialised [B, H, L, L] score maps over the valid keys: loss rows [B, H, L] and,
  // when need_grad, the gradient of their sum with respect to s (no masked copy of either map).
  m.def("attention_kl_maps_fwd_bwd(Tensor s, Tensor t, Tensor key_valid, Tensor row_weight, int window, "
        "bool need_grad) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(kdfast, CPU, m) {
  m.impl("attention_transfer_fwd_bwd", &kdfast::attention_transfer_fwd_bwd_cpu);
  m.impl("attention_kl_maps_fwd_bwd", &kdfast::attention_kl_maps_fwd_bwd_cpu);
}
