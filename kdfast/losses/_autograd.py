"""Autograd helpers shared by the losses whose forward kernel already wrote the gradient."""

from __future__ import annotations

import torch
from torch import Tensor


def scale_stored_grad(grad: Tensor, grad_out: Tensor) -> Tensor:
    """d loss / d input from the gradient stored by the forward and the upstream gradient.

    A scalar loss (reductions) gets ``grad * grad_out``; ``loss.backward()`` passes exactly 1, and
    then (in eager mode) the stored gradient is returned as is: no pass over N x V. Per-row losses
    (``reduction="none"``) get ``grad * grad_out[:, None]``.
    """
    if grad_out.dim() == 0:
        if not torch.compiler.is_compiling() and grad_out.item() == 1.0:
            return grad
        return grad * grad_out.to(grad.dtype)
    return grad * grad_out[:, None].to(grad.dtype)
