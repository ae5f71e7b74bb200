"""The one training loop of every recipe.

``Distiller(student, step_loss, data, config)`` runs AdamW or LAMB (``config.optimizer``; LAMB,
MobileBERT's optimizer, is :class:`kdfast.train.optim.Lamb`: torch has none), linear warm-up then
linear decay, gradient clipping and accumulation, bf16 autocast on GPU, metrics as JSON lines, a
progress bar with the loss terms and tokens/s, and atomic checkpoints (student + extra trainable
modules, optimizer, scheduler, RNG states, data position). ``train(resume=True)`` continues from
the newest complete checkpoint so that an interrupted-and-resumed run equals an uninterrupted one
(exactly, in fp32 on CPU).

Hostile or careless input stops with a named error, never with a silently wrong run:

- :class:`NonFiniteError`: the first step whose loss (or one of its terms) or gradient is NaN or
  infinite stops training before the weights are updated, naming the step and the term (or the
  parameter); weights that are not finite are never written as a checkpoint.
- :class:`CheckpointError`: a checkpoint is refused when a file is missing, truncated or altered
  (``checkpoint.json`` holds the sha256 of each file, as a cache manifest does), its tensors have
  another shape or are not finite, its step is out of range, ``checkpoints/latest`` names anything
  but a checkpoint directory of this run, or it was written with other settings (unless
  ``train(allow_changed_settings=True)``, which then applies the new ones).

Distributed: under ``torchrun`` wrap the student in DDP before passing it (see
``kdfast.train.distributed``); the data source gives each rank its slice.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import shutil
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from kdfast.cache.format import atomic_write_bytes, fsync_dir, sha256_file
from kdfast.train.distributed import barrier, mean_across_ranks, rank_and_world
from kdfast.train.optim import Lamb
from kdfast.train.run_guard import (StopSignals, check_no_previous_run, prune_checkpoints, record_seconds, run_lock,
                                    seconds_before)

StepLoss = Callable[[dict], tuple[torch.Tensor, dict[str, float]]]

#: ``TrainConfig.optimizer`` -> class; both take param groups with their own ``weight_decay``.
OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {"adamw": torch.optim.AdamW, "lamb": Lamb}

#: the most optimizer steps a run may ask for: more is a typo (the schedule would stretch over it)
MAX_STEPS = 10**9

CHECKPOINT_FORMAT = "kdfast-checkpoint"
CHECKPOINT_VERSION = 1
CHECKPOINT_META = "checkpoint.json"
CHECKPOINT_FILES = ("weights.safetensors", "trainer.pt")
CHECKPOINT_RE = re.compile(r"step-\d{7}")
#: what an interrupted save leaves behind (``save_checkpoint``'s and ``atomic_write_bytes``' temporaries)
STALE_TMP_RE = re.compile(r"\.(step-\d{7}|latest)\.tmp-(\d+)")
#: TrainConfig fields that change how a run is shown, logged or checkpointed, not what it trains
#: (evaluation runs on forked RNG states): a resume may change them
BOOKKEEPING = ("progress", "progress_label", "out_dir", "log_every", "checkpoint_every", "eval_every",
               "keep_checkpoints")
#: seeds are passed to ``torch.manual_seed`` and mixed with the epoch by the batch sources
MAX_SEED = 2**32 - 1


class CheckpointError(ValueError):
    """A checkpoint that is torn, altered, of another model, out of range or of other settings."""


class NonFiniteError(ValueError):
    """Training produced a NaN or infinite loss, gradient or weight."""


def seed_everything(seed: int) -> None:
    """Seed every generator a run draws from (torch's CPU and CUDA generators, Python's ``random``):
    call it before any random initialisation (students, projections, heads) so that a run is
    reproducible from its seed."""
    check_int("seed", seed, 0, MAX_SEED)
    torch.manual_seed(seed)
    random.seed(seed)


def check_int(name: str, value, minimum: int | None = None, maximum: int | None = None) -> int:
    """``value`` if it is an int (not a bool) in [minimum, maximum], else ValueError naming ``name``."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        bounds = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
        raise ValueError(f"{name} must be {bounds}, got {value}")
    return value


