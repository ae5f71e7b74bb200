"""Logit distillation: temperature KL (or soft cross-entropy) + MLM cross-entropy, fused.

Public: :func:`kd_loss`, :class:`KDLoss`. One kernel call computes the loss *and* the
gradient with respect to the student logits (the teacher is frozen, so nothing else is
needed); backward only scales the stored gradient by the upstream gradient, and skips even
that when the upstream gradient is exactly 1 (eager mode: ``loss.backward()`` on the loss).

The kernels are the ``kd_rows`` op of :mod:`kdfast.ops.logit_kd` (Triton, CUDA C++, CPU C++ and
eager torch), chosen by :func:`kdfast.ops.registry.select`. The compiled and Triton
kernels are ``torch.library`` ops with fake (meta) implementations, so
``torch.compile(fullgraph=True)`` traces through :func:`kd_loss`.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from kdfast.losses._autograd import scale_stored_grad
from kdfast.losses._checks import (
    KD_ROWS,
    acc_dtype,
    check_choice,
    check_logit_rows,
    check_nonnegative,
    check_row_tensor,
    check_same_dtype_device,
    check_temperature,
    check_tensor,
    row_weights,
    select_logit_rows,
    value_checks_enabled,
)
from kdfast.ops import logit_kd, registry

KINDS = ("kl", "soft_ce")
REDUCTIONS = ("batchmean", "sum", "mean", "none")


class _KDLossFunction(torch.autograd.Function):
    """Loss rows (or their sum) of 2-D logits; the gradient is produced by the forward kernel."""

    @staticmethod
    def forward(ctx, student, teacher, labels, row_weight, mlm_weight, temperature, alpha_kd, alpha_mlm, soft_ce,
                kernel, inplace, reduce):
        # In-place mode reuses the student logits buffer for the gradient (saves N x V memory).
        grad = student if inplace else torch.empty(student.shape, dtype=student.dtype, device=student.device)
        # one pass: KD weighted by row_weight, MLM by mlm_weight (None: row_weight too)
        loss_rows = kernel(student, teacher, labels, row_weight, grad, temperature, alpha_kd, alpha_mlm, soft_ce,
                           mlm_weight=mlm_weight)
        ctx.save_for_backward(grad)
        return loss_rows.sum() if reduce else loss_rows

    @staticmethod
    def backward(ctx, grad_out):
        (grad,) = ctx.saved_tensors
        g = scale_stored_grad(grad, grad_out)
        return (g,) + (None,) * 11


# --- public API -------------------------------------------------------------------------------

def kd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    temperature: float = 1.0,
    labels: Tensor | None = None,
    mask: Tensor | None = None,
    ignore_index: int = -100,
    alpha_kd: float = 1.0,
    alpha_mlm: float = 0.0,
    kind: str = "kl",
    reduction: str = "batchmean",
    kd_rows: str = "all",
    backend: str = "auto",
    inplace: bool = False,
    _names: tuple[str, str] = ("teacher_logits", "student_logits"),
) -> Tensor:
    r"""Logit distillation loss (DistilBERT L_ce, TinyBERT prediction loss), fused with MLM.

    Rows are tokens. The KD rows K (``kd_rows``, an explicit choice: labels alone never change it):
    ``"all"`` (default): every row with ``mask != 0`` (every row without a mask); ``"masked"``:
    the rows with ``labels != ignore_index`` and ``mask != 0`` (DistilBERT's
    ``restrict_ce_to_mask``; needs ``labels``). The MLM rows M: ``labels != ignore_index`` and
    ``mask != 0``. With student logits s, teacher logits t, temperature T, p = softmax(t/T),
    q = softmax(s/T):

        kl:      kd_r = T^2 * sum_j p_j (log p_j - log q_j)
        soft_ce: kd_r = T^2 * (-sum_j p_j log q_j)
        ce_r     = logsumexp(s) - s[label_r]                   (hard-label MLM cross-entropy, T = 1)

        batchmean / mean:  loss = alpha_kd / |K| * sum_{r in K} kd_r + alpha_mlm / |M| * sum_{r in M} ce_r
        sum:               loss = alpha_kd * sum_{r in K} kd_r + alpha_mlm * sum_{r in M} ce_r
        none:              loss_r = alpha_kd kd_r [r in K] + alpha_mlm ce_r [r in M]

    (a mean over an empty row set is 0; with ``"masked"`` K = M, one mean). Gradient:
    d kd_r / d s_j = T (q_j - p_j), d ce_r / d s_j = softmax(s)_j - [j = label_r].
    ``kl`` with ``batchmean`` equals ``T**2 * F.kl_div(log q, log p, reduction="batchmean",
    log_target=True)`` over the rows K. One kernel pass computes both terms, also when they count
    different rows (``"all"`` with an MLM term: the kernel weights the MLM term per row).

    Args:
        student_logits, teacher_logits: [..., V] (e.g. [B, L, V] or [N, V]), same shape, dtype
            (fp32 / fp16 / bf16 / fp64) and device; accumulation is fp32 (fp64 for fp64 input,
            which the Triton backend refuses: ``auto`` then picks another).
        temperature: T with 1e-2 <= T <= 1e4 (a number): over that range every backend stays
            within 1e-4 relative of float64 (a row whose KL < 1 is recomputed in a form without
            cancellation, csrc/common/kd_math.h); outside it, ValueError.
        labels: [...] int targets for the MLM term; rows equal to ``ignore_index`` have none.
            Required when ``alpha_mlm != 0`` or ``kd_rows="masked"``. Outside [0, V): ValueError
            when value checks run (`kdfast.set_value_checks`; by default on CPU tensors), else the
            row is dropped like an ignored one, never read out of bounds.
        mask: [...] attention/selection mask; rows where it is 0 count for nothing.
        reduction: ``batchmean`` and ``mean`` divide each term by the number of its rows
            (a row is the unit here, so they agree; torch's element-wise mean over V is not
            offered), ``sum`` sums, ``none`` returns per-row losses shaped [...] (0 where not
            counted). With no counted row the loss is 0 and the gradient 0, never NaN.
        kd_rows: ``"all"`` or ``"masked"``: which rows the KD term counts (above).
        backend: ``auto`` / ``triton`` / ``cuda`` / ``cpu`` / ``torch`` (:mod:`kdfast.backend`).
        inplace: write the gradient over ``student_logits`` (saves one N x V buffer). The
            logits are garbage afterwards; autograd raises if something still needs them.
        _names: how the value errors name (teacher, student): callers that pass other tensors
            as logits (attention_kl_loss: score maps) give their own argument names.

    Returns:
        The loss, float32 (float64 for float64 inputs). Gradient flows to ``student_logits``
        only, in its dtype.

    Raises:
        ValueError naming the argument: shape / vocabulary / dtype / device mismatch,
        temperature outside [1e-2, 1e4], a negative, NaN / Inf or non-number alpha, labels out of range,
        unknown kind / reduction / kd_rows / backend, ``kd_rows="masked"`` without labels, float64
        inputs with ``backend="triton"``, NaN or
        +Inf in the counted rows of ``teacher_logits`` or a row that is -inf everywhere (-inf
        entries are valid: probability 0). Value checks run as `set_value_checks` says.
    """
    student_logits = check_tensor("student_logits", student_logits, min_dim=1)
    teacher_logits = check_tensor("teacher_logits", teacher_logits, min_dim=1)
    if teacher_logits.shape != student_logits.shape:
        what = "vocabulary size" if teacher_logits.shape[:-1] == student_logits.shape[:-1] else "shape"
        raise ValueError(f"teacher_logits {what} mismatch: teacher_logits {tuple(teacher_logits.shape)} vs "
                         f"student_logits {tuple(student_logits.shape)}")
    check_same_dtype_device("student_logits", student_logits, "teacher_logits", teacher_logits)
    temperature = check_temperature(temperature)
    alpha_kd = check_nonnegative("alpha_kd", alpha_kd)
    alpha_mlm = check_nonnegative("alpha_mlm", alpha_mlm)
    check_choice("kind", kind, KINDS)
    check_choice("reduction", reduction, REDUCTIONS)
    check_choice("kd_rows", kd_rows, KD_ROWS)
    V = student_logits.shape[-1]
    if V == 0:
        raise ValueError("student_logits has an empty vocabulary dimension")
    lead = student_logits.shape[:-1]
    if student_logits.numel() == 0:
        raise ValueError(f"student_logits is an empty batch (shape {tuple(student_logits.shape)})")
    labels = check_row_tensor("labels", labels, lead, student_logits.device)
    mask = check_row_tensor("mask", mask, lead, student_logits.device)
    if labels is not None and (labels.dtype.is_floating_point or labels.dtype == torch.bool):
        raise ValueError(f"labels must be an integer tensor, got {labels.dtype}")
    if alpha_mlm != 0 and labels is None:
        raise ValueError("labels are required when alpha_mlm != 0")
    kernel = registry.select(logit_kd.OP, backend, student_logits, what="kd_loss").fn
    checks = value_checks_enabled(student_logits)

    # Rows of the kernel: [N, V] views with a unit column stride (copied only if they lack it).
    student2d = student_logits.reshape(-1, V)
    teacher2d = teacher_logits.reshape(-1, V)
    if student2d.stride(-1) != 1:
        if inplace:
            raise ValueError("inplace=True needs student_logits with a contiguous last dimension")
        student2d = student2d.contiguous()
    if teacher2d.stride(-1) != 1:
        teacher2d = teacher2d.contiguous()
    labels_flat, counted, mlm_rows = select_logit_rows(kd_rows, labels, mask, student2d.shape[0], V, ignore_index,
                                                       alpha_mlm, student_logits.device, checks)
    acc = acc_dtype(student_logits.dtype)
    row_weight = row_weights(counted, reduction, acc)
    mlm_weight = None if mlm_rows is None else row_weights(mlm_rows, reduction, acc)

    loss = _KDLossFunction.apply(student2d, teacher2d, labels_flat.contiguous(), row_weight, mlm_weight, temperature,
                                 alpha_kd, alpha_mlm, kind == "soft_ce", kernel, inplace, reduction != "none")
    if checks and not bool(torch.isfinite(loss).all()):
        # Only on the failure path: say which input is to blame.
        check_logit_rows(teacher2d[counted], None if inplace else student2d[counted], *_names)
    return loss if reduction != "none" else loss.reshape(lead)


class KDLoss(nn.Module):
    """Module form of :func:`kd_loss` with its keyword arguments fixed at construction.

    ``forward(student_logits, teacher_logits, labels=None, mask=None)`` returns the loss.
    """

    def __init__(
        self,
        temperature: float = 1.0,
        *,
        alpha_kd: float = 1.0,
        alpha_mlm: float = 0.0,
        kind: str = "kl",
        reduction: str = "batchmean",
        kd_rows: str = "all",
        ignore_index: int = -100,
        backend: str = "auto",
        inplace: bool = False,
    ) -> None:
        super().__init__()
        self.temperature = check_temperature(temperature)
        self.alpha_kd, self.alpha_mlm = check_nonnegative("alpha_kd", alpha_kd), check_nonnegative("alpha_mlm", alpha_mlm)
        self.kind = check_choice("kind", kind, KINDS)
        self.reduction = check_choice("reduction", reduction, REDUCTIONS)
        self.kd_rows = check_choice("kd_rows", kd_rows, KD_ROWS)
        self.ignore_index, self.backend, self.inplace = ignore_index, backend, inplace

    def forward(self, student_logits: Tensor, teacher_logits: Tensor, labels: Tensor | None = None,
                mask: Tensor | None = None) -> Tensor:
        return kd_loss(student_logits, teacher_logits, temperature=self.temperature, labels=labels, mask=mask,
                       ignore_index=self.ignore_index, alpha_kd=self.alpha_kd, alpha_mlm=self.alpha_mlm,
                       kind=self.kind, reduction=self.reduction, kd_rows=self.kd_rows, backend=self.backend,
                       inplace=self.inplace)

    def extra_repr(self) -> str:
        return (f"temperature={self.temperature}, alpha_kd={self.alpha_kd}, alpha_mlm={self.alpha_mlm}, "
                f"kind={self.kind!r}, reduction={self.reduction!r}, kd_rows={self.kd_rows!r}, backend={self.backend!r}")
