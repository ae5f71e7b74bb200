"""Autograd helpers shared by the losses whose forward kernel already wrote the gradient."""

from __future__ import annotations

import torch
from torch import Tensor


def scale_stored_grad(grad: Tensor, grad_out: Tensor) -> Tensor:
    """d loss / d input from the gradient stored by the forward and the upstream gradient.

    A scalar loss (reductions) gets ``grad * grad_out``; ``loss.backward()`` passes exactly 1, and
    then, for CPU tensors in eager mode, the stored gradient is returned as is: no pass over
    N x V. On other devices reading grad_out back would synchronise with the host, which costs more
    than the multiplication, so they always multiply. Per-row losses (``reduction="none"``) get
    ``grad * grad_out[:, None]``.
    """
    if grad_out.dim() == 0:
        if grad_out.device.type == "cpu" and not torch.compiler.is_compiling() and grad_out.item() == 1.0:
            return grad
        return grad * grad_out.to(grad.dtype)
    return grad * grad_out[:, None].to(grad.dtype)
