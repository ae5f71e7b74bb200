r"""kdfast inside ``transformers`` code.

- :func:`capture` (the same as :func:`kdfast.capture`): hidden states, unscaled queries / keys and
  pre-softmax scores out of a stock BERT, RoBERTa, DistilBERT or MobileBERT running on SDPA.
- :class:`DistillationTrainer`: a ``transformers.Trainer`` that distils a teacher (a live model,
  or a :mod:`kdfast.cache` of its activations) into the model it trains with a
  :class:`kdfast.DistillationLoss`, owns that loss's projections (trained with the student, saved
  beside it as ``kd_projections.safetensors``), and logs every loss term through the Trainer's
  own logging.

::

    criterion = kdfast.DistillationLoss((12, 4), {"hidden": 1.0, "attention": 1.0},
                                        student_hidden_size=312, teacher_hidden_size=768,
                                        qk_prescaled=False)   # captured queries are unscaled
    trainer = DistillationTrainer(model=student, args=TrainingArguments("out", ...), train_dataset=ds,
                                  teacher=teacher, distillation_loss=criterion)
    trainer.train()
    trainer.save_model("out/student")   # student: from_pretrained-ready; projections beside it

    # or from a cache built once (`kdfast cache build --qk ...`): no teacher forward while training
    trainer = DistillationTrainer(model=student, args=..., teacher="teacher-cache/", distillation_loss=criterion)
"""

from __future__ import annotations

import bisect
import contextlib
import copy
import inspect
import os
from typing import Any

import torch
from torch import Tensor, nn
from transformers import Trainer, TrainerCallback

from kdfast.cache.format import MANIFEST, CacheError
from kdfast.cache.reader import TeacherCache
from kdfast.capture import SUPPORTED_MODELS, Captured, capture, check_supported
from kdfast.integrations._checks import check_student_fits_teacher, save_teacher_tokenizer
from kdfast.losses._checks import check_nonnegative
from kdfast.losses.distillation import DistillationLoss
from kdfast.losses.sparse_kd import sparse_kd_loss
from kdfast.train.teacher import CachedTeacher

__all__ = ["Captured", "DistillationTrainer", "PROJECTIONS_FILE", "SUPPORTED_MODELS", "capture", "load_projections"]

#: File that :class:`DistillationTrainer` writes beside the student: the loss's projection weights.
PROJECTIONS_FILE = "kd_projections.safetensors"
_HIDDEN_TERMS = frozenset({"hidden", "cosine", "feature_map"})
_TEACHER_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "position_ids", "inputs_embeds")
#: the dataset column of a cache-backed run: the cache row each example is
CACHE_ROW = "kd_cache_row"


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


def open_teacher_cache(teacher: str | os.PathLike | TeacherCache) -> TeacherCache:
    """``teacher`` as an open :class:`kdfast.cache.TeacherCache` (a cache directory is opened);
    ValueError naming ``teacher`` when the directory is not a finished kdfast cache."""
    if isinstance(teacher, TeacherCache):
        return teacher
    path = os.fspath(teacher)
    if not os.path.isfile(os.path.join(path, MANIFEST)):
        raise ValueError(f"teacher: {path} is not a kdfast cache directory (no {MANIFEST}); pass a loaded model "
                         "for a live teacher, or build the cache with `kdfast cache build`")
    try:
        return TeacherCache(path)
    except CacheError as e:
        raise ValueError(f"teacher: {' '.join(str(e).split())}") from None


class _CacheRows(torch.utils.data.Dataset):
    """The rows of a teacher cache as a map-style dataset: item i is ``{CACHE_ROW: i}``; the
    collator reads the rows themselves (inputs and teacher targets), a shard at a time."""

    def __init__(self, cache: TeacherCache) -> None:
        cache.check_row_counts()
        self.n = len(cache)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> dict[str, int]:
        return {CACHE_ROW: index}


class _CacheCollator:
    """A batch of cache rows: ``input_ids``, ``attention_mask`` (and ``labels`` when the cache
    keeps logits) for the student, and the cached teacher targets under ``"kd_teacher"`` (hidden
    states, Q / K, sparse logits of the masked tokens). Rows are read shard by shard in
    ascending order (the reader's order), so a batch holds the sampled rows, reordered."""

    def __init__(self, cache: TeacherCache) -> None:
        self.cache = cache
        self.starts = [0]
        for info in cache.manifest.shards:
            self.starts.append(self.starts[-1] + info.rows)

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        by_shard: dict[int, list[int]] = {}
        for feature in features:
            row = int(feature[CACHE_ROW])
            shard = bisect.bisect_right(self.starts, row) - 1
            by_shard.setdefault(shard, []).append(row - self.starts[shard])
        parts = [self.cache.read_rows(shard, torch.tensor(rows)) for shard, rows in sorted(by_shard.items())]
        batch = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
        inputs = {k: batch.pop(k) for k in ("input_ids", "attention_mask", "labels") if k in batch}
        return {**inputs, "kd_teacher": batch}


