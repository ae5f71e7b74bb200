"""Loading a teacher from a local model directory: frozen, in eval mode, with or without its
masked-LM head (refusing a checkpoint whose head is missing rather than training against random
weights), and its parameter count."""

from __future__ import annotations

from pathlib import Path

from torch import nn

__all__ = ["load_teacher", "teacher_params"]


def load_teacher(path: Path, *, mlm_head: bool, needed_by: str = "", remedy: str | None = None) -> nn.Module:
    """The teacher, frozen and in eval mode: ``AutoModelForMaskedLM`` when ``mlm_head`` (refusing
    a checkpoint whose ``cls.predictions`` weights are missing, e.g. a sentence encoder, rather
    than training against a randomly initialised head), else ``AutoModel``. That error ends with
    ``remedy``, by default "set <needed_by> to 0"."""
    from transformers import AutoModel, AutoModelForMaskedLM

    if mlm_head:
        from transformers.utils import logging as hf_logging

        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # the missing head is reported below, in one line
        try:
            model, info = AutoModelForMaskedLM.from_pretrained(path, local_files_only=True, output_loading_info=True)
        finally:
            hf_logging.set_verbosity(verbosity)
        missing = sorted(k for k in info["missing_keys"] if ".predictions." in f".{k}"
                         and not k.endswith("decoder.weight"))  # the decoder is tied to the embeddings
        if missing:
            raise ValueError(f"teacher {path} has no MLM head (its checkpoint lacks {', '.join(missing[:3])}"
                             f"{', ...' if len(missing) > 3 else ''}): the logit / MLM terms would train against "
                             f"random weights; {remedy or f'set {needed_by} to 0'} or use a teacher with an MLM head")
    else:
        model = AutoModel.from_pretrained(path, local_files_only=True)
    model.eval().requires_grad_(False)
    return model


def teacher_params(path: Path) -> int:
    """The parameter count of the model in ``path`` (from its config, no weights loaded)."""
    from transformers import AutoConfig

    from kdfast.models.counting import count

    return int(count(AutoConfig.from_pretrained(path, local_files_only=True))["params"])
