"""Student builders: DistilBERT-style layer selection from a teacher, TinyBERT-style narrow students.

Both return plain ``transformers`` masked-LM models (``BertForMaskedLM``, ``RobertaForMaskedLM``,
``ModernBertForMaskedLM``, ...), so ``save_pretrained`` / ``AutoModelForMaskedLM.from_pretrained``
and every downstream ``transformers`` tool work on them unchanged.
"""

from __future__ import annotations

import torch

__all__ = ["DISTILBERT_LAYERS", "distilbert_from_teacher", "tinybert", "tinybert_config", "tinybert_student",
           "TINYBERT_PRESETS", "trim_vocabulary"]

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


#: where each teacher family keeps its list of layers, under its base model
_LAYER_LISTS = ("encoder.layer", "transformer.layer", "layers")


def _layer_list(model) -> str:
    """The state-dict prefix of ``model``'s list of transformer layers (``bert.encoder.layer``,
    ``distilbert.transformer.layer``, ``model.layers`` ...)."""
    names = {module: name for name, module in model.named_modules()}
    base = model.base_model
    for path in _LAYER_LISTS:
        module = base
        for part in path.split("."):
            module = getattr(module, part, None)
        if isinstance(module, torch.nn.ModuleList):
            return names[module]
    raise ValueError(f"teacher: no list of transformer layers found in {type(model).__name__}")


def _n_layers(config) -> int:
    return config.n_layers if config.model_type == "distilbert" else config.num_hidden_layers


def distilbert_from_teacher(teacher, layers=DISTILBERT_LAYERS):
    """A DistilBERT-style student initialised from a teacher: the same architecture with
    ``len(layers)`` of its layers.

    ``teacher`` is a ``transformers`` BERT, RoBERTa, XLM-RoBERTa, ELECTRA, DistilBERT, MobileBERT or
    ModernBERT model, masked-LM or base (or another head, whose encoder is used);
    ``layers`` are the 0-based teacher layers to keep, in order (default: DistilBERT's
    ``(0, 2, 4, 7, 9, 11)`` for a 12-layer teacher). Returns a new masked-LM model of the teacher's
    family (``AutoModelForMaskedLM`` of its configuration with the layer count changed; the teacher
    is unchanged), on the teacher's device and dtype, where

    * embeddings are copies of the teacher's;
    * student layer ``i`` is a copy of teacher layer ``layers[i]`` (identical parameters, so identical
      function);
    * the MLM head is copied when the teacher has one. For another teacher the head's transform is
      freshly initialised, the decoder is tied to the copied word embeddings (where the family ties
      them) and its bias is zero.

    ModernBERT: student layer ``i`` keeps teacher layer ``layers[i]``'s attention type (global, or
    local with the teacher's window) and rotary settings: the student's configuration lists them in
    ``layer_types`` (its ``global_attn_every_n_layers`` pattern would not hold for, e.g., every other
    layer), which ``save_pretrained`` / ``from_pretrained`` keep. ModernBERT's first layer has no
    attention LayerNorm (its input is the normalised embedding), so ``layers`` must start at 0.

    Token types (BERT, ELECTRA, MobileBERT): DistilBERT has no token-type embeddings. We set
    ``type_vocab_size=1`` and keep the teacher's **row 0** (rather than zeroing the table): row 0 is
    what the teacher added to every single-segment input during pre-training, so keeping it makes the
    student's embedding output equal to the teacher's for ``token_type_ids == 0`` (the distillation
    setting) and the copied layers see the input distribution they were trained on. Inputs must then
    use token type 0 only (omit ``token_type_ids``).

    Raises ``ValueError`` naming ``teacher`` for another architecture, or ``layers`` if it is empty,
    not ints, out of range, not unique or not increasing (or does not start at 0 for ModernBERT).
    """
    from transformers import AutoModelForMaskedLM, PreTrainedModel

    from .modernbert import is_modernbert, layer_types
    from .teachers import check_teacher_architecture

    if not isinstance(teacher, PreTrainedModel):
        raise ValueError(f"teacher must be a transformers model, got {type(teacher).__name__}")
    check_teacher_architecture(teacher)
    tcfg = teacher.config
    chosen = _validate_layers(layers, _n_layers(tcfg))
    modern = is_modernbert(tcfg)
    if modern and chosen[0] != 0:
        raise ValueError(f"layers must start at 0 for a ModernBERT teacher (its first layer alone has no attention "
                         f"LayerNorm), got {chosen}")

    cfg_dict = tcfg.to_dict()
    cfg_dict["n_layers" if tcfg.model_type == "distilbert" else "num_hidden_layers"] = len(chosen)
    if "type_vocab_size" in cfg_dict:
        cfg_dict["type_vocab_size"] = 1
    if modern:
        types = layer_types(tcfg)
        cfg_dict["layer_types"] = [types[i] for i in chosen]
    for key in ("architectures", "_name_or_path"):
        cfg_dict.pop(key, None)
    scfg = type(tcfg).from_dict(cfg_dict)
    if getattr(tcfg, "_attn_implementation", None):
        scfg._attn_implementation = tcfg._attn_implementation

    ref = next(teacher.parameters())
    with torch.device(ref.device):  # build where the teacher lives (GPU, CPU or meta for counting)
        student = AutoModelForMaskedLM.from_config(scfg)
    student.to(ref.dtype)

    if type(teacher) is type(student):
        teacher_sd, t_list = teacher.state_dict(), _layer_list(teacher)
    else:  # a base model or another head: its encoder, under the masked-LM model's prefix
        prefix = student.base_model_prefix
        teacher_sd = {f"{prefix}.{k}": v for k, v in teacher.base_model.state_dict().items()}
        t_list = f"{prefix}.{_layer_list(teacher.base_model)}"
    s_list = _layer_list(student)
    new_sd = {}
    for key in student.state_dict():
        src = key
        if key.startswith(s_list + "."):
            idx, rest = key[len(s_list) + 1:].split(".", 1)
            src = f"{t_list}.{chosen[int(idx)]}.{rest}"
        if src not in teacher_sd:
            continue  # the MLM head of a teacher without one: fresh (decoder tied below)
        value = teacher_sd[src]
        if key.endswith("token_type_embeddings.weight"):
            value = value[:1]
        new_sd[key] = value.detach().clone()
    missing, unexpected = student.load_state_dict(new_sd, strict=False)
    base_missing = [k for k in missing if k.startswith(student.base_model_prefix + ".")]
    if base_missing or unexpected:
        raise RuntimeError(f"weight copy mismatch: missing {base_missing}, unexpected {unexpected}")
    if missing:  # a teacher without an MLM head: decoder tied to the copied embeddings, head biases zero
        student.tie_weights()
        with torch.no_grad():
            for key in missing:
                if key.endswith("bias"):
                    student.get_parameter(key).zero_()
    return student.train(teacher.training)


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


