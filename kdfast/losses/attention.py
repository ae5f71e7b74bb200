"""Attention transfer: TinyBERT score MSE, MiniLM / MobileBERT attention KL, and the flash form.

Public: :func:`attention_mse_loss`, :func:`attention_kl_loss` (from materialised [B, H, L, L]
score maps) and :func:`flash_attention_transfer` (the same two losses from Q and K, without
ever storing an L x L map).

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
from kdfast.losses._checks import check_choice, check_same_dtype_device, check_tensor

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

def attention_mse_loss(student_scores: Tensor, teacher_scores: Tensor, mask: Tensor | None = None, *,
                       threshold: float = -1e2) -> Tensor:
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

    Returns:
        Scalar loss, float32 (float64 for float64 input). Gradient flows to ``student_scores``
        only (the teacher is treated as frozen): 2 (s - t) / n on counted elements, 0 elsewhere.

    Raises:
        ValueError naming the argument: shape / head count / dtype / device mismatch, mask shape.
    """
    _check_maps(student_scores, teacher_scores)
    B, H, L, _ = student_scores.shape
    m = _check_token_mask("mask", mask, B, L, student_scores.device)
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


def flash_attention_transfer(*args, **kwargs):  # placeholder, replaced below in the next step
    raise NotImplementedError
