"""The op registry: every kernel implementation is registered here, and the backend is chosen here.

An *op* is one kernel contract (say ``"kd_rows"``: loss rows of temperature KD + MLM, with the
gradient written in the same pass). Each kernel family package under :mod:`kdfast.ops` registers
one implementation per backend that has one, with what it supports::

    register("kd_rows", "torch", kd_rows_torch)
    register("kd_rows", "triton", kd_rows_triton, aot_configs="kdfast.ops.logit_kd.triton:AOT_CONFIGS")
    register("cosine_rows", "triton", cosine_rows_triton, max_cols=8192, fallback="torch")

and every loss and model asks one call, :func:`select` (``select(op, backend, x).fn(...)``;
:func:`dispatch` runs it at once), which returns the :class:`Impl` that runs. The rules, in this
one place:

- ``backend="auto"``: on CUDA tensors the Triton kernel, else the CUDA C++ kernel, else torch; on
  CPU tensors the compiled C++ kernel, else torch. A candidate is skipped when it is not
  registered for the op, not usable in this process (:func:`kdfast.backends` says why), or does
  not support the input: its ``dtypes`` (Triton kernels compute in float32, so float64 inputs
  never go there) or its ``max_cols`` (the widest row it takes).
- an explicit backend that is missing, not usable here or on the wrong device raises a one-line
  ``ValueError`` saying why; one that does not support the input runs its registered
  ``fallback`` instead (the Triton hidden-MSE epilogue, cosine and flash attention transfer run
  torch for float64 and, for the cosine, rows wider than 8,192, for the attention transfer heads
  wider than 64), else raises.

What ran is what :func:`select` returned: inside :func:`record`, every selection is noted, which
is how a run's report names the backend each term actually ran on. Resolution reads only dicts
filled at import, so ``torch.compile(fullgraph=True)`` traces through :func:`select` and treats
the choice as a constant (a compiled function's selections are not noted: a report then names the
backend the registry selects for its float32 inputs).
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Iterator
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
    """One backend's implementation of an op, and what it supports.

    ``dtypes``: the floating dtypes it takes (``None``: every one the op's contract allows);
    ``max_cols``: the widest last dimension it takes (``None``: any); ``fallback``: the backend
    that runs the inputs it does not support when it was asked for explicitly (``None``: refuse
    them); ``aot_configs``: for Triton, ``"module:attr"`` of the callable listing the
    configurations that ``python -m kdfast.ops.aot`` compiles for real GPU targets.
    """

    op: str
    backend: str
    fn: Callable[..., Any]
    dtypes: tuple[torch.dtype, ...] | None = None
    aot_configs: str | None = None
    max_cols: int | None = None
    fallback: str | None = None

    def takes(self, dtype: torch.dtype | None) -> bool:
        return dtype is None or self.dtypes is None or dtype in self.dtypes

    def unsupported(self, dtype: torch.dtype | None, cols: int | None) -> str | None:
        """Why this implementation does not take inputs of ``dtype`` with rows ``cols`` wide, as
        "for float32, ... inputs, got torch.float64" (None: it takes them)."""
        if not self.takes(dtype):
            kinds = ", ".join(str(d).removeprefix("torch.") for d in self.dtypes or ())
            return f"for {kinds} inputs, got {dtype}"
        if self.max_cols is not None and cols is not None and cols > self.max_cols:
            return f"for rows up to {self.max_cols} wide, got {cols}"
        return None

    def supports(self) -> str:
        """What it takes, in words (``kdfast backends`` prints it)."""
        where = {"torch": "any device", "triton": "CUDA tensors (CPU under TRITON_INTERPRET=1)",
                 "cuda": "CUDA tensors", "cpu": "CPU tensors"}[self.backend]
        kinds = "any dtype" if self.dtypes is None else "/".join(str(d).removeprefix("torch.") for d in self.dtypes)
        text = f"{where}, {kinds}" + (f", rows up to {self.max_cols} wide" if self.max_cols else "")
        return text + (f"; else {self.fallback}" if self.fallback else "")


_OPS: dict[str, dict[str, Impl]] = {}

# Triton kernels accumulate in float32: float64 inputs would silently lose precision there.
TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def register(op: str, backend: str, fn: Callable[..., Any] | None = None, *,
             dtypes: tuple[torch.dtype, ...] | None = None, aot_configs: str | None = None,
             max_cols: int | None = None, fallback: str | None = None):
    """Register ``fn`` as ``op``'s implementation on ``backend``, with what it supports (see
    :class:`Impl`); usable as a decorator. Triton implementations default to
    ``dtypes=TRITON_DTYPES`` (no float64)."""
    if backend not in KERNEL_BACKENDS:
        raise ValueError(f"backend must be one of {KERNEL_BACKENDS}, got {backend!r}")
    if fallback is not None and (fallback not in KERNEL_BACKENDS or fallback == backend):
        raise ValueError(f"fallback must be another of {KERNEL_BACKENDS}, got {fallback!r}")

    def add(f: Callable[..., Any]) -> Callable[..., Any]:
        table = _OPS.setdefault(op, {})
        if backend in table and table[backend].fn is not f:
            raise ValueError(f"op {op!r} already has a {backend!r} implementation ({table[backend].fn!r})")
        kinds = dtypes if dtypes is not None or backend != "triton" else TRITON_DTYPES
        table[backend] = Impl(op, backend, f, kinds, aot_configs, max_cols, fallback)
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
    lines += ["", "what each kernel takes (auto skips one that does not take the input; an explicit choice runs "
              "its fallback, else refuses):"]
    for op in rows:
        for b, impl in impls(op).items():
            if b != "torch":
                lines.append(f"  {op:<{width}}  {b:<6} {impl.supports()}")
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


#: the recorders :func:`record` has open: each notes {op: backends selected}
_RECORDERS: list[dict[str, set[str]]] = []


@contextlib.contextmanager
def record() -> Iterator[dict[str, set[str]]]:
    """Note, while inside, every backend :func:`select` picks: yields ``{op: {backend, ...}}``,
    filled as ops are selected (what ran, where a report must not guess)."""
    ran: dict[str, set[str]] = {}
    _RECORDERS.append(ran)
    try:
        yield ran
    finally:
        _RECORDERS.remove(ran)


def select(op: str, backend: str, like: torch.Tensor | None = None, *, device: torch.device | None = None,
           dtype: torch.dtype | None = None, cols: int | None = None, what: str | None = None) -> Impl:
    """The :class:`Impl` that runs ``op`` for ``backend`` (``"auto"`` or a name) on inputs like
    ``like`` (its device, dtype and last dimension; or given as ``device``, ``dtype``, ``cols``,
    which override it). Every choice and fallback is made here (module docstring).

    Raises a one-line ValueError (naming ``backend``, and ``what``, the public name a user called,
    in place of the op's) when an explicit choice cannot run here and has no fallback.
    """
    if like is not None:
        device = like.device if device is None else device
        dtype = like.dtype if dtype is None else dtype
        cols = (like.shape[-1] if like.dim() else 1) if cols is None else cols
    if device is None:
        raise ValueError(f"select({op!r}) needs a tensor or a device")
    impl = _select(op, backend, device, dtype, cols, what or op)
    if _RECORDERS and not torch.compiler.is_compiling():  # a traced graph holds no Python side effects
        for ran in _RECORDERS:
            ran.setdefault(op, set()).add(impl.backend)
    return impl


def _select(op: str, backend: str, device: torch.device, dtype: torch.dtype | None, cols: int | None,
            what: str) -> Impl:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    table = _OPS.get(op)
    if table is None:
        table = impls(op)
    usable = backend_status()
    if backend == "auto":
        for name in _AUTO_ORDER.get(device.type, ("torch",)):
            impl = table.get(name)
            if (impl is not None and usable[name].available and _runs_on(impl, device)
                    and impl.unsupported(dtype, cols) is None):
                return impl
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
    why = impl.unsupported(dtype, cols)
    if why is None:
        return impl
    if impl.fallback is not None:
        return _select(op, impl.fallback, device, dtype, cols, what)
    raise ValueError(f"backend={backend!r} computes {what} {why}; use backend='torch' or 'auto' (which picks one "
                     f"that does)")


def resolve(op: str, backend: str, device: torch.device, dtype: torch.dtype | None = None, *,
            cols: int | None = None, what: str | None = None) -> str:
    """The name of the backend :func:`select` picks for ``op`` on ``device`` and ``dtype``."""
    return select(op, backend, device=device, dtype=dtype, cols=cols, what=what).backend


def dispatch(op: str, backend: str, *args: Any, **kwargs: Any) -> Any:
    """Run ``op`` on the backend :func:`select` picks for its first tensor argument."""
    first = next((a for a in args if isinstance(a, torch.Tensor)), None)
    if first is None:
        raise ValueError(f"dispatch({op!r}) needs at least one tensor argument")
    return select(op, backend, first).fn(*args, **kwargs)