def _check_dataset_matches_cache(dataset: Any, cache: TeacherCache) -> None:
    """ValueError naming ``train_dataset`` unless its row i holds the real tokens (``input_ids``
    where ``attention_mask`` is 1) of the cache's row i, for every row."""
    if not hasattr(dataset, "__len__") or not hasattr(dataset, "__getitem__"):
        raise ValueError(f"train_dataset: a {type(dataset).__name__} cannot be matched against the cache's rows; "
                         "pass a map-style dataset with input_ids, or none (the cache's rows are the dataset)")
    if len(dataset) != len(cache):
        raise ValueError(f"train_dataset has {len(dataset)} rows, the cache {cache.dir} {len(cache)}: it must hold "
                         "the rows the cache was built from (or leave train_dataset unset)")
    row = 0
    for shard, info in enumerate(cache.manifest.shards):
        with cache.open_shard(shard) as f:
            ids, mask = f.get_tensor("input_ids").long(), f.get_tensor("attention_mask").bool()
        for r in range(info.rows):
            example = dataset[row]
            if "input_ids" not in example:
                raise ValueError(f"train_dataset row {row} has no input_ids")
            mine = torch.as_tensor(example["input_ids"]).long().reshape(-1)
            if "attention_mask" in example:
                mine = mine[torch.as_tensor(example["attention_mask"]).reshape(-1).bool()]
            theirs = ids[r][mask[r]]
            if not torch.equal(mine, theirs):
                raise ValueError(f"train_dataset row {row} does not match the cache's row {row} ({len(mine)} vs "
                                 f"{len(theirs)} real tokens, first {mine[:8].tolist()} vs {theirs[:8].tolist()}): "
                                 "the dataset must hold the cache's rows in order (as stored: MLM-masked when the "
                                 "cache keeps logits), or leave train_dataset unset")
            row += 1


