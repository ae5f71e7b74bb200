"""Attention transfer: TinyBERT score MSE, MiniLM / MobileBERT attention KL, and the flash form.

Public: :func:`attention_mse_loss`, :func:`attention_kl_loss` (from materialised [B, H, L, L]
score maps) and :func:`flash_attention_transfer` (the same two losses from Q and K, without
ever storing an L x L map).

Backends: ``triton`` kernels for all three (the KL on maps reuses the fused logit-KD kernel,
which also has ``cpu`` / ``cuda`` C++ versions), a ``cpu`` C++ kernel for the flash form, and
eager ``torch`` (chunked over query rows for the flash form). ``auto`` picks Triton on CUDA
tensors, the C++ CPU kernels (map KL, flash form) on CPU tensors, and torch otherwise.

Masks. ``mask`` / ``key_mask`` is a [B, L] token mask (nonzero = real token, 0 = padding). A
padded token is excluded both as a key (a column of the map) and as a query (a row): padded
query rows attend to real keys in BERT, but their attention is never used for anything, so
distilling it only adds noise.

Head counts. Teacher and student must have the same number of heads H (a ValueError naming the
teacher argument otherwise). Mapping H_t heads onto H_s != H_t is a modelling choice (MiniLM-v2
re-splits the concatenated Q and K into a common number of "relation heads"): do it on Q / K
before calling, e.g. ``q.transpose(1, 2).reshape(B, L, R, -1).transpose(1, 2)`` for R relation
heads on both models, which keeps :func:`flash_attention_transfer` O(L) in memory.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from kdfast import backend as _backend
from kdfast.kernels.reference import attention_transfer_fwd_bwd_torch
from kdfast.losses._checks import check_choice, check_positive, check_same_dtype_device, check_tensor

LOSSES = ("kl", "mse")


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_maps(student_scores: Tensor, teacher_scores: Tensor) -> None:
    check_tensor("student_scores", student_scores, min_dim=4)
    check_tensor("teacher_scores", teacher_scores, min_dim=4)
    if student_scores.dim() != 4 or student_scores.shape[-1] != student_scores.shape[-2]:
        raise ValueError(f"student_scores must be [B, H, L, L], got shape {tuple(student_scores.shape)}")
    if teacher_scores.shape != student_scores.shape:
        what = "head count" if (teacher_scores.dim() == 4 and teacher_scores.shape[0] == student_scores.shape[0]
                                and teacher_scores.shape[2:] == student_scores.shape[2:]) else "shape"
        raise ValueError(f"teacher_scores {what} mismatch: teacher_scores {tuple(teacher_scores.shape)} vs "
                         f"student_scores {tuple(student_scores.shape)} (the heads must correspond one to one)")
    check_same_dtype_device("student_scores", student_scores, "teacher_scores", teacher_scores)
    if student_scores.numel() == 0:
        raise ValueError(f"student_scores is empty (shape {tuple(student_scores.shape)})")


def _check_token_mask(name: str, mask: Tensor | None, B: int, L: int, device: torch.device) -> Tensor | None:
    """A [B, L] token mask (bool, int or float; nonzero = keep) -> bool, or None."""
    if mask is None:
        return None
    if not isinstance(mask, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(mask).__name__}")
    if tuple(mask.shape) != (B, L):
        raise ValueError(f"{name} has shape {tuple(mask.shape)}, expected [B, L] = {(B, L)}")
    if mask.device != device:
        raise ValueError(f"{name} is on {mask.device} but the inputs are on {device}")
    if mask.is_complex():
        raise ValueError(f"{name} must be a bool, integer or float tensor, got {mask.dtype}")
    return mask != 0


# --- from materialised score maps -------------------------------------------------------------

@torch.library.custom_op("kdfast::score_mse_fwd_triton", mutates_args=())
def _score_mse_fwd_op(s: Tensor, t: Tensor, mask: Tensor, threshold: float, has_mask: bool) -> tuple[Tensor, Tensor]:
    from kdfast.kernels.triton.score_mse import score_mse_fwd_triton

    return score_mse_fwd_triton(s, t, mask, threshold, has_mask)


@_score_mse_fwd_op.register_fake
def _(s, t, mask, threshold, has_mask):
    n = s.shape[0] * s.shape[1] * s.shape[2]
    return s.new_empty(n, dtype=torch.float32), s.new_empty(n, dtype=torch.int32)


@torch.library.custom_op("kdfast::score_mse_bwd_triton", mutates_args=())
def _score_mse_bwd_op(s: Tensor, t: Tensor, mask: Tensor, coef: Tensor, threshold: float, has_mask: bool) -> Tensor:
    from kdfast.kernels.triton.score_mse import score_mse_bwd_triton

    return score_mse_bwd_triton(s, t, mask, coef, threshold, has_mask)


@_score_mse_bwd_op.register_fake
def _(s, t, mask, coef, threshold, has_mask):
    return torch.empty_like(s, memory_format=torch.contiguous_format)


class _ScoreMSEFunction(torch.autograd.Function):
    """Triton score MSE: forward reads the maps once for (sum, count); backward recomputes the gradient."""

    @staticmethod
    def forward(ctx, s, t, mask, threshold, has_mask):
        sums, counts = _score_mse_fwd_op(s, t, mask, threshold, has_mask)
        n = counts.sum().clamp_min(1)  # int64: B H L^2 may exceed fp32's exact integers
        ctx.save_for_backward(s, t, mask, n)
        ctx.threshold, ctx.has_mask = threshold, has_mask
        acc = _acc_dtype(s.dtype)
        return sums.to(acc).sum() / n.to(acc)

    @staticmethod
    def backward(ctx, grad_out):
        s, t, mask, n = ctx.saved_tensors
        coef = (grad_out.to(torch.float64) / n.to(torch.float64)).to(torch.float32).reshape(1)
        return _score_mse_bwd_op(s, t, mask, coef, ctx.threshold, ctx.has_mask), None, None, None, None


def _triton_or_torch(backend: str, device: torch.device, what: str) -> str:
    """``auto`` -> Triton on CUDA tensors when it works, else torch; ``cpu``/``cuda`` (no C++ kernel) raise."""
    return _backend.resolve_for_loss(backend, device, what, compiled=())


def attention_mse_loss(student_scores: Tensor, teacher_scores: Tensor, mask: Tensor | None = None, *,
                       threshold: float = -1e2, backend: str = "auto") -> Tensor:
    r"""TinyBERT attention loss: MSE between pre-softmax attention scores, per head.

    With s, t the [B, H, L, L] student / teacher scores (after the additive mask, if any), an
    element (b, h, i, j) is *counted* unless

    - ``s <= threshold`` or ``t <= threshold`` (the additive mask put it there: TinyBERT's
      ``where(score <= -1e2, 0, score)``), or
    - ``mask[b, i] == 0`` or ``mask[b, j] == 0`` (padding as query row or as key column).

    Uncounted elements are set to 0 in both maps, and

        loss = sum_{counted} (s_bhij - t_bhij)^2 / (number of counted elements)

    (0 with no counted element). TinyBERT's own code divides by all B*H*L*L elements; this
    divides by the counted ones only, so the loss does not depend on the amount of padding. It
    also excludes an element where only one of the two maps is <= ``threshold`` (TinyBERT would
    compare 0 with the other score); with a shared additive mask both are the same.

    Args:
        student_scores, teacher_scores: [B, H, L, L], same shape, dtype and device. Computed in
            float32 (float64 for float64 input).
        mask: optional [B, L] token mask (nonzero = keep).
        threshold: scores at or below it count as masked.
        backend: ``auto`` (Triton on CUDA tensors when it works, else torch), ``triton`` (two
            row kernels: forward keeps nothing but per-row sums and counts, backward recomputes
            the gradient) or ``torch`` (eager, differentiated by autograd); ``cpu`` / ``cuda``
            have no kernel for this loss and raise.

    Returns:
        Scalar loss, float32 (float64 for float64 input). Gradient flows to ``student_scores``
        only (the teacher is treated as frozen): 2 (s - t) / n on counted elements, 0 elsewhere.

    Raises:
        ValueError naming the argument: shape / head count / dtype / device mismatch, mask shape,
        backend.
    """
    _check_maps(student_scores, teacher_scores)
    B, H, L, _ = student_scores.shape
    m = _check_token_mask("mask", mask, B, L, student_scores.device)
    try:
        threshold = float(threshold)
    except (TypeError, ValueError):
        raise ValueError(f"threshold must be a number, got {threshold!r}") from None
    if _triton_or_torch(backend, student_scores.device, "attention_mse_loss") == "triton":
        dev = student_scores.device
        mask_i8 = m.to(torch.int8).contiguous() if m is not None else torch.zeros(1, dtype=torch.int8, device=dev)
        return _ScoreMSEFunction.apply(student_scores.contiguous(), teacher_scores.detach().contiguous(), mask_i8,
                                       threshold, m is not None)
    acc = _acc_dtype(student_scores.dtype)
    s = student_scores.to(acc)
    t = teacher_scores.detach().to(acc)
    counted = (s > threshold) & (t > threshold)
    if m is not None:
        counted = counted & m[:, None, :, None] & m[:, None, None, :]
    diff = torch.where(counted, s - t, torch.zeros((), dtype=acc, device=s.device))
    return (diff * diff).sum() / counted.sum().clamp_min(1).to(acc)


def attention_kl_loss(student_scores: Tensor, teacher_scores: Tensor, mask: Tensor | None = None, *,
                      backend: str = "auto") -> Tensor:
    r"""Attention-distribution transfer (MobileBERT AT, MiniLM): KL(A_t || A_s) per query row.

    For each counted query row (b, h, i) (``mask[b, i] != 0``; every row when ``mask`` is None),
    over the keys K_b = {j : mask[b, j] != 0} (all keys when ``mask`` is None):

        A_t = softmax_{j in K_b}(t_bhi.),   A_s = softmax_{j in K_b}(s_bhi.)
        kl_bhi = sum_{j in K_b} A_t,j (log A_t,j - log A_s,j)
        loss = sum_{counted rows} kl_bhi / (number of counted rows)       (0 with none)

    gradient d loss / d s_bhij = (A_s,j - A_t,j) / (number of counted rows). Scores that already
    hold an additive mask (``finfo.min`` or -1e4 at padded keys) give those keys probability 0,
    so ``mask`` is then only needed to drop the padded query rows.

    Runs the fused logit-KD kernel (:func:`kdfast.kd_loss` at T = 1) on the B*H*L rows: the
    ``triton``, ``cpu`` and ``torch`` backends all work (:mod:`kdfast.backend`).

    Args:
        student_scores, teacher_scores: [B, H, L, L] pre-softmax scores, same shape, dtype and device.
        mask: optional [B, L] token mask (nonzero = keep).
        backend: ``auto`` / ``triton`` / ``cuda`` / ``cpu`` / ``torch``.

    Returns:
        Scalar loss, float32 (float64 for float64 input); gradient to ``student_scores`` only.

    Raises:
        ValueError naming the argument: shape / head count / dtype / device mismatch, mask shape,
        backend; NaN or Inf in the teacher's counted rows.
    """
    from kdfast.losses.kd import kd_loss

    _check_maps(student_scores, teacher_scores)
    B, H, L, _ = student_scores.shape
    m = _check_token_mask("mask", mask, B, L, student_scores.device)
    s, t = student_scores, teacher_scores.detach()
    rows = None
    if m is not None:
        # Masked keys get the most negative finite value in both maps: probability exactly 0 and
        # t - s = 0 there, so the kernels need no key mask (-inf would give 0 * NaN).
        keys = m[:, None, None, :]
        fill = torch.finfo(s.dtype).min
        s = s.masked_fill(~keys, fill)
        t = t.masked_fill(~keys, fill)
        rows = m[:, None, :].expand(B, H, L)
    return kd_loss(s, t, temperature=1.0, mask=rows, kind="kl", reduction="batchmean", backend=backend)


# --- flash form: from Q and K ----------------------------------------------------------------

@torch.library.custom_op("kdfast::attention_transfer_triton", mutates_args=())
def _attention_transfer_triton(q_s: Tensor, k_s: Tensor, q_t: Tensor, k_t: Tensor, key_valid: Tensor,
                               row_weight: Tensor, scale_s: float, scale_t: float, mse: bool,
                               need_grad: bool) -> tuple[Tensor, Tensor, Tensor]:
    from kdfast.kernels.triton.attention_transfer import attention_transfer_fwd_bwd_triton

    return attention_transfer_fwd_bwd_triton(q_s, k_s, q_t, k_t, key_valid, row_weight, scale_s, scale_t, mse,
                                             need_grad)


@_attention_transfer_triton.register_fake
def _(q_s, k_s, q_t, k_t, key_valid, row_weight, scale_s, scale_t, mse, need_grad):
    B, H, L, _ = q_s.shape
    rows = q_s.new_empty(B, H, L, dtype=torch.float32)
    if not need_grad:
        return rows, q_s.new_empty(0), k_s.new_empty(0)
    return rows, torch.empty_like(q_s, memory_format=torch.contiguous_format), \
        torch.empty_like(k_s, memory_format=torch.contiguous_format)


if _backend._extension()[0] is not None:

    @torch.library.register_fake("kdfast::attention_transfer_fwd_bwd")
    def _attention_transfer_cpu_fake(q_s, k_s, q_t, k_t, key_valid, row_weight, scale_s, scale_t, mse, need_grad):
        rows = q_s.new_empty(q_s.shape[:3], dtype=row_weight.dtype)
        if not need_grad:
            return rows, q_s.new_empty(0), k_s.new_empty(0)
        return rows, q_s.new_empty(q_s.shape), k_s.new_empty(k_s.shape)


class _FlashAttentionTransferFunction(torch.autograd.Function):
    """Loss from Q, K of both models; dq_s, dk_s are produced by the forward kernels (teacher frozen)."""

    @staticmethod
    def forward(ctx, q_s, k_s, q_t, k_t, key_valid, row_weight, scale_s, scale_t, mse, backend, grad_enabled):
        # grad mode is always off inside forward: the caller says whether it was on
        need_grad = grad_enabled and bool(ctx.needs_input_grad[0] or ctx.needs_input_grad[1])
        if backend == "triton":
            rows, dq, dk = _attention_transfer_triton(q_s, k_s, q_t, k_t, key_valid, row_weight, scale_s, scale_t,
                                                      mse, need_grad)
        elif backend == "cpu":
            rows, dq, dk = torch.ops.kdfast.attention_transfer_fwd_bwd(q_s, k_s, q_t, k_t, key_valid, row_weight,
                                                                       scale_s, scale_t, mse, need_grad)
        else:
            rows, dq, dk = attention_transfer_fwd_bwd_torch(q_s, k_s, q_t, k_t, key_valid, row_weight, scale_s,
                                                            scale_t, mse, need_grad)
        ctx.save_for_backward(dq, dk)
        return rows.to(_acc_dtype(q_s.dtype)).sum()

    @staticmethod
    def backward(ctx, grad_out):
        dq, dk = ctx.saved_tensors
        # loss.backward() passes exactly 1: the stored gradients are the answer.
        if torch.compiler.is_compiling() or grad_out.item() != 1.0:
            dq, dk = dq * grad_out.to(dq.dtype), dk * grad_out.to(dk.dtype)
        gq = dq if ctx.needs_input_grad[0] else None
        gk = dk if ctx.needs_input_grad[1] else None
        return gq, gk, None, None, None, None, None, None, None, None, None


def _check_qk(q_s: Tensor, k_s: Tensor, q_t: Tensor, k_t: Tensor) -> None:
    for name, x in (("q_s", q_s), ("k_s", k_s), ("q_t", q_t), ("k_t", k_t)):
        check_tensor(name, x, min_dim=4)
        if x.dim() != 4:
            raise ValueError(f"{name} must be [B, H, L, dh], got shape {tuple(x.shape)}")
        if x.numel() == 0:
            raise ValueError(f"{name} is empty (shape {tuple(x.shape)})")
    if k_s.shape != q_s.shape:
        raise ValueError(f"k_s shape mismatch: k_s {tuple(k_s.shape)} vs q_s {tuple(q_s.shape)}")
    if q_t.shape[1] != q_s.shape[1] and q_t.shape[0] == q_s.shape[0] and q_t.shape[2] == q_s.shape[2]:
        raise ValueError(f"q_t head count mismatch: the teacher has {q_t.shape[1]} heads, the student "
                         f"{q_s.shape[1]}; they must be equal (re-split both into the same number of relation "
                         f"heads first, see kdfast.losses.attention)")
    if q_t.shape[:3] != q_s.shape[:3]:
        raise ValueError(f"q_t shape mismatch: q_t {tuple(q_t.shape)} vs q_s {tuple(q_s.shape)} "
                         f"(B, H and L must agree; only dh may differ)")
    if k_t.shape != q_t.shape:
        raise ValueError(f"k_t shape mismatch: k_t {tuple(k_t.shape)} vs q_t {tuple(q_t.shape)}")
    for name, x in (("k_s", k_s), ("q_t", q_t), ("k_t", k_t)):
        check_same_dtype_device("q_s", q_s, name, x)


def flash_attention_transfer(
    q_s: Tensor,
    k_s: Tensor,
    q_t: Tensor,
    k_t: Tensor,
    key_mask: Tensor | None = None,
    *,
    loss: str = "kl",
    scale_s: float | None = None,
    scale_t: float | None = None,
    backend: str = "auto",
) -> Tensor:
    r"""Attention transfer from queries and keys, without ever storing an L x L map.

    Scores s = scale_s q_s k_s^T (student) and t = scale_t q_t k_t^T (teacher), per batch b and
    head h; a token mask ``key_mask`` [B, L] removes padded tokens as keys *and* as query rows
    (see the module docstring). With K_b the valid keys and n_b = |K_b|:

        kl  (default; MiniLM, MobileBERT AT):
            loss = 1 / (H sum_b n_b) sum_{b,h, i in K_b} sum_{j in K_b} A_t,ij (log A_t,ij - log A_s,ij),
            A = softmax over j in K_b;  d loss / d s_ij = (A_s,ij - A_t,ij) / (H sum_b n_b)
        mse (TinyBERT):
            loss = 1 / (H sum_b n_b^2) sum_{b,h, i,j in K_b} (s_ij - t_ij)^2;
            d loss / d s_ij = 2 (s_ij - t_ij) / (H sum_b n_b^2)

    and dq_s = scale_s dS k_s, dk_s = scale_s dS^T q_s. This equals :func:`attention_kl_loss`
    / :func:`attention_mse_loss` of the materialised scores plus the additive mask, with
    ``mask=key_mask`` (for ``mse``: as long as no unmasked score is <= -1e2, the threshold that
    the materialised form uses to spot an additive mask; here the mask is explicit).

    Memory: O(B H L) for the Triton kernels (two log-sum-exps per row) and the ``cpu`` C++
    kernel (plus one strip of at most 2^15 scores per model and thread), O(B H L C) for the
    ``torch`` backend, which works on C query rows at a time (C B H L <= 2^19, C >= 16).

    Args:
        q_s, k_s: student queries and keys [B, H, L, ds]; gradients flow to these two.
        q_t, k_t: teacher queries and keys [B, H, L, dt] (dt may differ from ds; H may not);
            no gradient. All four share dtype and device.
        key_mask: optional [B, L] token mask (nonzero = real token).
        loss: ``"kl"`` or ``"mse"``.
        scale_s, scale_t: score scales, default 1/sqrt(dh) of each model. Pass 1.0 for queries
            that are already pre-scaled (e.g. ``kdfast.models`` ``capture=("qk",)`` output).
        backend: ``auto`` (Triton on CUDA tensors when it works, the C++ kernel on CPU tensors
            when ``kdfast._C`` is built, else torch), ``triton``, ``cpu`` or ``torch``; ``cuda``
            has no kernel for this loss and raises.

    Returns:
        Scalar loss, float32 (float64 for float64 input). 0 (and zero gradients) when every
        token is masked.

    Raises:
        ValueError naming the argument: rank / shape / head count / dtype / device mismatch,
        key_mask shape or device, unknown loss or backend, scale <= 0.
    """
    _check_qk(q_s, k_s, q_t, k_t)
    check_choice("loss", loss, LOSSES)
    B, H, L, ds = q_s.shape
    dt = q_t.shape[-1]
    scale_s = 1.0 / math.sqrt(ds) if scale_s is None else check_positive("scale_s", scale_s)
    scale_t = 1.0 / math.sqrt(dt) if scale_t is None else check_positive("scale_t", scale_t)
    m = _check_token_mask("key_mask", key_mask, B, L, q_s.device)
    name = _backend.resolve_for_loss(backend, q_s.device, "flash_attention_transfer", compiled=("cpu",))
    key_valid = torch.ones(B, L, dtype=torch.bool, device=q_s.device) if m is None else m
    acc = _acc_dtype(q_s.dtype)
    n = key_valid.sum(1).to(acc)
    count = H * (n * n).sum() if loss == "mse" else H * n.sum()
    row_weight = key_valid.to(acc) / count.clamp_min(1)
    return _FlashAttentionTransferFunction.apply(q_s, k_s, q_t.detach(), k_t.detach(), key_valid, row_weight,
                                                 scale_s, scale_t, loss == "mse", name, torch.is_grad_enabled())


def split_relation_heads(x: Tensor, relation_heads: int, name: str = "x") -> Tensor:
    """[B, L, d] (heads concatenated, as a BERT projection returns them) or [B, H, L, dh] ->
    [B, R, L, d / R]: the common head split MiniLMv2 uses so that teacher and student with
    different head counts and widths can be compared head to head."""
    check_tensor(name, x, min_dim=3)
    if x.dim() == 4:  # [B, H, L, dh] -> [B, L, H * dh]
        x = x.transpose(1, 2).reshape(x.shape[0], x.shape[2], -1)
    if x.dim() != 3:
        raise ValueError(f"{name} must be [B, L, d] or [B, H, L, dh], got shape {tuple(x.shape)}")
    B, L, d = x.shape
    if relation_heads < 1 or d % relation_heads:
        raise ValueError(f"relation_heads={relation_heads} must divide the width of {name} ({d})")
    return x.reshape(B, L, relation_heads, d // relation_heads).transpose(1, 2)


def minilm_relation_loss(
    student: dict[str, Tensor] | tuple[Tensor, ...],
    teacher: dict[str, Tensor] | tuple[Tensor, ...],
    relation_heads: int,
    key_mask: Tensor | None = None,
    *,
    relations: tuple[str, ...] = ("qq", "kk", "vv"),
    backend: str = "auto",
) -> Tensor:
    r"""MiniLMv2's self-attention relation transfer, without any L x L map.

    For each relation ``xx`` in ``relations`` (x in q, k, v), with the student's and teacher's
    projections X split into R = ``relation_heads`` heads of width d / R (``split_relation_heads``):

        R_xx = softmax(X_r X_r^T / sqrt(d / R))        per relation head r and query row
        loss = sum_xx  mean over (b, r, real query rows) of KL(R_xx^teacher || R_xx^student)

    Each term is :func:`flash_attention_transfer` with the same tensor as query and key, so memory
    stays O(B R L) and teacher and student may differ in head count and width (R must divide
    both widths). ``student`` / ``teacher``: dicts with keys "q", "k", "v" (or tuples in that
    order) of [B, L, d] or [B, H, L, dh]. Gradients flow to the student's tensors.
    """
    names = ("q", "k", "v")
    s = dict(zip(names, student)) if isinstance(student, (tuple, list)) else dict(student)
    t = dict(zip(names, teacher)) if isinstance(teacher, (tuple, list)) else dict(teacher)
    if not relations:
        raise ValueError("relations must name at least one of 'qq', 'kk', 'vv'")
    total = None
    for rel in relations:
        if rel not in ("qq", "kk", "vv"):
            raise ValueError(f"relations must be among ('qq', 'kk', 'vv'), got {rel!r}")
        x = rel[0]
        if x not in s or x not in t:
            raise ValueError(f"relation {rel!r} needs {x!r} in both student and teacher")
        xs = split_relation_heads(s[x], relation_heads, f"student {x}")
        xt = split_relation_heads(t[x], relation_heads, f"teacher {x}")
        term = flash_attention_transfer(xs, xs, xt, xt, key_mask=key_mask, loss="kl", backend=backend)
        total = term if total is None else total + term
    return total
