"""Checkpoints of the :class:`~kdfast.train.distiller.Distiller`: their atomic save, their
validation and load, and what a run leaves on disk beside them (``metrics.jsonl``, interrupted
temporaries).

A checkpoint is ``checkpoints/step-NNNNNNN/`` holding ``weights.safetensors`` (the student and
the extra trainable modules), ``trainer.pt`` (optimizer, scheduler, RNG states, data position)
and ``checkpoint.json`` (format, step, the sha256 and size of each file, the run's settings);
``checkpoints/latest`` names the newest. :class:`CheckpointError` refuses a checkpoint that is
missing a file, truncated or altered, of another model, out of range or of other settings.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import warnings
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from kdfast.fileio import atomic_write_bytes, fsync_dir, pid_alive, sha256_file
from kdfast.train.distributed import barrier

CHECKPOINT_FORMAT = "kdfast-checkpoint"
CHECKPOINT_VERSION = 1
CHECKPOINT_META = "checkpoint.json"
CHECKPOINT_FILES = ("weights.safetensors", "trainer.pt")
CHECKPOINT_RE = re.compile(r"step-\d{7}")
#: what an interrupted save leaves behind (``save_checkpoint``'s and ``atomic_write_bytes``' temporaries)
STALE_TMP_RE = re.compile(r"\.(step-\d{7}|latest)\.tmp-(\d+)")
class CheckpointError(ValueError):
    """A checkpoint that is torn, altered, of another model, out of range or of other settings."""


class NonFiniteError(ValueError):
    """Training produced a NaN or infinite loss, gradient or weight."""


def finished_run(out_dir: str | os.PathLike, settings: dict | None = None) -> int | None:
    """The step at which the run in ``out_dir`` finished, or None when it did not (or cannot be told).

    Finished means: ``out_dir/report.json`` exists, and every stage checkpointed in ``out_dir``
    (``checkpoints/`` there or one folder down) has a sound newest checkpoint (sha256-checked) at
    its final step (``total_steps`` in ``checkpoint.json``), older than the report; with
    ``settings``, each of their (dotted) keys also equals the one stored in every such
    checkpoint, so that a resume with other settings is not mistaken for a finished run. The step
    returned is the newest stage's. Commands check this before any work so that ``--resume`` on a
    finished run says so and rewrites nothing."""
    out = Path(out_dir)
    report = out / "report.json"
    if not report.is_file():
        return None
    latest_files = sorted(out.glob("checkpoints/latest")) + sorted(out.glob("*/checkpoints/latest"))
    if not latest_files:
        return None
    wanted = _flatten(json.loads(json.dumps(settings, default=str))) if settings else {}
    newest = None  # (mtime, step)
    for latest in latest_files:
        try:
            name = latest.read_text().strip()
            path = latest.parent / name
            if not CHECKPOINT_RE.fullmatch(name) or path.is_symlink():
                return None
            meta = _read_checkpoint_meta(path)
        except (OSError, UnicodeDecodeError, CheckpointError):
            return None  # the normal path reports what is wrong with it
        stored = _flatten(meta["settings"]) if isinstance(meta.get("settings"), dict) else {}
        if meta.get("total_steps") != meta["step"] or any(stored.get(k) != v for k, v in wanted.items()):
            return None
        mtime = (path / CHECKPOINT_META).stat().st_mtime
        if mtime > report.stat().st_mtime:
            return None  # checkpointed after the report: a later run did not finish
        newest = max(newest or (mtime, meta["step"]), (mtime, meta["step"]))
    return newest[1]


class Checkpointing:
    """The checkpoint half of :class:`~kdfast.train.distiller.Distiller` (which sets ``student``,
    ``extra``, ``opt``, ``sched``, ``cfg``, ``settings``, ``out``, ``rank``, ``step``, ``epoch``,
    ``batch_in_epoch`` and ``_fresh_hparams``)."""


    def _ckpt_dir(self, step: int) -> Path:
        return self.out / "checkpoints" / f"step-{step:07d}"

    def _model(self) -> nn.Module:
        return self.student.module if hasattr(self.student, "module") else self.student

    def _named_tensors(self) -> dict[str, torch.Tensor]:
        tensors = {f"student.{k}": v for k, v in self._model().state_dict().items()}
        tensors.update({f"extra.{k}": v for k, v in self.extra.state_dict().items()})
        return tensors

    def save_checkpoint(self) -> Path:
        """Write everything a resume needs into a temporary directory, with ``checkpoint.json``
        holding each file's sha256 and the run's settings, fsync, rename, then point
        ``checkpoints/latest`` at it (atomically): a checkpoint cut short is never picked up, and
        one cut short by an error (a full disk) leaves no temporary directory behind. Weights
        that are not finite are refused (:class:`NonFiniteError`). Under torchrun rank 0 writes
        (the ranks hold identical replicas) and the others wait."""
        final = self._ckpt_dir(self.step)
        named = self._named_tensors()
        bad = _first_non_finite_tensor(named)  # on every rank (identical replicas): none waits for rank 0 in vain
        if bad is not None:
            raise NonFiniteError(f"step {self.step}: the weights hold non-finite values ({bad}); no checkpoint "
                                 f"was written (lower train.lr or check the data)")
        if self.rank != 0:
            barrier()
            return final
        tensors = {k: v.detach().contiguous().cpu() for k, v in named.items()}
        tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            save_file(_untie(tensors), str(tmp / "weights.safetensors"))
            state = {
                "optimizer": self.opt.state_dict(), "scheduler": self.sched.state_dict(),
                "step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
                "torch_rng": torch.get_rng_state(), "python_rng": random.getstate(),
                "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                "config": asdict(self.cfg),
            }
            torch.save(state, tmp / "trainer.pt")
            meta = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "step": self.step,
                    "total_steps": self.cfg.steps,  # step == total_steps: the run's final checkpoint
                    "files": {name: {"sha256": sha256_file(tmp / name), "bytes": (tmp / name).stat().st_size}
                              for name in CHECKPOINT_FILES},
                    "settings": self.settings}
            (tmp / CHECKPOINT_META).write_text(json.dumps(meta, indent=2, sort_keys=True))
            for f in tmp.iterdir():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
            fsync_dir(tmp)
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        fsync_dir(final.parent)
        atomic_write_bytes(final.parent / "latest", final.name.encode())
        barrier()
        return final

    def latest_checkpoint(self) -> Path | None:
        """The directory ``checkpoints/latest`` names (None when there is none); CheckpointError
        when it names anything but a ``step-NNNNNNN`` directory directly under ``checkpoints/``."""
        root = self.out / "checkpoints"
        latest = root / "latest"
        if not latest.exists() and not latest.is_symlink():
            return None
        if latest.is_symlink() or not latest.is_file():
            raise CheckpointError(f"{latest} must be a file naming a checkpoint directory")
        try:
            name = latest.read_bytes()[:64].decode("ascii").strip()
        except UnicodeDecodeError:
            name = None
        if name is None or not CHECKPOINT_RE.fullmatch(name):
            raise CheckpointError(f"{latest} must name a checkpoint directory of this run (step-NNNNNNN), "
                                  f"got {name!r}")
        path = root / name
        if path.is_symlink() or path.resolve().parent != root.resolve():
            raise CheckpointError(f"{latest} names {name!r}, which leads outside {root}")
        return path

    def load_checkpoint(self, path: Path | None = None, *, allow_changed_settings: bool = False) -> bool:
        """Restore the newest complete checkpoint (or ``path``); False when there is none.

        Everything is checked before anything is restored (:class:`CheckpointError`, one line):
        the files against the sha256 in ``checkpoint.json``, the step against the directory name
        and ``[0, config.steps]``, every tensor's name, shape and finiteness against the model and
        optimizer, and the stored settings against this run's (``allow_changed_settings``: accept
        a change, and train on with this run's lr, weight decay and schedule)."""
        if path is None:
            path = self.latest_checkpoint()
            if path is None:
                return False
        path = Path(path)
        meta = _read_checkpoint_meta(path)
        step = meta["step"]
        if CHECKPOINT_RE.fullmatch(path.name) and int(path.name[5:]) != step:
            raise CheckpointError(f"checkpoint {path}: checkpoint.json says step {step}, its name another")
        if step > self.cfg.steps:
            raise CheckpointError(f"checkpoint {path} is at step {step}, beyond this run's {self.cfg.steps} steps")
        changed = _changed_settings(meta.get("settings"), self.settings)
        if changed and not allow_changed_settings:
            raise CheckpointError(f"checkpoint {path} was written with other settings ({changed}); resume with "
                                  f"the same settings, or allow the change (--allow-changed-settings)")

        try:
            tensors = load_file(str(path / "weights.safetensors"))
        except Exception as e:  # safetensors raises its own error type for a malformed file
            raise CheckpointError(f"checkpoint {path}: weights.safetensors is unreadable ({_one_line(e)})") from None
        bad = _first_non_finite_tensor(tensors)
        if bad is not None:
            raise CheckpointError(f"checkpoint {path}: the weights hold non-finite values ({bad})")
        model = self._model()
        student_sd, extra_sd = model.state_dict(), self.extra.state_dict()
        student_t = {k[8:]: v for k, v in tensors.items() if k.startswith("student.")}
        extra_t = {k[6:]: v for k, v in tensors.items() if k.startswith("extra.")}
        unknown = [k for k in tensors if not k.startswith(("student.", "extra."))]
        unknown += [f"student.{k}" for k in student_t if k not in student_sd]
        unknown += [f"extra.{k}" for k in extra_t if k not in extra_sd]
        if unknown:
            raise CheckpointError(f"checkpoint {path} holds tensors this model lacks: {sorted(unknown)[:3]}")
        missing = {k for k in student_sd if k not in student_t and not _is_tied(model, k)}
        missing |= {f"extra.{k}" for k in extra_sd if k not in extra_t}
        if missing:
            raise CheckpointError(f"checkpoint {path} lacks tensors: {sorted(missing)[:5]}")
        for prefix, loaded, own in (("student.", student_t, student_sd), ("extra.", extra_t, extra_sd)):
            for k, v in loaded.items():
                if v.shape != own[k].shape or v.dtype != own[k].dtype:
                    raise CheckpointError(f"checkpoint {path}: {prefix}{k} is {v.dtype} {tuple(v.shape)}, the "
                                          f"model's is {own[k].dtype} {tuple(own[k].shape)} (another model?)")

        try:
            with warnings.catch_warnings():  # a foreign pickle's protocol warning: the error below says it all
                warnings.simplefilter("ignore")
                state = torch.load(path / "trainer.pt", weights_only=True)
        except Exception as e:  # a pickle that is torn or not torch's
            raise CheckpointError(f"checkpoint {path}: trainer.pt is unreadable ({_one_line(e)})") from None
        _check_trainer_state(path, state, step, self.opt)

        # everything checked: restore
        model.load_state_dict(student_t, strict=False)
        if extra_t:
            self.extra.load_state_dict(extra_t)
        try:
            self.opt.load_state_dict(state["optimizer"])
            self.sched.load_state_dict(state["scheduler"])
        except (ValueError, KeyError, TypeError, RuntimeError) as e:
            raise CheckpointError(f"checkpoint {path}: optimizer or scheduler state does not fit this run "
                                  f"({_one_line(e)})") from None
        _check_optimizer_shapes(path, self.opt)
        if changed:  # allowed: this run's hyper-parameters and schedule, not the checkpoint's
            self._apply_fresh_hparams()
        self._settings_changed = bool(changed)
        self.step, self.epoch, self.batch_in_epoch = step, state["epoch"], state["batch_in_epoch"]
        torch.set_rng_state(state["torch_rng"])
        random.setstate(_as_python_rng(state["python_rng"]))
        if state["cuda_rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        return True

    def _apply_fresh_hparams(self) -> None:
        """Over a loaded optimizer state: this run's lr, weight decay etc. per group, and the lr its
        schedule gives at the checkpoint's step."""
        for group, fresh in zip(self.opt.param_groups, self._fresh_hparams):
            for k, v in fresh.items():
                if k != "lr":
                    group[k] = v
        self.sched.base_lrs = [g["initial_lr"] for g in self.opt.param_groups]
        lrs = [base * fn(self.sched.last_epoch) for base, fn in zip(self.sched.base_lrs, self.sched.lr_lambdas)]
        for group, lr in zip(self.opt.param_groups, lrs):
            group["lr"] = lr
        self.sched._last_lr = lrs

    def _clean_stale_temporaries(self) -> None:
        """Remove what interrupted saves of this run left in ``checkpoints/`` (recognised by name;
        a save still running in a live process is left alone)."""
        root = self.out / "checkpoints"
        if self.rank != 0 or not root.is_dir():
            return
        for entry in root.iterdir():
            m = STALE_TMP_RE.fullmatch(entry.name)
            if not m or entry.is_symlink() or (int(m.group(2)) != os.getpid() and pid_alive(int(m.group(2)))):
                continue
            if entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)

    def _truncate_metrics(self) -> None:
        """Keep only the records of steps up to the one training continues from (none for a fresh
        run): a resumed run appends its own, so no step is recorded twice. A torn last line goes too."""
        path = self.out / "metrics.jsonl"
        if self.rank != 0 or not path.is_file():
            return
        lines = path.read_bytes().decode("utf-8", errors="replace").splitlines()
        kept = []
        for line in lines:
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if isinstance(rec, dict) and isinstance(rec.get("step"), int) and rec["step"] <= self.step:
                kept.append(line)
        if len(kept) != len(lines):
            atomic_write_bytes(path, "".join(line + "\n" for line in kept).encode())

    def _logged_records(self) -> tuple[list[dict], list[dict]]:
        """The records of ``metrics.jsonl``, for a resumed run that has nothing left to train."""
        return read_metrics(self.out / "metrics.jsonl")


