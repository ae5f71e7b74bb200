"""Timing and peak-memory measurement shared by ``kdfast bench`` and ``benchmarks/``.

Every comparison runs the baseline and kdfast in the same process on the same inputs and
reports ratios. Peak memory:
- CUDA: ``torch.cuda.max_memory_allocated`` above what was allocated before the call;
- CPU: the process's peak resident set (VmHWM, reset through /proc/self/clear_refs) above the
  resident set before the call. glibc is told to serve allocations of 1 MiB and more with mmap
  and to unmap them on free, so freed tensors leave the resident set and each call is measured
  on its own.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{key} not in /proc/self/status")


def _set_malloc_thresholds(mmap_bytes: int, trim_bytes: int) -> None:
    try:
        libc = ctypes.CDLL("libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
        libc.mallopt(M_MMAP_THRESHOLD, mmap_bytes)
        libc.mallopt(M_TRIM_THRESHOLD, trim_bytes)
    except OSError:
        pass


@contextlib.contextmanager
def _unmapping_malloc():
    """glibc set to unmap freed blocks (fixed 1 MiB thresholds) for a memory measurement.

    On exit the thresholds go to where glibc's dynamic threshold settles in a long-running
    process (mmap 32 MiB, trim 64 MiB): a fixed 1 MiB threshold would make every later timing
    page-fault its large temporaries afresh, which slows the eager baselines most and would
    inflate kdfast's ratios in suites that time after measuring memory.
    """
    _set_malloc_thresholds(1 << 20, 1 << 20)
    try:
        yield
    finally:
        _set_malloc_thresholds(32 << 20, 64 << 20)


def _release_free_heap() -> None:
    """Hand free heap memory back to the OS, so that reusing it shows up as resident growth."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def cpu_peak_memory_supported() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        _status_kib("VmHWM")
        return True
    except OSError:
        return False


def peak_memory_bytes(fn: Callable[[], object], device: torch.device) -> int | None:
    """Peak memory that one call of ``fn`` adds on ``device`` (None where it cannot be measured)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        out = fn()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - base
        del out
        return peak
    if not cpu_peak_memory_supported():
        return None
    with _unmapping_malloc():
        _release_free_heap()
        base = _status_kib("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current resident set
        out = fn()
        peak = _status_kib("VmHWM") - base
        del out
        gc.collect()
    return max(peak, 0) * 1024


def time_ms(fn: Callable[[], object], device: torch.device, *, warmup: int = 2, repeat: int = 5) -> float:
    """Median wall time of ``fn`` in milliseconds (device-synchronised)."""
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def copy_bandwidth_gbs(device: torch.device, nbytes: int = 1 << 30) -> float:
    """Measured device-memory copy bandwidth (read + write bytes per second), in GB/s."""
    x = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    y = torch.empty_like(x)
    ms = time_ms(lambda: y.copy_(x), device, warmup=3, repeat=10)
    return 2 * nbytes / (ms * 1e-3) / 1e9


@dataclass
class Result:
    """One implementation of one case."""

    suite: str
    case: str
    impl: str
    ms: float | None
    peak_bytes: int | None
    note: str = ""
    extra: dict = field(default_factory=dict)


@dataclass
class Entry:
    """One implementation of one case, to be measured."""

    suite: str
    case: str
    impl: str
    fn: Callable[[], object]
    bytes_moved: int | None = None  # minimal memory traffic of the op, for achieved bandwidth


def measure_all(entries: list[Entry], device: torch.device, *, repeat: int = 5, warmup: int = 2,
                copy_bw_gbs: float | None = None, progress: Callable[[str], None] | None = None) -> list[Result]:
    """Time every entry, then measure every entry's peak memory.

    Timings come first, under the allocator's default settings (what users run with); each CPU
    memory measurement switches glibc to unmap freed blocks and back (see ``_unmapping_malloc``).
    A failing implementation is reported in its row instead of aborting the run. ``progress``,
    when given, is called with one line per entry before it is timed.
    """
    results = []
    for i, e in enumerate(entries):
        if progress is not None:
            progress(f"{e.suite}: {e.case}: {e.impl} ({i + 1}/{len(entries)})")
        r = Result(e.suite, e.case, e.impl, None, None)
        try:
            r.ms = time_ms(e.fn, device, warmup=warmup, repeat=repeat)
            if e.bytes_moved and copy_bw_gbs:
                gbs = e.bytes_moved / (r.ms * 1e-3) / 1e9
                r.extra = {"GB/s": f"{gbs:.0f}", "of_copy_bw": f"{100 * gbs / copy_bw_gbs:.0f}%"}
        except Exception as ex:  # e.g. torch.compile without a working compiler
            r.note = f"failed: {type(ex).__name__}: {str(ex)[:80]}"
        results.append(r)
    for e, r in zip(entries, results):
        if r.ms is not None:
            try:
                r.peak_bytes = peak_memory_bytes(e.fn, device)
            except Exception as ex:
                r.note = f"memory failed: {type(ex).__name__}"
    return results


def by_case(results: list[Result]) -> dict[str, list[Result]]:
    """``results`` grouped by their ``case``, cases and rows in the order they first appear."""
    groups: dict[str, list[Result]] = {}
    for r in results:
        groups.setdefault(r.case, []).append(r)
    return groups


def format_table(results: list[Result], baseline: str = "eager") -> str:
    """Rows grouped by case, with speed-up and memory ratio against ``baseline`` of the same case."""
    header = f"{'suite':<10} {'case':<28} {'impl':<22} {'ms':>9} {'speed-up':>9} {'peak MB':>9} {'mem ratio':>9}  note"
    lines = [header, "-" * len(header)]
    by_case: dict[tuple[str, str], list[Result]] = {}
    for r in results:
        by_case.setdefault((r.suite, r.case), []).append(r)
    for (suite, case), rows in by_case.items():
        base = next((r for r in rows if r.impl == baseline), None)
        for r in rows:
            ms = f"{r.ms:9.2f}" if r.ms is not None else f"{'-':>9}"
            speed = (f"{base.ms / r.ms:8.2f}x" if base and base.ms and r.ms else f"{'-':>9}")
            mb = f"{r.peak_bytes / 2**20:9.1f}" if r.peak_bytes is not None else f"{'-':>9}"
            mem = (f"{base.peak_bytes / r.peak_bytes:8.2f}x"
                   if base and base.peak_bytes and r.peak_bytes else f"{'-':>9}")
            note = r.note + (" " if r.note and r.extra else "") + " ".join(f"{k}={v}" for k, v in r.extra.items())
            lines.append(f"{suite:<10} {case:<28} {r.impl:<22} {ms} {speed} {mb} {mem}  {note}")
    return "\n".join(lines)
