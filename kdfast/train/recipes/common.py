"""What the three recipes share: the start of every plan (:class:`RecipeRun`: settings checked,
seeded, corpus, tokenizer, teacher cache and batch sources, stages, the report), the Distiller
configuration, the LM-head terms and the terms of a :class:`kdfast.DistillationLoss` stage.

Teacher outputs come from :mod:`kdfast.train.teacher` (live or cached, one shape, unscaled Q/K),
teachers are loaded by :mod:`kdfast.models.teachers`, and every plan runs through
:func:`kdfast.train.stage.run_plan`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path

import torch
from torch import nn

from kdfast.train.recipes.config import (
    DataSettings,
    MaskingSettings,
    TeacherSettings,
    TrainSettings,
    config_to_dict,
)

#: recipe settings that change how a run is shown, logged, checkpointed or where it is written, not
#: what it trains: a resume may change them
BOOKKEEPING = ("progress", "out_dir", "train.log_every", "train.checkpoint_every", "train.keep_checkpoints",
               "train.eval_every")


def prepare_run(cfg) -> Path:
    """What every recipe does before any work, so that bad input fails at once and a run is
    reproducible from ``train.seed``: check every setting (types, finiteness, ranges: settings
    built in Python too), ``out_dir`` (absent or a directory), the teacher directory and
    ``data.max_length`` against its positions; then seed every generator, before any random
    initialisation (students, projections, heads, masking). Returns the teacher directory."""
    from kdfast.data import check_max_length
    from kdfast.models.teachers import check_teacher_architecture
    from kdfast.train.distiller import check_out_dir, seed_everything
    from kdfast.train.recipes.config import validate_config

    validate_config(cfg)
    check_out_dir(cfg.out_dir)
    tdir = teacher_dir(cfg.teacher)
    check_teacher_architecture(tdir, "teacher.dir")
    check_max_length(cfg.data.max_length, tdir, "data.max_length", minimum=8)
    seed_everything(cfg.train.seed)
    return tdir


def check_student_size(cfg, student, tdir: Path) -> None:
    """Refuse, before any training, a student with more parameters than its teacher unless
    ``teacher.allow_larger_student`` (a misread setting, not a distillation)."""
    from kdfast.models import count
    from kdfast.models.teachers import teacher_params

    s, t = int(count(student)["params"]), teacher_params(tdir)
    if s > t and not cfg.teacher.allow_larger_student:
        raise ValueError(f"student: {s / 1e6:.2f}M parameters, {s / t:.1f}x its teacher's {t / 1e6:.2f}M; make it "
                         "smaller (the student.* settings) or set teacher.allow_larger_student=true")


def run_settings(cfg) -> dict:
    """The settings a recipe's checkpoints store and a resume compares (all but :data:`BOOKKEEPING`)."""
    settings = config_to_dict(cfg)
    for key in BOOKKEEPING:
        *parents, leaf = key.split(".")
        node = settings
        for part in parents:
            node = node.get(part, {})
        node.pop(leaf, None)
    return settings


def teacher_dir(settings: TeacherSettings) -> Path:
    """The teacher's local directory (default: the embedded all-MiniLM-L6-v2); ValueError if it is not one."""
    from kdfast.defaults import minilm_teacher_dir

    path = Path(settings.dir) if settings.dir else minilm_teacher_dir()
    if not (path / "config.json").is_file():
        raise ValueError(f"teacher.dir {path} is not a local model directory (no config.json)")
    return path


def load_corpus(data: DataSettings) -> tuple[list[str], list[str]]:
    """(training texts, held-out texts): every ``held_out_every``-th text is held out."""
    from kdfast.data import load_texts
    from kdfast.defaults import pydoc_paragraphs

    texts = load_texts(data.files, data.text_column) if data.files else pydoc_paragraphs()
    texts = [t.replace("\n", " ") for t in texts[:data.max_texts]]
    if data.held_out_every:
        held_out = texts[::data.held_out_every]
        train = [t for i, t in enumerate(texts) if i % data.held_out_every]
    else:
        held_out, train = [], texts
    if not train:
        raise ValueError("data: no training text left")
    return train, held_out


