"""The teacher's output projection, split for the exact-logits cache (``logits="head"``).

A masked-LM head computes ``logits = head_input W^T + b``: ``head_input`` is what its last Linear
reads (for BERT, the output of the prediction-head transform dense -> GELU -> LayerNorm). The cache
stores ``head_input`` for every token and ``W``, ``b`` once, so a run from the cache rebuilds the
teacher's full-vocabulary logits chunk by chunk in :func:`kdfast.fused_linear_kd_loss` without the
teacher's body and without an N x V tensor.

Supported heads: ``transformers``' BERT, RoBERTa, DistilBERT, ModernBERT (any head whose output
Linear is ``get_output_embeddings()`` and is called as a module), ``MobileBertForMaskedLM`` (its
decoder is the tied embedding concatenated with an extra dense block, applied by ``matmul``) and
kdfast's ``KDMobileBertForMaskedLM`` (``output_weight()``).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn


def _mobilebert_style(model: nn.Module) -> nn.Module | None:
    """``cls.predictions`` of a MobileBERT-style head (decoder applied by matmul, not as a module)."""
    pred = getattr(getattr(model, "cls", None), "predictions", None)
    if pred is None or not isinstance(getattr(pred, "transform", None), nn.Module):
        return None
    if hasattr(pred, "output_weight") or (isinstance(getattr(pred, "dense", None), nn.Linear)
                                          and isinstance(getattr(pred, "decoder", None), nn.Linear)):
        return pred
    return None


def head_projection(model: nn.Module) -> tuple[Tensor, Tensor | None]:
    """``(W [V, d], b [V] or None)`` of ``model``'s output projection, detached: logits = head_input W^T + b.
    ValueError for a model without a supported masked-LM head."""
    pred = _mobilebert_style(model)
    if pred is not None:
        if hasattr(pred, "output_weight"):
            weight = pred.output_weight()
        else:  # transformers' MobileBERT: hidden @ cat([decoder.weight^T, dense.weight]) + decoder.bias
            weight = torch.cat([pred.decoder.weight.t(), pred.dense.weight], dim=0).t()
        return weight.detach().contiguous(), pred.decoder.bias.detach()
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(out, nn.Linear):
        raise ValueError(f"teacher {type(model).__name__} has no masked-LM output projection (an nn.Linear from "
                         "get_output_embeddings()) to cache with logits='head'")
    return out.weight.detach(), None if out.bias is None else out.bias.detach()


class HeadInput:
    """Holds the head input of the last forward (``value``: [B, L, d])."""

    value: Tensor | None = None


@contextmanager
def capture_head_input(model: nn.Module) -> Iterator[HeadInput]:
    """Within the block, each forward of ``model`` leaves the input of its output projection in the
    yielded holder's ``value`` (a forward hook on the head transform for MobileBERT-style heads,
    a pre-hook on the output Linear otherwise)."""
    holder = HeadInput()
    pred = _mobilebert_style(model)
    if pred is not None:
        def keep_output(_module, _args, output):
            holder.value = output.detach()

        handle = pred.transform.register_forward_hook(keep_output)
    else:
        head_projection(model)  # refuses an unsupported model before any forward

        def keep_input(_module, args):
            holder.value = args[0].detach()

        handle = model.get_output_embeddings().register_forward_pre_hook(keep_input)
    try:
        yield holder
    finally:
        handle.remove()
