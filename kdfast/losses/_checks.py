"""Argument checks shared by the losses: each raises ValueError naming the argument."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def check_tensor(name: str, x: object, *, min_dim: int = 1, floating: bool = True) -> Tensor:
    if not isinstance(x, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() < min_dim:
        raise ValueError(f"{name} must have at least {min_dim} dimensions, got shape {tuple(x.shape)}")
    if floating and x.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        raise ValueError(f"{name} must be float32, float16, bfloat16 or float64, got {x.dtype}")
    return x


def check_same_dtype_device(name_a: str, a: Tensor, name_b: str, b: Tensor) -> None:
    if a.device != b.device:
        raise ValueError(f"{name_b} is on {b.device} but {name_a} is on {a.device}")
    if a.dtype != b.dtype:
        raise ValueError(f"{name_b} has dtype {b.dtype} but {name_a} has dtype {a.dtype}")


def check_positive(name: str, value: float) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None
    if not (v > 0 and math.isfinite(v)):
        raise ValueError(f"{name} must be > 0 and finite, got {value!r}")
    return v


def check_choice(name: str, value: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value


def check_row_tensor(name: str, x: Tensor | None, lead_shape: torch.Size, device: torch.device) -> Tensor | None:
    """A per-row tensor (labels, mask) must have the logits' leading shape and device."""
    if x is None:
        return None
    if not isinstance(x, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.shape != lead_shape:
        raise ValueError(f"{name} has shape {tuple(x.shape)}, expected the logits' leading shape {tuple(lead_shape)}")
    if x.device != device:
        raise ValueError(f"{name} is on {x.device} but the logits are on {device}")
    return x


# Data-dependent checks (labels in range, finite teacher rows) read a value back to the host.
# On a GPU that is a synchronisation in every call, so there they are opt-in; the kernels treat
# a value that such a check would refuse without reading outside their rows.
_VALUE_CHECKS: bool | None = None


def set_value_checks(enabled: bool | None) -> None:
    """Turn the data-dependent checks on (True) or off (False) for every device, or back to the
    default (None): on for CPU tensors, on for CUDA tensors only when KDFAST_VALUE_CHECKS=1."""
    global _VALUE_CHECKS
    if enabled is not None and not isinstance(enabled, bool):
        raise ValueError(f"enabled must be True, False or None, got {enabled!r}")
    _VALUE_CHECKS = enabled


def value_checks_enabled(x: Tensor) -> bool:
    """Whether the host-synchronising value checks run for a call on ``x``'s device: never while
    torch.compile traces; otherwise as set by `set_value_checks`, by default always on the CPU and
    on CUDA only with the environment variable KDFAST_VALUE_CHECKS=1."""
    if torch.compiler.is_compiling():
        return False
    if _VALUE_CHECKS is not None:
        return _VALUE_CHECKS
    if x.device.type == "cpu":
        return True
    import os

    return os.environ.get("KDFAST_VALUE_CHECKS") == "1"
