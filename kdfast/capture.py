r"""One public way to read hidden states, queries / keys and attention scores out of a model.

    with kdfast.capture(teacher, qk=True) as cap_t, torch.no_grad():
        teacher(input_ids=ids, attention_mask=mask)
    with kdfast.capture(student, qk=True) as cap_s:
        student(input_ids=ids, attention_mask=mask)
    loss = sum(kdfast.flash_attention_transfer(qs, ks, qt, kt, key_mask=mask)
               for qs, ks, qt, kt in zip(cap_s.q, cap_s.k, cap_t.q[1::2], cap_t.k[1::2]))

The model runs its own forward, on whatever attention it is configured with (SDPA by default in
``transformers``): the capture listens with forward hooks on each layer and on the query / key
projections, so nothing forces the ``output_attentions`` slow path, and nothing is detached (a
student's captured tensors train it).

Conventions (the same for every supported model):

- ``hidden_states``: ``num_layers + 1`` tensors ``[B, L, d]``, the first layer's input (the
  embedding output) first, then every layer's output: what ``output_hidden_states=True`` returns.
- ``q``, ``k``: one ``[B, H, L, d_head]`` tensor per layer, the projections split into heads,
  **unscaled** (no ``1 / sqrt(d_head)`` folded in), which is what
  :func:`kdfast.flash_attention_transfer` takes with its default ``scale_s`` / ``scale_t``.
  The attention scores are ``q @ k.transpose(-1, -2) / sqrt(d_head) + additive_mask``.
  The teacher cache stores the same unscaled projections (``q_<l>``, ``k_<l>``) and
  :mod:`kdfast.train.teacher` hands them on unscaled; only ``KDMobileBert(capture=("qk",))``,
  the model's own capture, pre-scales its queries.
- ``scores`` (only with ``scores=True``; ``L x L`` per head, so it costs what
  ``output_attentions`` costs): one ``[B, H, L, L]`` tensor per layer,
  ``q k^T / sqrt(d_head) + m``, the pre-softmax scores of the eager attention path, where ``m``
  is the additive form of the mask the layer received: 0 where a key is attended and
  ``torch.finfo(dtype).min`` where it is masked (padding), as ``transformers``' eager attention
  adds it; softmax over the last axis gives ``output_attentions``. With no mask (no padding),
  ``m = 0``.

Each forward pass inside the block replaces what the previous one captured (the first layer
starting marks a new pass); the captured tensors stay readable after the block.

``kdfast.capture`` is the function (the package attribute shadows this module's name): take
other names with ``from kdfast.capture import Captured``, not ``import kdfast.capture as m``.
"""

from __future__ import annotations

import inspect
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch import Tensor, nn

__all__ = ["Captured", "SUPPORTED_MODELS", "capture", "check_supported"]

SUPPORTED_MODELS = ("transformers BERT, RoBERTa, DistilBERT and MobileBERT models (any head), "
                    "kdfast.models.KDMobileBert / KDMobileBertForMaskedLM")


@dataclass
class _Layer:
    """Where one transformer layer's pieces live, and its attention geometry."""

    block: nn.Module  # input of the first / output of each gives the hidden states
    attention: nn.Module  # self-attention: receives the mask
    query: nn.Module | None  # Linear giving q [B, L, H * d_head]; None for KDMobileBert (see _Hooks)
    key: nn.Module | None
    heads: int
    head_dim: int
    scale: float


def _unwrap(model: nn.Module) -> nn.Module:
    # DDP keeps the real model in .module; hooks belong on it
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return model.module
    return model


