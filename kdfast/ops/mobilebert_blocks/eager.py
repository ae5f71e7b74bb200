"""The ``torch`` backend of :mod:`kdfast.ops.mobilebert_blocks`: the three ops in eager PyTorch, any device
and dtype (moved from ``kdfast/models/fused.py``)."""

from __future__ import annotations

import torch
from torch import Tensor


def _sum(x: Tensor, bias: Tensor | None, residual: Tensor | None) -> Tensor:
    """x + bias + residual (the terms that are given)."""
    s = x if bias is None else x + bias
    return s if residual is None else s + residual


def nonorm_fwd_torch(x: Tensor, bias: Tensor | None, residual: Tensor | None, gamma: Tensor,
                     beta: Tensor) -> Tensor:
    """y = (x + bias + residual) * gamma + beta."""
    return torch.addcmul(beta, _sum(x, bias, residual), gamma)


def nonorm_bwd_torch(dy: Tensor, x: Tensor, bias: Tensor | None, residual: Tensor | None,
                     gamma: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dx = dresidual = dy * gamma, dbias = gamma * sum dy, dgamma = sum dy * (x + bias + residual),
    dbeta = sum dy), sums over rows."""
    dbeta = dy.sum(0)
    return dy * gamma, gamma * dbeta, (dy * _sum(x, bias, residual)).sum(0), dbeta


def relu_bwd_colsum_torch(dh: Tensor, h: Tensor) -> Tensor:
    """dh *= (h > 0) in place; returns sum_rows dh."""
    dh.masked_fill_(h <= 0, 0)
    return dh.sum(0)