class DistillationTrainer(Trainer):
    r"""``transformers.Trainer`` that trains its ``model`` (the student) to match a ``teacher``
    (a live model, or a :mod:`kdfast.cache` of its activations) through ``distillation_loss``:

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
    (:func:`load_projections`). Without a ``processing_class`` they also get the teacher's
    tokenizer (the student reads the teacher's token ids), or a warning when it cannot be found.
    Gradient accumulation is the Trainer's: the loss is a per-batch
    mean that the Trainer divides by the accumulation steps. Each training log adds
    ``kd_<term>``, the unweighted terms averaged over the micro-batches since the last log (and
    ``student_loss`` when weighted), so every ``report_to`` integration receives them.

    From a cache (``teacher`` a cache directory or a :class:`kdfast.cache.TeacherCache`) the
    teacher is never run: the training rows are the cache's rows (``input_ids``, ``attention_mask``
    and, when the cache keeps logits, its MLM ``labels``, with the masked inputs it stored), read
    with the teacher's hidden states and Q / K (cast from the cache's fp16 to the student's dtype;
    queries unscaled, as captured ones are) and fed to ``distillation_loss`` as a live teacher's
    would be. The ``logits`` term then has the cache's sparse logits of the masked tokens only:

        logits term = sparse_kd_loss(s[labels != -100], cached ids, values[, logsumexp], T)

    (:func:`kdfast.sparse_kd_loss`, top-k with its rest bucket or sampled, at the cache's
    temperature, which must equal the loss's; 0 for a batch without a masked token). A
    ``train_dataset`` given with a cache must hold the cache's rows in order (checked: the real
    tokens of every row); it is then read from the cache all the same. Each batch holds the rows
    the Trainer's sampler drew, read in cache order. ``data_collator`` and ``eval_dataset`` are
    not accepted with a cache.

    Under DDP (``torchrun``) the projections' gradients are averaged over the processes after each
    backward (they live outside the DDP module), and student outputs the loss does not use (an
    MLM head when no logit term is set) join it with weight 0, so that DDP's reducer gets a
    (zero) gradient for every parameter; with weight decay those parameters then decay, which
    they do not in one process (where their gradient is None).

    Args:
        model, args, ...: as ``transformers.Trainer`` (``compute_loss_func`` is not accepted: the
            loss is ``distillation_loss``).
        teacher: a model :func:`kdfast.capture` supports, called with the student's inputs; or a
            kdfast cache: its directory (``kdfast cache build``) or an open ``TeacherCache``.
        distillation_loss: the :class:`kdfast.DistillationLoss` to minimise.
        student_loss_weight: weight of the student's own loss; 0 (default) leaves ``labels`` out
            of the student's inputs.

    Raises:
        ValueError naming the argument: ``teacher`` / ``model`` of a class :func:`kdfast.capture`
        does not support (when the loss needs hidden states or attention), ``distillation_loss``
        not a DistillationLoss or set up for pre-scaled queries or ``output_attentions``,
        ``student_loss_weight`` negative or not finite, ``compute_loss_func`` given, an
        ``optimizers`` optimizer without the projections; at a step, ``student_loss_weight``
        with a student that returned no loss. With a live teacher, before any step
        (:func:`kdfast.integrations._checks.check_student_fits_teacher`): ``teacher`` the same
        module as ``model``, ``model`` with a smaller vocabulary than the teacher's (another one
        with a logits term) or another width than ``student_hidden_size``, a ``layer_map`` beyond
        either model's layers. With a cache: ``teacher`` not a finished cache,
        ``distillation_loss`` needing hidden states, Q / K or logits the cache does not hold (or
        attention from score maps, or another temperature than the cache's logits), projections
        to another width than the cache's teacher, ``model`` of another width (without
        projections) or vocabulary, ``train_dataset`` not the cache's rows, ``data_collator`` or
        ``eval_dataset`` given.
    """

    def __init__(self, *args: Any, teacher: nn.Module | str | os.PathLike | TeacherCache,
                 distillation_loss: DistillationLoss, student_loss_weight: float = 0.0, **kwargs: Any) -> None:
        if not isinstance(distillation_loss, DistillationLoss):
            raise ValueError(f"distillation_loss must be a kdfast.DistillationLoss, got {type(distillation_loss).__name__}")
        cache = None
        if isinstance(teacher, (str, os.PathLike, TeacherCache)):
            cache = open_teacher_cache(teacher)
        elif not isinstance(teacher, nn.Module):
            raise ValueError(f"teacher must be a torch.nn.Module, a kdfast cache directory or a TeacherCache, "
                             f"got {type(teacher).__name__}")
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
            if source == "scores" and cache is not None:
                raise ValueError("distillation_loss: attention_source='scores' needs a live teacher; a cache keeps "
                                 "Q / K: use 'qk' (or 'auto')")
            self._attention = "scores" if source == "scores" else "qk"
            if self._attention == "qk" and distillation_loss.qk_prescaled:
                raise ValueError("distillation_loss: build it with qk_prescaled=False; kdfast.capture gives "
                                 "unscaled queries")
        self._captures = self._want_hidden or self._attention is not None
        if self._captures and cache is None:
            check_supported(teacher, "teacher")
        self.teacher = None if cache is not None else teacher
        self.teacher_cache = cache
        # the cached teacher's hidden states, Q / K (split into heads) and sparse logits, as the recipes read them
        self._cached_teacher = CachedTeacher.for_cache(cache) if cache is not None else None
        self.distillation_loss = distillation_loss
        self.student_loss_weight = weight
        self._term_sums: dict[str, Tensor] = {}
        self._term_count = 0
        self._dense_loss = None
        if cache is not None:
            self._check_cache_holds_the_terms(cache, distillation_loss)
            args, kwargs = (), self._cache_data(cache, args, kwargs)
            # the terms other than the logits, whose cached form (sparse, masked rows) is computed here;
            # a shallow copy: it shares distillation_loss's projections
            if distillation_loss.weights.keys() - {"logits"}:
                self._dense_loss = copy.copy(distillation_loss)
                self._dense_loss.weights = {k: v for k, v in distillation_loss.weights.items() if k != "logits"}
        super().__init__(*args, **kwargs)
        if self._captures:
            check_supported(self.accelerator.unwrap_model(self.model), "model")
        if cache is not None:
            self._check_student_fits_cache(cache, self.accelerator.unwrap_model(self.model))
        else:
            check_student_fits_teacher(teacher, self.accelerator.unwrap_model(self.model), distillation_loss,
                                       hidden=self._want_hidden, layers=self._captures)
        self.loss_is_scaled_for_ga = False  # a per-batch mean: the Trainer divides it by the accumulation steps
        if cache is None:
            teacher.requires_grad_(False)
            self.teacher = teacher.to(self.args.device).eval()
            accepted = inspect.signature(teacher.forward).parameters
            self._teacher_keys = tuple(k for k in _TEACHER_INPUTS if k in accepted)
        self.distillation_loss.to(self.args.device)
        self.add_callback(_ZeroLossGradients(self.distillation_loss))

    # --- a cache as the teacher ------------------------------------------------------------------

    def _check_cache_holds_the_terms(self, cache: TeacherCache, loss: DistillationLoss) -> None:
        """ValueError naming ``distillation_loss`` for a term the cache cannot feed."""
        s, where = cache.settings, f"the cache {cache.dir}"
        width = s["teacher"]["hidden_size"]
        if self._want_hidden:
            held = set(s["hidden"]["layers"]) if s["hidden"] else set()
            missing = sorted(set(loss.layer_map.values()) - held)
            if missing:
                raise ValueError(f"distillation_loss: its layer_map needs the teacher's hidden states {missing}, "
                                 f"which {where} does not hold (it holds {sorted(held)}); rebuild it with those "
                                 "--layers or map other layers")
            for m, projection in loss.projections.items():
                if projection.out_features != width:
                    raise ValueError(f"distillation_loss: its projection of student state {m} maps to width "
                                     f"{projection.out_features}, but the teacher of {where} has hidden size {width}")
        if self._attention is not None:
            held = set(s["qk"]["layers"]) if s["qk"] else set()
            missing = sorted({g for m, g in loss.layer_map.items() if m >= 1 and g >= 1} - held)
            if missing:
                raise ValueError(f"distillation_loss: its attention term needs the teacher's Q / K of layers "
                                 f"{missing}, which {where} does not hold (build it with --qk)")
        if "logits" in loss.weights:
            logits = s["logits"]
            if logits["mode"] == "none":
                raise ValueError(f"distillation_loss: its logits term needs the teacher's logits, and {where} keeps "
                                 "none (built with --logits none)")
            if logits["mode"] != "head" and loss.temperature != logits["temperature"]:
                raise ValueError(f"distillation_loss: temperature {loss.temperature} differs from the "
                                 f"{logits['temperature']} {where} stored its {logits['mode']} logits at; build the "
                                 "loss (or the cache) with the other")

    def _check_student_fits_cache(self, cache: TeacherCache, model: nn.Module) -> None:
        """ValueError naming ``model`` for a student of another width (without projections) or vocabulary."""
        config, teacher = getattr(model, "config", None), cache.settings["teacher"]
        width, vocab = getattr(config, "hidden_size", None), getattr(config, "vocab_size", None)
        if self._want_hidden and not self.distillation_loss.projections and width not in (None, teacher["hidden_size"]):
            raise ValueError(f"model: its hidden size {width} differs from the cache's teacher's "
                             f"{teacher['hidden_size']} and distillation_loss has no projections (build it with "
                             "student_hidden_size and teacher_hidden_size)")
        if "logits" in self.distillation_loss.weights and vocab not in (None, teacher["vocab_size"]):
            raise ValueError(f"model: its vocabulary of {vocab} differs from the cache's teacher's "
                             f"{teacher['vocab_size']}; the logits term compares the two")

    def _cache_data(self, cache: TeacherCache, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
        """The Trainer's arguments (all as keywords) with the cache's rows as the training data."""
        given = inspect.signature(Trainer.__init__).bind(None, *args, **kwargs).arguments
        given.pop(next(iter(given)))  # self
        if given.get("data_collator") is not None:
            raise ValueError("data_collator: with a cache as the teacher, DistillationTrainer collates the cache's "
                             "rows itself; leave data_collator unset")
        if given.get("eval_dataset") is not None:
            raise ValueError("eval_dataset: evaluation against a cache teacher is not supported; evaluate with a "
                             "live teacher (or leave eval_dataset unset)")
        if given.get("train_dataset") is not None:
            _check_dataset_matches_cache(given["train_dataset"], cache)
        return {**given, "train_dataset": _CacheRows(cache), "data_collator": _CacheCollator(cache)}

    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()
        if self.teacher_cache is not None and CACHE_ROW not in self._signature_columns:
            self._signature_columns.append(CACHE_ROW)  # the Trainer would drop the row index as an unused column

    def _sparse_logit_term(self, logits: Tensor | None, cached: dict[str, Tensor], labels: Tensor) -> Tensor:
        """:func:`kdfast.sparse_kd_loss` of the masked rows' student logits against the cached sparse teacher."""
        if logits is None:
            raise ValueError("model: the logits term needs a student that returns logits (a masked-LM head)")
        masked = labels != -100
        if not bool(masked.any()):
            return logits.sum() * 0.0  # no masked token in this batch: nothing to distil, zero gradients
        settings = self.teacher_cache.settings["logits"]
        if settings["mode"] == "topk":
            return sparse_kd_loss(logits[masked], cached["topk_ids"], cached["topk_values"], mode="topk",
                                  teacher_logsumexp=cached["topk_lse"], temperature=self.distillation_loss.temperature,
                                  backend=self.distillation_loss.backend)
        return sparse_kd_loss(logits[masked], cached["sampled_ids"], cached["sampled_counts"], mode="sampled",
                              temperature=self.distillation_loss.temperature, backend=self.distillation_loss.backend)

    def _cached_loss(self, student: dict[str, Any], cached: dict[str, Tensor], labels: Tensor | None,
                     mask: Tensor | None) -> tuple[Tensor, dict[str, Tensor]]:
        """``distillation_loss`` against the cached teacher: its dense terms through the loss
        itself, the logits term from the sparse logits."""
        if self.teacher_cache.settings["logits"]["mode"] == "head":  # exact: the live loss on the rebuilt logits
            t_out = self._cached_teacher(cached)
            weight, bias = (x if x is None else x.to(t_out.head_input.device, torch.float32)
                            for x in self.teacher_cache.head_projection())
            t_out.logits = torch.nn.functional.linear(t_out.head_input.float(), weight, bias)
            return self.distillation_loss(student, t_out, mask)
        loss, terms = self._dense_loss(student, self._cached_teacher(cached), mask) if self._dense_loss else (None, {})
        if "logits" in self.distillation_loss.weights:
            kd = self._sparse_logit_term(student.get("logits"), cached, labels)
            weighted = self.distillation_loss.weights["logits"] * kd
            loss = weighted if loss is None else loss + weighted
            terms["logits"] = kd.detach()
        return loss, terms

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
        cached = inputs.pop("kd_teacher", None)
        if cached is None and self.teacher is None:
            raise ValueError("inputs: a batch without the cache's teacher targets; with a cache as the teacher "
                             "every batch must come from the cache (evaluate with a live teacher)")
        if cached is None:
            teacher_inputs = {k: inputs[k] for k in self._teacher_keys if k in inputs}
            with torch.no_grad(), self._capture(self.teacher) as cap_t:
                out_t = self.teacher(**teacher_inputs)
        student_inputs = inputs if labels is None or not self.student_loss_weight else {**inputs, "labels": labels}
        with self._capture(self.accelerator.unwrap_model(model)) as cap_s:
            out_s = model(**student_inputs)
        if cached is None:
            loss, terms = self.distillation_loss(self._outputs(cap_s, out_s), self._outputs(cap_t, out_t),
                                                 inputs.get("attention_mask"))
        else:
            loss, terms = self._cached_loss(self._outputs(cap_s, out_s), cached, labels, inputs.get("attention_mask"))
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

    def _save_tokenizer(self, directory: str) -> None:
        """Save the teacher's tokenizer beside the student when the Trainer saved none (no
        ``processing_class`` and no collator tokenizer): the student reads the teacher's token ids."""
        if self.processing_class is None and getattr(self.data_collator, "tokenizer", None) is None:
            save_teacher_tokenizer(directory, self.teacher if self.teacher_cache is None else self.teacher_cache)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        super()._save(output_dir, state_dict)
        directory = output_dir if output_dir is not None else self.args.output_dir
        if self.args.should_save:
            self._save_tokenizer(directory)
        own = self.distillation_loss.state_dict()
        if self.args.should_save and own:
            from safetensors.torch import save_file

            save_file({k: v.detach().contiguous().cpu() for k, v in own.items()},
                      os.path.join(directory, PROJECTIONS_FILE), metadata={"format": "pt"})

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        if self.distillation_loss.state_dict():
            load_projections(self.distillation_loss, resume_from_checkpoint)
