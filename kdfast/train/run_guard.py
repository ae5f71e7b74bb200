"""One run per output folder, and interruptions that keep the work.

- :func:`run_lock`: an exclusive lock on a run's output folder (``flock`` on the folder itself, as
  the teacher cache's build takes one: the kernel drops it when a killed run dies, so a stale lock
  never blocks the next run). A second run into a busy folder is refused with :class:`RunBusyError`.
  Re-entrant within a process (the command line locks ``--out``, each stage its own folder).
- :func:`check_no_previous_run` / :func:`remove_previous_run`: a finished or partial run in a folder
  is never overwritten without an explicit choice: resume it, or remove what kdfast wrote there
  (and nothing else).
- :class:`StopSignals`: SIGINT / SIGTERM ask the training loop to stop after the current step; the
  loop writes a checkpoint and raises :class:`RunInterrupted` (one line: where the work is and how
  to continue). A second signal stops at once.
- :func:`prune_checkpoints`: keep only the newest N checkpoints.
- :func:`resume_point`: the step a ``--resume`` continues from; :func:`record_seconds` /
  :func:`seconds_before`: the training time up to each checkpoint, so that a resumed run reports
  the time of the whole run.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["RunBusyError", "RunExistsError", "RunInterrupted", "StopSignals", "check_no_previous_run",
           "prune_checkpoints", "remove_previous_run", "resume_point", "run_lock"]

_STEP_DIR = re.compile(r"step-(\d{7})")
# What a run writes into a folder it trains in (a stage folder, or --out itself): the files and
# folders that --overwrite may remove. Anything else (a teacher cache, notes, .git) stays.
RUN_FILES = ("metrics.jsonl", "report.json", "metrics.json", "loss.png")
SAVED_MODELS = ("student", "model")  # removed only when they hold a saved model (config.json)


class RunBusyError(ValueError):
    """Another kdfast run holds the output folder."""


class RunExistsError(ValueError):
    """The output folder holds a previous run, and neither resuming nor overwriting it was asked for."""


class RunInterrupted(Exception):
    """SIGINT / SIGTERM stopped a run after a step; its checkpoint is written. ``signum``: the signal."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        """128 + the signal number, as a shell reports a process the signal ended (130 for SIGINT)."""
        return 128 + self.signum


# --- one run per folder -------------------------------------------------------------------------

_held: dict[str, list[int]] = {}  # real path -> [fd, depth]
_held_guard = threading.Lock()


@contextmanager
def run_lock(out: str | os.PathLike, name: str = "out_dir") -> Iterator[Path]:
    """Hold an exclusive lock on the folder ``out`` while the block runs; RunBusyError naming
    ``name`` when another process holds it. Re-entrant in one process. A folder it creates is
    removed again if the block leaves it empty (a run refused before any work writes nothing)."""
    import fcntl

    path = Path(out)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{name} {path} is an existing file, not a directory")
    created = not path.exists()
    path.mkdir(parents=True, exist_ok=True)
    key = os.path.realpath(path)
    with _held_guard:
        if key in _held:
            _held[key][1] += 1
            fd = None
        else:
            fd = os.open(path, os.O_RDONLY)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise RunBusyError(f"{name} {path}: another kdfast run is writing to it; wait for it to finish "
                                   "or choose another folder") from None
            _held[key] = [fd, 1]
    try:
        yield path
    finally:
        with _held_guard:
            _held[key][1] -= 1
            if _held[key][1] == 0:
                os.close(_held.pop(key)[0])  # releases the lock
                if created and path.is_dir() and not any(path.iterdir()):
                    path.rmdir()  # a run refused before any work leaves no folder behind


# --- never overwrite a run silently -------------------------------------------------------------

def _run_folders(out: Path, depth: int = 3) -> list[Path]:
    """``out`` and the folders below it (``depth`` levels; not into teacher caches, hidden or
    linked folders) that hold a run's files: a ``metrics.jsonl`` or checkpoints (stage folders)."""
    if not out.is_dir() or (out / "manifest.json").is_file():
        return []
    found = [out] if (out / "metrics.jsonl").is_file() or _has_checkpoints(out) else []
    if depth > 0:
        for p in sorted(out.iterdir()):
            if p.is_dir() and not p.is_symlink() and not p.name.startswith(".") and p.name != "checkpoints":
                found += _run_folders(p, depth - 1)
    return found


def _has_checkpoints(folder: Path) -> bool:
    ckpt = folder / "checkpoints"
    return ckpt.is_dir() and any(p.name == "latest" or _STEP_DIR.fullmatch(p.name) for p in ckpt.iterdir())


def _newest_step(folder: Path) -> int | None:
    latest = folder / "checkpoints" / "latest"
    try:
        m = _STEP_DIR.fullmatch(latest.read_text().strip())
    except (OSError, UnicodeDecodeError):
        return None
    return int(m.group(1)) if m else None


def previous_run(out: str | os.PathLike) -> str | None:
    """What an earlier run left in ``out`` (e.g. ``"checkpoints up to step 40 in out/general"``),
    or None when it holds none."""
    out = Path(out)
    if not out.is_dir():
        return None
    parts = []
    for d in _run_folders(out):
        step = _newest_step(d)
        where = d.relative_to(out).as_posix() if d != out else "."
        parts.append(f"checkpoints up to step {step} in {where}" if step is not None else f"the metrics of {where}")
    if (out / "report.json").is_file():
        parts.append("report.json")
    return ", ".join(parts) or None


