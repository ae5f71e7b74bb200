r"""Fused linear KD: distil through the LM head without ever building tokens x vocabulary.

Public: :func:`fused_linear_kd_loss`, :class:`FusedLinearKDLoss`, :func:`default_chunk_size`.

The student's logits are s = h_s W_s^T + b_s (BERT's decoder has a bias; the prediction-head
transform dense -> GELU -> LayerNorm stays outside, it is [N, d] and cheap). The teacher's
logits come either from its own hidden states and head (t = h_t W_t^T + b_t, the hidden sizes
may differ) or from sparse cached logits (:func:`kdfast.sparsify_teacher_logits`).

Rows (tokens) are processed in chunks of C rows. For each chunk, all inside the forward:

1. ``logits_s = h_s[chunk] W_s^T + b_s`` into a preallocated [C, V] buffer (one GEMM, fp32
   accumulate; fp64 for fp64 inputs), ``logits_t`` likewise into a second buffer (or nothing for a
   sparse teacher);
2. the fused KD kernel of :mod:`kdfast.losses.kd` (or :mod:`kdfast.losses.sparse_kd`) writes
   d loss / d logits_s *in place* over the ``logits_s`` buffer, and returns the loss rows;
3. ``grad_h[chunk] = grad_logits W_s``, ``grad_W += grad_logits^T h_s[chunk]``,
   ``grad_b += grad_logits.sum(0)``.

The teacher is frozen, so these are the final gradients up to the upstream scalar: backward only
multiplies them by ``grad_output`` (and skips even that when it is exactly 1). Peak memory beyond
the inputs is 2 C V (logits buffers) + V d_s (grad_W, which a trained head needs anyway) +
N d_s; the N x V logits never exist.

Only rows that count are projected: with ``kd_rows="masked"``, the rows with
``labels != ignore_index`` are gathered first (about 15% of the tokens under BERT's masking), so
the GEMMs shrink by the same factor against "full logits, then select the masked rows".
With ``kd_rows="all"`` and an MLM term (DistilBERT: KD on every real token, MLM on
the masked ones) the labelled rows are gathered first, then the other counted rows; each chunk's
logits are computed once and the KD kernel runs with the MLM term on the labelled prefix and
without it on the rest (two kernel calls only in the chunk that straddles the boundary).

fp16 / bf16 heads on a GPU: the weights are never copied to fp32. The logits GEMMs read the
low-precision operands and write fp32 (``torch.mm(..., out_dtype=torch.float32)``: fp32
accumulation, no rounding of the logits to 16 bits, which is what gives other fused losses their
large gradient errors); the chunk's logit gradient is rounded once to the head's dtype for the two
gradient GEMMs (fp32 accumulation again; ``grad_W`` and ``grad_b`` are summed over chunks in
fp32). Where that GEMM does not exist (torch on CPU has no ``aten::mm.dtype`` kernel), the head is
cast to fp32 once per call instead.

Host synchronisation (GPU): the gather of the counted rows reads their count back once per call
(the GEMM sizes depend on it; twice with the labelled-prefix ordering above; none when every
row counts: no ``mask``, no row restriction and no MLM subset).
The value checks (labels in range, a finite teacher) read values back too, so they follow
:func:`kdfast.losses._checks.value_checks_enabled`: always on CPU tensors, on CUDA only when
enabled (``KDFAST_VALUE_CHECKS=1`` or ``set_value_checks(True)``). With them off, an out-of-range
label or sparse id is clamped into [0, V) (a wrong number for a wrong input, never a read out of
bounds) and a non-finite teacher gives a non-finite loss.
"""

from __future__ import annotations

import contextlib
import functools
import math
import warnings

import torch
from torch import Tensor, nn

from kdfast.losses._autograd import scale_stored_grad
from kdfast.losses._checks import (
    KD_ROWS,
    acc_dtype,
    check_all_finite,
    check_choice,
    check_nonnegative,
    check_row_tensor,
    check_temperature,
    check_tensor,
    explain_non_finite,
    value_checks_enabled,
)
from kdfast.losses.kd import KINDS
from kdfast.losses.sparse_kd import TOPK_MAX_TEMPERATURE, check_sparse_teacher_rows, check_teacher_ids
from kdfast.ops import logit_kd, registry
from kdfast.ops import sparse_kd as sparse_kd_ops

SPARSE_MODES = ("topk", "sampled")

# Chunk-size policy (see default_chunk_size).
GPU_LOGITS_BUDGET = 256 << 20
CPU_LOGITS_BUDGET = 64 << 20
GPU_ROW_ALIGN = 128
CPU_ROW_ALIGN = 64


