"""The one training loop of every recipe.

``Distiller(student, step_loss, data, config)`` runs AdamW or LAMB (``config.optimizer``; LAMB,
MobileBERT's optimizer, is :class:`kdfast.train.optim.Lamb`: torch has none), linear warm-up then
linear decay, gradient clipping and accumulation, bf16 autocast on GPU, metrics as JSON lines, a
progress bar with the loss terms and tokens/s, and atomic checkpoints (student + extra trainable
modules, optimizer, scheduler, RNG states, data position). ``train(resume=True)`` continues from
the newest complete checkpoint so that an interrupted-and-resumed run equals an uninterrupted one
(exactly, in fp32 on CPU).

Distributed: under ``torchrun`` wrap the student in DDP before passing it (see
``kdfast.train.distributed``); the data source gives each rank its slice.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from kdfast.cache.format import atomic_write_bytes, fsync_dir
from kdfast.train.distributed import barrier, mean_across_ranks, rank_and_world
from kdfast.train.optim import Lamb

StepLoss = Callable[[dict], tuple[torch.Tensor, dict[str, float]]]

#: ``TrainConfig.optimizer`` -> class; both take param groups with their own ``weight_decay``.
OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {"adamw": torch.optim.AdamW, "lamb": Lamb}


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
    bf16: bool | None = None  # None: on when the student is on a GPU
    out_dir: str = "runs/kdfast"
    progress: bool = True
    eval_every: int = 0  # run the Distiller's eval_fn every this many steps (0: never)
    optimizer: str = "adamw"  # "adamw" | "lamb"

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.grad_accum < 1:
            raise ValueError(f"grad_accum must be >= 1, got {self.grad_accum}")
        if self.eval_every < 0:
            raise ValueError(f"eval_every must be >= 0, got {self.eval_every}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {sorted(OPTIMIZERS)}, got {self.optimizer!r}")


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
    """

    def __init__(self, student: nn.Module, step_loss: StepLoss, data, config: TrainConfig,
                 extra: nn.Module | None = None, trainable: list | None = None,
                 eval_fn: Callable[[nn.Module], dict] | None = None) -> None:
        self.student, self.step_loss, self.data, self.cfg = student, step_loss, data, config
        self.extra = extra if extra is not None else nn.ModuleDict()
        self.eval_fn = eval_fn
        self.eval_history: list[dict] = []
        params = trainable if trainable is not None else [
            p for p in list(student.parameters()) + list(self.extra.parameters()) if p.requires_grad]
        if not params:
            raise ValueError("nothing to train: no parameter requires a gradient")
        self.opt = OPTIMIZERS[config.optimizer](_decay_groups(params, config.weight_decay, config.lr), lr=config.lr)
        warm = max(1, int(config.warmup * config.steps) if config.warmup < 1 else int(config.warmup))
        total = config.steps  # fixed at construction: the schedule of a resumed run is the original one
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda s: linear_warmup_decay(s, total, warm))
        self.step, self.epoch, self.batch_in_epoch = 0, 0, 0
        self.out = Path(config.out_dir)
        device = next(student.parameters()).device
        self.bf16 = config.bf16 if config.bf16 is not None else device.type == "cuda"
        self.device = device
        self.history: list[dict] = []
        self.rank, self.world_size = rank_and_world()

    # ---- checkpoints ----------------------------------------------------------------------------

    def _ckpt_dir(self, step: int) -> Path:
        return self.out / "checkpoints" / f"step-{step:07d}"

    def save_checkpoint(self) -> Path:
        """Write everything a resume needs into a temporary directory, fsync, rename, then point
        ``checkpoints/latest`` at it (atomically): a checkpoint cut short is never picked up.
        Under torchrun rank 0 writes (the ranks hold identical replicas) and the others wait."""
        final = self._ckpt_dir(self.step)
        if self.rank != 0:
            barrier()
            return final
        tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        model = self.student.module if hasattr(self.student, "module") else self.student
        tensors = {f"student.{k}": v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        tensors.update({f"extra.{k}": v.detach().contiguous().cpu() for k, v in self.extra.state_dict().items()})
        save_file(_untie(tensors), str(tmp / "weights.safetensors"))
        state = {
            "optimizer": self.opt.state_dict(), "scheduler": self.sched.state_dict(),
            "step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
            "torch_rng": torch.get_rng_state(), "python_rng": random.getstate(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "config": asdict(self.cfg),
        }
        torch.save(state, tmp / "trainer.pt")
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        fsync_dir(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_dir(final.parent)
        atomic_write_bytes(final.parent / "latest", final.name.encode())
        barrier()
        return final

    def load_checkpoint(self, path: Path | None = None) -> bool:
        """Restore the newest complete checkpoint (or ``path``); False when there is none."""
        root = self.out / "checkpoints"
        if path is None:
            if not (root / "latest").is_file():
                return False
            path = root / (root / "latest").read_text().strip()
        if not (path / "weights.safetensors").is_file() or not (path / "trainer.pt").is_file():
            raise ValueError(f"checkpoint {path} is incomplete (weights.safetensors or trainer.pt missing)")
        tensors = load_file(str(path / "weights.safetensors"))
        model = self.student.module if hasattr(self.student, "module") else self.student
        model.load_state_dict({k[8:]: v for k, v in tensors.items() if k.startswith("student.")}, strict=False)
        missing = set(model.state_dict()) - {k[8:] for k in tensors if k.startswith("student.")}
        tied = {k for k in missing if _is_tied(model, k)}
        if missing - tied:
            raise ValueError(f"checkpoint {path} lacks student tensors: {sorted(missing - tied)[:5]}")
        if len(self.extra.state_dict()):
            self.extra.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("extra.")})
        state = torch.load(path / "trainer.pt", weights_only=True)
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        self.step, self.epoch, self.batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
        torch.set_rng_state(state["torch_rng"])
        random.setstate(_as_python_rng(state["python_rng"]))
        if state["cuda_rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        return True

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

    def train(self, resume: bool = False, on_log: Callable[[dict], None] | None = None) -> list[dict]:
        """Run until ``config.steps`` optimizer steps; returns the logged records."""
        cfg = self.cfg
        self.out.mkdir(parents=True, exist_ok=True)
        if not (resume and self.load_checkpoint()):
            torch.manual_seed(cfg.seed)
            random.seed(cfg.seed)
        self._it = None
        metrics = open(self.out / "metrics.jsonl", "a") if self.rank == 0 else None
        bar = None
        if cfg.progress and self.rank == 0:
            from tqdm import tqdm

            bar = tqdm(total=cfg.steps, initial=self.step, unit="step", desc="distil", dynamic_ncols=True)
        self.student.train()
        t_last, tokens = time.perf_counter(), 0
        tok_rate = None  # tokens/s of the last logging window, shown on the progress bar
        try:
            while self.step < cfg.steps:
                terms_sum: dict[str, float] = {}
                self.opt.zero_grad(set_to_none=True)
                for _ in range(cfg.grad_accum):
                    batch = self._next_batch()
                    batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
                    tokens += int(batch["attention_mask"].sum()) if "attention_mask" in batch else 0
                    with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
                        loss, terms = self.step_loss(batch)
                    (loss / cfg.grad_accum).backward()
                    for k, v in {"loss": loss.detach().item(), **terms}.items():
                        terms_sum[k] = terms_sum.get(k, 0.0) + float(v) / cfg.grad_accum
                params = [p for g in self.opt.param_groups for p in g["params"]]
                gnorm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm) if cfg.max_grad_norm else None
                self.opt.step()
                self.sched.step()
                self.step += 1
                if self.step % cfg.log_every == 0 or self.step == cfg.steps:
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
                    self.save_checkpoint()
        finally:
            if metrics is not None:
                metrics.close()
            if bar is not None:
                bar.close()
        self.save_checkpoint()
        return self.history


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


def _is_tied(model: nn.Module, name: str) -> bool:
    return any(name.endswith(s) for s in ("decoder.weight", "decoder.bias", "predictions.bias"))


def _as_python_rng(state):
    """Loading with weights_only=True turns the tuple of random.getstate() into lists."""
    version, internal, gauss = state
    return version, tuple(internal), gauss
