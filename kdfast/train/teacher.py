r"""One way to get teacher outputs: a live teacher, the teacher cache, or any supported model's
forward read with :func:`kdfast.capture`, all handed on in one shape, :class:`CapturedOutputs`.

Every driver (the three recipes, task distillation, the demo) reads its teacher through a
:class:`TeacherSource`: ``source(batch, inputs) -> CapturedOutputs``, where ``batch`` is what the
Distiller's data source gave (a cache batch holds the teacher's stored outputs) and ``inputs`` the
model inputs the student sees (a live teacher runs on them):

- :class:`LiveTeacher`: the frozen teacher run under ``torch.no_grad()`` inside
  :func:`kdfast.capture` (SDPA attention, no ``output_attentions`` slow path);
- :class:`CachedTeacher`: the teacher cache's ``hidden_<l>``, ``q_<l>`` / ``k_<l>`` and sparse
  logits, read from the batch.

:func:`capture_outputs` gives a student's outputs in the same shape (nothing detached), so that
:class:`kdfast.DistillationLoss` reads both sides alike.

The Q/K convention, one for the whole package: ``q`` and ``k`` are ``[B, H, L, d_head]`` per
layer, the projections split into heads, **unscaled** (``q_i = h W_q^T + b_q``), as
:func:`kdfast.capture` gives them and as the cache stores them (``q_<l>``: ``[N, L, H d_head]``,
the raw projection, since format version 1). The ``1 / sqrt(d_head)`` of the attention scores
``q k^T / sqrt(d_head)`` is applied in one place, by :func:`kdfast.flash_attention_transfer`'s
default ``scale_s`` / ``scale_t``: build :class:`kdfast.DistillationLoss` with
``qk_prescaled=False`` (:data:`QK_PRESCALED`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor, nn

__all__ = ["QK_PRESCALED", "CachedTeacher", "CapturedOutputs", "LiveTeacher", "TeacherSource", "capture_outputs",
           "model_inputs"]

#: what :class:`kdfast.DistillationLoss` must be told about the queries every source here gives
QK_PRESCALED = False


@dataclass
class CapturedOutputs:
    """One forward's outputs as :class:`kdfast.DistillationLoss` and the recipes read them.

    ``hidden_states``: ``num_layers + 1`` tensors ``[B, L, d]`` (index 0 the embedding output;
    None where a cache did not keep that layer); ``q`` / ``k``: per layer ``[B, H, L, d_head]``,
    unscaled (module docstring), or None when not asked for; ``logits``: the model's head output
    when it has one; ``sparse_logits``: from a cache built with logits, ``(ids, values,
    logsumexp)`` (top-k) or ``(ids, counts)`` (sampled) of the masked tokens in row-major order,
    what :func:`kdfast.fused_linear_kd_loss` takes as ``teacher_sparse``."""

    hidden_states: tuple[Tensor | None, ...] | None = None
    q: tuple[Tensor, ...] | None = None
    k: tuple[Tensor, ...] | None = None
    logits: Tensor | None = None
    sparse_logits: tuple[Tensor, ...] | None = None
    head_input: Tensor | None = None  # a ``logits: head`` cache's: the input of the teacher's output projection


def model_inputs(batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The inputs a BERT-style model takes from a batch: ``input_ids`` and ``attention_mask``."""
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


def capture_outputs(model: nn.Module, inputs: Mapping[str, Tensor], *, qk: bool = False,
                    hidden_states: bool = True) -> CapturedOutputs:
    """Run ``model(**inputs)`` inside :func:`kdfast.capture` and return its hidden states (equal to
    ``output_hidden_states=True``), unscaled per-layer ``q`` / ``k`` when ``qk``, and its
    ``logits`` when it has a head. Nothing is detached: a student's outputs train it. ValueError
    naming ``model`` for a class :func:`kdfast.capture` does not support."""
    from kdfast.capture import capture

    if not (hidden_states or qk):
        out = model(**inputs)
        return CapturedOutputs(logits=getattr(out, "logits", None))
    with capture(model, hidden_states=hidden_states, qk=qk) as cap:
        out = model(**inputs)
    return CapturedOutputs(hidden_states=cap.hidden_states if hidden_states else None,
                           q=cap.q if qk else None, k=cap.k if qk else None, logits=getattr(out, "logits", None))


class TeacherSource(Protocol):
    """``source(batch, inputs=None) -> CapturedOutputs``: the teacher's outputs for one batch;
    ``inputs`` (default :func:`model_inputs` of the batch) are what the student runs on, e.g. the
    MLM-masked ids of a live batch."""

    def __call__(self, batch: Mapping[str, Tensor],
                 inputs: Mapping[str, Tensor] | None = None) -> CapturedOutputs: ...


