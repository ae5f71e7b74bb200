r"""kdfast inside ``transformers`` code.

- :func:`capture` (the same as :func:`kdfast.capture`): hidden states, unscaled queries / keys and
  pre-softmax scores out of a stock BERT, RoBERTa, DistilBERT or MobileBERT running on SDPA.
- :class:`DistillationTrainer`: a ``transformers.Trainer`` that distils a live teacher into the
  model it trains with a :class:`kdfast.DistillationLoss`, owns that loss's projections (trained
  with the student, saved beside it as ``kd_projections.safetensors``), and logs every loss term
  through the Trainer's own logging.

::

    criterion = kdfast.DistillationLoss((12, 4), {"hidden": 1.0, "attention": 1.0},
                                        student_hidden_size=312, teacher_hidden_size=768,
                                        qk_prescaled=False)   # captured queries are unscaled
    trainer = DistillationTrainer(model=student, args=TrainingArguments("out", ...), train_dataset=ds,
                                  teacher=teacher, distillation_loss=criterion)
    trainer.train()
    trainer.save_model("out/student")   # student: from_pretrained-ready; projections beside it
"""

from __future__ import annotations

import contextlib
import inspect
import os
from typing import Any

import torch
from torch import Tensor, nn
from transformers import Trainer, TrainerCallback

from kdfast.capture import SUPPORTED_MODELS, Captured, _layers, _unwrap, capture
from kdfast.losses._checks import check_nonnegative
from kdfast.losses.distillation import DistillationLoss

__all__ = ["Captured", "DistillationTrainer", "PROJECTIONS_FILE", "SUPPORTED_MODELS", "capture", "load_projections"]

#: File that :class:`DistillationTrainer` writes beside the student: the loss's projection weights.
PROJECTIONS_FILE = "kd_projections.safetensors"
_HIDDEN_TERMS = frozenset({"hidden", "cosine", "feature_map"})
_TEACHER_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "position_ids", "inputs_embeds")


def load_projections(distillation_loss: DistillationLoss, directory: str | os.PathLike) -> None:
    """Load the projection weights a :class:`DistillationTrainer` saved in ``directory``
    (``kd_projections.safetensors``) into ``distillation_loss`` (same layer map and widths).

    Raises ValueError naming ``directory`` when the file is missing, or ``distillation_loss``
    when its projections do not match the file's names or shapes."""
    from safetensors.torch import load_file

    path = os.path.join(os.fspath(directory), PROJECTIONS_FILE)
    if not os.path.isfile(path):
        raise ValueError(f"directory: {path} does not exist (no projections were saved there)")
    tensors = load_file(path)
    own = distillation_loss.state_dict()
    if set(own) != set(tensors) or any(own[k].shape != tensors[k].shape for k in own):
        raise ValueError(f"distillation_loss: its projections {sorted((k, tuple(v.shape)) for k, v in own.items())} "
                         f"do not match {path}: {sorted((k, tuple(v.shape)) for k, v in tensors.items())}")
    distillation_loss.load_state_dict(tensors)


def _tensors(outputs: Any) -> list[Tensor]:
    values = outputs.values() if hasattr(outputs, "values") else outputs if isinstance(outputs, tuple) else ()
    return [v for v in values if isinstance(v, Tensor)]


class _ZeroLossGradients(TrainerCallback):
    """The Trainer zeroes only the model's gradients after a step; the loss's are zeroed here."""

    def __init__(self, loss: nn.Module) -> None:
        self.loss = loss

    def on_train_begin(self, args, state, control, **kwargs):
        self.loss.zero_grad(set_to_none=True)

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.loss.zero_grad(set_to_none=True)


