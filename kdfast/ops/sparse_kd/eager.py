"""The ``"torch"`` backend of ``sparse_kd_rows`` (the sparse_kd contract, see the package docstring),
in eager PyTorch, usable on any device: the same loss rows and closed-form gradient as the kernel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from kdfast.ops.dtypes import acc_dtype


def sparse_kd_rows_torch(
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
    mlm_weight: Tensor | None = None,
) -> Tensor:
    """The sparse-teacher kernel contract in eager PyTorch (the ``"torch"`` backend).

    student [N, V]; ids [N, K] int64 in [0, V) on every row (the caller sanitises uncounted
    rows); values [N, K]; teacher_lse [N] or None; row_weight w [N], 0 on uncounted rows.
    Returns the loss rows w alpha_kd T^2 kd + m alpha_mlm ce (m = ``mlm_weight``, or w when None)
    in float32 (float64 for float64 student) and writes d(sum of loss rows)/ds into ``grad`` (closed form, see
    :func:`kdfast.sparse_kd_loss`).
    """
    acc = acc_dtype(student.dtype)
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
        # the row's MLM coefficient relative to w: loss_r = w (alpha_kd T^2 kd + alpha_mlm (m / w) ce)
        mlm_rel = None if mlm_weight is None else mlm_weight.to(acc) / torch.where(counted, w, 1)
        a_mlm = alpha_mlm if mlm_rel is None else alpha_mlm * mlm_rel
        safe = torch.where(counted if mlm_rel is None else counted & (mlm_rel != 0), labels, 0)
        log_q1 = F.log_softmax(s, dim=-1)
        rows = rows - a_mlm * log_q1.gather(1, safe[:, None]).squeeze(1)
        g = g + (a_mlm if mlm_rel is None else a_mlm[:, None]) * (log_q1.exp() - F.one_hot(safe, V).to(acc))
    rows = torch.where(counted, w * rows, torch.zeros_like(rows))
    grad.copy_(torch.where(counted[:, None], w[:, None] * g, torch.zeros_like(g)))
    return rows