class LiveTeacher(nn.Module):
    """A frozen teacher run on each batch under ``torch.no_grad()``, read by :func:`capture_outputs`
    (hidden states, and unscaled ``q`` / ``k`` when ``qk``; ``logits`` when the model has a
    head: pass the encoder alone, e.g. ``teacher.bert``, when they are not needed). A module
    holding the teacher, so that ``.to(device)`` moves it (as the end-to-end bench does with the
    modules a step loss holds).

    Raises ValueError naming ``teacher`` at construction for a model class
    :func:`kdfast.capture` does not support (when anything is to be captured)."""

    def __init__(self, teacher: nn.Module, *, qk: bool = False, hidden_states: bool = True) -> None:
        from kdfast.capture import _layers, _unwrap

        if not isinstance(teacher, nn.Module):
            raise ValueError(f"teacher must be a torch.nn.Module, got {type(teacher).__name__}")
        if qk or hidden_states:
            _layers(_unwrap(teacher), "teacher")
        super().__init__()
        self.model, self.qk, self.hidden_states = teacher, bool(qk), bool(hidden_states)

    def forward(self, batch: Mapping[str, Tensor], inputs: Mapping[str, Tensor] | None = None) -> CapturedOutputs:
        with torch.no_grad():
            return capture_outputs(self.model, inputs if inputs is not None else model_inputs(batch), qk=self.qk,
                                   hidden_states=self.hidden_states)


class CachedTeacher:
    """Teacher outputs read from teacher-cache batches (:class:`kdfast.train.CachedBatches`,
    :class:`kdfast.cache.CacheDataset`): ``hidden_<l>`` as ``hidden_states[l]`` (None for layers
    the cache did not keep), with ``num_heads`` given ``q_<l>`` / ``k_<l>`` ``[B, L, H d_head]``
    split into heads as ``q[l - 1]`` / ``k[l - 1]`` (unscaled, as stored; without it they are not
    read), and the sparse logits. Tensors stay as the batch holds them (the cache stores fp16; the
    losses cast a teacher tensor to the student's dtype), or are cast to ``dtype`` when given.
    ``inputs`` is ignored: the cache batch holds the inputs the teacher saw, which the student
    must run on."""

    def __init__(self, num_layers: int, num_heads: int | None = None, *, dtype: torch.dtype | None = None) -> None:
        for name, value in (("num_layers", num_layers), ("num_heads", num_heads)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        self.num_layers, self.num_heads, self.dtype = num_layers, num_heads, dtype

    @classmethod
    def for_cache(cls, cache, *, dtype: torch.dtype | None = None) -> CachedTeacher:
        """The source for batches of ``cache`` (a :class:`kdfast.cache.TeacherCache`): layer and head
        counts from its manifest."""
        teacher = cache.manifest.settings["teacher"]
        return cls(teacher["num_hidden_layers"], teacher["num_attention_heads"], dtype=dtype)

    def _cast(self, x: Tensor) -> Tensor:
        return x if self.dtype is None else x.to(self.dtype)

    def _heads(self, x: Tensor, name: str) -> Tensor:
        b, length, width = x.shape
        if width % self.num_heads:
            raise ValueError(f"batch {name} is {width} wide: num_heads ({self.num_heads}) must divide it")
        return self._cast(x).view(b, length, self.num_heads, width // self.num_heads).transpose(1, 2)

    def __call__(self, batch: Mapping[str, Tensor], inputs: Mapping[str, Tensor] | None = None) -> CapturedOutputs:
        hidden = tuple(self._cast(batch[f"hidden_{l}"]) if f"hidden_{l}" in batch else None
                       for l in range(self.num_layers + 1))
        out = CapturedOutputs(hidden_states=hidden)
        if self.num_heads is not None and "q_1" in batch:
            layers = range(1, self.num_layers + 1)
            out.q = tuple(self._heads(batch[f"q_{l}"], f"q_{l}") for l in layers)
            out.k = tuple(self._heads(batch[f"k_{l}"], f"k_{l}") for l in layers)
        if "topk_ids" in batch:
            out.sparse_logits = (batch["topk_ids"], batch["topk_values"], batch["topk_lse"])
        elif "sampled_ids" in batch:
            out.sparse_logits = (batch["sampled_ids"], batch["sampled_counts"])
        if "head_input" in batch:
            out.head_input = self._cast(batch["head_input"])
        return out