#: what a TinyBERT-style student takes over from a ModernBERT teacher's configuration (besides its
#: layer types): vocabulary, special tokens, positions, window, rotary and normalisation settings
_MODERNBERT_INHERITED = ("vocab_size", "max_position_embeddings", "pad_token_id", "bos_token_id", "eos_token_id",
                         "cls_token_id", "sep_token_id", "local_attention", "rope_parameters", "norm_eps", "norm_bias",
                         "attention_bias", "mlp_bias", "hidden_activation", "classifier_activation", "decoder_bias",
                         "tie_word_embeddings")


def tinybert_student(teacher_config, name: str = "tinybert-4", **overrides):
    """A randomly initialised TinyBERT-style narrow student for a teacher, in the teacher's form.

    * ModernBERT teacher: a ``ModernBertForMaskedLM`` with the preset's widths (``"tinybert-4"``:
      d = 312, d_i = 1200, 12 heads; ``overrides`` may change them and ``num_hidden_layers``) and the
      teacher's vocabulary, special tokens, positions, window (``local_attention``) and rotary
      settings. Student layer ``m`` (1-based) takes the attention type of teacher layer
      ``g(m) = m N / M``, the layer :func:`kdfast.models.uniform_layer_map` pairs it with, so that
      every attention pair compares the same band (``layer_types`` in its configuration; M must
      divide N).
    * any other teacher: :func:`tinybert` (a ``BertForMaskedLM``) with the teacher's vocabulary,
      positions, pad token and token-type count (1 where the teacher has none, e.g. DistilBERT,
      ModernBERT).

    Raises ValueError for an unknown preset, widths the heads do not divide (or, for ModernBERT,
    an odd head width, which rotary embeddings cannot rotate), or a layer count not dividing N.
    """
    from .modernbert import is_modernbert, layer_types

    if name not in TINYBERT_PRESETS:
        raise ValueError(f"name must be one of {sorted(TINYBERT_PRESETS)}, got {name!r}")
    shape = {**TINYBERT_PRESETS[name], **overrides}
    heads, width = shape["num_attention_heads"], shape["hidden_size"]
    if width % heads:
        raise ValueError(f"hidden_size {width} must be divisible by num_attention_heads {heads}")
    if not is_modernbert(teacher_config):
        inherited = dict(vocab_size=teacher_config.vocab_size,
                         max_position_embeddings=teacher_config.max_position_embeddings,
                         type_vocab_size=getattr(teacher_config, "type_vocab_size", 1),
                         pad_token_id=getattr(teacher_config, "pad_token_id", 0) or 0)
        return tinybert(name, **{**inherited, **overrides})

    from transformers import ModernBertConfig, ModernBertForMaskedLM

    if (width // heads) % 2:
        raise ValueError(f"hidden_size / num_attention_heads = {width // heads} must be even for a ModernBERT "
                         "student (rotary embeddings rotate pairs of dimensions)")
    n_t, n_s = teacher_config.num_hidden_layers, shape["num_hidden_layers"]
    if n_t % n_s:
        raise ValueError(f"num_hidden_layers {n_s} must divide the teacher's {n_t} (uniform layer map)")
    types = layer_types(teacher_config)
    step = n_t // n_s
    config = {k: getattr(teacher_config, k) for k in _MODERNBERT_INHERITED if hasattr(teacher_config, k)}
    config.update(shape, layer_types=[types[(m + 1) * step - 1] for m in range(n_s)])
    return ModernBertForMaskedLM(ModernBertConfig(**config))


def trim_vocabulary(model, tokenizer, keep):
    """A copy of ``model`` and ``tokenizer`` that know only the token ids ``keep`` (and the
    tokenizer's special tokens): a deployment choice for a model that will only see text like the
    text ``keep`` was collected from.

    ``model``: a ``transformers`` BERT-family model (base or with a head) whose input embedding rows
    are the tokenizer's ids; ``tokenizer``: its BERT WordPiece tokenizer; ``keep``: token ids.
    The kept ids, sorted, are renumbered 0, 1, ... (so ``[PAD]`` = 0 stays 0): the new word
    embedding is ``E[kept]`` (an output embedding and its bias, when the model has a head, are
    trimmed alike and stay tied where they were). The new tokenizer is a ``BertTokenizer`` with the
    kept tokens and the old one's lower-casing, accent and Chinese-character settings: for a word
    whose WordPiece pieces are all kept it gives exactly the old pieces (greedy longest match on a
    subset that holds them); a word with a piece not kept becomes other kept pieces or ``[UNK]``.

    Returns ``(model, tokenizer, id_map)``: ``id_map[old_id]`` is the new id (the new ``[UNK]`` for
    an id not kept), a ``LongTensor`` of the old vocabulary's size, which turns ids of the old
    tokenizer (e.g. a teacher cache's) into the new model's. ``save_pretrained`` /
    ``AutoModel.from_pretrained`` and ``AutoTokenizer`` work on both unchanged. Raises ValueError
    naming ``tokenizer`` for a tokenizer that is not BERT WordPiece, ``keep`` for an id outside the
    vocabulary, ``model`` when its embedding does not match the tokenizer.
    """
    import copy

    from torch import nn
    from transformers import BertTokenizer

    if not isinstance(tokenizer, BertTokenizer):
        raise ValueError(f"tokenizer must be a BERT WordPiece tokenizer (BertTokenizer), got {type(tokenizer).__name__}")
    vocab = tokenizer.get_vocab()
    size = max(vocab.values()) + 1
    old = model.get_input_embeddings()
    if old is None or old.num_embeddings != size:
        raise ValueError(f"model: its input embedding has {getattr(old, 'num_embeddings', None)} rows, the "
                         f"tokenizer {size} ids")
    ids = set()
    for i in keep:
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < size:
            raise ValueError(f"keep must hold token ids in [0, {size}), got {i!r}")
        ids.add(i)
    ids |= set(tokenizer.all_special_ids)
    kept = torch.tensor(sorted(ids), dtype=torch.long)
    token_of = {i: t for t, i in vocab.items()}
    new_vocab = {token_of[int(i)]: n for n, i in enumerate(kept)}
    id_map = torch.full((size,), new_vocab[tokenizer.unk_token], dtype=torch.long)
    id_map[kept] = torch.arange(len(kept))

    trimmed = copy.deepcopy(model)
    out_emb = trimmed.get_output_embeddings()
    tied = out_emb is not None and out_emb.weight is trimmed.get_input_embeddings().weight
    pad = tokenizer.pad_token_id
    new_pad = int(id_map[pad]) if pad is not None else None
    emb = nn.Embedding(len(kept), old.embedding_dim, padding_idx=new_pad, device=old.weight.device,
                       dtype=old.weight.dtype)
    with torch.no_grad():
        emb.weight.copy_(old.weight[kept.to(old.weight.device)])
    trimmed.set_input_embeddings(emb)
    if out_emb is not None:  # the head's rows, everywhere the model shares them (BERT: the decoder's bias)
        rows = kept.to(out_emb.weight.device)
        swap = {id(out_emb.weight): emb.weight if tied else nn.Parameter(out_emb.weight.detach()[rows].clone())}
        if getattr(out_emb, "bias", None) is not None:
            swap[id(out_emb.bias)] = nn.Parameter(out_emb.bias.detach()[rows].clone())
        for module in trimmed.modules():
            for name, p in list(module._parameters.items()):
                if p is not None and id(p) in swap:
                    module._parameters[name] = swap[id(p)]
        out_emb.out_features = len(kept)
    trimmed.config.vocab_size = len(kept)
    if new_pad is not None:
        trimmed.config.pad_token_id = new_pad

    settings = {k: tokenizer.init_kwargs[k] for k in ("do_lower_case", "tokenize_chinese_chars", "strip_accents")
                if k in tokenizer.init_kwargs}
    specials = {k: getattr(tokenizer, k) for k in ("unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
                if getattr(tokenizer, k, None) is not None}
    new_tokenizer = BertTokenizer(vocab=new_vocab, model_max_length=tokenizer.model_max_length, **settings,
                                  **specials)
    return trimmed, new_tokenizer, id_map
