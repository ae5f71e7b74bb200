"""The ``"torch"`` backend of ``kd_rows`` (the logit_kd contract, see the package docstring), in
eager PyTorch, usable on any device: the same loss rows and closed-form gradient as the kernels.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from kdfast.ops.dtypes import acc_dtype


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


def kd_rows_torch(
    student: Tensor,
    teacher: Tensor,
    labels: Tensor,
    row_weight: Tensor,
    grad: Tensor,
    temperature: float,
    alpha_kd: float,
    alpha_mlm: float,
    soft_ce: bool,
    mlm_weight: Tensor | None = None,
) -> Tensor:
    """The fused-kernel contract in eager PyTorch (the ``"torch"`` backend).

    Inputs are 2-D [N, V]; ``row_weight`` w [N] is 0 on uncounted rows. Returns loss rows
    w * alpha_kd T^2 kd + m * alpha_mlm ce in float32 (float64 for float64 inputs), m =
    ``mlm_weight`` (``row_weight`` when None), and writes d(sum loss rows)/ds =
    w alpha_kd T (p_s - p_t) + m alpha_mlm (softmax(s) - onehot) into ``grad``.
    """
    acc = acc_dtype(student.dtype)
    s = student.to(acc)
    t = teacher.to(acc)
    w = row_weight.to(acc)
    counted = w != 0
    # per-row MLM factor relative to w: loss_r = w (alpha_kd T^2 kd + alpha_mlm (m / w) ce)
    mlm_rel = None if mlm_weight is None else mlm_weight.to(acc) / torch.where(counted, w, 1)
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
        a_mlm = alpha_mlm if mlm_rel is None else alpha_mlm * mlm_rel
        safe = torch.where(counted if mlm_rel is None else counted & (mlm_rel != 0), labels, 0)
        log_q1 = F.log_softmax(s, dim=-1)
        rows = rows - a_mlm * log_q1.gather(1, safe[:, None]).squeeze(1)
        a_mlm_col = a_mlm if mlm_rel is None else a_mlm[:, None]
        g = g + a_mlm_col * (log_q1.exp() - F.one_hot(safe, s.shape[1]).to(acc))
    # where(), not multiplication: uncounted rows may hold anything, even NaN.
    rows = torch.where(counted, w * rows, torch.zeros_like(rows))
    grad.copy_(torch.where(counted[:, None], w[:, None] * g, torch.zeros_like(g)))
    return rows
