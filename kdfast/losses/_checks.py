"""Argument checks shared by the losses: each raises ValueError naming the argument."""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable

import torch
from torch import Tensor

from kdfast.ops.dtypes import acc_dtype  # noqa: F401  (the losses' accumulation dtype, from the ops below them)


class NonFiniteInputError(ValueError):
    """A loss input holds a NaN or Inf where it counts (or the loss overflowed); the message names
    the input. A training loop reports it with the step it happened at."""


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


def check_number(name: str, value: object) -> float:
    """A finite real number (int, float, numpy scalar or 0-d real tensor; not a bool or a string)."""
    if isinstance(value, Tensor) and value.dim() == 0 and not value.dtype.is_complex and value.dtype != torch.bool:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    v = float(value)
    if not math.isfinite(v):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return v


def check_positive(name: str, value: object) -> float:
    """A finite number > 0 (see `check_number`)."""
    v = check_number(name, value)
    if not v > 0:
        raise ValueError(f"{name} must be > 0 and finite, got {value!r}")
    return v


def check_nonnegative(name: str, value: object) -> float:
    """A finite number >= 0 (see `check_number`): a loss weight."""
    v = check_number(name, value)
    if not v >= 0:
        raise ValueError(f"{name} must be >= 0 and finite, got {value!r}")
    return v


# The temperatures over which every logit-distillation backend is tested to stay finite and within
# 1e-4 relative of float64 (README, "Numerics"); outside it the losses refuse the temperature.
TEMPERATURE_RANGE = (1e-2, 1e4)


def check_temperature(value: object, name: str = "temperature", high: float | None = None) -> float:
    """A distillation temperature: a number in ``TEMPERATURE_RANGE`` (1e-2 <= T <= 1e4), or up to
    ``high`` for a loss whose accurate range ends earlier."""
    v = check_positive(name, value)
    lo, hi = TEMPERATURE_RANGE[0], TEMPERATURE_RANGE[1] if high is None else high
    if not lo <= v <= hi:
        raise ValueError(f"{name} must lie in [{lo:g}, {hi:g}] (the range over which this loss keeps "
                         f"float64 accuracy within 1e-4), got {value!r}")
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


def check_labels_in_range(labels: Tensor, counted: Tensor, V: int, ignore_index: int, name: str = "labels") -> None:
    """Counted labels must lie in [0, V) (a value check: run it only when `value_checks_enabled`)."""
    bad = counted & ((labels < 0) | (labels >= V))
    if bool(bad.any()):
        raise ValueError(f"{name} must lie in [0, {V}) or equal ignore_index={ignore_index}; "
                         f"found {labels[bad][0].item()}")


def check_logit_rows(teacher: Tensor, student: Tensor | None, teacher_name: str = "teacher_logits",
                     student_name: str = "student_logits") -> None:
    """Say which input made a soft-max loss non-finite (called on its failure path only).

    ``teacher`` / ``student``: the counted [n, V] rows (``student`` None when it was overwritten).
    -inf is a valid logit (probability 0), but a teacher row needs one finite entry, and the
    student may not be -inf where the teacher has mass (the KL would be infinite).
    """
    if bool(torch.isnan(teacher).any() | (teacher == float("inf")).any()):
        raise NonFiniteInputError(f"{teacher_name} contains NaN or +Inf in counted rows")
    if bool((teacher == float("-inf")).all(-1).any()):
        raise NonFiniteInputError(f"{teacher_name} has a counted row that is -inf everywhere (no distribution)")
    if student is None:
        return
    if bool(torch.isnan(student).any() | (student == float("inf")).any()):
        raise NonFiniteInputError(f"{student_name} contains NaN or +Inf in counted rows")
    if bool(((student == float("-inf")) & (teacher > float("-inf"))).any()):
        raise NonFiniteInputError(f"{student_name} is -inf where {teacher_name} gives probability > 0: the KL is infinite")
    raise NonFiniteInputError(f"the loss of {student_name} against {teacher_name} is not finite (overflow: check the "
                     f"magnitudes of the logits, temperature and alphas)")


