r"""Logit distillation from a *sparse* teacher (the teacher cache): top-k or sampled token ids.

Public: :func:`sparse_kd_loss`, :class:`SparseKDLoss`, :func:`sparsify_teacher_logits`.

The teacher is kept per row (token) as K token ids and K values; the student keeps its full
soft-max normaliser over all V logits. Two forms:

``mode="topk"``: the teacher's K largest logits and, optionally, the teacher's full
log-normaliser. Loss: KL over the K kept ids plus one "rest" bucket holding the teacher's
remaining mass against the student's mass outside the kept ids.

``mode="sampled"``: ids drawn from the teacher distribution (with replacement) and their
counts; the loss is the KL from the empirical teacher distribution, whose gradient is an
unbiased estimate of the full-KL gradient.

Stored form (what :func:`sparsify_teacher_logits` writes and the cache holds)
------------------------------------------------------------------------------
- top-k: ``ids`` int32 (every id < 65536 for BERT vocabularies, so they also fit uint16),
  ``values`` = the teacher's *raw* logits at those ids (T = 1), fp16, and ``logsumexp`` =
  logsumexp(t / T) over the whole vocabulary, fp32, at the distillation temperature T. The raw
  logits let the same cache serve any T for the kept ids; only the rest bucket needs the
  full normaliser, which depends on T (it cannot be rebuilt from the top-k and a T = 1
  normaliser), so the cache stores it for the temperature the recipe uses (write it for each
  T you need; it is one float per token). Without ``teacher_logsumexp`` the rest bucket is
  empty: the teacher is renormalised over its top-k (p_rest = 0).
- sampled: ``ids`` int32 sorted per row, ``values`` fp16 counts: each distinct id's count sits at
  its first occurrence, repeats carry 0 (any non-negative weights with duplicates are
  accepted; they are summed per id and normalised per row).

The fused kernel writes the gradient with respect to all V student logits in the same pass
as the loss (the teacher is frozen); backward only scales it.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from kdfast.losses._autograd import scale_stored_grad
from kdfast.losses._checks import (
    KD_ROWS,
    acc_dtype,
    check_choice,
    check_lse_temperature,
    check_nonnegative,
    check_row_tensor,
    check_temperature,
    check_tensor,
    explain_non_finite,
    row_weights,
    select_logit_rows,
    value_checks_enabled,
)
from kdfast.ops import registry
from kdfast.ops import sparse_kd as sparse_kd_ops

MODES = ("topk", "sampled")
# The top-k form's rest bucket still cancels in float32 at large T (1e-4 relative is lost near
# T = 1e2), so mode="topk" accepts 1e-2 <= T <= 20; mode="sampled" the full TEMPERATURE_RANGE.
TOPK_MAX_TEMPERATURE = 20.0
REDUCTIONS = ("batchmean", "sum", "mean", "none")
_INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.uint8, torch.uint16, torch.uint32)


class _SparseKDFunction(torch.autograd.Function):
    """Loss rows (or their sum); the gradient is produced by the forward kernel."""

    @staticmethod
    def forward(ctx, student, ids, values, teacher_lse, labels, row_weight, mlm_weight, temperature, alpha_kd,
                alpha_mlm, sampled, kernel, reduce):
        grad = torch.empty(student.shape, dtype=student.dtype, device=student.device)
        # one pass: KD weighted by row_weight, MLM by mlm_weight (None: row_weight too)
        loss_rows = kernel(student, ids, values, teacher_lse, labels, row_weight, grad, temperature, alpha_kd,
                           alpha_mlm, sampled, mlm_weight=mlm_weight)
        ctx.save_for_backward(grad)
        return loss_rows.sum() if reduce else loss_rows

    @staticmethod
    def backward(ctx, grad_out):
        (grad,) = ctx.saved_tensors
        g = scale_stored_grad(grad, grad_out)
        return (g,) + (None,) * 12


def check_teacher_ids(name: str, ids: object, lead: torch.Size, device: torch.device) -> Tensor:
    """Sparse-teacher ids: an integer tensor on ``device`` shaped ``lead`` + [K]."""
    if not isinstance(ids, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(ids).__name__}")
    if ids.dtype not in _INT_DTYPES:
        raise ValueError(f"{name} must be an integer tensor (int32, int64, uint16, ...), got {ids.dtype}")
    if ids.device != device:
        raise ValueError(f"{name} is on {ids.device} but student_logits is on {device}")
    if ids.dim() != len(lead) + 1 or ids.shape[:-1] != lead:
        raise ValueError(f"{name} has shape {tuple(ids.shape)}, expected the logits' leading shape "
                         f"{tuple(lead)} plus [K]")
    return ids


# --- public API -------------------------------------------------------------------------------

def sparse_kd_loss(
    student_logits: Tensor,
    teacher_ids: Tensor,
    teacher_values: Tensor,
    *,
    mode: str = "topk",
    temperature: float = 1.0,
    teacher_logsumexp: Tensor | None = None,
    labels: Tensor | None = None,
    mask: Tensor | None = None,
    ignore_index: int = -100,
    alpha_kd: float = 1.0,
    alpha_mlm: float = 0.0,
    reduction: str = "batchmean",
    kd_rows: str = "all",
    backend: str = "auto",
) -> Tensor:
    r"""Logit distillation from a sparse teacher (top-k or sampled ids), fused with MLM.

    Per KD row (``kd_rows``: ``"all"``, the default, every row with ``mask != 0``; ``"masked"``, the
    rows with ``labels != ignore_index`` and ``mask != 0``, as in :func:`kdfast.kd_loss`) with student logits s [V],
    x = s / T, lse_s = logsumexp(x), p_s,j = e^{x_j - lse_s}, kept ids k_1..k_K, values v_k:

    **topk** (distinct ids; v = raw teacher logits, see the module docstring for the stored
    form). y_k = v_k / T, lse_K = logsumexp_k y_k, lse_t = max(teacher_logsumexp, lse_K)
    (lse_t = lse_K when ``teacher_logsumexp`` is None or K = V; the max absorbs fp16 rounding of
    stored values, which can put lse_K a hair above the true normaliser), p_t,k = e^{y_k - lse_t},
    rest masses p_r = 1 - sum_k p_t,k = -expm1(lse_K - lse_t) and
    P_r = 1 - sum_k p_s,k = e^{lse_R - lse_s} with lse_R = logsumexp of x outside the kept ids:

        kd = sum_k p_t,k (log p_t,k - log p_s,k) + p_r (log p_r - log P_r)      (0 log 0 = 0)

    Gradient, with d log p_s,k / dx_j = [j = k] - p_s,j and
    d log P_r / dx_j = p_s,j ([j not kept] / P_r - 1), and sum_k p_t,k + p_r = 1:

        d kd / dx_j = p_s,j - p_t,j                      for j kept
        d kd / dx_j = p_s,j (1 - p_r / P_r)
                    = p_s,j - p_r e^{x_j - lse_R}          for j not kept

    (so p_r = 0 gives p_s,j there, and K = V gives the full KL of :func:`kdfast.kd_loss`).

    **sampled** (ids drawn from p_t = softmax(t / T) with replacement, values = counts or
    non-negative weights c_k; duplicates allowed): q_j = sum_{k: id_k = j} c_k / sum_k c_k,

        kd = sum_j q_j (log q_j - log p_s,j)      d kd / dx_j = p_s,j - q_j

    E[q_j] = p_t,j for counts of n draws, so the gradient T (p_s - q) is an unbiased estimate
    of the full-KL gradient T (p_s - p_t). The loss is the KL from the empirical distribution q:
    it differs from KL(p_t || p_s) by H(p_t) - H(q), which does not depend on the student (its
    expectation is KL(p_t || p_s) + H(p_t) - E[H(q)] >= KL(p_t || p_s)); log it as an
    estimate, not the exact KL.

    Both modes: loss_r = alpha_kd T^2 kd + alpha_mlm (logsumexp(s) - s[label_r]) and
    d loss_r / ds_j = alpha_kd T (d kd / dx_j) + alpha_mlm (softmax(s)_j - [j = label_r]).

    Args:
        student_logits: [..., V] float (fp32 / fp16 / bf16 / fp64); accumulation in fp32
            (fp64 for fp64 input).
        teacher_ids: [..., K] integer (int32 / int64 / uint16 ...) ids in [0, V), 1 <= K <= V.
            Distinct per row in topk mode.
        teacher_values: [..., K] float, any float dtype (fp16 from the cache is fine). topk:
            raw teacher logits; sampled: counts / non-negative weights, positive row sum.
        mode: ``"topk"`` or ``"sampled"``.
        temperature: T, 1e-2 <= T <= 20 for ``topk`` (its rest bucket loses float32 accuracy
            beyond), 1e-2 <= T <= 1e4 for ``sampled``; outside, ValueError.
        teacher_logsumexp: [...] (topk only): logsumexp(t / T) of the full teacher row at this T.
        labels, mask, ignore_index, alpha_kd, alpha_mlm, reduction, kd_rows: as in :func:`kdfast.kd_loss`:
            the KD term over the KD rows K, the MLM term over the labelled rows M with ``mask != 0``;
            ``batchmean``/``mean`` divide each term by the number of its rows
            (alpha_kd T^2 / |K| sum_K kd + alpha_mlm / |M| sum_M ce; an empty row set gives 0).
        backend: ``auto`` (Triton on CUDA tensors, torch otherwise), ``triton`` or ``torch``.

    Returns:
        The loss, float32 (float64 for float64 student logits); gradient flows to
        ``student_logits`` only, in its dtype.

    Raises:
        ValueError naming the argument: shape / dtype / device mismatch of ids or values, ids
        out of [0, V), K > V, repeated ids in topk mode, temperature outside its range, a negative
        alpha, NaN or Inf in ``teacher_values`` / ``teacher_logsumexp`` (or, when the loss is not
        finite, in ``student_logits``), a ``teacher_logsumexp`` computed at another temperature
        (:func:`kdfast.losses._checks.check_lse_temperature`), negative or all-zero sampled counts, unknown
        mode / reduction / kd_rows / backend, ``kd_rows="masked"`` without labels.
    """
    student_logits = check_tensor("student_logits", student_logits, min_dim=1)
    check_choice("mode", mode, MODES)
    temperature = check_temperature(temperature, high=TOPK_MAX_TEMPERATURE if mode == "topk" else None)
    alpha_kd = check_nonnegative("alpha_kd", alpha_kd)
    alpha_mlm = check_nonnegative("alpha_mlm", alpha_mlm)
    check_choice("reduction", reduction, REDUCTIONS)
    check_choice("kd_rows", kd_rows, KD_ROWS)
    V = student_logits.shape[-1]
    if V == 0 or student_logits.numel() == 0:
        raise ValueError(f"student_logits is empty (shape {tuple(student_logits.shape)})")
    lead = student_logits.shape[:-1]
    device = student_logits.device
    teacher_ids = check_teacher_ids("teacher_ids", teacher_ids, lead, device)
    K = teacher_ids.shape[-1]
    if K == 0:
        raise ValueError("teacher_ids has K = 0 kept ids per row; need 1 <= K <= V")
    if K > V:
        raise ValueError(f"teacher_ids keeps K = {K} ids per row but the vocabulary has only V = {V}")
    teacher_values = check_tensor("teacher_values", teacher_values, min_dim=1)
    if teacher_values.shape != teacher_ids.shape:
        raise ValueError(f"teacher_values has shape {tuple(teacher_values.shape)} but teacher_ids has "
                         f"{tuple(teacher_ids.shape)}: they must match")
    if teacher_values.device != device:
        raise ValueError(f"teacher_values is on {teacher_values.device} but student_logits is on {device}")
    if teacher_logsumexp is not None:
        if mode != "topk":
            raise ValueError("teacher_logsumexp is only used with mode='topk'")
        teacher_logsumexp = check_row_tensor("teacher_logsumexp", teacher_logsumexp, lead, device)
        check_tensor("teacher_logsumexp", teacher_logsumexp, min_dim=0)
    labels = check_row_tensor("labels", labels, lead, device)
    mask = check_row_tensor("mask", mask, lead, device)
    if labels is not None and (labels.dtype.is_floating_point or labels.dtype == torch.bool):
        raise ValueError(f"labels must be an integer tensor, got {labels.dtype}")
    if alpha_mlm != 0 and labels is None:
        raise ValueError("labels are required when alpha_mlm != 0")
    kernel = registry.select(sparse_kd_ops.OP, backend, student_logits, what="sparse_kd_loss").fn
    checks = value_checks_enabled(student_logits)

    student2d = student_logits.reshape(-1, V)
    if student2d.stride(-1) != 1:
        student2d = student2d.contiguous()
    N = student2d.shape[0]
    ids2d = teacher_ids.reshape(N, K).to(torch.int64)
    vals2d = teacher_values.reshape(N, K)
    if vals2d.stride(-1) != 1:
        vals2d = vals2d.contiguous()
    lse1d = teacher_logsumexp.reshape(N).to(acc_dtype(student2d.dtype)) \
        if teacher_logsumexp is not None else None
    labels_flat, counted, mlm_rows = select_logit_rows(kd_rows, labels, mask, N, V, ignore_index, alpha_mlm, device,
                                                       checks)
    if checks:
        check_sparse_teacher_rows(ids2d[counted], vals2d[counted], None if lse1d is None else lse1d[counted], V, mode,
                                  temperature)
    else:
        # unchecked (GPU default, set_value_checks): a row with an id outside [0, V) is dropped,
        # never gathered from
        counted = counted & ((ids2d >= 0) & (ids2d < V)).all(-1)
    # Uncounted rows (padding) may hold anything: give them in-range ids so that no backend
    # gathers out of bounds (the Triton kernel does not even read them).
    ids2d = torch.where(counted[:, None], ids2d, torch.arange(K, device=device)).contiguous()

    acc = acc_dtype(student2d.dtype)
    row_weight = row_weights(counted, reduction, acc)
    # an MLM row is one of the KD rows (mask != 0), whose teacher ids were checked or sanitised above
    mlm_weight = None if mlm_rows is None else row_weights(mlm_rows & counted, reduction, acc)
    loss = _SparseKDFunction.apply(student2d, ids2d, vals2d, lse1d, labels_flat.contiguous(), row_weight, mlm_weight,
                                   temperature, alpha_kd, alpha_mlm, mode == "sampled", kernel,
                                   reduction != "none")
    if checks:  # only on the failure path: the teacher rows were checked above, so the student is to blame
        explain_non_finite(loss, lambda: [("student_logits", student2d.detach()[counted])])
    return loss if reduction != "none" else loss.reshape(lead)


def check_sparse_teacher_rows(ids: Tensor, vals: Tensor, lse: Tensor | None, V: int, mode: str,
                              temperature: float) -> None:
    """Value checks of a sparse teacher's counted rows (N x K work, never N x V): ids in [0, V), finite
    values and log-normaliser, distinct top-k ids, a log-normaliser that belongs to ``temperature``
    (`check_lse_temperature`), non-negative sampled counts with a positive sum."""
    if ids.numel() == 0:
        return
    out = (ids < 0) | (ids >= V)
    if bool(out.any()):
        raise ValueError(f"teacher_ids must lie in [0, {V}); found {ids[out][0].item()}")
    if not bool(torch.isfinite(vals).all()):
        raise ValueError("teacher_values contains NaN or Inf in counted rows")
    if lse is not None and not bool(torch.isfinite(lse).all()):
        raise ValueError("teacher_logsumexp contains NaN or Inf in counted rows")
    if mode == "topk":
        if ids.shape[1] > 1:
            srt = ids.sort(dim=1).values
            if bool((srt[:, 1:] == srt[:, :-1]).any()):
                raise ValueError("teacher_ids must be distinct within a row in mode='topk' (repeats are only "
                                 "meaningful in mode='sampled')")
        if lse is not None:
            check_lse_temperature(vals, lse, temperature, V)
    else:
        if bool((vals < 0).any()):
            raise ValueError("teacher_values (sampled counts / weights) must be >= 0")
        if bool((vals.to(torch.float32).sum(1) <= 0).any()):
            raise ValueError("teacher_values (sampled counts / weights) must have a positive sum in every "
                             "counted row")


class SparseKDLoss(nn.Module):
    """Module form of :func:`sparse_kd_loss` with its keyword arguments fixed at construction.

    ``forward(student_logits, teacher_ids, teacher_values, teacher_logsumexp=None, labels=None,
    mask=None)`` returns the loss.
    """

    def __init__(self, temperature: float = 1.0, *, mode: str = "topk", alpha_kd: float = 1.0,
                 alpha_mlm: float = 0.0, reduction: str = "batchmean", kd_rows: str = "all",
                 ignore_index: int = -100, backend: str = "auto") -> None:
        super().__init__()
        self.mode = check_choice("mode", mode, MODES)
        self.temperature = check_temperature(temperature, high=TOPK_MAX_TEMPERATURE if mode == "topk" else None)
        self.alpha_kd, self.alpha_mlm = check_nonnegative("alpha_kd", alpha_kd), check_nonnegative("alpha_mlm", alpha_mlm)
        self.reduction = check_choice("reduction", reduction, REDUCTIONS)
        self.kd_rows = check_choice("kd_rows", kd_rows, KD_ROWS)
        self.ignore_index, self.backend = ignore_index, backend

    def forward(self, student_logits: Tensor, teacher_ids: Tensor, teacher_values: Tensor,
                teacher_logsumexp: Tensor | None = None, labels: Tensor | None = None,
                mask: Tensor | None = None) -> Tensor:
        return sparse_kd_loss(student_logits, teacher_ids, teacher_values, mode=self.mode,
                              temperature=self.temperature, teacher_logsumexp=teacher_logsumexp, labels=labels,
                              mask=mask, ignore_index=self.ignore_index, alpha_kd=self.alpha_kd,
                              alpha_mlm=self.alpha_mlm, reduction=self.reduction, kd_rows=self.kd_rows,
                              backend=self.backend)

    def extra_repr(self) -> str:
        return (f"temperature={self.temperature}, mode={self.mode!r}, alpha_kd={self.alpha_kd}, "
                f"alpha_mlm={self.alpha_mlm}, reduction={self.reduction!r}, kd_rows={self.kd_rows!r}, "
                f"backend={self.backend!r}")


def sparsify_teacher_logits(
    teacher_logits: Tensor,
    k: int,
    mode: str = "topk",
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, ...]:
    r"""Sparsify teacher logits [..., V] into the stored form used by :func:`sparse_kd_loss`.

    ``mode="topk"`` returns ``(ids, values, logsumexp)``: the k largest logits per row
    (sorted, descending), ``ids`` int32 [..., k], ``values`` the raw logits t_id in fp16
    [..., k], ``logsumexp`` = logsumexp_j(t_j / T) over the whole row in fp32 [...], at the
    distillation temperature T (the rest bucket's teacher mass is 1 - sum_k e^{t_k/T - lse}).

    ``mode="sampled"`` returns ``(ids, counts)``: k draws with replacement from
    p_t = softmax(t / T) (``generator`` for reproducibility), ``ids`` int32 [..., k] sorted per row,
    ``counts`` fp16 [..., k] with each distinct id's count at its first occurrence and 0 at its
    repeats (so sum_k counts = k, and q_j = counts of j / k is an unbiased estimate of p_t,j).

    Ids are below 65536 for vocabularies that size, so they can be stored as uint16.
    """
    teacher_logits = check_tensor("teacher_logits", teacher_logits, min_dim=1)
    check_choice("mode", mode, MODES)
    temperature = check_temperature(temperature)
    V = teacher_logits.shape[-1]
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= V:
        raise ValueError(f"k must be an integer in [1, V={V}], got {k!r}")
    lead = teacher_logits.shape[:-1]
    if mode == "topk":
        values, ids = torch.topk(teacher_logits, k, dim=-1)
        lse = torch.logsumexp(teacher_logits.to(torch.float32) / temperature, dim=-1)
        return ids.to(torch.int32), values.to(torch.float16), lse
    rows = teacher_logits.reshape(-1, V).to(torch.float32)
    # multinomial would fail with an opaque message (or a device assert) on such rows
    if bool(torch.isnan(rows).any() | (rows == float("inf")).any()):
        raise ValueError("teacher_logits contains NaN or +Inf: mode='sampled' cannot draw from such a row")
    if bool((rows == float("-inf")).all(-1).any()):
        raise ValueError("teacher_logits has a row that is -inf everywhere: mode='sampled' has no distribution "
                         "to draw from")
    probs = torch.softmax(rows / temperature, dim=-1)
    draws = torch.multinomial(probs, k, replacement=True, generator=generator).sort(dim=-1).values
    first = torch.ones_like(draws, dtype=torch.bool)
    first[:, 1:] = draws[:, 1:] != draws[:, :-1]
    group = first.long().cumsum(dim=-1) - 1            # index of each draw's run of equal ids
    run_len = torch.zeros_like(draws).scatter_add_(1, group, torch.ones_like(draws))
    counts = torch.where(first, run_len.gather(1, group), 0)
    return draws.to(torch.int32).reshape(*lead, k), counts.to(torch.float16).reshape(*lead, k)
