"""Attention transfer: TinyBERT score MSE, MiniLM / MobileBERT attention KL, and the flash form.

Public: :func:`attention_mse_loss`, :func:`attention_kl_loss` (from materialised [B, H, L, L]
score maps) and :func:`flash_attention_transfer` (the same two losses from Q and K, without
ever storing an L x L map).

The kernels are ops of the registry (:mod:`kdfast.ops.registry`, which alone resolves ``backend``):
``attention_transfer`` and ``attention_kl_maps`` (:mod:`kdfast.ops.attention_transfer`) and
``score_mse_fwd`` / ``score_mse_bwd`` (:mod:`kdfast.ops.score_mse`), each with its contract and
backends in its package. This module keeps what users call: the checks, the head mapping, the
autograd Functions and the losses. ``auto`` picks Triton on CUDA tensors, the C++ CPU kernels on
CPU tensors when ``kdfast._C`` is built, and torch otherwise.

Masks. ``mask`` / ``key_mask`` is a [B, L] token mask (nonzero = real token, 0 = padding). A
padded token is excluded both as a key (a column of the map) and as a query (a row): padded
query rows attend to real keys in BERT, but their attention is never used for anything, so
distilling it only adds noise.

Local (sliding-window) layers. Every loss takes ``window``: None (default) for global attention,
an int w >= 0 for a local layer whose query i attends only to the keys j with |i - j| <= w
(ModernBERT's local layers with ``local_attention`` = 128 have w = 64; positions are the row's
indices 0 .. L - 1, packed rows included). A key outside the band is not part of the row at all,
as in the model: probability 0 in both distributions, no MSE term, no gradient, and the mean is
over the counted elements inside the band. The kernels visit only the key tiles that meet the
band, so a local layer costs O(L w) instead of O(L^2) (:mod:`kdfast.ops.attention_transfer`). A
window of L - 1 or more is the global layer. Teacher and student are compared on one band: a
student layer whose window differs from its teacher layer's is a mismatch that
:class:`kdfast.DistillationLoss` refuses unless the term's window is given explicitly.

Head counts. Teacher and student may have different head counts H_t and H_s when one divides
the other (:func:`map_teacher_heads`, used by all three losses):

- H_t = g H_s: student head h learns from the teacher's group G_h = {h g, ..., h g + g - 1},
  merged by **averaging the group's pre-softmax scores**: t_h = (1/g) sum_{j in G_h} t_j. From Q
  and K this is exact without any L x L map: it is one head whose query and key are the group's
  heads concatenated along dh, with scale scale_t / g. For the KL losses the target is therefore
  softmax(mean of the group's scores), a normalised geometric mean of the group's distributions,
  not the mean of their probabilities: averaging probabilities would need every teacher head's
  log-sum-exp per row (an L x L pass per teacher head), and the score average keeps the flash
  form exact at O(L) memory.
- H_s = g H_t: teacher head j is the target of the g student heads j g, ..., j g + g - 1.
- Otherwise there is no head-to-head mapping and a ValueError names the teacher argument; compare
  *relation heads* instead (:func:`minilm_relation_loss`, MiniLMv2: both models' Q / K / V
  re-split into a common number R of heads, e.g.
  ``q.transpose(1, 2).reshape(B, L, R, -1).transpose(1, 2)``), which also stays O(L) in memory.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from kdfast.losses._autograd import scale_stored_grad
from kdfast.losses._checks import (
    acc_dtype,
    check_all_finite,
    check_choice,
    check_logit_rows,
    check_positive,
    check_same_dtype_device,
    check_tensor,
    counted_tokens,
    explain_non_finite,
    name_non_finite,
    value_checks_enabled,
)
from kdfast.ops import registry
from kdfast.ops.attention_transfer import FLASH_OP, MAPS_KL_OP, band_mask, flash_cols
from kdfast.ops.score_mse import BWD_OP as SCORE_MSE_BWD_OP
from kdfast.ops.score_mse import FWD_OP as SCORE_MSE_FWD_OP

LOSSES = ("kl", "mse")


def _check_maps(student_scores: Tensor, teacher_scores: Tensor) -> None:
    check_tensor("student_scores", student_scores, min_dim=4)
    check_tensor("teacher_scores", teacher_scores, min_dim=4)
    if student_scores.dim() != 4 or student_scores.shape[-1] != student_scores.shape[-2]:
        raise ValueError(f"student_scores must be [B, H, L, L], got shape {tuple(student_scores.shape)}")
    if teacher_scores.dim() != 4 or teacher_scores.shape[0] != student_scores.shape[0] \
            or teacher_scores.shape[2:] != student_scores.shape[2:]:
        raise ValueError(f"teacher_scores shape mismatch: teacher_scores {tuple(teacher_scores.shape)} vs "
                         f"student_scores {tuple(student_scores.shape)} (B and L must agree; H may differ, "
                         f"see map_teacher_heads)")
    check_same_dtype_device("student_scores", student_scores, "teacher_scores", teacher_scores)
    if student_scores.numel() == 0:
        raise ValueError(f"student_scores is empty (shape {tuple(student_scores.shape)})")


def map_teacher_heads(teacher: Tensor, student_heads: int, *, kind: str = "scores",
                      name: str = "teacher_scores") -> tuple[Tensor, int]:
    r"""Teacher heads -> the student's head count, as the attention losses pair them.

    With H_t = ``teacher.shape[1]`` and H_s = ``student_heads``:

    - H_t = H_s: ``teacher`` unchanged, g = 1.
    - H_t = g H_s (groups of g teacher heads, G_h = {h g, ..., h g + g - 1}):
        ``kind="scores"`` ([B, H_t, L, L] pre-softmax maps): t'_h = (1/g) sum_{j in G_h} t_j;
        ``kind="qk"`` ([B, H_t, L, d] queries or keys): x'_h = concat_{j in G_h} x_j along d,
        [B, H_s, L, g d], so that q'_h k'_h^T = sum_{j in G_h} q_j k_j^T: the caller divides
        the teacher's score scale by the returned g to get the group's mean score.
    - H_s = g H_t: t'_h = t_{floor(h / g)} (each teacher head taught to g student heads), g = 1;
      a view when H_t = 1, else a copy.

    Returns ``(mapped teacher, g)``. Score averages of additively masked maps (``finfo.min``)
    are clamped to ``finfo.min`` instead of overflowing to -inf.

    Raises:
        ValueError naming ``name`` and both head counts when neither divides the other (use
        :func:`minilm_relation_loss`: relation heads compare models of any head counts).
    """
    check_choice("kind", kind, ("scores", "qk"))
    if isinstance(student_heads, bool) or not isinstance(student_heads, int) or student_heads < 1:
        raise ValueError(f"student_heads must be a positive int, got {student_heads!r}")
    B, H_t = teacher.shape[:2]
    rest = tuple(teacher.shape[2:])
    if H_t == student_heads:
        return teacher, 1
    if H_t % student_heads == 0:
        g = H_t // student_heads
        grouped = teacher.unflatten(1, (student_heads, g))           # [B, H_s, g, L, *]
        if kind == "qk":  # [B, H_s, g, L, d] -> [B, H_s, L, g d]: a view when heads are concatenated in memory
            return grouped.transpose(2, 3).reshape(B, student_heads, rest[0], g * rest[1]), g
        mean = grouped.sum(2, dtype=acc_dtype(teacher.dtype)) / g
        return mean.clamp_min(torch.finfo(teacher.dtype).min).to(teacher.dtype), 1
    if student_heads % H_t == 0:
        g = student_heads // H_t
        return teacher.unsqueeze(2).expand(B, H_t, g, *rest).reshape(B, student_heads, *rest), 1
    raise ValueError(f"{name} head count mismatch: the teacher has {H_t} heads and the student {student_heads}; "
                     f"neither divides the other, so no head of one model maps onto a group of the other. "
                     f"Compare relation heads instead (kdfast.minilm_relation_loss re-splits both models' "
                     f"Q / K / V into a common number of heads).")


def check_window(name: str, window) -> int:
    """``window`` (None or an int >= 0) as the ops take it: -1 for None (global attention), else w.

    Raises:
        ValueError naming ``name`` for anything else (a bool, a float, a negative int).
    """
    if window is None:
        return -1
    if isinstance(window, bool) or not isinstance(window, int) or window < 0:
        raise ValueError(f"{name} must be None (global attention) or an int >= 0 (the band |i - j| <= {name}), "
                         f"got {window!r}")
    return int(window)


def band_counts(key_valid: Tensor, window: int) -> Tensor:
    """[B, L]: for each position i, the number of valid keys j with |i - j| <= window (all valid keys
    of the row for window = -1), from one cumulative sum: O(B L)."""
    B, L = key_valid.shape
    c = torch.zeros(B, L + 1, dtype=torch.int64, device=key_valid.device)
    c[:, 1:] = key_valid.to(torch.int64).cumsum(1)
    if window < 0:
        return c[:, L:].expand(B, L)
    pos = torch.arange(L, device=key_valid.device)
    return c[:, (pos + window + 1).clamp_max(L)] - c[:, (pos - window).clamp_min(0)]


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

class _ScoreMSEFunction(torch.autograd.Function):
    """Score MSE on the registry's row kernels: forward reads the maps once for (sum, count) per row;
    backward reads them again and recomputes the gradient (:mod:`kdfast.ops.score_mse`)."""

    @staticmethod
    def forward(ctx, s, t, mask, threshold, has_mask, window, backend):
        sums, counts = registry.select(SCORE_MSE_FWD_OP, backend, s).fn(s, t, mask, threshold, has_mask, window)
        n = counts.sum().clamp_min(1)  # int64: B H L^2 may exceed fp32's exact integers
        ctx.save_for_backward(s, t, mask, n)
        ctx.threshold, ctx.has_mask, ctx.window, ctx.backend = threshold, has_mask, window, backend
        acc = acc_dtype(s.dtype)
        return sums.to(acc).sum() / n.to(acc)

    @staticmethod
    def backward(ctx, grad_out):
        s, t, mask, n = ctx.saved_tensors
        coef = (grad_out.to(torch.float64) / n.to(torch.float64)).to(acc_dtype(s.dtype)).reshape(1)
        grad = registry.select(SCORE_MSE_BWD_OP, ctx.backend, s).fn(s, t, mask, coef, ctx.threshold, ctx.has_mask,
                                                                    ctx.window)
        return grad, None, None, None, None, None, None


def attention_mse_loss(student_scores: Tensor, teacher_scores: Tensor, mask: Tensor | None = None, *,
                       threshold: float = -1e2, window: int | None = None, backend: str = "auto") -> Tensor:
    r"""TinyBERT attention loss: MSE between pre-softmax attention scores, per head.

    With s, t the [B, H, L, L] student / teacher scores (after the additive mask, if any), an
    element (b, h, i, j) is *counted* unless

    - ``s <= threshold`` or ``t <= threshold`` (the additive mask put it there: TinyBERT's
      ``where(score <= -1e2, 0, score)``), or
    - ``mask[b, i] == 0`` or ``mask[b, j] == 0`` (padding as query row or as key column), or
    - ``window`` = w is given and |i - j| > w (a local layer: the key is outside the band; only
      the band of each row is read).

    Uncounted elements are set to 0 in both maps, and

        loss = sum_{counted} (s_bhij - t_bhij)^2 / (number of counted elements)

    (0 with no counted element). A teacher with a different head count is first mapped onto the
    student's H heads (:func:`map_teacher_heads`: groups of teacher maps averaged, or teacher
    maps repeated). TinyBERT's own code divides by all B*H*L*L elements; this
    divides by the counted ones only, so the loss does not depend on the amount of padding. It
    also excludes an element where only one of the two maps is <= ``threshold`` (TinyBERT would
    compare 0 with the other score); with a shared additive mask both are the same.

    Args:
        student_scores, teacher_scores: [B, H, L, L] and [B, H_t, L, L] (H_t a multiple or a
            divisor of H), same dtype and device. Computed in float32 (float64 for float64 input).
        mask: optional [B, L] token mask (nonzero = keep).
        threshold: scores at or below it count as masked.
        window: None (global attention) or an int w >= 0: only |i - j| <= w is compared.
        backend: ``auto`` (Triton on CUDA tensors when it works, the C++ kernel on CPU tensors
            when ``kdfast._C`` is built, else torch), ``triton``, ``cpu`` or ``torch``: each runs
            the two row kernels of :mod:`kdfast.ops.score_mse` (forward keeps nothing but per-row
            sums and counts, backward recomputes the gradient; torch with several [B, H, L, L]
            temporaries); ``cuda`` has no kernel for this loss and raises.

    Returns:
        Scalar loss, float32 (float64 for float64 input). Gradient flows to ``student_scores``
        only (the teacher is treated as frozen): 2 (s - t) / n on counted elements, 0 elsewhere.

    Raises:
        ValueError naming the argument: shape / dtype / device mismatch, head counts of which
        neither divides the other, mask shape, window, backend.
    """
    _check_maps(student_scores, teacher_scores)
    w = check_window("window", window)
    B, H, L, _ = student_scores.shape
    m = _check_token_mask("mask", mask, B, L, student_scores.device)
    teacher_scores, _ = map_teacher_heads(teacher_scores.detach(), H, name="teacher_scores")
    try:
        threshold = float(threshold)
    except (TypeError, ValueError):
        raise ValueError(f"threshold must be a number, got {threshold!r}") from None
    name = registry.select(SCORE_MSE_FWD_OP, backend, student_scores, what="attention_mse_loss").backend
    dev = student_scores.device
    mask_i8 = m.to(torch.int8).contiguous() if m is not None else torch.zeros(1, dtype=torch.int8, device=dev)
    loss = _ScoreMSEFunction.apply(student_scores.contiguous(), teacher_scores.detach().contiguous(), mask_i8,
                                   threshold, m is not None, w, name)

    band = None if w < 0 else _band(L, w, dev)  # w = -1: global

    def counted() -> list[tuple[str, Tensor]]:  # at or below threshold, or outside the band: not compared
        def kept(x: Tensor) -> Tensor:
            x = x.masked_fill(x <= threshold, 0)
            return x if band is None else x.masked_fill(~band, 0)

        return counted_tokens([("teacher_scores", kept(teacher_scores)), ("student_scores", kept(student_scores.detach()))],
                              m, maps=True)

    if value_checks_enabled(loss):
        # a NaN compares false with the threshold, so the kernels drop it: look for one as well, one
        # (b, h) map at a time (no masked copy of either map unless there is something to name)
        if (not bool(torch.isfinite(loss)) or _has_nan(teacher_scores, m, band)
                or _has_nan(student_scores.detach(), m, band)):
            name_non_finite(counted())
    return loss


def _qk_not_finite(tensors: tuple[Tensor, ...], mask: Tensor | None) -> bool:
    """Whether any [B, H, L, d] tensor holds a NaN / Inf in a row ``mask`` [B, L] keeps, read one
    (b, h) slice at a time: O(B H L d) reads and one [L, d] temporary, never a copy of the inputs."""
    for x in tensors:
        for b in range(x.shape[0]):
            rows = None if mask is None else mask[b].bool()
            for head in x[b]:
                kept = head if rows is None else head[rows]
                if not bool(torch.isfinite(kept).all()):
                    return True
    return False


def _band(L: int, w: int, device: torch.device) -> Tensor:
    """[L, L] bool: |i - j| <= w."""
    i = torch.arange(L, device=device)
    return (i[:, None] - i[None, :]).abs() <= w


def _has_nan(scores: Tensor, mask: Tensor | None, band: Tensor | None) -> bool:
    """Whether [B, H, L, L] ``scores`` hold a NaN where the loss counts them (query row and key both
    kept by ``mask``, inside ``band``), read one [L, L] map at a time (a bool map of one head, not of
    the batch)."""
    for b in range(scores.shape[0]):
        keep = band
        if mask is not None:
            tokens = mask[b].bool()
            pairs = tokens[:, None] & tokens[None, :]
            keep = pairs if keep is None else keep & pairs
        for head in scores[b]:
            nan = torch.isnan(head) if keep is None else torch.isnan(head) & keep
            if bool(nan.any()):
                return True
    return False


def attention_kl_loss(student_scores: Tensor, teacher_scores: Tensor, mask: Tensor | None = None, *,
                      window: int | None = None, backend: str = "auto") -> Tensor:
    r"""Attention-distribution transfer (MobileBERT AT, MiniLM): KL(A_t || A_s) per query row.

    For each counted query row (b, h, i) (``mask[b, i] != 0``; every row when ``mask`` is None),
    over the keys K_bi = {j : mask[b, j] != 0} (all keys when ``mask`` is None; with ``window`` = w
    only those with |i - j| <= w, and only they are read):

        A_t = softmax_{j in K_bi}(t_bhi.),   A_s = softmax_{j in K_bi}(s_bhi.)
        kl_bhi = sum_{j in K_bi} A_t,j (log A_t,j - log A_s,j)
        loss = sum_{counted rows} kl_bhi / (number of counted rows)       (0 with none)

    gradient d loss / d s_bhij = (A_s,j - A_t,j) / (number of counted rows). A teacher with
    H_t = g H heads gives t_bh = the mean of the scores of its heads h g, ..., h g + g - 1 (so A_t
    is softmax of the mean score); with H = g H_t, teacher head j serves student heads j g, ...,
    j g + g - 1 (:func:`map_teacher_heads`). Scores that already
    hold an additive mask (``finfo.min`` or -1e4 at padded keys) give those keys probability 0,
    so ``mask`` is then only needed to drop the padded query rows.

    Runs the op ``attention_kl_maps`` (:mod:`kdfast.ops.attention_transfer`): loss rows and the
    gradient in one pass, the logit-KD row at T = 1 over the valid keys. ``cpu`` skips padded keys
    in place; ``triton`` / ``cuda`` / ``torch`` run the logit-KD row kernels on maps whose padded
    keys are set to finfo.min.

    Args:
        student_scores, teacher_scores: [B, H, L, L] and [B, H_t, L, L] pre-softmax scores (H_t a
            multiple or a divisor of H), same dtype and device.
        mask: optional [B, L] token mask (nonzero = keep).
        window: None (global attention) or an int w >= 0: each row over |i - j| <= w only.
        backend: ``auto`` / ``triton`` / ``cuda`` / ``cpu`` / ``torch``.

    Returns:
        Scalar loss, float32 (float64 for float64 input); gradient to ``student_scores`` only
        (0 outside the band).

    Raises:
        ValueError naming the argument: shape / dtype / device mismatch, head counts of which
        neither divides the other, mask shape, window, backend (float64 maps with
        ``backend="triton"``); NaN or +Inf in the teacher's counted rows, or a row that is -inf
        everywhere (-inf scores are valid: one-hot attention rows).
    """
    _check_maps(student_scores, teacher_scores)
    w = check_window("window", window)
    B, H, L, _ = student_scores.shape
    s = student_scores
    m = _check_token_mask("mask", mask, B, L, s.device)
    t, _ = map_teacher_heads(teacher_scores.detach(), H, name="teacher_scores")
    name = registry.select(MAPS_KL_OP, backend, s, what="attention_kl_loss").backend
    acc = acc_dtype(s.dtype)
    if m is None:
        row_weight = torch.full((B, L), 1.0 / (B * H * L), dtype=acc, device=s.device)
    else:
        row_weight = m.to(acc) / (H * m.sum()).clamp_min(1).to(acc)
    loss = _StoredGradLossFunction.apply(MAPS_KL_OP, name, 1, torch.is_grad_enabled(), s, t, m, row_weight, w)
    if value_checks_enabled(s) and not bool(torch.isfinite(loss)):
        # Only on the failure path: say which input is to blame, on the counted rows over their keys.
        keys = torch.ones(B, L, dtype=torch.bool, device=s.device) if m is None else m
        fill = torch.finfo(s.dtype).min
        counted = keys[:, None, :].expand(B, H, L)
        off = ~keys[:, None, None, :]
        band = band_mask(L, w, s.device)
        if band is not None:
            off = off | ~band
        check_logit_rows(t.masked_fill(off, fill)[counted], s.detach().masked_fill(off, fill)[counted],
                         "teacher_scores", "student_scores")
    return loss


# --- flash form: from Q and K ----------------------------------------------------------------

class _StoredGradLossFunction(torch.autograd.Function):
    """Sum of the loss rows of a registered op that returns them with the gradients of their sum:
    ``select(op, backend, args[0]).fn(*args, need_grad) -> (rows, d/d args[0], ..., d/d args[n_diff - 1])``
    (the student's tensors come first in ``args``; with ``need_grad`` false the gradients are empty).
    Backward only scales the stored gradients (the teacher is frozen)."""

    @staticmethod
    def forward(ctx, op, backend, n_diff, grad_enabled, *args):
        # grad mode is always off inside forward: the caller says whether it was on
        need_grad = grad_enabled and any(ctx.needs_input_grad[4 + i] for i in range(n_diff))
        rows, *grads = registry.select(op, backend, args[0]).fn(*args, need_grad)
        ctx.save_for_backward(*grads)
        ctx.n_args = len(args)
        return rows.to(acc_dtype(args[0].dtype)).sum()

    @staticmethod
    def backward(ctx, grad_out):
        grads = ctx.saved_tensors
        return (None, None, None, None, *(
            scale_stored_grad(grads[i], grad_out) if i < len(grads) and ctx.needs_input_grad[4 + i] else None
            for i in range(ctx.n_args)))


def _check_qk(q_s: Tensor, k_s: Tensor, q_t: Tensor, k_t: Tensor) -> None:
    for name, x in (("q_s", q_s), ("k_s", k_s), ("q_t", q_t), ("k_t", k_t)):
        check_tensor(name, x, min_dim=4)
        if x.dim() != 4:
            raise ValueError(f"{name} must be [B, H, L, dh], got shape {tuple(x.shape)}")
        if x.numel() == 0:
            raise ValueError(f"{name} is empty (shape {tuple(x.shape)})")
    if k_s.shape != q_s.shape:
        raise ValueError(f"k_s shape mismatch: k_s {tuple(k_s.shape)} vs q_s {tuple(q_s.shape)}")
    if q_t.dim() != 4 or q_t.shape[0] != q_s.shape[0] or q_t.shape[2] != q_s.shape[2]:
        raise ValueError(f"q_t shape mismatch: q_t {tuple(q_t.shape)} vs q_s {tuple(q_s.shape)} "
                         f"(B and L must agree; H and dh may differ, see map_teacher_heads)")
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
    window: int | None = None,
    backend: str = "auto",
) -> Tensor:
    r"""Attention transfer from queries and keys, without ever storing an L x L map.

    Scores s = scale_s q_s k_s^T (student) and t = scale_t q_t k_t^T (teacher), per batch b and
    head h. When the teacher has H_t = g H student heads, student head h is paired with the mean
    score of the teacher heads G_h = {h g, ..., h g + g - 1}, t_h = (scale_t / g) sum_{j in G_h}
    q_t,j k_t,j^T, computed as one head of width g dt (:func:`map_teacher_heads`; for ``kl`` this
    is softmax of the mean score, not the mean of the probabilities, see the module docstring);
    when H = g H_t, teacher head j is the target of student heads j g, ..., j g + g - 1. A token mask
    ``key_mask`` [B, L] removes padded tokens as keys *and* as query rows
    (see the module docstring). With K_b the valid keys, n_b = |K_b|, and the keys of query row
    i K_bi = K_b (global, ``window=None``) or K_bi = {j in K_b : |i - j| <= w} (``window`` = w, a
    local layer: keys outside the band are not part of the row, probability 0), N = H sum_b
    sum_{i in K_b} |K_bi| (= H sum_b n_b^2 for a global layer):

        kl  (default; MiniLM, MobileBERT AT):
            loss = 1 / (H sum_b n_b) sum_{b,h, i in K_b} sum_{j in K_bi} A_t,ij (log A_t,ij - log A_s,ij),
            A = softmax over j in K_bi;  d loss / d s_ij = (A_s,ij - A_t,ij) / (H sum_b n_b)
        mse (TinyBERT):
            loss = 1 / N sum_{b,h, i in K_b, j in K_bi} (s_ij - t_ij)^2;
            d loss / d s_ij = 2 (s_ij - t_ij) / N

    and d loss / d s_ij = 0 for j outside K_bi. A local layer visits only the key tiles that meet
    the band: O(B H L w (ds + dt)) work instead of O(B H L^2 (ds + dt)).

    and dq_s = scale_s dS k_s, dk_s = scale_s dS^T q_s. This equals :func:`attention_kl_loss`
    / :func:`attention_mse_loss` of the materialised scores plus the additive mask, with
    ``mask=key_mask`` (for ``mse``: as long as no unmasked score is <= -1e2, the threshold that
    the materialised form uses to spot an additive mask; here the mask is explicit).

    Memory: O(B H L) for the Triton kernels (two log-sum-exps per row) and the ``cpu`` C++
    kernel (plus one strip of at most 2^18 scores per model and thread), O(B H L C) for the
    ``torch`` backend, which works on C query rows at a time (C B H L <= 2^19, C >= 16).

    Args:
        q_s, k_s: student queries and keys [B, H, L, ds]; gradients flow to these two.
        q_t, k_t: teacher queries and keys [B, H_t, L, dt] (dt may differ from ds; H_t must be a
            multiple or a divisor of H); no gradient. All four share dtype and device.
        key_mask: optional [B, L] token mask (nonzero = real token).
        loss: ``"kl"`` or ``"mse"``.
        scale_s, scale_t: score scales, default 1/sqrt(dh) of each model. Pass 1.0 for queries
            that are already pre-scaled (e.g. ``kdfast.models`` ``capture=("qk",)`` output).
        window: None (global attention, the default) or an int w >= 0: the band |i - j| <= w
            of a local (sliding-window) layer, e.g. 64 for ModernBERT's ``local_attention=128``.
        backend: ``auto`` (Triton on CUDA tensors when it works, the C++ kernel on CPU tensors
            when ``kdfast._C`` is built, else torch), ``triton``, ``cpu`` or ``torch``; ``cuda``
            has no kernel for this loss and raises. Triton takes student and teacher heads (grouped
            teacher heads concatenated) up to 64, where its GPU tiles fit in registers; wider heads
            run on ``torch``, also under ``backend="triton"``.

    Returns:
        Scalar loss, float32 (float64 for float64 input). 0 (and zero gradients) when every
        token is masked.

    Raises:
        ValueError naming the argument: rank / shape / dtype / device mismatch, head counts of
        which neither divides the other, key_mask shape or device, unknown loss or backend,
        scale <= 0, window not None or an int >= 0.
    """
    _check_qk(q_s, k_s, q_t, k_t)
    w = check_window("window", window)
    check_choice("loss", loss, LOSSES)
    B, H, L, ds = q_s.shape
    dt = q_t.shape[-1]
    scale_s = 1.0 / math.sqrt(ds) if scale_s is None else check_positive("scale_s", scale_s)
    scale_t = 1.0 / math.sqrt(dt) if scale_t is None else check_positive("scale_t", scale_t)
    q_t, group = map_teacher_heads(q_t.detach(), H, kind="qk", name="q_t")
    k_t, _ = map_teacher_heads(k_t.detach(), H, kind="qk", name="k_t")
    scale_t /= group  # concatenated group heads sum the group's scores; 1/g makes it their mean
    m = _check_token_mask("key_mask", key_mask, B, L, q_s.device)
    name = registry.select(FLASH_OP, backend, q_s, cols=flash_cols(ds, q_t.shape[-1]),
                           what="flash_attention_transfer").backend
    key_valid = torch.ones(B, L, dtype=torch.bool, device=q_s.device) if m is None else m
    acc = acc_dtype(q_s.dtype)
    if loss == "mse":  # counted (i, j) pairs: H sum_b n_b^2 for a global layer
        count = H * (band_counts(key_valid, w) * key_valid).sum().to(acc)
    else:
        count = H * key_valid.sum().to(acc)
    row_weight = key_valid.to(acc) / count.clamp_min(1)
    out = _StoredGradLossFunction.apply(FLASH_OP, name, 2, torch.is_grad_enabled(), q_s, k_s, q_t, k_t, key_valid,
                                        row_weight, scale_s, scale_t, loss == "mse", w)
    def named() -> list[tuple[str, Tensor]]:
        return counted_tokens([("q_t", q_t), ("k_t", k_t), ("q_s", q_s.detach()), ("k_s", k_s.detach())], m)

    if value_checks_enabled(out) and bool(torch.isfinite(out)) and _qk_not_finite((q_t, k_t, q_s, k_s), m):
        # a finite loss can still hide a NaN / Inf teacher row (a kernel's max skips a NaN)
        check_all_finite(named())
    explain_non_finite(out, named)
    return out


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
