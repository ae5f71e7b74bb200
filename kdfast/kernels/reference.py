"""The ``"torch"`` backends of the logit, sparse-logit and attention-transfer kernels: the same
kernel contract as the compiled backends (loss rows + closed-form gradient), in plain PyTorch,
usable on any device. (The float64 test oracles live in ``tests/reference.py``.)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def _p_phi(log_p: Tensor, p: Tensor, u: Tensor) -> Tensor:
    """p (e^{-u} - 1 + u) without cancellation: a series for |u| <= 1/2, else e^{log p - u} - p + p u."""
    terms = 16 if u.dtype == torch.float64 else 9
    poly = torch.zeros_like(u)
    for k in range(terms - 1, -1, -1):
        poly = poly * -u + 1.0 / math.factorial(k + 2)
    return torch.where(u.abs() <= 0.5, p * u * u * poly, (log_p - u).exp() - p + p * u)


def centred_diff(t: Tensor, s: Tensor) -> Tensor:
    """(t - s) - (max t - max s) per row, formed the way that loses fewer digits (kd_math.h's
    kd_centred_diff): directly for close logits (t - s is exact), from the centred logits for
    far-apart ones (a finfo.min mask would swallow the other logit in t - s)."""
    t_max, s_max = t.amax(-1, keepdim=True), s.amax(-1, keepdim=True)
    dm = t_max - s_max
    direct, tc, sc = t - s, t - t_max, s - s_max
    return torch.where(direct.abs() + dm.abs() <= tc.abs() + sc.abs(), direct - dm, tc - sc)


def kl_rows_small_safe(log_p: Tensor, log_q: Tensor, d: Tensor) -> Tensor:
    """Row KL sum_j p_j (log p_j - log q_j) that keeps its relative accuracy when it is small.

    ``d`` = (t - s) / T up to a per-row constant (`centred_diff`). The plain sum cancels
    when the KL is tiny next to log p and log q (large T); rows below 1 use the form of
    csrc/common/kd_math.h: over the teacher's support (p > 0), c = E_p[d], u = d - c,
    KL = E_p[u] + log1p(E_p[phi(u)] - E_p[u]) - log1p(-Q_out), phi(u) = e^{-u} - 1 + u >= 0,
    Q_out = the student's mass off the support.
    """
    p = log_p.exp()
    live = p > 0  # the support: where p does not underflow (t = -inf, finfo.min masks)
    zero = torch.zeros((), dtype=log_p.dtype, device=log_p.device)
    plain = torch.where(p > 0, p * (log_p - log_q), zero).sum(-1)
    c = torch.where(live, p * d, zero).sum(-1)
    u = torch.where(live, d - c[:, None], zero)
    a = (p * u).sum(-1)
    b = torch.where(live, _p_phi(log_p, p, u), zero).sum(-1)
    q_out = torch.where(live, zero, log_q.exp()).sum(-1)
    return torch.where(plain < 1, a + torch.log1p(b - a) - torch.log1p(-q_out), plain)


def kd_fwd_bwd_torch(
    student: Tensor,
    teacher: Tensor,
    labels: Tensor,
    row_weight: Tensor,
    grad: Tensor,
    temperature: float,
    alpha_kd: float,
    alpha_mlm: float,
    soft_ce: bool,
) -> Tensor:
    """The fused-kernel contract in eager PyTorch (the ``"torch"`` backend).

    Inputs are 2-D [N, V]; ``row_weight`` w [N] is 0 on uncounted rows. Returns loss rows
    w * (alpha_kd T^2 kd + alpha_mlm ce) in float32 (float64 for float64 inputs) and writes
    d(sum loss rows)/ds = w * (alpha_kd T (p_s - p_t) + alpha_mlm (softmax(s) - onehot)) into ``grad``.
    """
    acc = torch.float64 if student.dtype == torch.float64 else torch.float32
    s = student.to(acc)
    t = teacher.to(acc)
    w = row_weight.to(acc)
    counted = w != 0
    log_q = F.log_softmax(s / temperature, dim=-1)
    log_p = F.log_softmax(t / temperature, dim=-1)
    p = log_p.exp()
    zero = torch.zeros((), dtype=acc, device=s.device)
    if soft_ce:
        kd = -torch.where(p > 0, p * log_q, zero).sum(-1)
    else:
        kd = kl_rows_small_safe(log_p, log_q, centred_diff(t, s) / temperature)
    g = alpha_kd * temperature * (log_q.exp() - p)
    rows = alpha_kd * temperature * (temperature * kd)
    if alpha_mlm:
        safe = torch.where(counted, labels, 0)
        log_q1 = F.log_softmax(s, dim=-1)
        rows = rows - alpha_mlm * log_q1.gather(1, safe[:, None]).squeeze(1)
        g = g + alpha_mlm * (log_q1.exp() - F.one_hot(safe, s.shape[1]).to(acc))
    # where(), not multiplication: uncounted rows may hold anything, even NaN.
    rows = torch.where(counted, w * rows, torch.zeros_like(rows))
    grad.copy_(torch.where(counted[:, None], w[:, None] * g, torch.zeros_like(g)))
    return rows


# --- sparse teacher (top-k with a rest bucket, or sampled ids with counts) ----------------------

def sparse_kd_fwd_bwd_torch(
    student: Tensor,
    ids: Tensor,
    values: Tensor,
    teacher_lse: Tensor | None,
    labels: Tensor,
    row_weight: Tensor,
    grad: Tensor,
    temperature: float,
    alpha_kd: float,
    alpha_mlm: float,
    sampled: bool,
) -> Tensor:
    """The sparse-teacher kernel contract in eager PyTorch (the ``"torch"`` backend).

    student [N, V]; ids [N, K] int64 in [0, V) on every row (the caller sanitises uncounted
    rows); values [N, K]; teacher_lse [N] or None; row_weight w [N], 0 on uncounted rows.
    Returns the loss rows w * (alpha_kd T^2 kd + alpha_mlm ce) in float32 (float64 for float64
    student) and writes d(sum of loss rows)/ds into ``grad`` (closed form, see
    :func:`kdfast.sparse_kd_loss`).
    """
    acc = torch.float64 if student.dtype == torch.float64 else torch.float32
    T = temperature
    N, V = student.shape
    K = ids.shape[1]
    s = student.to(acc)
    v = values.to(acc)
    w = row_weight.to(acc)
    counted = w != 0
    x = s / T
    lse_s = torch.logsumexp(x, dim=-1)
    p_s = (x - lse_s[:, None]).exp()
    log_q_k = x.gather(1, ids) - lse_s[:, None]
    if not sampled:
        y = v / T
        lse_kept = torch.logsumexp(y, dim=-1)
        lse_t = lse_kept
        if teacher_lse is not None and K < V:
            lse_t = torch.maximum(teacher_lse.to(acc), lse_kept)
        log_p = y - lse_t[:, None]
        p_t = log_p.exp()
        kd = (p_t * (log_p - log_q_k)).sum(-1)
        g = p_s
        if K < V:
            # rest bucket: teacher mass p_rest, student log-mass lse_rest - lse_s (exact, no cancellation)
            p_rest = -torch.expm1(lse_kept - lse_t)
            x_rest = x.scatter(1, ids, float("-inf"))
            lse_rest = torch.logsumexp(x_rest, dim=-1)
            kd = kd + torch.xlogy(p_rest, p_rest) - p_rest * (lse_rest - lse_s)
            g = g - p_rest[:, None] * (x_rest - lse_rest[:, None]).exp()
        g = g.scatter_add(1, ids, -p_t)
    else:
        wn = v / v.sum(-1, keepdim=True)
        q_t = torch.zeros_like(s).scatter_add(1, ids, wn)
        # zero-weight entries (repeats in the merged-count form) contribute nothing
        kd = torch.where(wn > 0, wn * (q_t.gather(1, ids).log() - log_q_k), 0.0).sum(-1)
        g = p_s - q_t
    rows = alpha_kd * T**2 * kd
    g = alpha_kd * T * g
    if alpha_mlm:
        safe = torch.where(counted, labels, 0)
        log_q1 = F.log_softmax(s, dim=-1)
        rows = rows - alpha_mlm * log_q1.gather(1, safe[:, None]).squeeze(1)
        g = g + alpha_mlm * (log_q1.exp() - F.one_hot(safe, V).to(acc))
    rows = torch.where(counted, w * rows, torch.zeros_like(rows))
    grad.copy_(torch.where(counted[:, None], w[:, None] * g, torch.zeros_like(g)))
    return rows


# --- attention transfer -------------------------------------------------------------------------

def attention_transfer_fwd_bwd_torch(
    q_s: Tensor, k_s: Tensor, q_t: Tensor, k_t: Tensor, key_valid: Tensor, row_weight: Tensor,
    scale_s: float, scale_t: float, mse: bool, need_grad: bool, chunk_elems: int = 1 << 19,
) -> tuple[Tensor, Tensor, Tensor]:
    """The flash attention-transfer contract in eager PyTorch, in chunks of query rows.

    Inputs: q_s, k_s [B, H, L, ds], q_t, k_t [B, H, L, dt], ``key_valid`` [B, L] bool,
    ``row_weight`` [B, L] (w_i: 0 on uncounted query rows). Scores s = scale_s q_s k_s^T and
    t = scale_t q_t k_t^T are formed for ``C`` query rows at a time, C * B * H * L <=
    ``chunk_elems`` (at least 4 rows), so memory is O(B H L C), never O(B H L^2).

    Returns ``(loss_rows [B, H, L], dq_s, dk_s)``: loss rows w_i * row_loss_i in float32
    (float64 for float64 input) and, when ``need_grad``, the gradients of their sum (empty
    tensors otherwise). Row losses and dS = d(sum)/d s_ij on valid keys j:
        kl:  sum_j A_t,ij (log A_t,ij - log A_s,ij),   dS = w_i (A_s,ij - A_t,ij)
        mse: sum_j (s_ij - t_ij)^2,                      dS = 2 w_i (s_ij - t_ij)
    then dq_s = scale_s dS k_s and dk_s = scale_s dS^T q_s.
    """
    acc = torch.float64 if q_s.dtype == torch.float64 else torch.float32
    B, H, L, _ = q_s.shape
    kv = key_valid[:, None, None, :]                           # [B, 1, 1, L]
    w = row_weight.to(acc)[:, None, :].expand(B, H, L)         # [B, H, L]
    counted = w != 0
    zero = torch.zeros((), dtype=acc, device=q_s.device)
    # Padding rows of Q / K may hold anything, even NaN. The teacher's only reach scores that are
    # masked out below; the student's also enter the gradient GEMMs (0 * NaN = NaN), so padded
    # student keys are zeroed -- with a copy only when they are not finite (always under compile),
    # and padded student queries chunk by chunk.
    kt, qt = k_t.to(acc), q_t.to(acc)
    ks = k_s.to(acc)
    key_pad = ~key_valid[:, None, :, None]
    # (indexing the padded rows reads only them; masked_select would expand the mask to K's size)
    if torch.compiler.is_compiling() or not bool(torch.isfinite(k_s.transpose(1, 2)[~key_valid]).all()):
        ks = torch.where(key_pad, zero, ks)
    loss_rows = torch.zeros(B, H, L, dtype=acc, device=q_s.device)
    dq = torch.zeros(q_s.shape, dtype=acc, device=q_s.device) if need_grad else q_s.new_empty(0)
    dk = torch.zeros(k_s.shape, dtype=acc, device=k_s.device) if need_grad else k_s.new_empty(0)
    chunk = max(4, chunk_elems // max(1, B * H * L))
    for i0 in range(0, L, chunk):
        i1 = min(L, i0 + chunk)
        qs = torch.where(counted[:, :, i0:i1, None], q_s[:, :, i0:i1].to(acc), zero)  # [B, H, C, ds]
        s = (qs @ ks.transpose(-1, -2)) * scale_s                     # [B, H, C, L]
        t = (qt[:, :, i0:i1] @ kt.transpose(-1, -2)) * scale_t
        wc = w[:, :, i0:i1, None]
        valid = counted[:, :, i0:i1, None] & kv
        if mse:
            diff = torch.where(valid, s - t, zero)
            del s, t
            loss_rows[:, :, i0:i1] = (diff * diff).sum(-1)
            ds = diff.mul_(2 * wc) if need_grad else None
        else:
            neg_inf = torch.full((), -float("inf"), dtype=acc, device=q_s.device)
            log_ps = torch.where(kv, s, neg_inf).log_softmax(-1)
            del s
            log_pt = torch.where(kv, t, neg_inf).log_softmax(-1)
            del t
            p_t = log_pt.exp()
            # p_t (log p_t - log p_s), written into log_pt's buffer; 0 at masked keys (0 * NaN otherwise)
            terms = torch.where(valid, log_pt.sub_(log_ps).mul_(p_t), zero)
            loss_rows[:, :, i0:i1] = terms.sum(-1)
            del terms, log_pt
            ds = torch.where(valid, log_ps.exp_().sub_(p_t).mul_(wc), zero) if need_grad else None
            del log_ps, p_t
        if need_grad:
            dq[:, :, i0:i1] = (ds @ ks) * scale_s
            # accumulate in place: a temporary [B, H, L, d] per chunk would cost as much as dk itself
            dk.view(B * H, L, -1).baddbmm_(ds.reshape(B * H, i1 - i0, L).transpose(1, 2),
                                           qs.reshape(B * H, i1 - i0, -1), alpha=scale_s)
        del ds
    loss_rows = torch.where(counted, w * loss_rows, zero)
    if need_grad:
        dq, dk = dq.to(q_s.dtype), dk.to(k_s.dtype)
    return loss_rows, dq, dk