def default_chunk_size(n_rows: int, vocab: int, device: torch.device, *, buffers: int = 2,
                       bytes_per_elem: int = 4) -> int:
    r"""Rows per chunk: as many as a memory budget for the logits buffers allows, in GEMM-sized multiples.

    The rule. A chunk needs ``buffers`` (2: student, teacher; 1 for a sparse teacher) logits
    buffers of C x V fp32. Pick the largest C with ``buffers * C * V * 4 <= budget``, rounded down
    to a multiple of the GEMM tile (128 rows on a GPU, 64 on a CPU), then spread the rows evenly
    over the resulting number of chunks (rounded up to the tile again) so that the last chunk is
    not a sliver, and never larger than the row count. Budgets: 256 MiB on a GPU (at V = 30522:
    C = 1024 with a dense teacher, 2048 with a sparse one), 64 MiB on a CPU (C = 256: the
    GEMM's throughput on a CPU is flat from about 128 rows on, and a smaller buffer is more of
    it in cache when the KD kernel and the two gradient GEMMs read it back).

    Why not Liger's ``cdiv(V, H)`` chunks. Liger-Kernel splits the rows into about V / H chunks
    (the idea: keep the chunk's logits about as large as the hidden states). At BERT's
    V = 30522, H = 768 that is 40 chunks: for the 32 x 128 x 15% = 614 masked rows of a BERT
    batch, 16-row chunks, and ~100 rows even for all 4096 tokens. GEMMs with M = 16..100 run far
    below peak (a tensor-core tile is 128 rows, and each chunk re-reads the whole V x H head three
    times: logits, grad_h, grad_W), and the fixed per-chunk cost (kernel launches, a pass over W)
    is paid 40 times. The memory it saves is irrelevant at BERT scale: a budgeted 1024-row chunk
    is 2 x 125 MB of logits, already far less than the V x H fp32 weight gradient plus what
    eager's 4096 x 30522 logits need (0.5 GB per copy). A fixed budget gives the fewest chunks
    whose memory one can afford, independent of H.
    """
    if n_rows <= 0:
        return 1
    on_gpu = device.type == "cuda"
    budget = GPU_LOGITS_BUDGET if on_gpu else CPU_LOGITS_BUDGET
    align = GPU_ROW_ALIGN if on_gpu else CPU_ROW_ALIGN
    cap = budget // max(1, buffers * vocab * bytes_per_elem)
    cap = max(align, cap // align * align)
    if n_rows <= cap:
        return n_rows
    chunks = math.ceil(n_rows / cap)
    even = math.ceil(math.ceil(n_rows / chunks) / align) * align
    return min(cap, even)


_LOW_PRECISION = (torch.float16, torch.bfloat16)


@functools.lru_cache(maxsize=None)
def _fp32_out_gemm_available(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``torch.mm(a, b, out_dtype=torch.float32)`` runs for ``dtype`` operands on ``device``
    into a given fp32 ``out`` (fp16 / bf16 on CUDA in recent torch; not on CPU). Probed once per
    (device, dtype) on 2 x 2 matrices."""
    if dtype not in _LOW_PRECISION or device.type != "cuda":
        return False
    a = torch.ones(2, 2, dtype=dtype, device=device)
    out = torch.empty(2, 2, dtype=torch.float32, device=device)
    try:
        _mm_fp32_out(a, a, out)  # the exact call the loss makes (the out= overload)
    except (RuntimeError, TypeError, NotImplementedError):
        return False
    return True


def low_precision_gemm_path(device: torch.device, dtype: torch.dtype) -> bool:
    r"""True when :func:`fused_linear_kd_loss` keeps a ``dtype`` head in ``dtype`` on ``device``
    (logits ``s = h W^T`` accumulated and written in fp32 straight from the 16-bit operands), False
    when it casts the head to fp32 once per call (fp32 / fp64 heads, and fp16 / bf16 where torch
    has no fp32-output GEMM for them, e.g. on CPU)."""
    return _fp32_out_gemm_available(device, dtype)


def _mm_fp32_out(a: Tensor, b: Tensor, out: Tensor) -> Tensor:
    """out (fp32) = a @ b for fp16 / bf16 operands, accumulated in fp32 (one GEMM, no 16-bit rounding)."""
    return torch.mm(a, b, out_dtype=torch.float32, out=out)


def _without_autocast(device: torch.device):
    """A context in which autocast is off for ``device`` (a no-op on devices autocast does not know)."""
    if device.type in ("cuda", "cpu"):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def _logits_into(out: Tensor, h: Tensor, w: Tensor, b: Tensor | None, low_precision: bool) -> None:
    """out = h w^T + b in out's dtype; ``low_precision``: h, w are fp16 / bf16, b already fp32."""
    if low_precision:
        _mm_fp32_out(h, w.t(), out)
        if b is not None:
            out.add_(b)
    elif b is None:
        torch.mm(h, w.t(), out=out)
    else:
        torch.addmm(b, h, w.t(), out=out)


class _FusedLinearKDFunction(torch.autograd.Function):
    """Loss (a scalar) from hidden rows and the LM head; gradients computed in the forward."""

    @staticmethod
    def forward(ctx, h_s, w_s, b_s, h_t, w_t, b_t, sparse, labels, row_weight, temperature, alpha_kd, alpha_mlm,
                n_mlm, soft_ce, kernel, chunk, want_grad, lowp_s, lowp_t):
        # ``sparse`` is (ids, values, lse or None, sampled) or None; ``kernel`` the registry's kd_rows or
        # sparse_kd_rows implementation accordingly. ``n_mlm``: only the first n_mlm rows carry
        # the MLM term (alpha_mlm), the rest KD alone (n_mlm = n: every row). ``want_grad``: grad mode was on at the
        # call (inside forward it is always off); under no_grad only the loss is computed. ``lowp_s`` /
        # ``lowp_t``: the student's / teacher's 16-bit head stays 16-bit (fp32-output GEMMs), else it is
        # cast to the accumulation dtype once here.
        need_h, need_w, need_b = (want_grad and ctx.needs_input_grad[i] for i in range(3))
        acc = acc_dtype(h_s.dtype)
        n, d_s = h_s.shape
        V = w_s.shape[0]
        dev = h_s.device
        w_s_c = w_s if lowp_s else w_s.to(acc)
        b_s_c = None if b_s is None else b_s.to(acc)
        if sparse is None:
            w_t_c = w_t if lowp_t else w_t.to(acc)
            b_t_c = None if b_t is None else b_t.to(acc)
        C = max(1, min(chunk, n))
        buf_s = torch.empty(C, V, dtype=acc, device=dev)
        buf_t = torch.empty(C, V, dtype=acc, device=dev) if sparse is None else None
        # 16-bit path: the chunk's logit gradient, rounded once for the gradient GEMMs
        buf_g = torch.empty(C, V, dtype=w_s.dtype, device=dev) if lowp_s and (need_h or need_w) else None
        grad_h = (torch.empty(n, d_s, dtype=h_s.dtype if lowp_s else acc, device=dev)) if need_h else None
        grad_w = torch.zeros(V, d_s, dtype=acc, device=dev) if need_w else None
        w_part = torch.empty(V, d_s, dtype=acc, device=dev) if need_w and lowp_s and C < n else None
        grad_b = torch.zeros(V, dtype=acc, device=dev) if need_b else None
        total = torch.zeros((), dtype=acc, device=dev)
        # The GEMMs set their precision themselves (out= buffers, which autocast passes through); with
        # autocast off here, an out-of-place op added later cannot be rounded to 16 bits by the
        # Distiller's bf16 autocast either.
        with _without_autocast(dev):
            for start in range(0, n, C):
                end = min(n, start + C)
                m = end - start
                hc = h_s[start:end] if lowp_s else h_s[start:end].to(acc)
                ls = buf_s[:m]
                _logits_into(ls, hc, w_s_c, b_s_c, lowp_s)
                if sparse is None:
                    lt = buf_t[:m]
                    htc = h_t[start:end] if lowp_t else h_t[start:end].to(acc)
                    _logits_into(lt, htc, w_t_c, b_t_c, lowp_t)
                # Rows [0, split) of the chunk get KD + MLM, rows [split, m) KD alone: a chunk straddling the
                # boundary gets one kernel call per side, on contiguous row blocks of the same logits buffers.
                split = min(max(n_mlm - start, 0), m)
                for lo, hi, a_mlm in ((0, split, alpha_mlm), (split, m, 0.0)):
                    if hi == lo:
                        continue
                    r0, r1 = start + lo, start + hi
                    if sparse is None:
                        rows = kernel(ls[lo:hi], lt[lo:hi], labels[r0:r1], row_weight[r0:r1], ls[lo:hi],
                                      temperature, alpha_kd, a_mlm, soft_ce)
                    else:
                        ids, vals, lse, sampled = sparse
                        rows = kernel(ls[lo:hi], ids[r0:r1], vals[r0:r1], None if lse is None else lse[r0:r1],
                                      labels[r0:r1], row_weight[r0:r1], ls[lo:hi], temperature, alpha_kd, a_mlm,
                                      sampled)
                    total += rows.sum().to(acc)
                g = ls  # now the gradient wrt this chunk's student logits
                if need_b:
                    grad_b += g.sum(0)
                if buf_g is not None:
                    g_lp = buf_g[:m]
                    g_lp.copy_(g)
                    if need_h:  # 16-bit output straight from the GEMM's fp32 accumulator
                        torch.mm(g_lp, w_s_c, out=grad_h[start:end])
                    if need_w:
                        if w_part is None:  # one chunk: the GEMM writes the fp32 sum itself
                            _mm_fp32_out(g_lp.t(), hc, grad_w)
                        else:
                            grad_w += _mm_fp32_out(g_lp.t(), hc, w_part)
                    continue
                if need_h:
                    torch.mm(g, w_s_c, out=grad_h[start:end])
                if need_w:
                    grad_w.addmm_(g.t(), hc)
        del buf_s, buf_t, buf_g, w_part
        ctx.save_for_backward(
            grad_h.to(h_s.dtype) if need_h else None,
            grad_w.to(w_s.dtype) if need_w else None,
            grad_b.to(b_s.dtype) if need_b else None,
        )
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grads = [None if g is None else scale_stored_grad(g, grad_out) for g in ctx.saved_tensors]
        return (grads[0], grads[1], grads[2]) + (None,) * 16


# --- argument checks ------------------------------------------------------------------------------

def _check_linear(prefix: str, hidden, weight, bias, device=None) -> tuple[Tensor, Tensor, Tensor | None]:
    hn, wn, bn = f"{prefix}_hidden", f"{prefix}_weight", f"{prefix}_bias"
    hidden = check_tensor(hn, hidden, min_dim=2)
    weight = check_tensor(wn, weight, min_dim=2)
    if weight.dim() != 2:
        raise ValueError(f"{wn} must be 2-D [V, hidden], got shape {tuple(weight.shape)}")
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"{wn} has width {weight.shape[1]} but {hn} has hidden size {hidden.shape[-1]} "
                         f"({wn} must be [V, {hidden.shape[-1]}])")
    if weight.shape[0] == 0 or weight.shape[1] == 0:
        raise ValueError(f"{wn} is empty (shape {tuple(weight.shape)})")
    if bias is not None:
        bias = check_tensor(bn, bias, min_dim=1)
        if bias.shape != (weight.shape[0],):
            raise ValueError(f"{bn} has shape {tuple(bias.shape)}, expected [{weight.shape[0]}] (the vocabulary)")
    for name, x in ((wn, weight), (bn, bias)):
        if x is None:
            continue
        if x.device != hidden.device:
            raise ValueError(f"{name} is on {x.device} but {hn} is on {hidden.device}")
        if x.dtype != hidden.dtype:
            raise ValueError(f"{name} has dtype {x.dtype} but {hn} has dtype {hidden.dtype}")
    if device is not None and hidden.device != device:
        raise ValueError(f"{hn} is on {hidden.device} but student_hidden is on {device}")
    return hidden, weight, bias


def _unpack_sparse(teacher_sparse, sparse_mode, lead, V, device):
    if not isinstance(teacher_sparse, (tuple, list)) or len(teacher_sparse) not in (2, 3):
        raise ValueError("teacher_sparse must be a tuple (ids, values[, logsumexp]) as stored by "
                         f"kdfast.sparsify_teacher_logits, got {type(teacher_sparse).__name__}"
                         + (f" of length {len(teacher_sparse)}" if isinstance(teacher_sparse, (tuple, list)) else ""))
    if sparse_mode is None:
        # sparsify_teacher_logits stores topk as (ids, values, logsumexp) and sampled as (ids, counts)
        sparse_mode = "topk" if len(teacher_sparse) == 3 else "sampled"
    check_choice("sparse_mode", sparse_mode, SPARSE_MODES)
    ids, vals = teacher_sparse[0], teacher_sparse[1]
    lse = teacher_sparse[2] if len(teacher_sparse) == 3 else None
    if lse is not None and sparse_mode != "topk":
        raise ValueError("teacher_sparse has a logsumexp (3 entries), which only sparse_mode='topk' uses")
    ids = check_teacher_ids("teacher_sparse ids", ids, lead, device)
    K = ids.shape[-1]
    if K == 0 or K > V:
        raise ValueError(f"teacher_sparse ids keep K = {K} ids per row; need 1 <= K <= V = {V} "
                         "(the student_weight vocabulary)")
    vals = check_tensor("teacher_sparse values", vals, min_dim=1)
    if vals.shape != ids.shape:
        raise ValueError(f"teacher_sparse values have shape {tuple(vals.shape)} but ids have {tuple(ids.shape)}")
    if vals.device != device:
        raise ValueError(f"teacher_sparse values are on {vals.device} but student_hidden is on {device}")
    if lse is not None:
        lse = check_row_tensor("teacher_sparse logsumexp", lse, lead, device)
        check_tensor("teacher_sparse logsumexp", lse, min_dim=0)
    return ids, vals, lse, sparse_mode


def _kd_rows_argument(kd_rows: str | None, restrict_to_masked: bool | None, has_labels: bool) -> str:
    """``kd_rows`` from it and its deprecated alias ``restrict_to_masked`` (default ``"all"``)."""
    if restrict_to_masked is not None:
        if kd_rows is not None:
            raise ValueError("give kd_rows or restrict_to_masked (its deprecated alias), not both")
        warnings.warn("restrict_to_masked is deprecated: use kd_rows='masked' (True) or kd_rows='all' (False)",
                      DeprecationWarning, stacklevel=3)
        # True without labels always meant every row with mask != 0
        return "masked" if restrict_to_masked and has_labels else "all"
    kd_rows = "all" if kd_rows is None else kd_rows
    check_choice("kd_rows", kd_rows, KD_ROWS)
    if kd_rows == "masked" and not has_labels:
        raise ValueError("kd_rows='masked' counts the rows with a label: it needs labels")
    return kd_rows


# --- public API ----------------------------------------------------------------------------------

def fused_linear_kd_loss(
    student_hidden: Tensor,
    student_weight: Tensor,
    teacher_hidden: Tensor | None = None,
    teacher_weight: Tensor | None = None,
    *,
    student_bias: Tensor | None = None,
    teacher_bias: Tensor | None = None,
    teacher_sparse: tuple[Tensor, ...] | None = None,
    sparse_mode: str | None = None,
    labels: Tensor | None = None,
    mask: Tensor | None = None,
    ignore_index: int = -100,
    temperature: float = 1.0,
    alpha_kd: float = 1.0,
    alpha_mlm: float = 0.0,
    kd_rows: str | None = None,
    restrict_to_masked: bool | None = None,
    chunk_size: int | None = None,
    kind: str = "kl",
    backend: str = "auto",
) -> Tensor:
    r"""Logit distillation (+ MLM) from hidden states through the LM head, chunked, never N x V.

    Equals ``kdfast.kd_loss(h_s W_s^T + b_s, h_t W_t^T + b_t, labels=labels, mask=mask, ...)``
    with ``reduction="batchmean"`` (or :func:`kdfast.sparse_kd_loss` against ``teacher_sparse``),
    without materialising either logits tensor; see the module docstring for the algorithm.

    Which rows count (are projected at all), ``kd_rows`` (default ``"all"``; as in :func:`kdfast.kd_loss`):
    - ``"all"``: KD over every row with ``mask != 0`` whatever its label (DistilBERT's default,
      over the attention mask), and the MLM term over those of them with a label, in the same
      pass over the vocabulary chunks (each row's logits are computed once; the kernel's
      log-sum-exp at T = 1 and the logit at the label give the cross-entropy).
    - ``"masked"`` (DistilBERT's ``restrict_ce_to_mask``; needs ``labels``): KD and MLM over the
      rows with ``labels != ignore_index`` and ``mask != 0``.

          loss = alpha_kd * T^2 / |K| * sum_{r in K} KL(softmax(t_r / T) || softmax(s_r / T))
                 + alpha_mlm / |M| * sum_{r in M} (logsumexp(s_r) - s_r[label_r])

      with K = {r : mask_r != 0} (every row without ``mask``) for ``"all"``, K = M for
      ``"masked"``, and M = {r in K : label_r != ignore_index}; a term whose row set is empty is 0.
    ``restrict_to_masked`` is the deprecated spelling (DeprecationWarning): True is ``"masked"``
    (``"all"`` without ``labels``, as it always was), False is ``"all"``; giving both is an error.
    With no counted row the loss is 0 (and the gradients 0), never NaN.

    Args:
        student_hidden: [..., d_s] output of the head transform (dense -> GELU -> LayerNorm).
            float32 / float16 / bfloat16 / float64; the GEMMs accumulate in fp32 (fp64 for fp64)
            and the logits chunks are fp32.
        student_weight: [V, d_s] decoder weight (tied to the word embeddings in BERT), same dtype
            and device as ``student_hidden``. ``student_bias``: [V] or None.
        teacher_hidden, teacher_weight, teacher_bias: the teacher's side, [..., d_t], [V, d_t],
            [V]; same leading shape and V as the student's; its own dtype. Treated as frozen
            (no gradient flows to it).
        teacher_sparse: instead of the teacher's head, its cached sparse logits:
            ``(ids, values, logsumexp)`` (top-k, with the rest bucket), ``(ids, counts)``
            (sampled) as :func:`kdfast.sparsify_teacher_logits` returns them, shapes [..., K]
            and [...]. ``sparse_mode`` ("topk" / "sampled") overrides the inference from the
            tuple's length (e.g. ``sparse_mode="topk"`` with ``(ids, values)``: no rest bucket).
        labels: [...] int MLM targets; ``ignore_index`` marks rows without one. They never change
            which rows the KD term counts: ``kd_rows`` does.
        mask: [...] attention mask; rows where it is 0 never count.
        temperature, alpha_kd, alpha_mlm, kind: as in :func:`kdfast.kd_loss` (``kind="soft_ce"``
            only with a dense teacher).
        chunk_size: rows per chunk; default :func:`default_chunk_size` (a memory budget for the
            two C x V fp32 buffers, in multiples of 64/128 rows).
        backend: the KD kernel's backend (``auto`` / ``triton`` / ``cuda`` / ``cpu`` / ``torch``);
            with a sparse teacher as :func:`kdfast.sparse_kd_loss` (no C++ kernel: ``auto`` on CPU
            is ``torch``). The GEMMs are always torch's.

    Returns:
        The scalar loss, float32 (float64 for float64 inputs). Gradients flow to
        ``student_hidden``, ``student_weight`` and ``student_bias``.

    Raises:
        ValueError naming the argument: shapes, hidden widths, vocabulary mismatch between
        ``student_weight`` and ``teacher_weight``, dtype / device mismatches, a temperature outside
        [1e-2, 1e4] (a top-k teacher: [1e-2, 20], as sparse_kd_loss), non-numeric or non-finite alphas,
        neither or both of ``teacher_hidden`` and ``teacher_sparse``, unknown kind / backend /
        sparse_mode / kd_rows, ``kd_rows="masked"`` without labels, both ``kd_rows`` and
        ``restrict_to_masked``, bad chunk_size; and, where the value checks run
        (:func:`kdfast.losses._checks.value_checks_enabled`: CPU tensors, CUDA on request),
        labels or sparse ids out of [0, V), NaN / Inf in the counted rows of either side's hidden
        states, weight or bias (looked for when the loss is not finite), in the sparse teacher's
        values, or a sparse teacher's logsumexp computed at another temperature.
    """
    student_hidden, student_weight, student_bias = _check_linear("student", student_hidden, student_weight,
                                                                 student_bias)
    device = student_hidden.device
    lead = student_hidden.shape[:-1]
    V = student_weight.shape[0]
    topk_teacher = isinstance(teacher_sparse, (tuple, list)) and len(teacher_sparse) == 3
    temperature = check_temperature(temperature, high=TOPK_MAX_TEMPERATURE if topk_teacher else None)
    alpha_kd, alpha_mlm = check_nonnegative("alpha_kd", alpha_kd), check_nonnegative("alpha_mlm", alpha_mlm)
    check_choice("kind", kind, KINDS)
    kd_rows = _kd_rows_argument(kd_rows, restrict_to_masked, labels is not None)
    if teacher_hidden is None and teacher_sparse is None:
        raise ValueError("give the teacher: teacher_hidden (with teacher_weight) or teacher_sparse; neither was given")
    if teacher_hidden is not None and teacher_sparse is not None:
        raise ValueError("give teacher_hidden (with teacher_weight) or teacher_sparse, not both")
    if math.prod(lead) == 0:
        raise ValueError(f"student_hidden is an empty batch (shape {tuple(student_hidden.shape)})")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)
                                   or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")

    sparse = None
    if teacher_sparse is None:
        if teacher_weight is None:
            raise ValueError("teacher_weight is required with teacher_hidden")
        teacher_hidden, teacher_weight, teacher_bias = _check_linear("teacher", teacher_hidden, teacher_weight,
                                                                     teacher_bias, device)
        if teacher_hidden.shape[:-1] != lead:
            raise ValueError(f"teacher_hidden has leading shape {tuple(teacher_hidden.shape[:-1])} but "
                             f"student_hidden has {tuple(lead)}: one row per token on both sides")
        if teacher_weight.shape[0] != V:
            raise ValueError(f"vocabulary mismatch: teacher_weight has V = {teacher_weight.shape[0]} rows but "
                             f"student_weight has V = {V}")
        op = logit_kd.OP
    else:
        if teacher_weight is not None or teacher_bias is not None:
            raise ValueError("teacher_weight / teacher_bias go with teacher_hidden, not with teacher_sparse")
        if kind != "kl":
            raise ValueError("kind='soft_ce' needs a dense teacher (teacher_hidden); the sparse teacher is KL")
        ids, vals, lse, sparse_mode = _unpack_sparse(teacher_sparse, sparse_mode, lead, V, device)
        op = sparse_kd_ops.OP

    labels = check_row_tensor("labels", labels, lead, device)
    mask = check_row_tensor("mask", mask, lead, device)
    if labels is not None and (labels.dtype.is_floating_point or labels.dtype == torch.bool):
        raise ValueError(f"labels must be an integer tensor, got {labels.dtype}")
    if alpha_mlm != 0 and labels is None:
        raise ValueError("labels are required when alpha_mlm != 0")

    # Which rows count, and gather them (the only N-sized work besides the gathers of h).
    N = math.prod(lead)
    checks = value_checks_enabled(student_hidden)
    labels_flat = None if labels is None else labels.reshape(N).to(torch.int64)
    # KD over every counted row, MLM over the labelled ones among them: the labelled rows are gathered
    # first, so the MLM rows are the prefix [0, n_mlm) of the counted rows
    masked_only = kd_rows == "masked"
    mlm_subset = alpha_mlm != 0 and not masked_only
    selective = mask is not None or masked_only or mlm_subset
    acc = acc_dtype(student_hidden.dtype)
    kernel = registry.select(op, backend, device=device, dtype=acc, what="fused_linear_kd_loss").fn  # on acc logits
    if selective:
        counted = torch.ones(N, dtype=torch.bool, device=device)
        if masked_only:
            counted &= labels_flat != ignore_index
        if mask is not None:
            counted &= mask.reshape(N).bool()
        if mlm_subset:
            labelled = counted & (labels_flat != ignore_index)
            first = labelled.nonzero().squeeze(1)  # reads the counts back: the GEMM sizes depend on them
            idx = torch.cat([first, (counted & ~labelled).nonzero().squeeze(1)])
        else:
            idx = counted.nonzero().squeeze(1)  # reads the row count back: the GEMM sizes depend on it
        n = idx.numel()
    else:
        idx, n = None, N  # every row counts: no gather, no synchronisation
    n_mlm = first.numel() if mlm_subset else n

    def rows_of(x: Tensor, width: int) -> Tensor:
        x = x.reshape(N, width)
        return x if idx is None else x.index_select(0, idx)

    if n == 0:
        # Nothing counts: a zero that still depends on the inputs, so backward gives zero gradients.
        z = student_hidden.sum() * 0 + student_weight.sum() * 0
        if student_bias is not None:
            z = z + student_bias.sum() * 0
        return z.to(acc)
    if checks:  # O(V d): an Inf weight could give a -inf logit, a valid "probability 0", and no error
        check_all_finite([("teacher_weight", teacher_weight), ("teacher_bias", teacher_bias),
                          ("student_weight", student_weight), ("student_bias", student_bias)])
    if labels_flat is not None:
        lab = rows_of(labels_flat, 1).squeeze(1)
        lab_mlm = lab[:n_mlm]  # the rows whose label is read
        if alpha_mlm != 0 and checks and bool(((lab_mlm < 0) | (lab_mlm >= V)).any()):
            bad = lab_mlm[(lab_mlm < 0) | (lab_mlm >= V)][0].item()
            raise ValueError(f"labels must lie in [0, {V}) or equal ignore_index={ignore_index}; found {bad}")
        lab = lab.clamp(0, V - 1).contiguous()  # with the checks off: in bounds, never a stray read
    else:
        lab = torch.zeros(n, dtype=torch.int64, device=device)
    h_s = rows_of(student_hidden, student_hidden.shape[-1])
    row_weight = torch.full((n,), 1.0 / n, dtype=acc, device=device)  # the KD mean over the n counted rows
    # the kernel weights both terms of a row by row_weight = 1 / n; the MLM mean is over n_mlm rows
    alpha_mlm_rows = float(alpha_mlm) if not mlm_subset else float(alpha_mlm) * n / n_mlm if n_mlm else 0.0
    if teacher_sparse is None:
        h_t = rows_of(teacher_hidden.detach(), teacher_hidden.shape[-1])
        w_t, b_t = teacher_weight.detach(), None if teacher_bias is None else teacher_bias.detach()
    else:
        K = ids.shape[-1]
        ids_g = rows_of(ids, K).to(torch.int64).contiguous()
        vals_g = rows_of(vals.detach(), K).contiguous()
        lse_g = None
        if lse is not None:
            lse_g = rows_of(lse.detach(), 1).squeeze(1).to(acc).contiguous()
        if checks:
            check_sparse_teacher_rows(ids_g, vals_g, lse_g, V, sparse_mode, temperature)
        else:
            ids_g = ids_g.clamp(0, V - 1)  # unchecked ids stay in bounds
        sparse = (ids_g, vals_g, lse_g, sparse_mode == "sampled")
        h_t = w_t = b_t = None
    C = chunk_size or default_chunk_size(n, V, device, buffers=2 if sparse is None else 1)
    lowp_s = low_precision_gemm_path(device, student_weight.dtype)
    lowp_t = sparse is None and low_precision_gemm_path(device, teacher_weight.dtype)
    loss = _FusedLinearKDFunction.apply(h_s, student_weight, student_bias, h_t, w_t, b_t, sparse, lab, row_weight,
                                        temperature, float(alpha_kd), alpha_mlm_rows, n_mlm, kind == "soft_ce",
                                        kernel, int(C), torch.is_grad_enabled(), lowp_s, lowp_t)
    if checks:  # only on the failure path: which input is to blame (the counted rows)
        explain_non_finite(loss, [("teacher_hidden", h_t), ("teacher_weight", w_t), ("teacher_bias", b_t),
                                  ("student_hidden", h_s), ("student_weight", student_weight),
                                  ("student_bias", student_bias)])
    return loss