# Which rows the KD term of a logit loss counts (an explicit choice, never implied by labels).
KD_ROWS = ("all", "masked")


def select_logit_rows(kd_rows: str, labels: Tensor | None, mask: Tensor | None, n_rows: int, vocab: int,
                      ignore_index: int, alpha_mlm: float, device: torch.device,
                      checks: bool) -> tuple[Tensor, Tensor, Tensor | None]:
    """The rows the KD and MLM terms of a logit loss count: ``(labels_flat, kd_rows, mlm_rows)``.

    K (``kd_rows`` mask [N]): ``"all"``: every row with ``mask != 0``; ``"masked"``: the rows with
    ``labels != ignore_index`` and ``mask != 0`` (needs ``labels``). M, the MLM rows: labelled
    rows with ``mask != 0``. ``mlm_rows`` is None when the MLM term runs on the KD rows in the same
    kernel pass (``"masked"``, or no MLM term), else M (``"all"`` with ``alpha_mlm != 0``).
    ``labels_flat`` [N] int64 (zeros without labels). Labels outside [0, V) raise ValueError when
    ``checks`` (`value_checks_enabled`) run; otherwise their rows leave M (and K under
    ``"masked"``), so no kernel reads outside a row.
    """
    check_choice("kd_rows", kd_rows, KD_ROWS)
    if kd_rows == "masked" and labels is None:
        raise ValueError("kd_rows='masked' counts the rows with a label: it needs labels")
    kd = torch.ones(n_rows, dtype=torch.bool, device=device) if mask is None else mask.reshape(-1).bool()
    if labels is None:
        return torch.zeros(n_rows, dtype=torch.int64, device=device), kd, None
    labels_flat = labels.reshape(-1).to(torch.int64)
    labelled = labels_flat != ignore_index
    if checks:
        check_labels_in_range(labels_flat, labelled, vocab, ignore_index)
    elif alpha_mlm != 0:
        labelled = labelled & (labels_flat >= 0) & (labels_flat < vocab)  # unchecked: drop, never read outside
    if kd_rows == "masked":
        return labels_flat, kd & labelled, None
    return labels_flat, kd, (kd & labelled) if alpha_mlm != 0 else None


def row_weights(counted: Tensor, reduction: str, dtype: torch.dtype) -> Tensor:
    """Kernel row weights: 1 on counted rows (0 elsewhere), divided by their number for the means."""
    w = counted.to(dtype)
    return w / w.sum().clamp_min(1) if reduction in ("batchmean", "mean") else w


def mask_row_weights(mask: Tensor | None, lead: torch.Size, device: torch.device, acc: torch.dtype,
                     per_row: int = 1) -> Tensor:
    """[N] row weights of a mean over counted rows, N = prod(lead): w_r = [mask_r != 0] / (|C| per_row)
    with C the counted rows (every row when ``mask`` is None), 0 on the others; all 0 when C is empty.

    ``mask`` must have the leading shape ``lead`` and sit on ``device`` (ValueError naming it otherwise).
    """
    if mask is None:
        n = 1
        for size in lead:
            n *= size
        return torch.full((n,), 1.0 / (n * per_row), dtype=acc, device=device)
    if not isinstance(mask, Tensor):
        raise ValueError(f"mask must be a torch.Tensor, got {type(mask).__name__}")
    if mask.shape != lead:
        raise ValueError(f"mask has shape {tuple(mask.shape)}, expected the hidden states' leading shape "
                         f"{tuple(lead)}")
    if mask.device != device:
        raise ValueError(f"mask is on {mask.device} but the hidden states are on {device}")
    if mask.is_complex():
        raise ValueError(f"mask must be a bool, integer or float tensor, got {mask.dtype}")
    w = row_weights(mask.reshape(-1) != 0, "mean", acc)
    return w / per_row if per_row != 1 else w


