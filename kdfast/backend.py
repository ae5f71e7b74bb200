"""Which implementation runs a kernel: ``"auto" | "triton" | "cuda" | "cpu" | "torch"``.

- ``triton``: Triton kernels, on CUDA tensors (or on CPU tensors when ``TRITON_INTERPRET=1``
  was set before kdfast was imported, which is how the tests run them);
- ``cuda``: the CUDA C++ kernels of ``kdfast._C`` (built when nvcc was found), on CUDA tensors;
- ``cpu``: the vectorised C++ kernels of ``kdfast._C``, on CPU tensors;
- ``torch``: eager PyTorch (each family's eager module, e.g. ``kdfast/ops/hidden_rows/eager.py``), anywhere.

This module probes which backends are built and usable in this process (:func:`backend_status`); which
backend runs a given op, ``auto`` included, is decided in one place, :mod:`kdfast.ops.registry`
(which also holds :func:`kdfast.backends`, the report of both).
"""

from __future__ import annotations

import functools
import importlib.util
import os
from dataclasses import dataclass

import torch

BACKENDS = ("auto", "triton", "cuda", "cpu", "torch")


@dataclass(frozen=True)
class BackendStatus:
    """Whether a backend is built and usable in this process, and why not."""

    available: bool
    reason: str


@functools.lru_cache(maxsize=None)
def _extension():
    """The compiled extension module, or the ImportError text."""
    try:
        from kdfast import _C  # noqa: F401  (registers torch.ops.kdfast.*)

        return _C, ""
    except ImportError as e:  # not built: pip install -e . --no-build-isolation
        return None, f"kdfast._C is not built or failed to load ({e})"


def triton_interpreter() -> bool:
    """True when Triton kernels run on CPU tensors through the interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _probe() -> dict[str, BackendStatus]:
    ext, ext_err = _extension()
    out: dict[str, BackendStatus] = {}
    if importlib.util.find_spec("triton") is None:
        out["triton"] = BackendStatus(False, "triton is not installed")
    elif torch.cuda.is_available():
        out["triton"] = BackendStatus(True, "CUDA tensors" + (" and CPU tensors (interpreter)" if triton_interpreter() else ""))
    elif triton_interpreter():
        out["triton"] = BackendStatus(True, "CPU tensors through the interpreter (TRITON_INTERPRET=1); no GPU")
    else:
        out["triton"] = BackendStatus(False, "no CUDA device (set TRITON_INTERPRET=1 to run on CPU tensors)")
    if ext is None:
        out["cuda"] = BackendStatus(False, ext_err)
        out["cpu"] = BackendStatus(False, ext_err)
    else:
        if not ext.with_cuda:
            out["cuda"] = BackendStatus(False, "kdfast._C was built without nvcc: CUDA kernels left out")
        elif not torch.cuda.is_available():
            out["cuda"] = BackendStatus(
                False, f"compiled (CUDA runtime {ext.cuda_runtime_version}) but no CUDA device in this process"
            )
        else:
            out["cuda"] = BackendStatus(True, f"compiled for CUDA runtime {ext.cuda_runtime_version}")
        out["cpu"] = BackendStatus(True, f"compiled C++ kernels ({ext.cpu_capability})")
    out["torch"] = BackendStatus(True, "eager PyTorch")
    return out


# Probed once at import: a plain dict that torch.compile reads as a constant.
_STATUS: dict[str, BackendStatus] = _probe()


def backend_status() -> dict[str, BackendStatus]:
    """``{name: BackendStatus(available, reason)}`` of every kernel backend, probed once at import
    (:func:`kdfast.backends` prints it with the op x backend matrix of :mod:`kdfast.ops.registry`)."""
    return _STATUS
