"""Logit distillation: temperature KL (or soft cross-entropy) + MLM cross-entropy, fused.

Public: :func:`kd_loss`, :class:`KDLoss`. One kernel call computes the loss *and* the
gradient with respect to the student logits (the teacher is frozen, so nothing else is
needed); backward only scales the stored gradient by the upstream gradient, and skips even
that when the upstream gradient is exactly 1 (eager mode: ``loss.backward()`` on the loss).

Backends (see :mod:`kdfast.backend`): Triton, CUDA C++ and CPU C++ kernels, and the eager
reference. The compiled and Triton kernels are ``torch.library`` ops with fake (meta)
implementations, so ``torch.compile(fullgraph=True)`` traces through :func:`kd_loss`.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from kdfast import backend as _backend
from kdfast.kernels.reference import kd_fwd_bwd_torch
from kdfast.losses._autograd import scale_stored_grad
from kdfast.losses._checks import (
    check_choice,
    check_labels_in_range,
    check_logit_rows,
    check_number,
    check_row_tensor,
    check_same_dtype_device,
    check_temperature,
    check_tensor,
    resolve_backend,
    value_checks_enabled,
)

KINDS = ("kl", "soft_ce")
REDUCTIONS = ("batchmean", "sum", "mean", "none")


# --- torch.library registrations --------------------------------------------------------------

def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


if _backend._extension()[0] is not None:

    @torch.library.register_fake("kdfast::kd_fwd_bwd")
    def _kd_fwd_bwd_fake(student, teacher, labels, row_weight, grad, temperature, alpha_kd, alpha_mlm, soft_ce,
                         cuda_stream=0):
        return student.new_empty(student.shape[0], dtype=_acc_dtype(student.dtype))


@torch.library.custom_op("kdfast::kd_fwd_bwd_triton", mutates_args=("grad",))
def _kd_fwd_bwd_triton(student: Tensor, teacher: Tensor, labels: Tensor, row_weight: Tensor, grad: Tensor,
                       temperature: float, alpha_kd: float, alpha_mlm: float, soft_ce: bool) -> Tensor:
    from kdfast.kernels.triton.kd_loss import kd_fwd_bwd_triton

    return kd_fwd_bwd_triton(student, teacher, labels, row_weight, grad, temperature, alpha_kd, alpha_mlm, soft_ce)


@_kd_fwd_bwd_triton.register_fake
def _(student, teacher, labels, row_weight, grad, temperature, alpha_kd, alpha_mlm, soft_ce):
    return student.new_empty(student.shape[0], dtype=torch.float32)


def _kd_fwd_bwd(backend: str, student: Tensor, teacher: Tensor, labels: Tensor, row_weight: Tensor, grad: Tensor,
                temperature: float, alpha_kd: float, alpha_mlm: float, soft_ce: bool) -> Tensor:
    """Run the fused kernel of ``backend``: returns loss rows, writes the gradient into ``grad``."""
    if backend == "torch":
        return kd_fwd_bwd_torch(student, teacher, labels, row_weight, grad, temperature, alpha_kd, alpha_mlm, soft_ce)
    if backend == "triton":
        return _kd_fwd_bwd_triton(student, teacher, labels, row_weight, grad, temperature, alpha_kd, alpha_mlm,
                                  soft_ce)
    stream = torch.cuda.current_stream(student.device).cuda_stream if backend == "cuda" else 0
    return torch.ops.kdfast.kd_fwd_bwd(student, teacher, labels, row_weight, grad, temperature, alpha_kd, alpha_mlm,
                                       soft_ce, stream)


class _KDLossFunction(torch.autograd.Function):
    """Loss rows (or their sum) of 2-D logits; the gradient is produced by the forward kernel."""

    @staticmethod
    def forward(ctx, student, teacher, labels, row_weight, temperature, alpha_kd, alpha_mlm, soft_ce, backend,
                inplace, reduce):
        # In-place mode reuses the student logits buffer for the gradient (saves N x V memory).
        grad = student if inplace else torch.empty(student.shape, dtype=student.dtype, device=student.device)
        loss_rows = _kd_fwd_bwd(backend, student, teacher, labels, row_weight, grad, temperature, alpha_kd,
                                alpha_mlm, soft_ce)
        ctx.save_for_backward(grad)
        return loss_rows.sum() if reduce else loss_rows

    @staticmethod
    def backward(ctx, grad_out):
        (grad,) = ctx.saved_tensors
        g = scale_stored_grad(grad, grad_out)
        return g, None, None, None, None, None, None, None, None, None, None


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
    backend: str = "auto",
    inplace: bool = False,
    _names: tuple[str, str] = ("teacher_logits", "student_logits"),
) -> Tensor:
    r"""Logit distillation loss (DistilBERT L_ce, TinyBERT prediction loss), fused with MLM.

    For each counted row r (a token: ``labels != ignore_index`` and ``mask != 0``) with
    student logits s, teacher logits t, temperature T, p = softmax(t/T), q = softmax(s/T):

        kl:      loss_r = alpha_kd * T^2 * sum_j p_j (log p_j - log q_j)
        soft_ce: loss_r = alpha_kd * T^2 * (-sum_j p_j log q_j)
        + alpha_mlm * (logsumexp(s) - s[label_r])            (hard-label MLM cross-entropy, T = 1)

    and d loss_r / d s_j = alpha_kd * T * (q_j - p_j) + alpha_mlm * (softmax(s)_j - [j = label_r]).
    ``kl`` with ``batchmean`` equals ``T**2 * F.kl_div(log q, log p, reduction="batchmean",
    log_target=True)`` over the counted rows.

    Args:
        student_logits, teacher_logits: [..., V] (e.g. [B, L, V] or [N, V]), same shape, dtype
            (fp32 / fp16 / bf16 / fp64) and device; accumulation is fp32 (fp64 for fp64 input,
            which the Triton backend refuses: ``auto`` then picks another).
        temperature: T with 1e-2 <= T <= 1e4 (a number): over that range every backend stays
            within 1e-4 relative of float64 (a row whose KL < 1 is recomputed in a form without
            cancellation, csrc/common/kd_math.h); outside it, ValueError.
        labels: [...] int targets for the MLM term; rows equal to ``ignore_index`` are not
            counted. Required when ``alpha_mlm != 0``. Outside [0, V): ValueError when value
            checks run (`kdfast.set_value_checks`; by default on CPU tensors), else the row is
            dropped like an ignored one, never read out of bounds.
        mask: [...] attention/selection mask; rows where it is 0 are not counted.
        reduction: ``batchmean`` and ``mean`` divide the sum by the number of counted rows
            (a row is the unit here, so they agree; torch's element-wise mean over V is not
            offered), ``sum`` sums, ``none`` returns per-row losses shaped [...] (0 where not
            counted). With no counted row the loss is 0 and the gradient 0, never NaN.
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
        temperature outside [1e-2, 1e4], a NaN / Inf / non-number alpha, labels out of range,
        unknown kind / reduction / backend, float64 inputs with ``backend="triton"``, NaN or
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
    alpha_kd = check_number("alpha_kd", alpha_kd)
    alpha_mlm = check_number("alpha_mlm", alpha_mlm)
    check_choice("kind", kind, KINDS)
    check_choice("reduction", reduction, REDUCTIONS)
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
    name = resolve_backend(backend, student_logits.device, student_logits.dtype, "kd_loss")
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
    N = student2d.shape[0]
    if labels is not None:
        labels_flat = labels.reshape(-1).to(torch.int64)
        counted = labels_flat != ignore_index
        if checks:
            check_labels_in_range(labels_flat, counted, V, ignore_index)
        elif alpha_mlm != 0:
            # Unchecked (GPU default): a label outside [0, V) drops its row instead of sending a
            # kernel outside the row; see set_value_checks.
            counted = counted & (labels_flat >= 0) & (labels_flat < V)
    else:
        labels_flat = torch.zeros(N, dtype=torch.int64, device=student_logits.device)
        counted = torch.ones(N, dtype=torch.bool, device=student_logits.device)
    if mask is not None:
        counted = counted & mask.reshape(-1).bool()
    row_weight = counted.to(_acc_dtype(student_logits.dtype))
    if reduction in ("batchmean", "mean"):
        row_weight = row_weight / row_weight.sum().clamp_min(1)

    loss = _KDLossFunction.apply(student2d, teacher2d, labels_flat.contiguous(), row_weight, temperature,
                                 alpha_kd, alpha_mlm, kind == "soft_ce", name, inplace,
                                 reduction != "none")
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
        ignore_index: int = -100,
        backend: str = "auto",
        inplace: bool = False,
    ) -> None:
        super().__init__()
        self.temperature = check_temperature(temperature)
        self.alpha_kd, self.alpha_mlm = check_number("alpha_kd", alpha_kd), check_number("alpha_mlm", alpha_mlm)
        self.kind = check_choice("kind", kind, KINDS)
        self.reduction = check_choice("reduction", reduction, REDUCTIONS)
        self.ignore_index, self.backend, self.inplace = ignore_index, backend, inplace

    def forward(self, student_logits: Tensor, teacher_logits: Tensor, labels: Tensor | None = None,
                mask: Tensor | None = None) -> Tensor:
        return kd_loss(student_logits, teacher_logits, temperature=self.temperature, labels=labels, mask=mask,
                       ignore_index=self.ignore_index, alpha_kd=self.alpha_kd, alpha_mlm=self.alpha_mlm,
                       kind=self.kind, reduction=self.reduction, backend=self.backend, inplace=self.inplace)

    def extra_repr(self) -> str:
        return (f"temperature={self.temperature}, alpha_kd={self.alpha_kd}, alpha_mlm={self.alpha_mlm}, "
                f"kind={self.kind!r}, reduction={self.reduction!r}, backend={self.backend!r}")
