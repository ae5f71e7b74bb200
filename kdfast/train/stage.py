"""Runs as plans of stages, and the one runner.

Every driver (the three recipes, the demo, fine-tuning and task distillation) first builds its
run as a :class:`Plan`, a list of :class:`Stage`: each stage names the model it trains, its step
loss (a :class:`StageLoss`, an ``nn.Module``), its data, its held-out data and its
:class:`~kdfast.train.TrainConfig`. :func:`run_plan` then trains the stages in order through one
:class:`~kdfast.train.Distiller` each (checkpoints, resume, held-out evaluation), and the plan's
``finish`` turns their report entries into the driver's report. A stage can also be taken on its
own, e.g. to time its step (``kdfast bench --suites e2e``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from kdfast.ops import registry
from kdfast.train.distiller import Distiller, TrainConfig

__all__ = ["Plan", "Stage", "StageLoss", "distillation_step", "distillation_term_losses", "held_out_eval",
           "loss_backend", "run_plan", "run_stage", "term_backends"]


class StageLoss(nn.Module):
    """A stage's step loss: ``loss(batch) -> (total, {term: float})`` computed by ``fn``.

    ``owns``: modules the loss trains with the model (e.g. :class:`kdfast.DistillationLoss` and its
    projections), registered as submodules so that ``.parameters()`` finds them and checkpoints
    store them; the models it only runs (the student, a live teacher) stay outside it.
    ``terms``: ``{logged term: the kdfast loss computing it}``, what the report's ``backends``
    resolves (:func:`term_backends`)."""

    def __init__(self, fn: Callable[[dict], tuple[torch.Tensor, dict[str, float]]], *,
                 terms: dict[str, str] | None = None, owns: dict[str, nn.Module] | None = None) -> None:
        super().__init__()
        self.fn = fn
        self.terms = dict(terms or {})
        for name, module in (owns or {}).items():
            self.add_module(name, module)

    def forward(self, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        return self.fn(batch)


@dataclass(eq=False)
class Stage:
    """One training stage of a plan.

    ``model``: what it trains (checkpointed as ``student.*``); ``loss``: its :class:`StageLoss`
    (its own modules checkpointed as ``extra.*``); ``data``: the batch source (``num_batches()``,
    ``batches(epoch, start)``); ``held_out``: a callable giving the held-out batches, or None;
    ``config``: the :class:`TrainConfig` (steps, lr, ``out_dir``, ...); ``teacher``: the live
    teacher model the loss runs (frozen; None from a cache), so that a caller can move it with the
    rest; ``trainable``: called just before the stage trains, it sets ``requires_grad`` and
    returns the param groups (``{"params": [...], "lr_scale": s}``), or None for every parameter
    that requires a gradient; ``settings``: what checkpoints store and a resume compares (None:
    the config's); ``report``: entries added to the stage's report entry."""

    name: str
    model: nn.Module
    loss: StageLoss
    data: Any
    config: TrainConfig
    held_out: Callable[[], Iterator[dict]] | None = None
    teacher: nn.Module | None = None
    trainable: Callable[[], list | None] | None = None
    settings: dict | None = None
    report: dict = field(default_factory=dict)

    def parameters(self) -> list:
        """What the stage's optimizer trains (after :attr:`trainable` has set ``requires_grad``):
        its param groups, or every parameter of the model and the loss that requires a gradient."""
        groups = self.trainable() if self.trainable is not None else None
        if groups is not None:
            return groups
        return [p for p in list(self.model.parameters()) + list(self.loss.parameters()) if p.requires_grad]


class Plan(list):
    """A run: its :class:`Stage` list, in order, and ``finish(entries) -> report``, which saves what
    the run made and writes its report from the stages' report entries (:func:`run_stage`)."""

    def __init__(self, stages: list[Stage] = (), finish: Callable[[list[dict]], dict] | None = None) -> None:
        super().__init__(stages)
        self.finish = finish


def held_out_eval(step_loss: Callable, batches: Callable[[], Iterator[dict]] | None, device: torch.device,
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


def run_stage(stage: Stage, *, resume: bool = False, allow_changed_settings: bool = False) -> dict:
    """Train one stage: a :class:`~kdfast.train.Distiller` over ``stage.data`` with
    ``stage.config`` (the loss's own modules trained beside the model), evaluated on the held-out
    batches every ``config.eval_every`` steps (:func:`held_out_eval`, seeded with
    ``config.seed``); ``resume`` continues from the stage's newest checkpoint in
    ``config.out_dir``, whose stored settings must match unless ``allow_changed_settings``.

    Returns the stage's report entry: ``name``, ``steps``, ``out_dir``, ``first`` / ``last`` (the
    first and last logged records: loss, terms, lr, tokens/s), ``tokens_per_s`` (median over the
    logged records), ``seconds`` (wall time of the stage), ``eval`` / ``eval_first`` (the last and
    first held-out evaluations, or None), ``history`` (every logged record), ``backends`` (where
    the loss declares its terms: the backend each ran on, :func:`term_backends`) and
    ``stage.report``'s entries."""
    config = stage.config
    device = next(stage.model.parameters()).device
    eval_fn = held_out_eval(stage.loss, stage.held_out, device, config.seed, progress=config.progress)
    trainable = stage.trainable() if stage.trainable is not None else None
    distiller = Distiller(stage.model, stage.loss, stage.data, config, extra=stage.loss, trainable=trainable,
                          eval_fn=eval_fn, settings=stage.settings)
    t0 = time.perf_counter()
    with registry.record() as ran:  # the backends the stage's ops actually ran on
        history = distiller.train(resume=resume, allow_changed_settings=allow_changed_settings)
    seconds = time.perf_counter() - t0
    rates = [h["tokens_per_s"] for h in history if h.get("tokens_per_s")]
    entry = {"name": stage.name, "steps": config.steps, "out_dir": config.out_dir,
             "first": history[0] if history else None, "last": history[-1] if history else None,
             "tokens_per_s": sorted(rates)[len(rates) // 2] if rates else None, "seconds": round(seconds, 2),
             "eval": distiller.eval_history[-1] if distiller.eval_history else None,
             "eval_first": distiller.eval_history[0] if distiller.eval_history else None,
             "history": history}
    if stage.loss.terms:
        entry["backends"] = term_backends(stage.loss.terms, device, ran=ran)
    return {**stage.report, **entry}


def run_plan(plan: Plan, *, resume: bool = False, allow_changed_settings: bool = False) -> dict:
    """Run every stage of ``plan`` in order (:func:`run_stage`, with ``resume`` and
    ``allow_changed_settings``), then ``plan.finish`` on their report entries; returns the
    report (``{"stages": entries}`` for a plan without ``finish``)."""
    entries = [run_stage(st, resume=resume, allow_changed_settings=allow_changed_settings) for st in plan]
    return plan.finish(entries) if plan.finish is not None else {"stages": entries}


# --- the terms of a stage ---------------------------------------------------------------------------

def distillation_term_losses(loss_fn) -> dict[str, str]:
    """``{term: kdfast loss name}`` of a :class:`kdfast.DistillationLoss` (the losses its
    ``forward`` calls for each weighted term; attention per its ``attention_source``, ``auto``
    counted as ``qk``, which is what the recipes feed it)."""
    attention = {"qk": "flash_attention_transfer", "auto": "flash_attention_transfer"}.get(
        loss_fn.attention_source, "attention_mse_loss" if loss_fn.attention == "mse" else "attention_kl_loss")
    names = {"hidden": "hidden_mse_loss", "cosine": "cosine_loss", "feature_map": "feature_map_loss",
             "attention": attention, "logits": "kd_loss"}
    return {term: names[term] for term in loss_fn.weights}


def distillation_step(loss_fn, student_outputs, teacher, inputs=None):
    """The :class:`StageLoss` of a :class:`kdfast.DistillationLoss` stage:
    ``loss_fn(student_outputs(batch, inputs), teacher(batch, inputs), inputs["attention_mask"])``
    with ``inputs = inputs(batch)`` (default :func:`kdfast.train.teacher.model_inputs`); ``loss_fn``
    (its projections) is owned and trained with the student."""
    from kdfast.train.teacher import model_inputs

    inputs_of = inputs or model_inputs

    def step(batch):
        inp = inputs_of(batch)
        total, terms = loss_fn(student_outputs(batch, inp), teacher(batch, inp), inp["attention_mask"])
        return total, {k: float(v) for k, v in terms.items()}

    return StageLoss(step, terms=distillation_term_losses(loss_fn), owns={"criterion": loss_fn})


# --- which backend each term runs on --------------------------------------------------------------

def loss_backend(loss: str, device: torch.device, backend: str = "auto", dtype: torch.dtype = torch.float32) -> str:
    """The backend kdfast's public loss ``loss`` runs on for ``backend`` and inputs of ``dtype`` on
    ``device``: its op (:data:`kdfast.losses.LOSS_OPS`) resolved by the op registry, as the loss
    resolves it; ``"torch"`` for the eager ``cross_entropy`` term."""
    from kdfast.losses import LOSS_OPS

    if loss == "cross_entropy":
        return "torch"
    if loss not in LOSS_OPS:
        raise ValueError(f"loss {loss!r} is not one of kdfast's losses known here")
    return registry.resolve(LOSS_OPS[loss], backend, device, dtype, what=loss)


def term_backends(term_losses: dict[str, str], device: torch.device, backend: str = "auto",
                  ran: dict[str, set[str]] | None = None) -> dict[str, dict]:
    """``{term: {"loss": name, "backend": ...}}`` for a stage's ``{term: kdfast loss name}`` (what
    ``report.json`` and the printed table show): the backend(s) its op ran on, from ``ran``
    (:func:`kdfast.ops.registry.record`), joined with "+" when it ran on several; for a term
    whose op did not run (no step trained), the one the registry selects for ``backend`` and
    float32 inputs on ``device``."""
    from kdfast.losses import LOSS_OPS

    def where(loss: str) -> str:
        op = LOSS_OPS.get(loss)
        if ran and op in ran:
            return "+".join(sorted(ran[op]))
        return loss_backend(loss, device, backend)

    return {term: {"loss": loss, "backend": where(loss)} for term, loss in term_losses.items()}


def format_backends(backends: dict[str, dict]) -> str:
    """``kd_mlm fused_linear_kd_loss (cpu), cos cosine_loss (cpu)``."""
    return ", ".join(f"{term} {b['loss']} ({b['backend']})" for term, b in backends.items())