class DistillationTrainer(Trainer):
    r"""``transformers.Trainer`` that trains its ``model`` (the student) to match a live
    ``teacher`` through ``distillation_loss``:

        loss = distillation_loss(student, teacher, attention_mask)[0] + student_loss_weight * student_loss

    where the per-term formulas are :class:`kdfast.DistillationLoss`'s (hidden MSE through learned
    projections, attention from Q/K without any L x L map, cosine, feature map, logit KD) and
    ``student_loss`` is the loss the student returns itself when the batch has ``labels`` (e.g. MLM
    cross-entropy). Both models run on the attention they are configured with (SDPA by default):
    hidden states, queries and keys are read with :func:`kdfast.capture`, so ``distillation_loss``
    must be built with ``qk_prescaled=False`` (captured queries are unscaled) and an attention
    source of ``"auto"``, ``"qk"`` or ``"scores"``. The teacher sees the same batch
    (``input_ids``, ``attention_mask``, ``token_type_ids``, ... as its forward accepts them), so
    both models must share the tokenizer. It runs under ``torch.no_grad()`` and in the Trainer's
    autocast (``bf16=True``), is put in eval mode, frozen and moved to the training device.

    The loss's parameters (its projections) are trained with the student: they join the
    optimizer the Trainer creates (weight decay as the Trainer applies it: none on biases); an
    optimizer passed through ``optimizers=`` must already hold them; gradient clipping
    (``max_grad_norm``) takes the norm over the student's and their gradients together, and
    their gradients are zeroed after every optimizer step. ``save_model`` and every
    checkpoint write them beside the student as ``kd_projections.safetensors`` (the student's own
    ``save_pretrained`` files hold the student only); ``resume_from_checkpoint`` reads them back
    (:func:`load_projections`). Gradient accumulation is the Trainer's: the loss is a per-batch
    mean that the Trainer divides by the accumulation steps. Each training log adds
    ``kd_<term>``, the unweighted terms averaged over the micro-batches since the last log (and
    ``student_loss`` when weighted), so every ``report_to`` integration receives them.

    Under DDP (``torchrun``) the projections' gradients are averaged over the processes after each
    backward (they live outside the DDP module), and student outputs the loss does not use (an
    MLM head when no logit term is set) join it with weight 0, so that DDP's reducer gets a
    (zero) gradient for every parameter; with weight decay those parameters then decay, which
    they do not in one process (where their gradient is None).

    Args:
        model, args, ...: as ``transformers.Trainer`` (``compute_loss_func`` is not accepted: the
            loss is ``distillation_loss``).
        teacher: a model :func:`kdfast.capture` supports, called with the student's inputs.
        distillation_loss: the :class:`kdfast.DistillationLoss` to minimise.
        student_loss_weight: weight of the student's own loss; 0 (default) leaves ``labels`` out
            of the student's inputs.

    Raises:
        ValueError naming the argument: ``teacher`` / ``model`` of a class :func:`kdfast.capture`
        does not support (when the loss needs hidden states or attention), ``distillation_loss``
        not a DistillationLoss or set up for pre-scaled queries or ``output_attentions``,
        ``student_loss_weight`` negative or not finite, ``compute_loss_func`` given, an
        ``optimizers`` optimizer without the projections; at a step, ``student_loss_weight``
        with a student that returned no loss.
    """

    def __init__(self, *args: Any, teacher: nn.Module, distillation_loss: DistillationLoss,
                 student_loss_weight: float = 0.0, **kwargs: Any) -> None:
        if not isinstance(distillation_loss, DistillationLoss):
            raise ValueError(f"distillation_loss must be a kdfast.DistillationLoss, got {type(distillation_loss).__name__}")
        if not isinstance(teacher, nn.Module):
            raise ValueError(f"teacher must be a torch.nn.Module, got {type(teacher).__name__}")
        if kwargs.get("compute_loss_func") is not None:
            raise ValueError("compute_loss_func: DistillationTrainer computes its loss with distillation_loss; "
                             "leave compute_loss_func unset")
        weight = check_nonnegative("student_loss_weight", student_loss_weight)
        terms = distillation_loss.weights.keys()
        self._want_hidden = bool(_HIDDEN_TERMS & terms)
        self._attention = None
        if "attention" in terms:
            source = distillation_loss.attention_source
            if source == "attentions":
                raise ValueError("distillation_loss: attention_source='attentions' needs output_attentions (eager "
                                 "attention); DistillationTrainer captures under SDPA: use 'qk' (or 'scores')")
            self._attention = "scores" if source == "scores" else "qk"
            if self._attention == "qk" and distillation_loss.qk_prescaled:
                raise ValueError("distillation_loss: build it with qk_prescaled=False; kdfast.capture gives "
                                 "unscaled queries")
        self._captures = self._want_hidden or self._attention is not None
        if self._captures:
            _layers(_unwrap(teacher), "teacher")
        self.teacher = teacher
        self.distillation_loss = distillation_loss
        self.student_loss_weight = weight
        self._term_sums: dict[str, Tensor] = {}
        self._term_count = 0
        super().__init__(*args, **kwargs)
        if self._captures:
            _layers(self.accelerator.unwrap_model(self.model), "model")
        self.loss_is_scaled_for_ga = False  # a per-batch mean: the Trainer divides it by the accumulation steps
        teacher.requires_grad_(False)
        self.teacher = teacher.to(self.args.device).eval()
        self.distillation_loss.to(self.args.device)
        accepted = inspect.signature(teacher.forward).parameters
        self._teacher_keys = tuple(k for k in _TEACHER_INPUTS if k in accepted)
        self.add_callback(_ZeroLossGradients(self.distillation_loss))

    # --- loss ----------------------------------------------------------------------------------

    def _capture(self, model: nn.Module):
        if not self._captures:
            return contextlib.nullcontext(None)
        return capture(model, hidden_states=self._want_hidden, qk=self._attention == "qk",
                       scores=self._attention == "scores")

    def _outputs(self, cap: Captured | None, out: Any) -> dict[str, Any]:
        fields: dict[str, Any] = {}
        if self._want_hidden:
            fields["hidden_states"] = cap.hidden_states
        if self._attention == "qk":
            fields["q"], fields["k"] = cap.q, cap.k
        elif self._attention == "scores":
            fields["scores"] = cap.scores
        if "logits" in self.distillation_loss.weights:
            fields["logits"] = getattr(out, "logits", None)
        return fields

    def compute_loss(self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Tensor | int | None = None) -> Tensor | tuple[Tensor, Any]:
        """``distillation_loss(student, teacher, attention_mask)`` plus ``student_loss_weight``
        times the student's own loss; records the terms for the next log."""
        inputs = dict(inputs)
        labels = inputs.pop("labels", None)
        teacher_inputs = {k: inputs[k] for k in self._teacher_keys if k in inputs}
        with torch.no_grad(), self._capture(self.teacher) as cap_t:
            out_t = self.teacher(**teacher_inputs)
        student_inputs = inputs if labels is None or not self.student_loss_weight else {**inputs, "labels": labels}
        with self._capture(self.accelerator.unwrap_model(model)) as cap_s:
            out_s = model(**student_inputs)
        loss, terms = self.distillation_loss(self._outputs(cap_s, out_s), self._outputs(cap_t, out_t),
                                             inputs.get("attention_mask"))
        if self.student_loss_weight:
            own = getattr(out_s, "loss", None)
            if own is None:
                raise ValueError("student_loss_weight: the student returned no loss (does the batch have labels?)")
            loss = loss + self.student_loss_weight * own
            terms["student_loss"] = own.detach()
        if self.accelerator.num_processes > 1 and model.training:
            # DDP's reducer waits for a gradient of every parameter that reaches the outputs
            # (e.g. an MLM head the loss does not use): tie them in with weight 0
            unused = [t for t in _tensors(out_s) if t.requires_grad]
            loss = loss + sum(t.sum() for t in unused) * 0.0
        if model.training:
            for name, value in terms.items():
                key = name if name == "student_loss" else f"kd_{name}"
                value = value.float()
                self._term_sums[key] = self._term_sums[key] + value if key in self._term_sums else value
            self._term_count += 1
        return (loss, out_s) if return_outputs else loss

    def training_step(self, model: nn.Module, inputs: dict[str, Any],
                      num_items_in_batch: Tensor | int | None = None) -> Tensor:
        """The Trainer's step; under several processes the projections' gradients are averaged
        over them, as DDP averages the student's (the loss is not inside the DDP module)."""
        loss = super().training_step(model, inputs, num_items_in_batch)
        if self.accelerator.num_processes > 1:
            world = self.accelerator.num_processes
            for p in self.distillation_loss.parameters():
                if p.grad is not None:
                    torch.distributed.all_reduce(p.grad)
                    p.grad.div_(world)
        return loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """The Trainer's log, with the loss terms averaged since the previous training log."""
        if "loss" in logs and self._term_count:
            for key, total in self._term_sums.items():
                mean = self.accelerator.reduce(total / self._term_count, reduction="mean")
                logs[key] = float(mean)
            self._term_sums, self._term_count = {}, 0
        super().log(logs, start_time)

    # --- the projections: optimised with the student, saved beside it -------------------------

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        """The Trainer's optimizer, plus the loss's trainable parameters (two groups: with and
        without weight decay, as the Trainer splits the student's)."""
        given = self.optimizer is not None
        optimizer = super().create_optimizer(model)
        named = [(n, p) for n, p in self.distillation_loss.named_parameters() if p.requires_grad]
        held = {id(p) for group in optimizer.param_groups for p in group["params"]}
        missing = [(n, p) for n, p in named if id(p) not in held]
        if missing and given:
            raise ValueError(f"optimizers: the optimizer passed to DistillationTrainer lacks the distillation_loss "
                             f"parameters {[n for n, _ in missing]}; add distillation_loss.parameters() to it")
        if missing:
            decay = set(self.get_decay_parameter_names(self.distillation_loss))
            for params, wd in (([p for n, p in missing if n in decay], self.args.weight_decay),
                               ([p for n, p in missing if n not in decay], 0.0)):
                if params:
                    optimizer.add_param_group({"params": params, "weight_decay": wd})
        return optimizer

    def _clip_grad_norm(self, model: nn.Module):
        """Clip the student's and the projections' gradients together, as one model's would be."""
        if not any(True for _ in self.distillation_loss.parameters()) or self._has_mixed_mesh_grads(model):
            return super()._clip_grad_norm(model)
        return self.accelerator.clip_grad_norm_([*model.parameters(), *self.distillation_loss.parameters()],
                                                self.args.max_grad_norm)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        super()._save(output_dir, state_dict)
        own = self.distillation_loss.state_dict()
        if self.args.should_save and own:
            from safetensors.torch import save_file

            directory = output_dir if output_dir is not None else self.args.output_dir
            save_file({k: v.detach().contiguous().cpu() for k, v in own.items()},
                      os.path.join(directory, PROJECTIONS_FILE), metadata={"format": "pt"})

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        if self.distillation_loss.state_dict():
            load_projections(self.distillation_loss, resume_from_checkpoint)