class FusedLinearKDLoss(nn.Module):
    """Module form of :func:`fused_linear_kd_loss` with its keyword arguments fixed at construction.

    ``forward(student_hidden, student_weight, teacher_hidden=None, teacher_weight=None, *,
    student_bias=None, teacher_bias=None, teacher_sparse=None, labels=None, mask=None)``.
    """

    def __init__(self, temperature: float = 1.0, *, alpha_kd: float = 1.0, alpha_mlm: float = 0.0,
                 kind: str = "kl", ignore_index: int = -100, kd_rows: str | None = None,
                 restrict_to_masked: bool | None = None, chunk_size: int | None = None,
                 sparse_mode: str | None = None, backend: str = "auto") -> None:
        super().__init__()
        self.temperature = check_temperature(temperature, high=TOPK_MAX_TEMPERATURE if sparse_mode == "topk" else None)
        self.alpha_kd, self.alpha_mlm = check_nonnegative("alpha_kd", alpha_kd), check_nonnegative("alpha_mlm", alpha_mlm)
        self.kind = check_choice("kind", kind, KINDS)
        if kd_rows is not None:
            if restrict_to_masked is not None:
                raise ValueError("give kd_rows or restrict_to_masked (its deprecated alias), not both")
            check_choice("kd_rows", kd_rows, KD_ROWS)
        self.ignore_index, self.kd_rows, self.restrict_to_masked = ignore_index, kd_rows, restrict_to_masked
        self.chunk_size, self.sparse_mode, self.backend = chunk_size, sparse_mode, backend

    def forward(self, student_hidden: Tensor, student_weight: Tensor, teacher_hidden: Tensor | None = None,
                teacher_weight: Tensor | None = None, *, student_bias: Tensor | None = None,
                teacher_bias: Tensor | None = None, teacher_sparse: tuple[Tensor, ...] | None = None,
                labels: Tensor | None = None, mask: Tensor | None = None) -> Tensor:
        return fused_linear_kd_loss(
            student_hidden, student_weight, teacher_hidden, teacher_weight, student_bias=student_bias,
            teacher_bias=teacher_bias, teacher_sparse=teacher_sparse, sparse_mode=self.sparse_mode, labels=labels,
            mask=mask, ignore_index=self.ignore_index, temperature=self.temperature, alpha_kd=self.alpha_kd,
            alpha_mlm=self.alpha_mlm, kd_rows=self.kd_rows, restrict_to_masked=self.restrict_to_masked,
            chunk_size=self.chunk_size,
            kind=self.kind, backend=self.backend)

    def extra_repr(self) -> str:
        return (f"temperature={self.temperature}, alpha_kd={self.alpha_kd}, alpha_mlm={self.alpha_mlm}, "
                f"kind={self.kind!r}, kd_rows={self.kd_rows or 'all'!r}, backend={self.backend!r}")