def check_no_previous_run(out: str | os.PathLike, name: str = "--out") -> None:
    """RunExistsError naming ``name`` when ``out`` holds a finished or partial run."""
    found = previous_run(out)
    if found:
        raise RunExistsError(f"{name} {out} holds a previous run ({found}); continue it with --resume, or start over "
                             "with --overwrite (removes only the files kdfast wrote there)")


def remove_previous_run(out: str | os.PathLike) -> list[str]:
    """Remove what kdfast runs wrote in ``out`` and its stage folders: ``RUN_FILES``, the
    ``checkpoints`` folder's own entries (``step-NNNNNNN``, ``latest`` and their temporaries), and the
    saved ``student`` / ``model`` folders; a folder is removed only when that leaves it empty.
    Other files (a teacher cache, notes) stay. Returns the removed paths, relative to ``out``."""
    out = Path(out)
    removed: list[str] = []
    if not out.is_dir():
        return removed
    folders = {out, *_run_folders(out)}
    folders |= {p for d in list(folders) for p in d.parents if out in p.parents}  # e.g. task/ above task/<stage>
    for d in sorted(folders, key=lambda p: len(p.parts), reverse=True):
        for name in RUN_FILES:
            if (d / name).is_file():
                (d / name).unlink()
                removed.append((d / name).relative_to(out).as_posix())
        ckpt = d / "checkpoints"
        if ckpt.is_dir():
            for p in ckpt.iterdir():
                if _STEP_DIR.fullmatch(p.name) and p.is_dir():
                    shutil.rmtree(p)
                elif p.name in ("latest", SECONDS_FILE) or p.name.startswith((".step-", ".latest.", ".seconds.")):
                    p.unlink() if not p.is_dir() else shutil.rmtree(p)
                else:
                    continue
                removed.append(p.relative_to(out).as_posix())
        for name in SAVED_MODELS:
            model = d / name
            if (model / "config.json").is_file():
                shutil.rmtree(model)
                removed.append(model.relative_to(out).as_posix())
        if ckpt.is_dir() and not any(ckpt.iterdir()):
            ckpt.rmdir()
        if d != out and d.is_dir() and not any(d.iterdir()):
            d.rmdir()
    return sorted(removed)


def resume_point(out: str | os.PathLike) -> str:
    """One line saying where ``--resume`` continues a run in ``out``: the newest checkpoint of each
    stage folder, or that there is nothing to resume (the run starts from step 1)."""
    out = Path(out)
    steps = [(d, _newest_step(d)) for d in _run_folders(out)] if out.is_dir() else []
    steps = [(d, s) for d, s in steps if s is not None]
    if not steps:
        return f"nothing to resume in {out}: no checkpoint there; starting from step 1"
    shown = ", ".join(f"{(d.relative_to(out).as_posix() if d != out else '.')} at step {s}" for d, s in steps)
    return f"resuming the run in {out} from its checkpoints: {shown}"


def prune_checkpoints(checkpoints: str | os.PathLike, keep: int) -> list[str]:
    """Remove all but the newest ``keep`` checkpoints (``step-NNNNNNN`` folders) of ``checkpoints``,
    never the one ``latest`` names; ``keep`` 0 keeps all. Returns the removed folder names."""
    root = Path(checkpoints)
    if keep <= 0 or not root.is_dir():
        return []
    steps = sorted((int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.fullmatch(p.name)) and p.is_dir())
    newest = _newest_step(root.parent)
    removed = []
    for step, p in steps[:-keep]:
        if step != newest:
            shutil.rmtree(p)
            removed.append(p.name)
    return removed


# --- interruption -------------------------------------------------------------------------------

class StopSignals:
    """While active (a ``with`` block in the main thread), SIGINT and SIGTERM set ``signum`` instead
    of ending the process, so the training loop can finish its step and write a checkpoint; a second
    signal raises KeyboardInterrupt at once. Outside the main thread it does nothing."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()

    def interrupted(self, step: int, total: int, checkpoint: Path) -> RunInterrupted:
        """The exception to raise once the checkpoint of ``step`` is written."""
        name = signal.Signals(self.signum).name
        return RunInterrupted(f"stopped by {name} after step {step} of {total}; checkpoint written to {checkpoint}; "
                              "continue with --resume", self.signum)


# --- the wall time of a run that was interrupted and resumed -----------------------------------

SECONDS_FILE = "seconds.json"  # in checkpoints/: {"step-NNNNNNN": seconds of training up to it}


def record_seconds(checkpoints: str | os.PathLike, step: int, seconds: float) -> None:
    """Store the training seconds up to the checkpoint of ``step`` (beside the checkpoints)."""
    import json

    from kdfast.fileio import atomic_write_bytes

    path = Path(checkpoints) / SECONDS_FILE
    table = _seconds_table(path)
    table[f"step-{step:07d}"] = round(seconds, 3)
    atomic_write_bytes(path, json.dumps(table, sort_keys=True).encode())


def seconds_before(out: str | os.PathLike) -> float:
    """The training seconds a resume in ``out`` starts with: those recorded for the checkpoint that
    ``checkpoints/latest`` names (0 when there is none)."""
    step = _newest_step(Path(out))
    if step is None:
        return 0.0
    return float(_seconds_table(Path(out) / "checkpoints" / SECONDS_FILE).get(f"step-{step:07d}", 0.0))


def _seconds_table(path: Path) -> dict[str, float]:
    import json

    try:
        table = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return {k: float(v) for k, v in table.items() if _STEP_DIR.fullmatch(k) and isinstance(v, (int, float))} \
        if isinstance(table, dict) else {}