def check_out_dir(path: str | os.PathLike, name: str = "out_dir") -> Path:
    """``path`` as a Path if it is a directory or absent (it is created later), else ValueError
    naming ``name``: checked before any work, so a run never fails at its first write."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{name} {path} is an existing file, not a directory")
    return path


def check_finite(name: str, value, minimum: float | None = None, *, positive: bool = False) -> float:
    """``value`` as a float if it is a finite real number (>= minimum, or > 0 when ``positive``),
    else ValueError naming ``name``."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise ValueError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if positive and not value > 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return float(value)


@dataclass
class TrainConfig:
    """Optimisation and bookkeeping settings (paper defaults live in the recipes)."""

    steps: int = 100
    lr: float = 5e-4
    weight_decay: float = 0.01
    warmup: float = 0.1  # fraction of steps (< 1) or a step count (>= 1)
    max_grad_norm: float = 1.0
    grad_accum: int = 1
    seed: int = 0
    log_every: int = 10
    checkpoint_every: int = 0  # 0: only at the end
    keep_checkpoints: int = 0  # keep only the newest this many checkpoints (0: all)
    bf16: bool | None = None  # None: on when the student is on a GPU
    out_dir: str = "runs/kdfast"
    progress: bool = True
    progress_label: str = "distil"  # the progress bar's label
    eval_every: int = 0  # run the Distiller's eval_fn every this many steps (0: never)
    optimizer: str = "adamw"  # "adamw" | "lamb"

    def __post_init__(self) -> None:
        # every number is type- and range-checked: a NaN, inf or "2" would otherwise train silently wrong
        for name, minimum in (("grad_accum", 1), ("log_every", 1), ("checkpoint_every", 0), ("eval_every", 0),
                              ("keep_checkpoints", 0)):
            check_int(name, getattr(self, name), minimum)
        check_int("steps", self.steps, 1, MAX_STEPS)
        check_int("seed", self.seed, 0, MAX_SEED)
        check_finite("lr", self.lr, positive=True)
        for name in ("weight_decay", "warmup", "max_grad_norm"):
            check_finite(name, getattr(self, name), 0.0)
        if self.bf16 is not None and not isinstance(self.bf16, bool):
            raise ValueError(f"bf16 must be None or a bool, got {self.bf16!r}")
        if not isinstance(self.progress, bool):
            raise ValueError(f"progress must be a bool, got {self.progress!r}")
        if not isinstance(self.out_dir, (str, os.PathLike)):
            raise ValueError(f"out_dir must be a path, got {type(self.out_dir).__name__}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {sorted(OPTIMIZERS)}, got {self.optimizer!r}")


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