def tokenize(tokenizer, texts: list[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Padded to ``max_length`` exactly as :func:`kdfast.cache.build_cache` does (live and cached runs see the same rows)."""
    enc = tokenizer(texts, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


def training_rows(tokenizer, texts: list[str], data: DataSettings) -> tuple[torch.Tensor, torch.Tensor]:
    """The training rows (input_ids, attention_mask) [R, max_length]: packed by
    :func:`kdfast.data.pack_texts` when ``data.packing``, else :func:`tokenize`'s padded rows, one per
    text (what ``build_cache(..., packing=data.packing)`` stores, so live and cached runs agree)."""
    if data.packing:
        from kdfast.data import pack_texts

        return pack_texts(tokenizer, texts, data.max_length)
    return tokenize(tokenizer, texts, data.max_length)


class Masker:
    """MLM masking of live batches (the cache stores its own masked inputs), optionally with
    DistilBERT's frequency smoothing over the training corpus (``kdfast.data.token_mask_weights``)."""

    def __init__(self, settings: MaskingSettings, tokenizer, vocab_size: int, train_ids: torch.Tensor,
                 train_mask: torch.Tensor) -> None:
        from kdfast.data import count_tokens, token_mask_weights

        self.settings, self.vocab_size = settings, vocab_size
        self.special = list(tokenizer.all_special_ids)
        self.mask_id = tokenizer.mask_token_id
        if self.mask_id is None:
            raise ValueError("the teacher's tokenizer has no [MASK] token: MLM masking is impossible")
        self.weights = None
        if settings.smoothing > 0:
            counts = count_tokens(train_ids, train_mask, vocab_size)
            self.weights = token_mask_weights(counts, settings.smoothing, self.special)

    def __call__(self, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        from kdfast.data import mask_tokens

        out, labels = mask_tokens(ids.cpu(), mask.cpu(), special_ids=self.special, mask_id=self.mask_id,
                                  vocab_size=self.vocab_size, probability=self.settings.probability,
                                  token_weights=self.weights)
        return out.to(ids.device), labels.to(ids.device)


def prepare_cache(cfg, tdir: Path, train: list[str], held_out: list[str], *, logits: str, temperature: float,
                  layers: list[int], qk: bool) -> tuple:
    """Build (or reopen, or resume) the teacher caches of the training and held-out texts under
    ``teacher.cache_dir`` (default ``<out_dir>/teacher-cache``); returns (train cache, held-out
    cache or None). A cache left there by another teacher, tokenizer or setting is refused."""
    from kdfast.cache import TeacherCache, build_cache, teacher_weights_sha256, tokenizer_sha256
    from kdfast.defaults import write_corpus

    root = Path(cfg.teacher.cache_dir) if cfg.teacher.cache_dir else Path(cfg.out_dir) / "teacher-cache"
    if (root / "manifest.json").is_file():  # a cache built on its own (kdfast cache build): reused, never written
        return reuse_cache(cfg, root, tdir, held_out, logits=logits, temperature=temperature, layers=layers,
                           qk=qk), None
    data_dir = root / "texts"  # beside the cache: another run with the same cache_dir and texts reuses it
    data_dir.mkdir(parents=True, exist_ok=True)
    caches = []
    for name, texts in (("train", train), ("held_out", held_out)):
        if not texts:
            caches.append(None)
            continue
        corpus = data_dir / f"{name}.txt"
        wanted = "\n".join(t.replace("\n", " ") for t in texts) + "\n"  # what write_corpus writes
        if corpus.is_file() and (root / name / "manifest.json").is_file() and corpus.read_text() != wanted:
            # another run's cache of other texts: its corpus file is not rewritten under it
            raise ValueError(f"teacher.cache_dir {root} holds the {name} cache of other texts (another run's); "
                             "kdfast never writes inside a cache it did not create for this run: point "
                             "teacher.cache_dir elsewhere, or leave it unset")
        corpus = write_corpus(corpus, texts)
        packing = cfg.data.packing and name == "train"  # held-out evaluation stays one row per text
        bs = min(16, len(texts))
        build_cache(str(tdir), [str(corpus)], str(root / name), logits=logits, hidden="fp16" if layers else "none",
                    layers=layers or None, qk=qk, max_length=cfg.data.max_length, batch_size=bs, packing=packing,
                    rows_per_shard=bs * 16, temperature=temperature,
                    mlm_probability=getattr(getattr(cfg, "mlm", None), "probability", 0.15), seed=cfg.train.seed,
                    progress=cfg.progress)
        caches.append(TeacherCache(str(root / name), expect_teacher_sha256=teacher_weights_sha256(tdir),
                                   expect_tokenizer_sha256=tokenizer_sha256(tdir)))
    return caches[0], caches[1]


def reuse_cache(cfg, root: Path, tdir: Path, held_out: list[str], *, logits: str, temperature: float,
                layers: list[int], qk: bool):
    """The cache in ``root`` (``teacher.cache_dir`` naming a cache built on its own) as this run's
    training cache, when it holds what this run would build (same teacher and tokenizer by their
    hashes, the data files by theirs, every text, the same length, packing, logits, masking, and
    at least the hidden-state and Q / K layers needed); else ValueError naming every difference.
    Nothing is written inside it."""
    from kdfast.cache import TeacherCache, teacher_weights_sha256, tokenizer_sha256
    from kdfast.data import files_sha256

    where = f"teacher.cache_dir {root}"
    try:
        cache = TeacherCache(str(root), expect_teacher_sha256=teacher_weights_sha256(tdir),
                             expect_tokenizer_sha256=tokenizer_sha256(tdir))
    except ValueError as e:  # CacheError: another teacher or tokenizer, a torn or unfinished cache
        raise ValueError(f"{where}: {' '.join(str(e).split())}") from None
    s = cache.settings
    mode, _, k = logits.partition(":")
    want = {"data": files_sha256(cfg.data.files)[:12] if cfg.data.files else "the built-in corpus",
            "max_length": cfg.data.max_length, "packing": cfg.data.packing, "logits.mode": mode,
            "logits.k": int(k) if k else 0}
    have = {"data": s["data"]["sha256"][:12], "max_length": s["max_length"], "packing": s["packing"],
            "logits.mode": s["logits"]["mode"], "logits.k": s["logits"]["k"]}
    if mode != "none":
        want.update({"logits.temperature": temperature,
                     "mlm.probability": getattr(getattr(cfg, "mlm", None), "probability", 0.15),
                     "mlm.seed": cfg.train.seed})
        have.update({"logits.temperature": s["logits"]["temperature"],
                     "mlm.probability": (s["mlm"] or {}).get("probability"), "mlm.seed": (s["mlm"] or {}).get("seed")})
    differ = [f"{key} {have[key]} (this run: {want[key]})" for key in want if have[key] != want[key]]
    missing = sorted(set(layers) - set((s["hidden"] or {}).get("layers", [])))
    if missing:
        differ.append(f"hidden-state layers {missing} are not stored")
    if qk and not s["qk"]:
        differ.append("no Q / K stored (build it with --qk)")
    if held_out or cfg.data.max_texts is not None:
        differ.append("it holds every text, so set data.held_out_every=0 and leave data.max_texts unset")
    if differ:
        raise ValueError(f"{where} is a cache built for other settings ({'; '.join(differ)}); kdfast never writes "
                         "inside a cache it did not create: build one with these settings, or leave "
                         "teacher.cache_dir unset")
    return cache


def data_sources(cfg, tokenizer, train: list[str], held_out: list[str], caches: tuple | None):
    """(training batch source for the Distiller, a function giving a fresh iterator of held-out
    batches or None), from the caches when given, else from the tokenised texts."""
    from kdfast.cache import CacheDataset
    from kdfast.train.data import CachedBatches, TokenBatches

    bs = cfg.train.batch_size
    if caches is not None:
        train_cache, held_cache = caches
        if len(train_cache) < bs:
            raise ValueError(f"train.batch_size {bs} exceeds the {len(train_cache)} training "
                             f"{'rows packed from the texts' if cfg.data.packing else 'texts'}")
        source = CachedBatches(train_cache, bs, seed=cfg.train.seed)
        held = (lambda: iter(CacheDataset(held_cache, min(bs, len(held_cache)), drop_last=False))) \
            if held_cache is not None else None
        return source, held
    ids, am = training_rows(tokenizer, train, cfg.data)
    if ids.shape[0] < bs:
        raise ValueError(f"train.batch_size {bs} exceeds the {ids.shape[0]} training "
                         f"{'rows packed from the texts' if cfg.data.packing else 'texts'}")
    source = TokenBatches(ids, am, bs, seed=cfg.train.seed, rank=0, world_size=1)
    held = None
    if held_out:
        hids, ham = tokenize(tokenizer, held_out, cfg.data.max_length)
        held_src = TokenBatches(hids, ham, min(bs, hids.shape[0]), shuffle=False, drop_last=False, rank=0,
                                world_size=1)
        held = lambda: held_src.batches(0)  # noqa: E731
    return source, held


def train_config(settings: TrainSettings, steps: int, out_dir: Path, progress: bool, *, lr: float | None = None,
                 preferred_optimizer: str | None = None):
    """:class:`kdfast.train.TrainConfig` of one stage; ``optimizer`` is passed through where the
    Distiller offers a choice (else only AdamW, the Distiller's own, is accepted)."""
    from kdfast.train.distiller import TrainConfig

    kwargs = dict(steps=steps, lr=lr if lr is not None else settings.lr, weight_decay=settings.weight_decay,
                  warmup=settings.warmup, max_grad_norm=settings.max_grad_norm, grad_accum=settings.grad_accum,
                  seed=settings.seed, log_every=min(settings.log_every, steps),
                  checkpoint_every=settings.checkpoint_every, keep_checkpoints=settings.keep_checkpoints,
                  eval_every=settings.eval_every, out_dir=str(out_dir), progress=progress)
    optimizer = settings.optimizer
    if "optimizer" in {f.name for f in dataclasses.fields(TrainConfig)}:
        if optimizer is not None or preferred_optimizer is not None:
            kwargs["optimizer"] = optimizer if optimizer is not None else preferred_optimizer
    elif optimizer not in (None, "adamw"):
        raise ValueError(f"train.optimizer {optimizer!r} is not offered by this Distiller (AdamW only); "
                         "set train.optimizer to adamw or null")
    return TrainConfig(**kwargs)


def write_report(out_dir: Path, report: dict) -> Path:
    """``report.json`` and ``loss.png`` (every stage's logged terms, :func:`kdfast.train.plot.plot_stage_losses`)."""
    from kdfast.train.plot import plot_stage_losses

    path = Path(out_dir) / "report.json"
    path.write_text(json.dumps(report, indent=2, default=str))
    plot_stage_losses([(st["name"], st["out_dir"]) for st in report["stages"]], Path(out_dir) / "loss.png",
                      title=f"kdfast distill --recipe {report['recipe']}")
    return path


def format_report(report: dict) -> str:
    """The results table the CLI prints: loss first/last per term, tokens/s and held-out loss per stage."""
    t, s = report["teacher"], report["student"]
    lines = [f"recipe {report['recipe']}: teacher {t['dir']} ({t['source']}), {t['params'] / 1e6:.2f}M params; "
             f"student {s['params'] / 1e6:.2f}M params ({t['params'] / s['params']:.2f}x smaller), saved to {s['dir']}"]
    header = f"{'stage':<22} {'steps':>6} {'loss first -> last':<22} {'tokens/s':>10} {'eval loss':>18}  terms first -> last"
    lines += [header, "-" * len(header)]
    for st in report["stages"]:
        first, last = st["first"] or {}, st["last"] or {}
        loss = f"{first.get('loss', math.nan):.4f} -> {last.get('loss', math.nan):.4f}"
        ev = ""
        if st["eval"]:
            ev = f"{st['eval_first'].get('eval/loss', math.nan):.4f} -> {st['eval'].get('eval/loss', math.nan):.4f}"
        skip = {"step", "loss", "lr", "tokens_per_s", "grad_norm"}
        terms = ", ".join(f"{k} {first[k]:.4g} -> {last.get(k, math.nan):.4g}" for k in first if k not in skip)
        rate = f"{st['tokens_per_s']:.0f}" if st["tokens_per_s"] else "-"
        lines.append(f"{st['name']:<22} {st['steps']:>6} {loss:<22} {rate:>10} {ev:>18}  {terms}")
        if st.get("backends"):
            from kdfast.train.stage import format_backends

            lines.append(f"{'':<22} terms ran on: {format_backends(st['backends'])}")
    lines.append(f"total {report['timing_s']['total']} s (teacher set-up and cache {report['timing_s'].get('cache', 0)} s); "
                 f"report: {report['out_dir']}/report.json")
    return "\n".join(lines)


# --- the LM-head terms through kdfast.fused_linear_kd_loss -----------------------------------------

#: ``kd_rows`` settings: which tokens the logit-KD term counts
KD_ROWS = ("auto", "all", "masked")


def resolve_kd_rows(setting: str, cached: bool, name: str = "kd_rows", exact: bool = False) -> str:
    """``"all"`` (every real token) or ``"masked"`` (the MLM-masked tokens) from a recipe's
    ``kd_rows`` setting: ``auto`` is ``all`` with a live teacher or an exact cache (``exact``:
    ``teacher.logits=head``) and ``masked`` from a top-k cache, which keeps the teacher's logits at
    the masked tokens only (``all`` from a top-k cache is refused)."""
    if setting not in KD_ROWS:
        raise ValueError(f"{name} must be one of {KD_ROWS}, got {setting!r}")
    if setting == "auto":
        return "masked" if cached and not exact else "all"
    if setting == "all" and cached and not exact:
        raise ValueError(f"{name}=all needs teacher.source=live or teacher.logits=head: a top-k cache keeps the "
                         f"teacher's logits at the masked tokens only (use {name}=masked or auto)")
    return setting


@dataclasses.dataclass
class LMHead:
    """A masked-LM head split for :func:`kdfast.fused_linear_kd_loss`: ``logits = transform(h) W^T + b``.

    ``transform`` is the prediction-head transform (dense -> GELU -> LayerNorm); ``weight`` [V, d]
    and ``bias`` [V] are the decoder's (for kdfast's MobileBERT, the tied embedding and the
    untied block concatenated: :meth:`LMPredictionHead.output_weight`)."""

    transform: nn.Module
    weight: torch.Tensor
    bias: torch.Tensor | None


def cached_lm_head(cache) -> LMHead:
    """The teacher's output projection stored by a ``logits: head`` cache, as an :class:`LMHead` whose
    transform is the identity: the cache's ``head_input`` is already the transform's output."""
    weight, bias = cache.head_projection()
    return LMHead(nn.Identity(), weight, bias)


def encoder_of(model: nn.Module, argument: str = "model") -> nn.Module:
    """The headless encoder of a masked-LM model (``bert`` of a ``transformers`` BERT, ``model`` of
    a ModernBERT, ``roberta`` / ``electra`` / ``distilbert`` / ``mobilebert`` of theirs, and of
    :class:`kdfast.models.KDMobileBertForMaskedLM`); ValueError naming ``argument`` for another
    class."""
    if isinstance(getattr(model, "mobilebert", None), nn.Module) and hasattr(model, "cls"):
        return model.mobilebert
    if type(model).__name__.endswith("ForMaskedLM") and getattr(model, "base_model", model) is not model:
        return model.base_model
    raise ValueError(f"{argument}: a {type(model).__name__} has no masked-LM head; the fused LM-head terms support "
                     "the masked-LM models of BERT, RoBERTa, XLM-RoBERTa, ELECTRA, DistilBERT, MobileBERT and "
                     "ModernBERT, and kdfast's KDMobileBertForMaskedLM")


def lm_head(model: nn.Module, argument: str = "model") -> LMHead:
    """The :class:`LMHead` (transform, decoder weight and bias) of a masked-LM model of a family
    :func:`encoder_of` accepts (its current parameters: call it inside the step, after the
    optimizer's last update); ValueError naming ``argument`` for another class."""
    encoder_of(model, argument)
    if hasattr(model, "cls"):  # BERT, MobileBERT (transformers' and kdfast's)
        pred = model.cls.predictions
        if hasattr(pred, "output_weight"):
            weight = pred.output_weight()
        elif type(pred).__name__ == "MobileBertLMPredictionHead":  # logits = h [E_dec^T; dense]
            weight = torch.cat([pred.decoder.weight.t(), pred.dense.weight], 0).t()
        else:
            weight = pred.decoder.weight
        bias = pred.decoder.bias if pred.decoder.bias is not None else getattr(pred, "bias", None)
        return LMHead(pred.transform, weight, bias)
    kind = model.config.model_type
    if kind in ("roberta", "xlm-roberta"):
        head = model.lm_head
        return LMHead(nn.Sequential(head.dense, nn.GELU(), head.layer_norm), head.decoder.weight, head.decoder.bias)
    if kind == "electra":
        return LMHead(model.generator_predictions, model.generator_lm_head.weight, model.generator_lm_head.bias)
    if kind == "distilbert":
        return LMHead(nn.Sequential(model.vocab_transform, model.activation, model.vocab_layer_norm),
                      model.vocab_projector.weight, model.vocab_projector.bias)
    if kind == "modernbert":
        return LMHead(model.head, model.decoder.weight, model.decoder.bias)
    raise ValueError(f"{argument}: no LM head known for a {type(model).__name__}")


def _empty_loss(*tensors: torch.Tensor) -> torch.Tensor:
    """A 0 that depends on ``tensors`` (so that backward gives zero gradients), for a batch with no counted row."""
    return sum(t.sum().float() * 0 for t in tensors)


def lm_distillation_loss(student_hidden: torch.Tensor, student_head: LMHead, labels: torch.Tensor,
                         attention_mask: torch.Tensor, *, kd_rows: str, temperature: float, alpha_kd: float,
                         alpha_mlm: float, teacher_hidden: torch.Tensor | None = None,
                         teacher_head: LMHead | None = None, teacher_sparse: tuple | None = None,
                         ignore_index: int = -100, backend: str = "auto") -> torch.Tensor:
    r"""The LM-head terms of a masked-LM recipe, from the last hidden states, without any N x V logits:

        alpha_kd * T^2 KL(softmax(t / T) || softmax(s / T)) averaged over the KD rows
        + alpha_mlm * CE(s, labels) averaged over the masked rows (``labels != ignore_index``)

    with s = transform_s(h_s) W_s^T + b_s and t = transform_t(h_t) W_t^T + b_t (or the cached
    sparse logits ``teacher_sparse`` = (ids, values, logsumexp) [n_masked, K] of the masked rows,
    in row-major order). ``kd_rows``: ``"masked"`` (the KD rows are the masked ones) or ``"all"``
    (every token with ``attention_mask != 0``, live teacher only). Only the counted rows are
    gathered and transformed, and the decoder projections, KD and MLM run in one
    :func:`kdfast.fused_linear_kd_loss` call: for ``all`` its ``kd_rows="all"`` form
    (KD mean over the KD rows, the real tokens and the masked ones; MLM mean over the masked rows),
    every row projected once in one pass over the vocabulary chunks. With ``alpha_kd`` = 0 (e.g. a
    live teacher without a head): the MLM term alone, cross-entropy on the masked rows' logits (no
    teacher projection).

    Args:
        student_hidden, teacher_hidden: [B, L, d_s] / [B, L, d_t] last hidden states (before the head).
        labels: [B, L] MLM targets, ``ignore_index`` where not masked. attention_mask: [B, L].
    Returns:
        The scalar loss (float32; float64 for float64 states).
    """
    from kdfast.losses.fused_linear_kd import fused_linear_kd_loss

    if kd_rows not in ("all", "masked"):
        raise ValueError(f"kd_rows must be 'all' or 'masked', got {kd_rows!r}")
    masked = labels != ignore_index
    weight = student_head.weight
    if alpha_kd and teacher_head is None and teacher_sparse is None:
        raise ValueError("alpha_kd > 0 needs the teacher's head (teacher_head) or its cached logits (teacher_sparse)")
    if not alpha_kd:  # MLM alone: no teacher logits needed
        if not bool(masked.any()):
            return _empty_loss(student_hidden, weight)
        logits = torch.nn.functional.linear(student_head.transform(student_hidden[masked]).to(weight.dtype), weight,
                                            student_head.bias)
        return alpha_mlm * torch.nn.functional.cross_entropy(logits.float(), labels[masked])

    # under autocast (the Distiller's bf16 on a GPU) the projections run in the autocast dtype, as
    # the decoder Linear would: fused_linear_kd_loss then keeps the 16-bit head 16-bit (fp32 accumulation)
    device_type = student_hidden.device.type
    head_dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else weight.dtype
    weight = weight.to(head_dtype)
    bias = None if student_head.bias is None else student_head.bias.to(head_dtype)

    def student_rows(rows):
        return student_head.transform(student_hidden[rows]).to(head_dtype)

    def call(rows, a_kd, a_mlm, sparse=None, mlm_subset=False):
        # mlm_subset: KD on every gathered row, MLM on those with a label (one fused call)
        kwargs = dict(student_bias=bias, labels=labels[rows] if a_mlm else None, temperature=temperature,
                      alpha_kd=a_kd, alpha_mlm=a_mlm, kd_rows="masked" if a_mlm and not mlm_subset else "all",
                      backend=backend)
        if sparse is not None:
            return fused_linear_kd_loss(student_rows(rows), weight, teacher_sparse=sparse, **kwargs)
        with torch.no_grad():
            t_weight = teacher_head.weight.to(head_dtype)
            t_bias = None if teacher_head.bias is None else teacher_head.bias.to(head_dtype)
            h_t = teacher_head.transform(teacher_hidden[rows]).to(head_dtype)
        return fused_linear_kd_loss(student_rows(rows), weight, h_t, t_weight, teacher_bias=t_bias, **kwargs)

    n_masked = int(masked.sum())
    if teacher_sparse is not None:
        if kd_rows != "masked":
            raise ValueError("kd_rows='all' needs a live teacher: the cached logits are the masked rows' only")
        return call(masked, alpha_kd, alpha_mlm, teacher_sparse) if n_masked else _empty_loss(student_hidden, weight)
    if kd_rows == "masked":
        return call(masked, alpha_kd, alpha_mlm) if n_masked else _empty_loss(student_hidden, weight)
    real = attention_mask != 0
    if not alpha_mlm:
        return call(real, alpha_kd, 0.0) if bool(real.any()) else _empty_loss(student_hidden, weight)
    kd_mask = real | masked
    if not bool(kd_mask.any()):
        return _empty_loss(student_hidden, weight)
    return call(kd_mask, alpha_kd, alpha_mlm, mlm_subset=True)


# --- what the three recipes' plans share -----------------------------------------------------------

def lm_terms(alpha_kd: float, alpha_mlm: float, cached: bool, exact: bool = False) -> dict[str, str]:
    """``{logged term: kdfast loss}`` of the LM-head terms (:func:`lm_distillation_loss`): ``kd_mlm``
    (both weighted: one fused call), ``kd`` or ``mlm`` (the eager cross-entropy). From a top-k
    cache the fused loss runs on the sparse teacher; from a head cache (``exact``) on the dense one,
    as live."""
    if alpha_kd:
        return {"kd_mlm" if alpha_mlm else "kd": f"fused_linear_kd_loss{'[sparse]' if cached and not exact else ''}"}
    return {"mlm": "cross_entropy"} if alpha_mlm else {}


class RecipeRun:
    """What every recipe's ``plan(cfg)`` starts from, done once here: the settings checked and
    every generator seeded (:func:`prepare_run`), the corpus split, the teacher's tokenizer, the
    teacher caches and batch sources (:meth:`sources`), one stage per call of :meth:`stage`, and
    the :class:`~kdfast.train.stage.Plan` whose ``finish`` saves the student and tokenizer to
    ``<out_dir>/student`` and writes ``report.json`` (:meth:`plan`)."""

    def __init__(self, cfg, recipe: str) -> None:
        from transformers import AutoTokenizer

        self.t_start = time.perf_counter()
        self.cfg, self.recipe, self.out = cfg, recipe, Path(cfg.out_dir)
        self.tdir = prepare_run(cfg)  # checked and seeded before any random initialisation
        self.settings = run_settings(cfg)
        self.train, self.held_out = load_corpus(cfg.data)
        self.tokenizer = AutoTokenizer.from_pretrained(self.tdir, local_files_only=True)
        self.cached = cfg.teacher.source == "cache"
        self.cache_s = 0.0
        self.caches = None
        self.source = self.held = None

    def sources(self, **cache_options) -> tuple:
        """Create ``out_dir``; build (or reopen) the teacher caches when ``teacher.source`` is
        ``cache`` (``cache_options``: :func:`prepare_cache`'s), timed as the report's
        ``timing_s.cache``; then the training and held-out batch sources (:func:`data_sources`).
        Returns the caches (None for a live teacher)."""
        self.out.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        if self.cached:
            self.caches = prepare_cache(self.cfg, self.tdir, self.train, self.held_out, **cache_options)
        self.cache_s = time.perf_counter() - t0
        self.source, self.held = data_sources(self.cfg, self.tokenizer, self.train, self.held_out, self.caches)
        return self.caches

    def masker(self, vocab_size: int) -> Masker:
        """MLM masking of live batches over this run's training rows."""
        ids, am = training_rows(self.tokenizer, self.train, self.cfg.data)
        return Masker(self.cfg.mlm, self.tokenizer, vocab_size, ids, am)

    def stage(self, name: str, model: nn.Module, loss, steps: int, out_dir: Path, *, teacher: nn.Module | None = None,
              trainable=None, lr: float | None = None, preferred_optimizer: str | None = None):
        """A :class:`~kdfast.train.stage.Stage` on this run's batch sources and settings."""
        from kdfast.train.stage import Stage

        config = train_config(self.cfg.train, steps, out_dir, self.cfg.progress, lr=lr,
                              preferred_optimizer=preferred_optimizer)
        return Stage(name, model, loss, self.source, config, held_out=self.held, teacher=teacher, trainable=trainable,
                     settings=self.settings)

    def plan(self, stages: list, student: nn.Module, *, teacher_layers: int, student_info: dict,
             report: dict | None = None, save=None, then=None):
        """The run's :class:`~kdfast.train.stage.Plan`: after the stages, the student (by
        ``save(path)``, default its ``save_pretrained``) and the tokenizer are saved to
        ``<out_dir>/student``, ``then(report)`` may add to the report (e.g. task distillation), and
        ``report.json`` is written with the teacher, the student (``student_info`` beside its
        directory and parameter count), ``report``'s entries, the stages and the timing."""
        from kdfast.models import count
        from kdfast.models.teachers import teacher_params
        from kdfast.train.stage import Plan

        def finish(entries: list[dict]) -> dict:
            student_dir = self.out / "student"
            (save or student.save_pretrained)(student_dir)
            self.tokenizer.save_pretrained(student_dir)
            out = {"recipe": self.recipe, "out_dir": str(self.out), "config": config_to_dict(self.cfg),
                   "teacher": {"dir": str(self.tdir), "source": self.cfg.teacher.source,
                               "params": teacher_params(self.tdir), "layers": teacher_layers},
                   "student": {"dir": str(student_dir), "params": int(count(student)["params"]), **student_info},
                   **(report or {}), "stages": entries, "timing_s": {"cache": round(self.cache_s, 2)}}
            if then is not None:
                then(out)
            out["timing_s"]["total"] = round(time.perf_counter() - self.t_start, 2)
            write_report(self.out, out)
            return out

        return Plan(stages, finish)
