"""The one stage runner: every training stage of every driver (the demo, the three recipes, task
fine-tuning and distillation) runs through :func:`run_stage`, so checkpoints, resume, held-out
evaluation and the report entry behave alike everywhere."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import nn

from kdfast.train.distiller import Distiller, StepLoss, TrainConfig, read_metrics

__all__ = ["held_out_eval", "run_stage"]


def held_out_eval(step_loss: StepLoss, batches: Callable[[], Iterator[dict]] | None, device: torch.device,
                  seed: int, progress: bool = False) -> Callable[[nn.Module], dict[str, float]] | None:
    """``eval_fn`` for the Distiller: the step loss and its terms averaged over the held-out
    batches (``mean_b loss(b)``, ``mean_b term(b)``), with the RNG reseeded with ``seed`` so that
    every evaluation masks the same tokens (``progress``: a bar over the batches while it runs).
    None when there are no held-out batches."""
    from tqdm import tqdm

    if batches is None:
        return None

    def eval_fn(student):
        torch.manual_seed(seed)
        sums: dict[str, float] = {}
        n = 0
        for batch in tqdm(batches(), desc="held-out eval", unit="batch", leave=False, disable=not progress):
            batch = {k: v.to(device) for k, v in batch.items()}
            loss, terms = step_loss(batch)
            for k, v in {"loss": float(loss), **terms}.items():
                sums[k] = sums.get(k, 0.0) + float(v)
            n += 1
        return {k: v / max(n, 1) for k, v in sums.items()}

    return eval_fn


def run_stage(name: str, model: nn.Module, step_loss: StepLoss, data, config: TrainConfig, *,
              held_out: Callable[[], Iterator[dict]] | None = None, extra: nn.Module | None = None,
              trainable=None, resume: bool = False, settings: dict | None = None,
              allow_changed_settings: bool = False) -> dict:
    """Train ``model`` for one stage: a :class:`~kdfast.train.Distiller` over ``data`` with
    ``config`` (``extra`` modules and ``trainable`` param groups as the Distiller takes them),
    evaluated on ``held_out()`` batches every ``config.eval_every`` steps (:func:`held_out_eval`,
    seeded with ``config.seed``); ``resume`` continues from the stage's newest checkpoint in
    ``config.out_dir``, whose stored ``settings`` must match unless ``allow_changed_settings``.

    Returns the stage's report entry: ``name``, ``steps``, ``out_dir``, ``first`` / ``last`` (the
    first and last logged records: loss, terms, lr, tokens/s), ``tokens_per_s`` (median over the
    logged records), ``seconds`` (wall time of the stage), ``eval`` / ``eval_first`` (the last and
    first held-out evaluations, or None) and ``history`` (every logged record)."""
    device = next(model.parameters()).device
    eval_fn = held_out_eval(step_loss, held_out, device, config.seed, progress=config.progress)
    distiller = Distiller(model, step_loss, data, config, extra=extra, trainable=trainable, eval_fn=eval_fn,
                          settings=settings)
    distiller.train(resume=resume, allow_changed_settings=allow_changed_settings)
    # the whole run's records and time, also when it was interrupted and resumed
    history, evals = (read_metrics(Path(config.out_dir) / "metrics.jsonl") if distiller.rank == 0
                      else (distiller.history, distiller.eval_history))  # only rank 0 writes the file
    seconds = distiller.seconds
    rates = [h["tokens_per_s"] for h in history if h.get("tokens_per_s")]
    return {"name": name, "steps": config.steps, "out_dir": config.out_dir,
            "first": history[0] if history else None, "last": history[-1] if history else None,
            "tokens_per_s": sorted(rates)[len(rates) // 2] if rates else None, "seconds": round(seconds, 2),
            "eval": evals[-1] if evals else None, "eval_first": evals[0] if evals else None,
            "history": history}