def linear_warmup_decay(step: int, total: int, warmup: int) -> float:
    """LR multiplier: (step+1)/warmup during warm-up, then linear decay to 0 at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, (total - step) / max(1, total - warmup))


class Distiller:
    """Train ``student`` (plus ``extra`` trainable modules, e.g. projections) on ``step_loss``.

    ``step_loss(batch) -> (loss, {term: value})`` runs the student (and the live teacher, or reads
    the cached targets from the batch) and returns the weighted total. ``data`` has
    ``num_batches()`` and ``batches(epoch, start)`` (see :mod:`kdfast.train.data`).

    ``trainable``: the parameters to optimise (default: every parameter of ``student`` and
    ``extra`` that requires a gradient), or param groups ``{"params": [...], "lr_scale": s}``
    trained at ``s * config.lr`` (e.g. MobileBERT's lower layers during progressive transfer).

    ``eval_fn(student) -> {name: number}``: with ``config.eval_every > 0`` it runs every
    ``eval_every`` steps (and after the last) in eval mode under ``no_grad``, with the RNG
    states forked so that training continues exactly as without it; each result is written to
    ``metrics.jsonl`` as ``{"step": s, "eval/<name>": value}`` and kept in ``eval_history``.

    ``settings``: what the run was started with, stored in every checkpoint and compared on
    resume (JSON-able; default: ``config``'s fields except :data:`BOOKKEEPING`). A recipe
    passes its whole configuration, so that a changed loss weight is caught as well as a changed lr.
    """

    def __init__(self, student: nn.Module, step_loss: StepLoss, data, config: TrainConfig,
                 extra: nn.Module | None = None, trainable: list | None = None,
                 eval_fn: Callable[[nn.Module], dict] | None = None, settings: dict | None = None) -> None:
        self.student, self.step_loss, self.data, self.cfg = student, step_loss, data, config
        self.extra = extra if extra is not None else nn.ModuleDict()
        self.eval_fn = eval_fn
        self.eval_history: list[dict] = []
        if settings is None:
            settings = {k: v for k, v in asdict(config).items() if k not in BOOKKEEPING}
        # snapshot, in the form it takes in checkpoint.json (tuples -> lists, keys -> str)
        self.settings = _flatten(json.loads(json.dumps(settings, default=str)))
        params = trainable if trainable is not None else [
            p for p in list(student.parameters()) + list(self.extra.parameters()) if p.requires_grad]
        if not params:
            raise ValueError("nothing to train: no parameter requires a gradient")
        self.opt = OPTIMIZERS[config.optimizer](_decay_groups(params, config.weight_decay, config.lr), lr=config.lr)
        warm = max(1, int(config.warmup * config.steps) if config.warmup < 1 else int(config.warmup))
        total = config.steps  # fixed at construction: the schedule of a resumed run is the original one
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda s: linear_warmup_decay(s, total, warm))
        # the hyper-parameters of this run's settings, re-applied over a checkpoint's when a resume
        # is allowed to change the settings
        self._fresh_hparams = [{k: v for k, v in g.items() if k != "params"} for g in self.opt.param_groups]
        self.step, self.epoch, self.batch_in_epoch = 0, 0, 0
        self.out = Path(config.out_dir)
        device = next(student.parameters()).device
        self.bf16 = config.bf16 if config.bf16 is not None else device.type == "cuda"
        self.device = device
        self.history: list[dict] = []
        self.already_finished = False  # set by train(resume=True) when the checkpoint is the final one
        self.rank, self.world_size = rank_and_world()

    # ---- checkpoints ----------------------------------------------------------------------------

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
            if not m or entry.is_symlink() or (int(m.group(2)) != os.getpid() and _pid_alive(int(m.group(2)))):
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

    # ---- the loop -------------------------------------------------------------------------------

    def _next_batch(self):
        while True:
            if not hasattr(self, "_it") or self._it is None:
                self._it = iter(self.data.batches(self.epoch, self.batch_in_epoch))
            try:
                batch = next(self._it)
                self.batch_in_epoch += 1
                return batch
            except StopIteration:
                self._it = None
                self.epoch += 1
                self.batch_in_epoch = 0

    def _param_names(self) -> dict[int, str]:
        names = {id(p): f"student parameter {n!r}" for n, p in self._model().named_parameters()}
        names.update({id(p): f"extra parameter {n!r}" for n, p in self.extra.named_parameters()})
        return names

    def _check_step(self, bad_term: tuple[str, float] | None, params: list, gnorm: torch.Tensor) -> None:
        """NonFiniteError naming the step and the first non-finite loss term, or the parameter whose
        gradient is not finite; under torchrun every rank stops together."""
        grad_ok = bool(torch.isfinite(gnorm))
        failed = bad_term is not None or not grad_ok
        if self.world_size > 1:  # a term non-finite on one rank only must stop every rank
            failed = mean_across_ranks(1.0 if failed else 0.0) > 0
        if not failed:
            return
        step = self.step + 1
        if bad_term is not None:
            name, value = bad_term
            what = "the loss" if name == "loss" else f"the loss term {name!r}"
            raise NonFiniteError(f"step {step}: {what} is {value}; training stopped before updating the weights "
                                 f"(lower the lr or check the data and the teacher)")
        if not grad_ok:
            names = self._param_names()
            culprit = next((names.get(id(p), "a parameter") for p in params
                            if p.grad is not None and not bool(torch.isfinite(p.grad).all())), "a parameter")
            raise NonFiniteError(f"step {step}: the gradient of {culprit} is not finite (norm {float(gnorm)}); "
                                 f"training stopped before updating the weights (lower the lr or check the data)")
        raise NonFiniteError(f"step {step}: another rank's loss is not finite; training stopped")

    def train(self, resume: bool = False, on_log: Callable[[dict], None] | None = None, *,
              allow_changed_settings: bool = False) -> list[dict]:
        """:meth:`_train` holding ``out_dir`` (:func:`kdfast.train.run_guard.run_lock`: a second run
        into it is refused) with SIGINT / SIGTERM deferred to the end of the current step, which
        then writes a checkpoint and raises :class:`kdfast.train.run_guard.RunInterrupted`. A fresh
        run (not ``resume``) into a folder that holds a previous run raises
        :class:`kdfast.train.run_guard.RunExistsError`."""
        check_out_dir(self.out)
        with run_lock(self.out), StopSignals() as self._stop:
            if not resume and self.rank == 0:
                check_no_previous_run(self.out, "out_dir")
            self._clock = (time.perf_counter(), seconds_before(self.out) if resume else 0.0)
            return self._train(resume, on_log, allow_changed_settings=allow_changed_settings)

    @property
    def seconds(self) -> float:
        """Wall seconds of training so far, over every interrupted and resumed part of the run."""
        start, before = getattr(self, "_clock", (time.perf_counter(), 0.0))
        return before + time.perf_counter() - start

    def _train(self, resume: bool = False, on_log: Callable[[dict], None] | None = None, *,
               allow_changed_settings: bool = False) -> list[dict]:
        """Run until ``config.steps`` optimizer steps; returns the logged records.

        Steps are counted from 1 (the number of optimizer steps done): ``metrics.jsonl``, the
        progress bar, checkpoints and errors all say "step s" after s updates. Step 1, every
        ``log_every``-th step and the last are logged.

        ``resume``: continue from the newest checkpoint (see :meth:`load_checkpoint`); a fresh
        run is seeded with ``config.seed``. A resume whose checkpoint is already at
        ``config.steps`` trains nothing, leaves the checkpoint as it is, sets ``already_finished``
        and returns the records of ``metrics.jsonl``. Stops with :class:`NonFiniteError` at the
        first step whose loss, a loss term or the gradient is not finite."""
        cfg = self.cfg
        check_out_dir(self.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self._settings_changed = False
        resumed = resume and self.load_checkpoint(allow_changed_settings=allow_changed_settings)
        if not resumed:
            seed_everything(cfg.seed)
        self._clean_stale_temporaries()
        self._truncate_metrics()
        self.already_finished = resumed and self.step >= cfg.steps
        if self.already_finished:
            # nothing to train: the records are the finished run's, and its final checkpoint is left as it
            # is (rewritten only to store settings a resume was allowed to change)
            self.history, self.eval_history = self._logged_records()
            if self._settings_changed:
                self.save_checkpoint()
            return self.history
        self._it = None
        metrics = open(self.out / "metrics.jsonl", "a") if self.rank == 0 else None
        bar = None
        if cfg.progress and self.rank == 0:
            from tqdm import tqdm

            bar = tqdm(total=cfg.steps, initial=self.step, unit="step", desc=cfg.progress_label, dynamic_ncols=True)
        self.student.train()
        t_last, tokens = time.perf_counter(), 0
        tok_rate = None  # tokens/s of the last logging window, shown on the progress bar
        try:
            while self.step < cfg.steps:
                terms_sum: dict[str, float] = {}
                bad_term = None  # the first (term, value) of this step that is not finite
                self.opt.zero_grad(set_to_none=True)
                for _ in range(cfg.grad_accum):
                    batch = self._next_batch()
                    batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
                    tokens += int(batch["attention_mask"].sum()) if "attention_mask" in batch else 0
                    with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
                        loss, terms = self.step_loss(batch)
                    values = {**{k: float(v) for k, v in terms.items()}, "loss": loss.detach().item()}
                    if bad_term is None:
                        bad_term = next(((k, v) for k, v in values.items() if not math.isfinite(v)), None)
                    # backward even then: under DDP every rank must join the gradient all-reduce
                    (loss / cfg.grad_accum).backward()
                    for k, v in {"loss": values["loss"], **terms}.items():
                        terms_sum[k] = terms_sum.get(k, 0.0) + float(v) / cfg.grad_accum
                params = [p for g in self.opt.param_groups for p in g["params"]]
                grads = [p.grad for p in params if p.grad is not None]
                gnorm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())
                self._check_step(bad_term, params, gnorm)
                if cfg.max_grad_norm:
                    torch.nn.utils.clip_grads_with_norm_(params, cfg.max_grad_norm, gnorm)
                else:
                    gnorm = None
                try:
                    self.opt.step()
                except RuntimeError as e:  # torch's optimizers refuse a step size beyond float32
                    if "overflow" not in str(e):
                        raise
                    raise NonFiniteError(f"step {self.step + 1}: the optimizer's update overflows the weights' "
                                         f"dtype (lr {cfg.lr}); lower the lr") from None
                self.sched.step()
                self.step += 1
                # step 1 too: a report's "first" loss is the loss before training has moved the weights much
                if self.step == 1 or self.step % cfg.log_every == 0 or self.step == cfg.steps:
                    dt = time.perf_counter() - t_last
                    if self.world_size > 1:  # log the global loss: the mean over ranks
                        terms_sum = {k: mean_across_ranks(v) for k, v in terms_sum.items()}
                        tokens = int(mean_across_ranks(tokens) * self.world_size)
                    rec = {"step": self.step, **{k: round(v, 6) for k, v in terms_sum.items()},
                           "lr": self.sched.get_last_lr()[0], "tokens_per_s": round(tokens / max(dt, 1e-9), 1)}
                    if gnorm is not None:
                        rec["grad_norm"] = round(float(gnorm), 4)
                    if metrics is not None:
                        metrics.write(json.dumps(rec) + "\n")
                        metrics.flush()
                    self.history.append(rec)
                    if on_log:
                        on_log(rec)
                    tok_rate = rec["tokens_per_s"]
                    t_last, tokens = time.perf_counter(), 0
                if bar is not None:
                    bar.update(1)
                    postfix = {k: f"{v:.4g}" for k, v in terms_sum.items()}
                    if tok_rate is not None:
                        postfix["tok/s"] = f"{tok_rate:.0f}"
                    bar.set_postfix(postfix)
                if cfg.eval_every and self.eval_fn is not None and (
                        self.step % cfg.eval_every == 0 or self.step == cfg.steps):
                    self._evaluate(metrics)
                if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0 and self.step < cfg.steps:
                    self._checkpoint()
                if self._stop.signum is not None and self.step < cfg.steps:
                    raise self._stop.interrupted(self.step, cfg.steps, self._checkpoint())
        finally:
            if metrics is not None:
                metrics.close()
            if bar is not None:
                bar.close()
        self._checkpoint()
        return self.history

    def _checkpoint(self) -> Path:
        """:meth:`save_checkpoint`, then only the newest ``keep_checkpoints`` kept."""
        path = self.save_checkpoint()
        if self.rank == 0:
            record_seconds(self.out / "checkpoints", self.step, self.seconds)
            prune_checkpoints(self.out / "checkpoints", self.cfg.keep_checkpoints)
        return path


    def _evaluate(self, metrics) -> None:
        """Run ``eval_fn`` on rank 0 without disturbing training: RNG states forked, mode restored."""
        if self.rank != 0:
            return
        model = self.student.module if hasattr(self.student, "module") else self.student
        py_state = random.getstate()
        devices = [torch.cuda.current_device()] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            model.eval()
            try:
                result = self.eval_fn(model)
            finally:
                model.train()
                random.setstate(py_state)
        rec = {"step": self.step, **{f"eval/{k}": round(float(v), 6) for k, v in result.items()}}
        if metrics is not None:
            metrics.write(json.dumps(rec) + "\n")
            metrics.flush()
        self.eval_history.append(rec)


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


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by another user
        return True
    return True


def _is_tied(model: nn.Module, name: str) -> bool:
    return any(name.endswith(s) for s in ("decoder.weight", "decoder.bias", "predictions.bias"))


def _as_python_rng(state):
    """Loading with weights_only=True turns the tuple of random.getstate() into lists."""
    version, internal, gauss = state
    return version, tuple(internal), gauss
