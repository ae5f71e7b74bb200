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
  ``train(allow_changed_settings=True)``, which then applies the new ones). Checkpoint I/O and
  validation live in :mod:`kdfast.train.checkpoint`.

Distributed: under ``torchrun`` wrap the student in DDP before passing it (see
``kdfast.train.distributed``); the data source gives each rank its slice.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from kdfast.losses._checks import NonFiniteInputError
from kdfast.train.checkpoint import (  # noqa: F401  (CheckpointError, finished_run, read_metrics: re-exported)
    CheckpointError,
    Checkpointing,
    NonFiniteError,
    _flatten,
    finished_run,
    read_metrics,
)
from kdfast.train.distributed import mean_across_ranks, rank_and_world, signal_on_any_rank
from kdfast.train.optim import OPTIMIZERS, build_optimizer
from kdfast.train.run_guard import (
    StopSignals,
    check_no_previous_run,
    prune_checkpoints,
    record_seconds,
    run_lock,
    seconds_before,
)

StepLoss = Callable[[dict], tuple[torch.Tensor, dict[str, float]]]

#: the most optimizer steps a run may ask for: more is a typo (the schedule would stretch over it)
MAX_STEPS = 10**9

#: TrainConfig fields that change how a run is shown, logged or checkpointed, not what it trains
#: (evaluation runs on forked RNG states): a resume may change them
BOOKKEEPING = ("progress", "progress_label", "out_dir", "log_every", "checkpoint_every", "eval_every",
               "keep_checkpoints")
#: seeds are passed to ``torch.manual_seed`` and mixed with the epoch by the batch sources
MAX_SEED = 2**32 - 1


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


def linear_warmup_decay(step: int, total: int, warmup: int) -> float:
    """LR multiplier: (step+1)/warmup during warm-up, then linear decay to 0 at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, (total - step) / max(1, total - warmup))


class Distiller(Checkpointing):
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
        self.opt = build_optimizer(params, config)
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
        # under torchrun the ranks share out_dir: rank 0, which writes it, holds the lock for all
        lock = run_lock(self.out) if self.rank == 0 else contextlib.nullcontext()
        with lock, StopSignals() as self._stop:
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
                    try:
                        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
                            loss, terms = self.step_loss(batch)
                    except NonFiniteInputError as e:  # a loss refused a NaN / Inf: say at which step
                        raise NonFiniteError(f"step {self.step + 1}: {e}") from None
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
                if self.step < cfg.steps:
                    self._stop.signum = signal_on_any_rank(self._stop.signum)
                    if self._stop.signum is not None:
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
