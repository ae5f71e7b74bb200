"""What kdfast needs to know about ``transformers``' ModernBERT: its per-layer attention geometry
(global, or a sliding window) and whether the installed ``transformers`` lays the model out the
way kdfast reads it.

ModernBERT alternates global and local attention layers (``config.layer_types``: ``"full_attention"``
or ``"sliding_attention"``; older configurations give ``global_attn_every_n_layers``, layer ``i``
global when ``i % n == 0``). ``config.local_attention`` is the *full* width of a local layer's
window; its mask lets query ``i`` see key ``j`` when ``|i - j| <= w`` with the half-width
``w = local_attention // 2`` (``config.sliding_window``): that ``w`` is what kdfast calls a layer's
window everywhere (``kdfast.capture``'s ``windows``, the attention-transfer ops' ``window=``).

Supported layout (``transformers`` 5.1 and later): ModernBERT works on padded ``[B, L]`` tensors,
each ``ModernBertAttention`` projects with one fused ``Wqkv`` and applies the rotary embedding in
its ``forward`` from the ``position_embeddings`` it receives. ``transformers`` 4.48 to 5.0 unpadded
the batch inside the model and rotated inside a separate module: refused with
:class:`UnsupportedModernBert`.
"""

from __future__ import annotations

import inspect
import sys

from torch import nn

__all__ = ["UnsupportedModernBert", "attention_windows", "check_layout", "is_modernbert", "layer_types"]

#: the attention type names of ``config.layer_types``
GLOBAL, LOCAL = "full_attention", "sliding_attention"


class UnsupportedModernBert(ValueError):
    """The installed ``transformers`` lays ModernBERT out in a way kdfast does not read."""


def is_modernbert(model_or_config) -> bool:
    """True for a ModernBERT model (any head) or configuration."""
    config = getattr(model_or_config, "config", model_or_config)
    return getattr(config, "model_type", None) == "modernbert"


def layer_types(config) -> tuple[str, ...]:
    """Each layer's attention type, ``"full_attention"`` or ``"sliding_attention"``, as the model
    builds it: ``config.layer_types``, or, for a configuration that has none, layer ``i`` global
    when ``i % global_attn_every_n_layers == 0``."""
    types = getattr(config, "layer_types", None)
    if types is None:
        every = getattr(config, "global_attn_every_n_layers", 3)
        types = [GLOBAL if i % every == 0 else LOCAL for i in range(config.num_hidden_layers)]
    return tuple(types)


def attention_windows(model_or_config) -> tuple[int | None, ...]:
    """Per layer: ``None`` for a global layer, else the half-width ``w = local_attention // 2`` of
    its band ``|i - j| <= w`` (query ``i`` sees key ``j``). Every layer of a model that is not a
    ModernBERT is global."""
    config = getattr(model_or_config, "config", model_or_config)
    if not is_modernbert(config):
        return (None,) * int(getattr(config, "num_hidden_layers", getattr(config, "n_layers", 0)))
    w = int(config.local_attention) // 2
    return tuple(None if t == GLOBAL else w for t in layer_types(config))


def check_layout(model: nn.Module, argument: str = "model") -> None:
    """Raise :class:`UnsupportedModernBert` (naming ``argument`` and the installed ``transformers``)
    unless ``model``'s ModernBERT has the layout kdfast reads (see the module docstring)."""
    import transformers

    base = getattr(model, "base_model", model)
    layers = getattr(base, "layers", None)
    ok = isinstance(layers, nn.ModuleList) and len(layers) > 0
    if ok:
        attn = getattr(layers[0], "attn", None)
        module = sys.modules.get(type(attn).__module__) if attn is not None else None
        ok = (isinstance(getattr(attn, "Wqkv", None), nn.Linear)
              and "position_embeddings" in inspect.signature(attn.forward).parameters
              and callable(getattr(module, "apply_rotary_pos_emb", None))
              and getattr(model.config, "layer_types", None) is not None
              and isinstance(getattr(base, "final_norm", None), nn.Module))
    if not ok:
        raise UnsupportedModernBert(
            f"{argument}: this {type(model).__name__} comes from transformers {transformers.__version__}, whose "
            "ModernBERT layout kdfast does not read (it supports transformers >= 5.1: padded attention with the "
            "rotary embedding applied in ModernBertAttention.forward); upgrade transformers")


def rotary(attn: nn.Module):
    """The rotary function the attention module's own ``forward`` calls (``apply_rotary_pos_emb`` of
    its ``transformers`` module), so that a capture rotates exactly as the model does."""
    return sys.modules[type(attn).__module__].apply_rotary_pos_emb
