"""The ``"torch"`` backend of the score_mse family: its row contract in eager PyTorch, usable on any
device (the contract is in :mod:`kdfast.ops.score_mse`). Several [B, H, L, L] temporaries."""

from __future__ import annotations

import torch
from torch import Tensor

from kdfast.ops.dtypes import acc_dtype


def _counted_diff(s: Tensor, t: Tensor, mask: Tensor, threshold: float, has_mask: bool,
                  window: int) -> tuple[Tensor, Tensor]:
    """(s - t where counted else exactly 0, the counted elements), in the accumulation dtype."""
    acc = acc_dtype(s.dtype)
    s, t = s.to(acc), t.to(acc)
    counted = torch.minimum(s, t) > threshold  # NaN propagates through minimum and is not counted
    if has_mask:
        m = mask != 0
        counted &= m[:, None, :, None] & m[:, None, None, :]
    L = s.shape[-1]
    if 0 <= window < L - 1:
        pos = torch.arange(L, device=s.device)
        counted &= (pos[:, None] - pos[None, :]).abs() <= window
    # masked_fill, not multiplication: uncounted elements may hold anything, even NaN
    return (s - t).masked_fill_(~counted, 0.0), counted


def score_mse_fwd_torch(s: Tensor, t: Tensor, mask: Tensor, threshold: float,
                        has_mask: bool, window: int) -> tuple[Tensor, Tensor]:
    """Row sums of counted (s - t)^2 [B*H*L] (accumulation dtype) and row counts [B*H*L] int32."""
    diff, counted = _counted_diff(s, t, mask, threshold, has_mask, window)
    return torch.linalg.vecdot(diff, diff).reshape(-1), counted.sum(-1, dtype=torch.int32).reshape(-1)


def score_mse_bwd_torch(s: Tensor, t: Tensor, mask: Tensor, coef: Tensor, threshold: float,
                        has_mask: bool, window: int) -> Tensor:
    """d loss / d s = 2 coef (s - t) on counted elements, 0 elsewhere, in s's dtype."""
    diff, _ = _counted_diff(s, t, mask, threshold, has_mask, window)
    return diff.mul_(2 * coef.to(diff.dtype)).to(s.dtype)