def _layers(model: nn.Module, argument: str = "model") -> tuple[list[_Layer], bool]:
    """The layers of a supported model, and whether it is a kdfast MobileBERT (captured through
    its ``attend`` method, because its fused kernels may skip the query / key modules). An
    unsupported class raises ValueError naming ``argument``."""
    from kdfast.models.mobilebert import KDMobileBert, KDMobileBertForMaskedLM

    if isinstance(model, (KDMobileBert, KDMobileBertForMaskedLM)):
        base = model.mobilebert if isinstance(model, KDMobileBertForMaskedLM) else model
        layers = [_Layer(blk, blk.attention.self, None, None, blk.attention.self.num_heads,
                         blk.attention.self.head_dim, blk.attention.self.scale) for blk in base.encoder.layer]
        return layers, True

    try:
        from transformers.models.bert.modeling_bert import BertPreTrainedModel
        from transformers.models.distilbert.modeling_distilbert import DistilBertPreTrainedModel
        from transformers.models.mobilebert.modeling_mobilebert import MobileBertPreTrainedModel
        from transformers.models.roberta.modeling_roberta import RobertaPreTrainedModel
    except ImportError:  # no transformers: only kdfast's own models can be captured
        hf: tuple = ()
        distil: tuple = ()
    else:
        hf = (BertPreTrainedModel, RobertaPreTrainedModel, MobileBertPreTrainedModel)
        distil = (DistilBertPreTrainedModel,)

    if hf and isinstance(model, hf):
        layers = []
        for blk in model.base_model.encoder.layer:
            sa = blk.attention.self
            layers.append(_Layer(blk, sa, sa.query, sa.key, sa.num_attention_heads, sa.attention_head_size,
                                 sa.scaling))
        return layers, False
    if distil and isinstance(model, distil):
        layers = []
        for blk in model.base_model.transformer.layer:
            sa = blk.attention
            layers.append(_Layer(blk, sa, sa.q_lin, sa.k_lin, sa.n_heads, sa.attention_head_size, sa.scaling))
        return layers, False
    raise ValueError(f"{argument}: kdfast.capture does not support {type(model).__name__}; "
                     f"it supports {SUPPORTED_MODELS}")


def _additive(mask: object, dtype: torch.dtype, where: str) -> Tensor | None:
    """The layer's mask as eager attention adds it: 0 keep, finfo(dtype).min drop."""
    from kdfast.models.mobilebert import additive_mask

    if mask is None:
        return None
    if not isinstance(mask, Tensor):
        raise ValueError(f"scores: {where} received a {type(mask).__name__} attention mask; scores=True needs a "
                         "tensor mask (use attn_implementation='sdpa' or 'eager')")
    return additive_mask(mask, dtype)


class Captured:
    """What :func:`capture` recorded in the latest forward pass (see the module docstring for
    the conventions). Fields that were not asked for raise ``ValueError`` naming the argument
    to set; reading before a complete forward pass raises ``RuntimeError``."""

    def __init__(self, model_name: str, n_layers: int, hidden_states: bool, qk: bool, scores: bool) -> None:
        self._model_name = model_name
        self._n_layers = n_layers
        self._want = {"hidden_states": hidden_states, "qk": qk, "scores": scores}
        self._passes = 0
        self._reset()

    def _reset(self) -> None:
        n = self._n_layers
        self._hidden: list[Tensor | None] = [None] * (n + 1)
        self._q: list[Tensor | None] = [None] * n
        self._k: list[Tensor | None] = [None] * n
        self._mask: list[object] = [None] * n
        self._scores: list[Tensor | None] = [None] * n

    @property
    def num_layers(self) -> int:
        """Number of transformer layers of the captured model."""
        return self._n_layers

    def _field(self, values: list, flag: str, name: str) -> tuple[Tensor, ...]:
        if not self._want[flag]:
            raise ValueError(f"{name} was not captured: pass {flag}=True to kdfast.capture")
        if self._passes == 0:
            raise RuntimeError(f"{name}: no forward pass of {self._model_name} has run inside kdfast.capture yet")
        missing = [i for i, v in enumerate(values) if v is None]
        if missing:
            raise RuntimeError(f"{name}: the latest forward pass of {self._model_name} did not complete "
                               f"(nothing captured for index {missing[0]} of {len(values)})")
        return tuple(values)

    @property
    def hidden_states(self) -> tuple[Tensor, ...]:
        """``num_layers + 1`` tensors ``[B, L, d]``: embedding output, then each layer's output."""
        return self._field(self._hidden, "hidden_states", "hidden_states")

    @property
    def q(self) -> tuple[Tensor, ...]:
        """Per layer ``[B, H, L, d_head]`` queries, unscaled."""
        return self._field(self._q, "qk", "q")

    @property
    def k(self) -> tuple[Tensor, ...]:
        """Per layer ``[B, H, L, d_head]`` keys."""
        return self._field(self._k, "qk", "k")

    @property
    def scores(self) -> tuple[Tensor, ...]:
        """Per layer ``[B, H, L, L]`` pre-softmax scores ``q k^T / sqrt(d_head) + additive mask``."""
        return self._field(self._scores, "scores", "scores")


