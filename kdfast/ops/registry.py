"""The op registry: every kernel implementation is registered here, and the backend is chosen here.

An *op* is one kernel contract (say ``"kd_rows"``: loss rows of temperature KD + MLM, with the
gradient written in the same pass). Each kernel family package under :mod:`kdfast.ops` registers
one implementation per backend that has one::

    register("kd_rows", "torch", kd_rows_torch)
    register("kd_rows", "triton", kd_rows_triton, float64=False, aot_configs="kdfast.ops.logit_kd.triton:AOT_CONFIGS")
    register("kd_rows", "cpu", torch.ops.kdfast.kd_fwd_bwd)   # through a small adapter

and the losses call ``dispatch("kd_rows", backend, *tensors)``. The rules, in this one place:

- ``backend="auto"``: on CUDA tensors the Triton kernel, else the CUDA C++ kernel, else torch; on
  CPU tensors the compiled C++ kernel, else torch. A candidate is skipped when it is not
  registered for the op, not usable in this process (:func:`kdfast.backends` says why), or does
  not take the input dtype (Triton kernels compute in float32, so float64 inputs never go there).
- an explicit backend that cannot run raises a one-line ``ValueError`` saying why and naming the
  backends that can.

Resolution reads only dicts filled at import, so ``torch.compile(fullgraph=True)`` traces through
:func:`dispatch` and treats the choice as a constant.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable

import torch

from kdfast.backend import BACKENDS, BackendStatus, backend_status, triton_interpreter

KERNEL_BACKENDS = tuple(b for b in BACKENDS if b != "auto")  # ("triton", "cuda", "cpu", "torch")
_AUTO_ORDER = {"cuda": ("triton", "cuda", "torch"), "cpu": ("cpu", "torch")}

# The kernel family packages; importing one registers its implementations.
FAMILIES = (
    "kdfast.ops.logit_kd",
    "kdfast.ops.sparse_kd",
    "kdfast.ops.attention_transfer",
    "kdfast.ops.score_mse",
    "kdfast.ops.hidden_rows",
    "kdfast.ops.mobilebert_blocks",
)


@dataclass(frozen=True)
class Impl:
    """One backend's implementation of an op.

    ``dtypes``: the floating dtypes it takes (``None``: every one the op's contract allows);
    ``aot_configs``: for Triton, ``"module:attr"`` of the callable listing the configurations that
    ``python -m kdfast.ops.aot`` compiles for real GPU targets.
    """

    op: str
    backend: str
    fn: Callable[..., Any]
    dtypes: tuple[torch.dtype, ...] | None = None
    aot_configs: str | None = None

    def takes(self, dtype: torch.dtype | None) -> bool:
        return dtype is None or self.dtypes is None or dtype in self.dtypes


_OPS: dict[str, dict[str, Impl]] = {}

# Triton kernels accumulate in float32: float64 inputs would silently lose precision there.
TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def register(op: str, backend: str, fn: Callable[..., Any] | None = None, *,
             dtypes: tuple[torch.dtype, ...] | None = None, aot_configs: str | None = None):
    """Register ``fn`` as ``op``'s implementation on ``backend``; usable as a decorator.

    Triton implementations default to ``dtypes=TRITON_DTYPES`` (no float64).
    """
    if backend not in KERNEL_BACKENDS:
        raise ValueError(f"backend must be one of {KERNEL_BACKENDS}, got {backend!r}")

    def add(f: Callable[..., Any]) -> Callable[..., Any]:
        table = _OPS.setdefault(op, {})
        if backend in table and table[backend].fn is not f:
            raise ValueError(f"op {op!r} already has a {backend!r} implementation ({table[backend].fn!r})")
        kinds = dtypes if dtypes is not None or backend != "triton" else TRITON_DTYPES
        table[backend] = Impl(op, backend, f, kinds, aot_configs)
        return f

    return add if fn is None else add(fn)


def load_all() -> None:
    """Import every kernel family package, so that the registry is complete."""
    for family in FAMILIES:
        importlib.import_module(family)


def ops() -> list[str]:
    """The registered op names, sorted."""
    load_all()
    return sorted(_OPS)


def impls(op: str) -> dict[str, Impl]:
    """``{backend: Impl}`` of every registered implementation of ``op`` (usable here or not)."""
    if op not in _OPS:
        load_all()
    if op not in _OPS:
        raise ValueError(f"unknown op {op!r}; registered ops: {', '.join(sorted(_OPS))}")
    return dict(_OPS[op])


def status(op: str, backend: str) -> BackendStatus:
    """Whether ``op`` can run on ``backend`` in this process, and why not."""
    if backend not in impls(op):
        return BackendStatus(False, "no kernel registered")
    return backend_status()[backend]


def matrix() -> dict[str, dict[str, BackendStatus]]:
    """``{op: {backend: BackendStatus}}`` for every registered op and every kernel backend."""
    return {op: {b: status(op, b) for b in KERNEL_BACKENDS} for op in ops()}


def format_matrix() -> str:
    """The op x backend matrix as text: ``yes`` or ``-`` per cell, then why each ``-`` is one."""
    rows = matrix()
    width = max((len(op) for op in rows), default=2)
    lines = [f"{'op':<{width}}  " + "  ".join(f"{b:<6}" for b in KERNEL_BACKENDS).rstrip()]
    why: dict[tuple[str, str], list[str]] = {}
    for op, cells in rows.items():
        lines.append((f"{op:<{width}}  " + "  ".join(f"{'yes' if s.available else '-':<6}" for s in cells.values())).rstrip())
        for b, s in cells.items():
            if not s.available:
                why.setdefault((b, s.reason), []).append(op)
    for (b, reason), names in sorted(why.items()):
        lines.append(f"  - {b}: {reason}: " + ("every op" if len(names) == len(rows) else ", ".join(names)))
    return "\n".join(lines)


class BackendReport(dict):
    """``{name: BackendStatus}``; printed, it shows the backends and the op x backend matrix."""

    def __str__(self) -> str:
        lines = [f"{name:<7} {'yes' if st.available else 'no ':<4} {st.reason}" for name, st in self.items()]
        return "\n".join([*lines, "", format_matrix()])


def backends() -> BackendReport:
    """Report every backend: ``{name: BackendStatus(available, reason)}``; ``print()`` it for the
    op x backend matrix (which kernel each op has on each backend, and why one is missing)."""
    return BackendReport(backend_status())


def _runs_on(impl: Impl, device: torch.device) -> bool:
    if impl.backend == "torch":
        return True
    if impl.backend == "triton":
        return device.type == "cuda" or (device.type == "cpu" and triton_interpreter())
    return impl.backend == device.type


def resolve(op: str, backend: str, device: torch.device, dtype: torch.dtype | None = None, *,
            what: str | None = None) -> str:
    """The backend that runs ``op`` for tensors on ``device`` of ``dtype``; ``"auto"`` resolved.

    Raises ValueError (naming ``backend``, and ``what``, the public name a user called, in place
    of the op's) when an explicit choice cannot run here.
    """
    what = what or op
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    table = _OPS.get(op)
    if table is None:
        table = impls(op)
    usable = backend_status()
    if backend == "auto":
        for name in _AUTO_ORDER.get(device.type, ("torch",)):
            impl = table.get(name)
            if impl is not None and usable[name].available and impl.takes(dtype) and _runs_on(impl, device):
                return name
        raise ValueError(f"no {what} implementation runs on {device} tensors of dtype {dtype}")
    impl = table.get(backend)
    if impl is None:
        have = ", ".join(repr(b) for b in KERNEL_BACKENDS if b in table)
        raise ValueError(f"backend={backend!r} has no {what} kernel; use {have} or 'auto'")
    if not usable[backend].available:
        raise ValueError(f"backend={backend!r} is not usable here: {usable[backend].reason}")
    if not _runs_on(impl, device):
        if backend == "triton" and device.type == "cpu":
            raise ValueError("backend='triton' on CPU tensors needs TRITON_INTERPRET=1 set before kdfast is imported")
        need = "CUDA" if backend in ("triton", "cuda") else backend.upper()
        raise ValueError(f"backend={backend!r} needs {need} tensors, got tensors on {device}")
    if not impl.takes(dtype):
        kinds = ", ".join(str(d).removeprefix("torch.") for d in impl.dtypes or ())
        raise ValueError(f"backend={backend!r} computes {what} for {kinds} inputs, got {dtype}; "
                         f"use backend='torch' or 'auto' (which picks one that does)")
    return backend


def implementation(op: str, backend: str, device: torch.device, dtype: torch.dtype | None = None, *,
                   what: str | None = None) -> tuple[str, Callable]:
    """``(resolved backend, its function)`` of ``op``: for callers that run it more than once."""
    name = resolve(op, backend, device, dtype, what=what)
    return name, _OPS[op][name].fn


def dispatch(op: str, backend: str, *args: Any, **kwargs: Any) -> Any:
    """Run ``op`` on ``backend`` (``"auto"`` resolved from the first tensor argument's device and dtype)."""
    first = next((a for a in args if isinstance(a, torch.Tensor)), None)
    if first is None:
        raise ValueError(f"dispatch({op!r}) needs at least one tensor argument")
    return implementation(op, backend, first.device, first.dtype)[1](*args, **kwargs)
