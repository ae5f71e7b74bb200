"""The ``torch`` backend of :mod:`kdfast.ops.hidden_rows`: the row contracts in eager PyTorch, any device
(moved from ``kdfast/losses/hidden.py``)."""

from __future__ import annotations

import torch
from torch import Tensor


def mse_epilogue_torch(y: Tensor, t: Tensor, w: Tensor) -> Tensor:
    """In place: ``y`` [C, D] becomes dY = 2 w (y - t) (0 on rows with w = 0, whatever they held);
    returns the row losses w sum_j (y_j - t_j)^2 in ``w``'s dtype."""
    y.sub_(t)
    y.masked_fill_((w == 0)[:, None], 0.0)  # padded rows may hold anything, NaN included
    rows = torch.linalg.vector_norm(y, dim=-1).square_() * w
    y.mul_(2 * w[:, None])
    return rows


def cosine_rows_torch(s: Tensor, t: Tensor, w: Tensor, eps: float, need_grad: bool) -> tuple[Tensor, Tensor]:
    """Row losses w (1 - cos(s, t)) (``w``'s dtype) and, when ``need_grad``, their gradient with respect
    to ``s`` in ``s``'s dtype (an empty tensor otherwise)."""
    acc = w.dtype
    on = w != 0
    zero = torch.zeros((), dtype=acc, device=s.device)
    sa = torch.where(on[:, None], s.to(acc), zero)
    ta = torch.where(on[:, None], t.to(acc), zero)
    norm_s = sa.norm(dim=-1)
    ns = norm_s.clamp_min(eps)
    nt = ta.norm(dim=-1).clamp_min(eps)
    cos = (sa * ta).sum(-1) / (ns * nt)
    rows = torch.where(on, w * (1 - cos), zero)
    if not need_grad:
        return rows, s.new_empty(0)
    radial = torch.where(norm_s > eps, cos / (ns * ns), zero)
    g = -w[:, None] * (ta / (ns * nt)[:, None] - radial[:, None] * sa)
    return rows, g.to(s.dtype)


def feature_map_torch(s: Tensor, t: Tensor, w: Tensor, eps: float, beta_mean: float, beta_var: float) -> Tensor:
    """The feature-map transfer loss (see the package docstring) of rows ``s``, ``t`` [N, d] with row
    weights ``w`` [N] (1 / |C| on counted rows, 0 elsewhere), computed in ``w``'s dtype and
    differentiated by autograd."""
    acc = w.dtype
    on = (w != 0)[:, None]
    zero = torch.zeros((), dtype=acc, device=s.device)
    s = torch.where(on, s.to(acc), zero)  # padded rows may hold anything finite
    t = torch.where(on, t.to(acc), zero)
    var_s, mu_s = torch.var_mean(s, dim=-1, correction=0)
    var_t, mu_t = torch.var_mean(t, dim=-1, correction=0)
    ns = (s - mu_s[:, None]) * torch.rsqrt(var_s[:, None] + eps)
    nt = (t - mu_t[:, None]) * torch.rsqrt(var_t[:, None] + eps)
    loss = (((ns - nt) ** 2).sum(-1) * w).sum() / s.shape[-1]
    if beta_mean:
        loss = loss + beta_mean * (((mu_s - mu_t) ** 2) * w).sum()
    if beta_var:
        loss = loss + beta_var * ((var_s - var_t).abs() * w).sum()
    return loss