def _heads(x: Tensor, heads: int, head_dim: int) -> Tensor:
    b, length, _ = x.shape
    return x.view(b, length, heads, head_dim).transpose(1, 2)


def _check_flag(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return value


@contextmanager
def capture(model: nn.Module, *, hidden_states: bool = True, qk: bool = False,
            scores: bool = False, num_layers: int | None = None) -> Iterator[Captured]:
    r"""Record a model's hidden states, per-layer queries / keys and pre-softmax attention scores
    while it runs inside the ``with`` block, under any attention implementation (SDPA included).

    Yields a :class:`Captured` with, after a forward pass,

    - ``.hidden_states``: ``(h_0, ..., h_N)``, ``h_0`` the embedding output and ``h_i`` layer
      ``i``'s output, each ``[B, L, d]`` (equal to ``output_hidden_states=True``);
    - ``.q``, ``.k`` (``qk=True``): per layer ``q_i = h_{i-1}' W_q^T + b_q`` and
      ``k_i = h_{i-1}' W_k^T + b_k`` split into heads, ``[B, H, L, d_head]``, **unscaled**
      (``h'`` is the attention's input: ``h`` itself, or MobileBERT's bottleneck of it);
    - ``.scores`` (``scores=True``): per layer ``s_i = q_i k_i^T / sqrt(d_head) + m``,
      ``[B, H, L, L]``, with ``m`` the layer's mask in additive form (0 attended,
      ``finfo(dtype).min`` masked; absent when the model got no mask), the pre-softmax scores of
      eager attention: ``softmax(s_i, -1)`` is ``output_attentions``.

    Every tensor stays in the autograd graph (a loss on a student's ``q`` trains the student);
    run a teacher under ``torch.no_grad()`` as usual. Each forward pass replaces the previous
    one's tensors. With gradient checkpointing, the recomputation in backward passes through the
    hooks again: read what you need before ``backward``. All hooks are removed when the block
    exits, also on an exception.

    Args:
        model: a ``transformers`` BERT, RoBERTa, DistilBERT or MobileBERT (base model or any head,
            also wrapped in DistributedDataParallel), or ``kdfast.models.KDMobileBert`` /
            ``KDMobileBertForMaskedLM`` (fused kernels or not).
        hidden_states, qk, scores: what to record.
        num_layers: record only the first ``num_layers`` transformer layers (default: all), for a
            forward that stops early, e.g. MobileBERT's progressive transfer, which trains layer
            ``l`` on a pass through layers ``1..l`` only; the fields then hold those layers
            (``hidden_states``: ``num_layers + 1`` tensors).

    Raises:
        ValueError naming ``model`` for any other model class, or the flag that is not a bool,
        ``num_layers`` outside ``[1, the model's layer count]``, or when nothing is asked for.
    """
    hidden_states = _check_flag("hidden_states", hidden_states)
    qk = _check_flag("qk", qk)
    scores = _check_flag("scores", scores)
    if not (hidden_states or qk or scores):
        raise ValueError("hidden_states, qk and scores are all False: nothing to capture")
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    inner = _unwrap(model)
    layers, kd_mobilebert = _layers(inner)
    name = type(inner).__name__
    if num_layers is not None:
        if isinstance(num_layers, bool) or not isinstance(num_layers, int) or not 1 <= num_layers <= len(layers):
            raise ValueError(f"num_layers must be an int in [1, {len(layers)}] ({name} has {len(layers)} layers), "
                             f"got {num_layers!r}")
        layers = layers[:num_layers]
    if scores and any(getattr(spec.attention, "is_causal", False) for spec in layers):
        # SDPA may get no mask and apply causality itself: the scores here would miss it
        raise ValueError(f"scores: {name} is configured as a causal decoder (is_decoder=True); "
                         "kdfast.capture(scores=True) supports bidirectional encoders only")
    cap = Captured(name, len(layers), hidden_states, qk, scores)
    want_qk = qk or scores
    removers: list[Callable[[], None]] = []

    def on_first_layer(module, args, kwargs):
        cap._reset()
        cap._passes += 1
        if hidden_states:
            cap._hidden[0] = args[0] if args else kwargs["hidden_states"]

    def on_layer_output(i):
        def hook(module, args, output):
            cap._hidden[i + 1] = output[0] if isinstance(output, tuple) else output
        return hook

    def record_qk(i, spec: _Layer, q: Tensor, k: Tensor, mask: object) -> None:
        qh, kh = _heads(q, spec.heads, spec.head_dim), _heads(k, spec.heads, spec.head_dim)
        cap._q[i], cap._k[i] = qh, kh
        if scores:
            s = torch.matmul(qh, kh.transpose(-1, -2)) * spec.scale
            m = _additive(mask, s.dtype, f"layer {i} of {name}")
            cap._scores[i] = s if m is None else s + m

    try:
        removers.append(layers[0].block.register_forward_pre_hook(on_first_layer, with_kwargs=True).remove)
        if hidden_states:
            for i, spec in enumerate(layers):
                removers.append(spec.block.register_forward_hook(on_layer_output(i)).remove)
        if want_qk and kd_mobilebert:
            # its attention_inputs kernel may compute q / k in one fused GEMM without calling
            # sa.query / sa.key; attend() always receives them, unscaled
            for i, spec in enumerate(layers):
                removers.append(_wrap_attend(spec.attention, lambda q, k, mask, i=i, spec=spec: record_qk(i, spec, q, k, mask)))
        elif want_qk:
            for i, spec in enumerate(layers):
                removers.extend(_hook_projections(spec, lambda q, k, mask, i=i, spec=spec: record_qk(i, spec, q, k, mask)))
        yield cap
    finally:
        for remove in reversed(removers):
            remove()


def _wrap_attend(sa: nn.Module, on_qk: Callable[[Tensor, Tensor, object], None]) -> Callable[[], None]:
    """Shadow a kdfast MobileBERT SelfAttention's ``attend`` with one that reports q, k and the
    mask first; returns the function that restores the previous one."""
    had_own = "attend" in sa.__dict__
    previous = sa.attend

    def attend(q, k, v, mask, want_maps, want_qk):
        on_qk(q, k, mask)
        return previous(q, k, v, mask, want_maps, want_qk)

    sa.attend = attend

    def restore() -> None:
        if had_own:
            sa.attend = previous
        else:
            del sa.attend

    return restore


def _hook_projections(spec: _Layer, on_qk: Callable[[Tensor, Tensor, object], None]) -> list[Callable[[], None]]:
    """Hooks on a transformers attention module (its mask argument) and its query / key Linears."""
    signature = inspect.signature(spec.attention.forward)
    seen: dict[str, object] = {}

    def on_attention(module, args, kwargs):
        seen.clear()
        seen["mask"] = signature.bind_partial(*args, **kwargs).arguments.get("attention_mask")

    def on_query(module, args, output):
        seen["q"] = output

    def on_key(module, args, output):
        # the key projection runs after the query's in every supported model
        on_qk(seen.pop("q"), output, seen.get("mask"))

    return [spec.attention.register_forward_pre_hook(on_attention, with_kwargs=True).remove,
            spec.query.register_forward_hook(on_query).remove,
            spec.key.register_forward_hook(on_key).remove]


def check_supported(model: nn.Module, argument: str = "model") -> None:
    """Return quietly when :func:`capture` supports ``model`` (wrapped in DistributedDataParallel or
    not), else raise the ValueError that names ``argument`` and the supported classes."""
    _layers(_unwrap(model), argument)