def explain_non_finite(loss: Tensor, inputs: list[tuple[str, Tensor | None]] | Callable[[], list],
                       what: str = "loss") -> None:
    """Refuse a non-finite ``loss`` by naming its cause (only where `value_checks_enabled`).

    The one failure-path check of the losses whose kernels do not look at values: when ``loss``
    has a NaN or Inf, the first of ``inputs`` (teacher side first, then student side; ``None``
    entries skipped) that holds one is named in a ValueError; if every input is finite the loss
    overflowed, and the error says so. A finite ``loss`` costs one host read (CPU tensors: free).
    Callers pass only the rows that count where they can (``inputs`` may be a function that
    gathers them: it runs on the failure path only), so padding may hold anything.
    """
    if not value_checks_enabled(loss) or bool(torch.isfinite(loss).all()):
        return
    name_non_finite(inputs() if callable(inputs) else inputs, what)


def check_all_finite(inputs: list[tuple[str, Tensor | None]]) -> None:
    """ValueError naming the first of ``inputs`` (``None`` skipped) that holds a NaN or Inf (a value
    check: one host read per tensor). For parameters such as a projection matrix, where an Inf can
    turn into a -inf logit that a soft-max loss accepts as probability 0."""
    for name, x in inputs:
        if x is not None and x.is_floating_point() and not bool(torch.isfinite(x).all()):
            raise NonFiniteInputError(f"{name} contains NaN or Inf")


def name_non_finite(inputs: list[tuple[str, Tensor | None]], what: str = "loss") -> None:
    """Raise the ValueError of `explain_non_finite` for a loss known not to be finite."""
    check_all_finite(inputs)
    raise NonFiniteInputError(f"the {what} is not finite although every input is: overflow (check the magnitudes "
                     f"of {', '.join(n for n, x in inputs if x is not None)})")


def check_lse_temperature(values: Tensor, lse: Tensor, temperature: float, vocab: int) -> None:
    """A top-k teacher's ``lse`` must be logsumexp(t / T) at this ``temperature`` (a value check).

    ``values`` [n, K]: the teacher's K largest raw logits of each counted row, ``lse`` [n]. Every
    logit outside the kept ids is at most the row's smallest kept one, so at temperature T, with
    y = values / T:

        lse_K = logsumexp(y) <= lse <= logaddexp(lse_K, log(V - K) + min y)

    An ``lse`` outside these bounds (beyond the fp16 rounding of stored values) was computed at
    another temperature: ValueError naming ``temperature`` and ``teacher_logsumexp``.
    """
    if lse.numel() == 0:
        return
    y = values.to(torch.float32) / temperature
    K = y.shape[-1]
    lse_k = torch.logsumexp(y, -1)
    upper = lse_k if vocab <= K else torch.logaddexp(lse_k, math.log(vocab - K) + y.min(-1).values)
    tol = 2e-3 * (1.0 + y.abs().amax(-1))  # fp16-stored values: 2^-11 relative each
    lse = lse.to(torch.float32)
    bad = (lse < lse_k - tol) | (lse > upper + tol)
    if bool(bad.any()):
        r = int(bad.nonzero()[0, 0])
        raise ValueError(f"teacher_logsumexp does not belong to temperature={temperature:g}: a row's stored "
                         f"{float(lse[r]):.4g} lies outside [{float(lse_k[r]):.4g}, {float(upper[r]):.4g}], the "
                         f"range of logsumexp(t / T) for its top-k values at this T; it was computed at another "
                         f"temperature (pass the temperature it was stored at, or recompute it)")


def counted_tokens(named: list[tuple[str, Tensor]], mask: Tensor | None,
                   maps: bool = False) -> list[tuple[str, Tensor]]:
    """For `explain_non_finite`: [B, H, L, ...] attention tensors with the padded tokens of the
    [B, L] ``mask`` (nonzero = real) zeroed: as query rows, and with ``maps`` ([B, H, L, L]) also
    as key columns. ``mask`` None: the tensors unchanged."""
    if mask is None:
        return named
    real = mask != 0
    keep = real[:, None, :, None]
    out = []
    for name, x in named:
        x = x.masked_fill(~keep, 0)
        out.append((name, x.masked_fill(~real[:, None, None, :], 0) if maps else x))
    return out
