"""LAMB: Adam with a per-parameter trust ratio (You et al., 2019, "Large Batch Optimization for
Deep Learning: Training BERT in 76 minutes", arXiv:1904.00962; the optimizer MobileBERT was
trained with). torch has no LAMB; the libraries that carry one are either unmaintained or
collections of a hundred optimizers, so this is a short implementation of the paper's
Algorithm 2, tensor by tensor.
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
                _lamb_update(p, p.grad, state["exp_avg"], state["exp_avg_sq"], state["step"], group)
        return loss


def _lamb_update(w: torch.Tensor, g: torch.Tensor, m: torch.Tensor, v: torch.Tensor, t: int, group: dict) -> None:
    """One tensor's step, in place. Tensor by tensor rather than with ``_foreach`` ops over the
    group: the update must be whole before its norm is known, so a group-wide version holds
    group-sized temporaries (880 MB for BERT-base), this one a tensor-sized one (94 MB at most)."""
    beta1, beta2 = group["betas"]
    m.lerp_(g, 1.0 - beta1)
    v.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
    bc1, bc2 = (1.0 - beta1 ** t, 1.0 - beta2 ** t) if group["bias_correction"] else (1.0, 1.0)
    update = v.sqrt().mul_(1.0 / math.sqrt(bc2)).add_(group["eps"])
    torch.div(m, update, out=update).mul_(1.0 / bc1)
    if group["weight_decay"]:
        update.add_(w, alpha=group["weight_decay"])
    # norms in float32 at least: a bf16 norm is too coarse for the ratio
    norm_dtype = torch.promote_types(w.dtype, torch.float32)
    w_norm = torch.linalg.vector_norm(w, dtype=norm_dtype)
    u_norm = torch.linalg.vector_norm(update, dtype=norm_dtype)
    bounds = group["weight_norm_bounds"]
    phi = w_norm if bounds is None else w_norm.clamp(*bounds)
    # a tensor, not .item(): no host sync per parameter on a GPU
    trust = torch.where((w_norm > 0) & (u_norm > 0), phi / u_norm, torch.ones_like(w_norm))
    w.sub_(update.mul_(trust * group["lr"]))


#: ``TrainConfig.optimizer`` -> class; both take param groups with their own ``weight_decay``.
OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {"adamw": torch.optim.AdamW, "lamb": Lamb}


def build_optimizer(params: list, config) -> torch.optim.Optimizer:
    """The optimizer the Distiller trains ``params`` with: ``config.optimizer`` (AdamW or LAMB) at
    ``config.lr``, matrices decayed by ``config.weight_decay`` and vectors not; ``params`` are
    parameters or groups ``{"params": [...], "lr_scale": s}`` (trained at ``s * config.lr``).
    ValueError when there is nothing to train."""
    if not params:
        raise ValueError("nothing to train: no parameter requires a gradient")
    return OPTIMIZERS[config.optimizer](_decay_groups(params, config.weight_decay, config.lr), lr=config.lr)


def _decay_groups(params: list, weight_decay: float, lr: float) -> list[dict]:
    """Optimizer param groups: matrices decayed, vectors (biases, norms) not; each input group
    ``{"params": [...], "lr_scale": s}`` (or a bare parameter) keeps its learning rate s * lr."""
    groups = []
    entries = [p for p in params if isinstance(p, dict)]
    bare = [p for p in params if not isinstance(p, dict)]
    if bare:
        entries.append({"params": bare})
    for entry in entries:
        unknown = set(entry) - {"params", "lr_scale"}
        if unknown:
            raise ValueError(f"trainable param groups take 'params' and 'lr_scale', got {sorted(unknown)}")
        scale = float(entry.get("lr_scale", 1.0))
        if not scale > 0:
            raise ValueError(f"trainable lr_scale must be > 0 (leave frozen parameters out), got {scale}")
        ps = list(entry["params"])
        for wd, sel in ((weight_decay, [p for p in ps if p.dim() >= 2]), (0.0, [p for p in ps if p.dim() < 2])):
            if sel:
                groups.append({"params": sel, "weight_decay": wd, "lr": lr * scale})
    if not groups:
        raise ValueError("nothing to train: the trainable groups hold no parameter")
    return groups
