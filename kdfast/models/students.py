"""Student builders: DistilBERT-style layer selection from a BERT teacher, TinyBERT-style narrow BERTs.

Both return plain ``transformers`` models (``BertForMaskedLM``), so ``save_pretrained`` /
``from_pretrained`` and every downstream ``transformers`` tool work on them unchanged.
"""

from __future__ import annotations

import torch

__all__ = ["DISTILBERT_LAYERS", "distilbert_from_teacher", "tinybert", "tinybert_config", "TINYBERT_PRESETS"]

#: DistilBERT's choice for a 12-layer teacher: every other layer, keeping the first and the last.
DISTILBERT_LAYERS = (0, 2, 4, 7, 9, 11)


def _validate_layers(layers, n_teacher: int) -> tuple[int, ...]:
    try:
        chosen = tuple(layers)
    except TypeError:
        raise ValueError(f"layers must be a sequence of teacher layer indices, got {layers!r}") from None
    if not chosen:
        raise ValueError("layers must not be empty")
    for i in chosen:
        if isinstance(i, bool) or not isinstance(i, int):
            raise ValueError(f"layers must contain ints, got {i!r} in {chosen}")
        if not 0 <= i < n_teacher:
            raise ValueError(f"layers must lie in [0, {n_teacher}) for a {n_teacher}-layer teacher, got {i} in {chosen}")
    if len(set(chosen)) != len(chosen):
        raise ValueError(f"layers must be unique, got {chosen}")
    if list(chosen) != sorted(chosen):
        raise ValueError(f"layers must be sorted in increasing order, got {chosen}")
    return chosen


def distilbert_from_teacher(bert, layers=DISTILBERT_LAYERS):
    """A DistilBERT-style student initialised from a BERT teacher.

    ``bert`` is a ``transformers.BertForMaskedLM`` or ``BertModel``; ``layers`` are the 0-based teacher
    layers to keep, in order (default: DistilBERT's ``(0, 2, 4, 7, 9, 11)`` for a 12-layer teacher).
    Returns a new ``transformers.BertForMaskedLM`` with ``len(layers)`` layers (teacher unchanged), on the
    teacher's device and dtype, where

    * embeddings (word, position, LayerNorm) are copies of the teacher's;
    * student layer ``i`` is a copy of teacher layer ``layers[i]`` (identical parameters, so identical
      function);
    * the MLM head (transform, bias, tied decoder) is copied when the teacher has one. For a ``BertModel``
      teacher the head's transform is freshly initialised, the decoder is tied to the copied word
      embeddings and the bias is zero. The teacher's pooler is not used (a masked-LM model has none).

    Token types: DistilBERT has no token-type embeddings. We set ``type_vocab_size=1`` and keep the
    teacher's **row 0** (rather than zeroing the table): row 0 is what the teacher added to every
    single-segment input during pre-training, so keeping it makes the student's embedding output equal to
    the teacher's for ``token_type_ids == 0`` (the distillation setting) and the copied layers see the
    input distribution they were trained on. Zeroing it would shift every embedding by a constant vector
    the copied LayerNorm never saw. Inputs must then use token type 0 only (omit ``token_type_ids``).

    Raises ``ValueError`` (naming ``layers``) if ``layers`` is empty, not ints, out of range, not unique
    or not increasing.
    """
    from transformers import BertForMaskedLM, BertModel

    if isinstance(bert, BertForMaskedLM):
        teacher_sd = bert.state_dict()
    elif isinstance(bert, BertModel):
        teacher_sd = {f"bert.{k}": v for k, v in bert.state_dict().items()}
    else:
        raise TypeError(f"bert must be a transformers BertForMaskedLM or BertModel, got {type(bert).__name__}")
    tcfg = bert.config
    chosen = _validate_layers(layers, tcfg.num_hidden_layers)

    cfg_dict = tcfg.to_dict()
    cfg_dict.update(num_hidden_layers=len(chosen), type_vocab_size=1)
    for key in ("architectures", "_name_or_path"):
        cfg_dict.pop(key, None)
    scfg = type(tcfg).from_dict(cfg_dict)
    if getattr(tcfg, "_attn_implementation", None):
        scfg._attn_implementation = tcfg._attn_implementation

    ref = next(bert.parameters())
    with torch.device(ref.device):  # build where the teacher lives (GPU, CPU or meta for counting)
        student = BertForMaskedLM(scfg)
    student.to(ref.dtype)

    new_sd = {}
    for key in student.state_dict():
        src = key
        if key.startswith("bert.encoder.layer."):
            idx, rest = key[len("bert.encoder.layer."):].split(".", 1)
            src = f"bert.encoder.layer.{chosen[int(idx)]}.{rest}"
        if src not in teacher_sd:
            continue  # MLM head of a BertModel teacher: keep the fresh init (decoder tied below)
        value = teacher_sd[src]
        if key == "bert.embeddings.token_type_embeddings.weight":
            value = value[:1]
        new_sd[key] = value.detach().clone()
    missing, unexpected = student.load_state_dict(new_sd, strict=False)
    bad = [k for k in missing if not k.startswith("cls.")]
    if bad or unexpected:
        raise RuntimeError(f"weight copy mismatch: missing {bad}, unexpected {unexpected}")
    if missing:  # BertModel teacher: make sure the decoder is the (copied) word embedding and bias is zero
        with torch.no_grad():
            if getattr(scfg, "tie_word_embeddings", True):
                student.cls.predictions.decoder.weight = student.bert.embeddings.word_embeddings.weight
            student.cls.predictions.bias.zero_()
    return student.train(bert.training)


TINYBERT_PRESETS = {
    "tinybert-4": dict(num_hidden_layers=4, hidden_size=312, intermediate_size=1200, num_attention_heads=12),
    "tinybert-6": dict(num_hidden_layers=6, hidden_size=768, intermediate_size=3072, num_attention_heads=12),
}


def tinybert_config(name: str = "tinybert-4", **overrides):
    """``transformers.BertConfig`` of TinyBERT: ``"tinybert-4"`` (M=4, d=312, d_i=1200, 12 heads) or
    ``"tinybert-6"`` (M=6, d=768, d_i=3072, 12 heads); BERT-base vocabulary (30522), 512 positions,
    2 token types. ``overrides`` go to the config (e.g. a small ``vocab_size`` for tests)."""
    from transformers import BertConfig

    if name not in TINYBERT_PRESETS:
        raise ValueError(f"name must be one of {sorted(TINYBERT_PRESETS)}, got {name!r}")
    return BertConfig(**{**TINYBERT_PRESETS[name], **overrides})


def tinybert(name: str = "tinybert-4", **overrides):
    """A randomly initialised ``transformers.BertForMaskedLM`` with :func:`tinybert_config`."""
    from transformers import BertForMaskedLM

    return BertForMaskedLM(tinybert_config(name, **overrides))
