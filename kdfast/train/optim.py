"""LAMB: Adam with a per-parameter trust ratio (You et al., 2019, "Large Batch Optimization for
Deep Learning: Training BERT in 76 minutes", arXiv:1904.00962; the optimizer MobileBERT was
trained with). torch has no LAMB; the libraries that carry one are either unmaintained or
collections of a hundred optimizers, so this is a short implementation of the paper's
Algorithm 2 on torch's ``_foreach`` ops (one kernel per operation over all tensors of a group).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch


class Lamb(torch.optim.Optimizer):
    r"""LAMB. For each parameter w with gradient g, at its step t (from 1):

        m = beta1 m + (1 - beta1) g                      v = beta2 v + (1 - beta2) g^2
        m_hat = m / (1 - beta1^t)                        v_hat = v / (1 - beta2^t)
        u = m_hat / (sqrt(v_hat) + eps) + weight_decay * w          (decoupled decay, in the update)
        r = phi(||w||) / ||u||,  or 1 when ||w|| = 0 or ||u|| = 0   (the layer-wise trust ratio)
        w = w - lr * r * u

    with ||.|| the Frobenius norm of the whole tensor and phi(z) = min(max(z, lo), hi) when
    ``weight_norm_bounds=(lo, hi)`` is given (the paper's scaling function), phi(z) = z otherwise.
    ``bias_correction=False`` drops the 1 - beta^t factors. ``lr``, ``weight_decay`` and the others
    may be set per parameter group (e.g. no decay for biases and LayerNorm weights).
    """

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-6, weight_decay: float = 0.0, bias_correction: bool = True,
                 weight_norm_bounds: tuple[float, float] | None = None) -> None:
        if not lr > 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {betas}")
        if not eps > 0:
            raise ValueError(f"eps must be > 0, got {eps}")
        if not weight_decay >= 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        if weight_norm_bounds is not None and (len(weight_norm_bounds) != 2
                                               or not 0 <= weight_norm_bounds[0] <= weight_norm_bounds[1]):
            raise ValueError(f"weight_norm_bounds must be (lo, hi) with 0 <= lo <= hi, got {weight_norm_bounds}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                                      bias_correction=bias_correction, weight_norm_bounds=weight_norm_bounds))

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """One LAMB update of every parameter that has a gradient; returns ``closure()`` if given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params, grads, ms, vs, steps = [], [], [], [], []
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise ValueError("Lamb does not support sparse gradients (params: a sparse-gradient parameter)")
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                params.append(p)
                grads.append(p.grad)
                ms.append(state["exp_avg"])
                vs.append(state["exp_avg_sq"])
                steps.append(state["step"])
            if params:
                self._update_group(group, params, grads, ms, vs, steps)
        return loss

    @staticmethod
    def _update_group(group: dict, params: list, grads: list, ms: list, vs: list, steps: list[int]) -> None:
        beta1, beta2 = group["betas"]
        torch._foreach_lerp_(ms, grads, 1.0 - beta1)
        torch._foreach_mul_(vs, beta2)
        torch._foreach_addcmul_(vs, grads, grads, value=1.0 - beta2)
        denom = torch._foreach_sqrt(vs)
        if group["bias_correction"]:
            # a parameter that missed steps (no gradient) has its own t, hence lists of scalars
            torch._foreach_div_(denom, [math.sqrt(1.0 - beta2 ** t) for t in steps])
        torch._foreach_add_(denom, group["eps"])
        update = torch._foreach_div(ms, denom)
        if group["bias_correction"]:
            torch._foreach_div_(update, [1.0 - beta1 ** t for t in steps])
        if group["weight_decay"]:
            torch._foreach_add_(update, params, alpha=group["weight_decay"])
        # the ratio in float32 at least (bf16 norms are too coarse), float64 for float64 parameters
        ratio_dtype = torch.float64 if any(p.dtype == torch.float64 for p in params) else torch.float32
        w_norm = torch.stack([n.to(ratio_dtype) for n in torch._foreach_norm(params)])
        u_norm = torch.stack([n.to(ratio_dtype) for n in torch._foreach_norm(update)])
        phi = w_norm if group["weight_norm_bounds"] is None else w_norm.clamp(*group["weight_norm_bounds"])
        trust = torch.where((w_norm > 0) & (u_norm > 0), phi / u_norm, torch.ones_like(w_norm))
        # kept on the device (no .tolist()): no host sync per step on a GPU
        torch._foreach_mul_(update, list((trust * -group["lr"]).unbind()))
        torch._foreach_add_(params, update)
