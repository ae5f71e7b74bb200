"""Benchmark suites behind ``kdfast bench``: one module per op family.

Every suite has one signature, ``run_suite(opts: BenchOptions) -> Table``, and is listed in
:data:`SUITES` (name -> callable, imported on first call: a suite's module may pull in
transformers or the cache writer), so that ``kdfast bench`` is one loop over the chosen names.
Each module's own ``run(...)`` keeps its detailed keyword arguments for tests, ``benchmarks/`` and
``make gpu-check``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from kdfast.bench.timing import Result

Progress = Callable[[str], None]


def no_progress(message: str) -> None:
    """The silent progress reporter (``kdfast bench --no-progress``, and the default of every suite)."""


@dataclass(frozen=True)
class BenchOptions:
    """What ``kdfast bench`` hands every suite; a suite reads the fields it has a use for.

    ``sizes``: the kd_loss suite's (rows, vocab) cases, None for its defaults; ``tokens``: the
    fused_linear_kd suite's (batch, length), None for its default; ``e2e_steps``: which recipe
    steps the e2e suite runs, None for all; ``progress``: called with one line per suite stage
    and measured row (``kdfast bench`` prints them on stderr, so stdout holds only the tables).
    """

    device: torch.device
    dtypes: tuple[torch.dtype, ...] = (torch.float32,)
    quick: bool = False
    repeat: int = 5
    compile_baseline: bool = True
    sizes: tuple[tuple[int, int], ...] | None = None
    tokens: tuple[int, int] | None = None
    e2e_steps: tuple[str, ...] | None = None
    progress: Progress = no_progress


@dataclass
class Table:
    """One suite's output: its measured rows and the table printed for them."""

    results: list[Result] = field(default_factory=list)
    text: str = ""


def _lazy(module: str) -> Callable[[BenchOptions], Table]:
    """``kdfast.bench.<module>.run_suite``, imported when first called."""

    def run_suite(opts: BenchOptions) -> Table:
        return importlib.import_module(f"kdfast.bench.{module}").run_suite(opts)

    run_suite.__name__ = run_suite.__qualname__ = f"{module}.run_suite"
    return run_suite


# In the order ``kdfast bench`` runs them (the kernels first, the whole recipe steps last).
SUITES: dict[str, Callable[[BenchOptions], Table]] = {
    name: _lazy(name) for name in ("kd_loss", "attention", "long_context", "models", "cache", "fused_linear_kd",
                                   "optim", "e2e", "e2e_modernbert")
}