def read_metrics(path: str | os.PathLike) -> tuple[list[dict], list[dict]]:
    """The training and evaluation records of a run's ``metrics.jsonl`` (as :meth:`Distiller.train`
    returns and keeps them; torn lines are skipped); two empty lists when the file is absent."""
    path = Path(path)
    if not path.is_file():
        return [], []
    train, evals = [], []
    for line in path.read_bytes().decode("utf-8", errors="replace").splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and isinstance(rec.get("step"), int):
            (evals if any(k.startswith("eval/") for k in rec) else train).append(rec)
    return train, evals


def _untie(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses shared storage: store tied weights once (the model re-ties them on load)."""
    seen: dict[tuple, str] = {}
    out = {}
    for k, v in tensors.items():
        key = (v.data_ptr(), v.shape, v.stride()) if v.numel() else (k,)
        if key in seen:
            continue
        seen[key] = k
        out[k] = v
    return out


def _flatten(settings: dict, prefix: str = "") -> dict:
    """Nested settings as {dotted key: value}."""
    flat = {}
    for k, v in settings.items():
        if isinstance(v, dict) and v:
            flat.update(_flatten(v, f"{prefix}{k}."))
        else:
            flat[f"{prefix}{k}"] = v
    return flat


def _changed_settings(stored, current: dict) -> str:
    """'key old -> new, ...' for every setting that differs ('' when none)."""
    if not isinstance(stored, dict):
        return "no settings stored"
    stored = _flatten(stored)
    keys = sorted(set(stored) | set(current))
    missing = object()
    diffs = [f"{k} {stored.get(k, '(unset)')!r} -> {current.get(k, '(unset)')!r}" for k in keys
             if stored.get(k, missing) != current.get(k, missing)]
    return ", ".join(diffs[:6]) + (f" and {len(diffs) - 6} more" if len(diffs) > 6 else "")


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())[:200] or type(e).__name__


def _first_non_finite_tensor(tensors: dict[str, torch.Tensor]) -> str | None:
    """The name of the first floating tensor holding a NaN or an infinity, or None."""
    for name, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            return name
    return None


def _read_checkpoint_meta(path: Path) -> dict:
    """``checkpoint.json`` of ``path``, checked: format, a sane step, and every file present with
    the size and sha256 recorded there."""
    missing = [n for n in (*CHECKPOINT_FILES, CHECKPOINT_META) if not (path / n).is_file()]
    if missing:
        raise CheckpointError(f"checkpoint {path} is incomplete ({', '.join(missing)} missing)")
    try:
        meta = json.loads((path / CHECKPOINT_META).read_bytes())
        if not isinstance(meta, dict):
            raise ValueError("not a JSON object")
    except ValueError as e:  # also UnicodeDecodeError
        raise CheckpointError(f"checkpoint {path}: {CHECKPOINT_META} is malformed ({_one_line(e)})") from None
    if meta.get("format") != CHECKPOINT_FORMAT or meta.get("version") != CHECKPOINT_VERSION:
        raise CheckpointError(f"checkpoint {path}: {CHECKPOINT_META} is not a {CHECKPOINT_FORMAT} version "
                              f"{CHECKPOINT_VERSION} record")
    step = meta.get("step")
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise CheckpointError(f"checkpoint {path}: step must be an int >= 0, got {step!r}")
    files = meta.get("files")
    for name in CHECKPOINT_FILES:
        rec = files.get(name) if isinstance(files, dict) else None
        if not isinstance(rec, dict) or not isinstance(rec.get("sha256"), str) or not isinstance(rec.get("bytes"), int):
            raise CheckpointError(f"checkpoint {path}: {CHECKPOINT_META} records no sha256 and size of {name}")
        size = (path / name).stat().st_size
        if size != rec["bytes"]:
            raise CheckpointError(f"checkpoint {path}: {name} has {size} bytes, {rec['bytes']} were written "
                                  f"(truncated or altered)")
        if sha256_file(path / name) != rec["sha256"]:
            raise CheckpointError(f"checkpoint {path}: {name} does not match its sha256 (altered or corrupted)")
    return meta


def _check_trainer_state(path: Path, state, step: int, opt: torch.optim.Optimizer) -> None:
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path}: trainer.pt holds {type(state).__name__}, not a trainer state")
    need = ("optimizer", "scheduler", "step", "epoch", "batch_in_epoch", "torch_rng", "python_rng", "cuda_rng")
    absent = [k for k in need if k not in state]
    if absent:
        raise CheckpointError(f"checkpoint {path}: trainer.pt lacks {absent}")
    if state["step"] != step:
        raise CheckpointError(f"checkpoint {path}: trainer.pt is at step {state['step']!r}, checkpoint.json at {step}")
    for name in ("epoch", "batch_in_epoch"):
        v = state[name]
        if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v <= 10**12:
            raise CheckpointError(f"checkpoint {path}: {name} must be an int >= 0, got {v!r}")
    rng = state["torch_rng"]
    if not isinstance(rng, torch.Tensor) or rng.dtype != torch.uint8 or rng.shape != torch.get_rng_state().shape:
        raise CheckpointError(f"checkpoint {path}: torch_rng is not a torch RNG state")
    try:
        _as_python_rng(state["python_rng"])
        random.Random().setstate(_as_python_rng(state["python_rng"]))
    except (TypeError, ValueError):
        raise CheckpointError(f"checkpoint {path}: python_rng is not a Python RNG state") from None
    groups = state["optimizer"].get("param_groups") if isinstance(state["optimizer"], dict) else None
    if not isinstance(groups, list) or [len(g.get("params", ())) for g in groups] != [
            len(g["params"]) for g in opt.param_groups]:
        raise CheckpointError(f"checkpoint {path}: its optimizer has other parameter groups than this run's")


def _check_optimizer_shapes(path: Path, opt: torch.optim.Optimizer) -> None:
    """Every per-parameter state tensor (Adam's moments) has its parameter's shape and is finite."""
    for group in opt.param_groups:
        for p in group["params"]:
            for key, v in opt.state.get(p, {}).items():
                if isinstance(v, torch.Tensor) and v.dim() > 0 and (
                        v.shape != p.shape or (v.is_floating_point() and not bool(torch.isfinite(v).all()))):
                    raise CheckpointError(f"checkpoint {path}: optimizer state {key!r} is {tuple(v.shape)} or not "
                                          f"finite, for a parameter of shape {tuple(p.shape)}")




def _is_tied(model: nn.Module, name: str) -> bool:
    return any(name.endswith(s) for s in ("decoder.weight", "decoder.bias", "predictions.bias"))


def _as_python_rng(state):
    """Loading with weights_only=True turns the tuple of random.getstate() into lists."""
    version, internal, gauss = state
    return version, tuple(internal), gauss
