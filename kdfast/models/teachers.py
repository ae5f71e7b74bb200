"""Loading a teacher from a local model directory: frozen, in eval mode, with or without its
masked-LM head (refusing a checkpoint whose head is missing rather than training against random
weights), and its parameter count."""

from __future__ import annotations

from pathlib import Path

from torch import nn

__all__ = ["TEACHER_ARCHITECTURES", "check_teacher_architecture", "load_quietly", "load_teacher", "teacher_params"]


def load_teacher(path: Path, *, mlm_head: bool, needed_by: str = "", remedy: str | None = None) -> nn.Module:
    """The teacher, frozen and in eval mode: ``AutoModelForMaskedLM`` when ``mlm_head`` (refusing
    a checkpoint whose masked-LM head weights are missing, e.g. a sentence encoder, rather
    than training against a randomly initialised head), else ``AutoModel``. Any architecture
    but those :func:`check_teacher_architecture` accepts is refused first, from ``config.json``. That error ends with
    ``remedy``, by default "set <needed_by> to 0"."""
    from transformers import AutoModel, AutoModelForMaskedLM

    check_teacher_architecture(path)
    if mlm_head:
        model, info = load_quietly(AutoModelForMaskedLM, path)  # the missing head is reported below, in one line
        # the head's weights are those outside the encoder (BERT's cls.*, RoBERTa's lm_head.*,
        # ModernBERT's head.* / decoder.*, ...); the decoder weight is tied to the embeddings
        encoder = model.base_model_prefix + "."
        missing = sorted(k for k in info["missing_keys"] if not k.startswith(encoder)
                         and not k.endswith("decoder.weight") and not k.endswith("vocab_projector.weight")
                         and not k.endswith("generator_lm_head.weight"))
        if missing:
            raise ValueError(f"teacher {path} has no MLM head (its checkpoint lacks {', '.join(missing[:3])}"
                             f"{', ...' if len(missing) > 3 else ''}): the logit / MLM terms would train against "
                             f"random weights; {remedy or f'set {needed_by} to 0'} or use a teacher with an MLM head")
    else:
        model, _ = load_quietly(AutoModel, path, fresh=("pooler.",))  # an MLM checkpoint has no pooler: unused
    model.eval().requires_grad_(False)
    return model


def load_quietly(auto_class, path, *, fresh: tuple[str, ...] = (), **kwargs) -> tuple[nn.Module, dict]:
    """``auto_class.from_pretrained(path, local_files_only=True, **kwargs)`` without transformers'
    load report, and its loading info. Weights kdfast initialises on purpose (keys containing one
    of ``fresh``, e.g. a task head) pass silently; any other weight missing from the checkpoint is
    named in one warning. Weights of the checkpoint the model does not use (an MLM head under a
    base model) are expected and not reported."""
    import warnings

    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        model, info = auto_class.from_pretrained(path, local_files_only=True, output_loading_info=True, **kwargs)
    finally:
        hf_logging.set_verbosity(verbosity)
    missing = sorted(k for k in info.get("missing_keys", ()) if not any(f in k for f in fresh))
    if missing and auto_class.__name__ != "AutoModelForMaskedLM":  # load_teacher says that one in its own words
        warnings.warn(f"{path}: {len(missing)} weights are not in the checkpoint and start random "
                      f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''})", stacklevel=3)
    return model, info


def teacher_params(path: Path) -> int:
    """The parameter count of the model in ``path`` (from its config, no weights loaded)."""
    from transformers import AutoConfig

    from kdfast.models.counting import count

    return int(count(AutoConfig.from_pretrained(path, local_files_only=True))["params"])


#: the teacher architectures every recipe, the cache and ``kdfast eval`` accept: ``model_type`` -> name
TEACHER_ARCHITECTURES = {"bert": "BERT", "roberta": "RoBERTa", "xlm-roberta": "XLM-RoBERTa", "electra": "ELECTRA",
                         "distilbert": "DistilBERT", "mobilebert": "MobileBERT", "modernbert": "ModernBERT"}


def _model_type(source) -> tuple[str | None, str]:
    """(``model_type``, how to name ``source``) of a model, a configuration or a model directory
    (read from its ``config.json`` alone: nothing is loaded)."""
    import json

    if isinstance(source, (str, Path)):
        path = Path(source)
        try:
            config = json.loads((path / "config.json").read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"{path} is not a local model directory with a readable config.json ({e})") from None
        return (config.get("model_type") if isinstance(config, dict) else None), str(path)
    if isinstance(source, nn.Module):
        config = getattr(source, "config", None)
        return getattr(config, "model_type", None), type(source).__name__
    return getattr(source, "model_type", None), type(source).__name__


def check_teacher_architecture(source, argument: str = "teacher") -> str:
    """The architecture name (``"BERT"``, ..., ``"ModernBERT"``) of a teacher given as a model (base
    or any head), a ``transformers`` configuration or a local model directory, whose
    ``model_type`` is one of :data:`TEACHER_ARCHITECTURES`: BERT, RoBERTa, XLM-RoBERTa, ELECTRA,
    DistilBERT, MobileBERT and ModernBERT (kdfast's own MobileBERT counts as MobileBERT). Reads only
    the configuration, so that a recipe can refuse a teacher before any work.

    Raises a one-line ``ValueError`` naming ``argument``, the architecture found and the accepted
    ones, for any other (DeBERTa-v2, GPT-2, ...)."""
    model_type, what = _model_type(source)
    if model_type in TEACHER_ARCHITECTURES:
        return TEACHER_ARCHITECTURES[model_type]
    accepted = ", ".join(TEACHER_ARCHITECTURES.values())
    raise ValueError(f"{argument}: {what} is a {model_type or 'model without a model_type'} model; kdfast distils "
                     f"from {accepted} teachers only")
