"""DistilBERT (Sanh et al., 2019): a student of every other teacher layer, initialised from them,
trained on masked text with

    L = alpha_kd * T^2 KL(softmax(t/T) || softmax(s/T)) + alpha_mlm * CE(s, labels) + alpha_cos * (1 - cos(h_s, h_t))

(T = 2, 5.0 / 2.0 / 1.0; cosine between the last hidden states over real tokens), MLM masking of
15% (80/10/10) with the original's frequency smoothing (token j chosen with probability
proportional to count(j)^-0.7); from the cache the masking is the cache's (plain 15%, no smoothing).

The fast path: the student's prediction-head transform (dense, GELU, LayerNorm) runs on the
counted tokens only, and the decoder projection, KD and MLM run in
:func:`kdfast.fused_linear_kd_loss` (with a live teacher, its decoder projection too), so neither
model's [tokens, vocabulary] logits exist in a step (:func:`common.lm_distillation_loss`); the
cosine term is :func:`kdfast.cosine_loss`. ``kd_rows`` picks the tokens the KD term counts:
``all`` (every real token: the original script's default, ``restrict_ce_to_mask=False``),
``masked`` (the MLM-masked tokens only: its ``restrict_ce_to_mask=True``, about 15% of the rows,
so the projections shrink by as much) or ``auto`` (default): ``all`` with a live teacher, as the
original trains, and ``masked`` from the cache, which keeps the teacher's logits at the masked
tokens only. The log's ``kd_mlm`` is alpha_kd KD + alpha_mlm MLM as the one fused call computes it.

Defaults: loss weights, temperature, masking, layer choice, lr 5e-4, warm-up 5%, no weight decay
and clipping at 5.0 follow the original training script; steps, batch size (the original used
about 4K sequences per batch) and max_length (512 there) are sized for the embedded corpus.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from kdfast.models.teachers import load_teacher
from kdfast.train.recipes import common
from kdfast.train.recipes.config import DataSettings, MaskingSettings, TeacherSettings, TrainSettings
from kdfast.train.stage import Plan, StageLoss
from kdfast.train.teacher import CachedTeacher, LiveTeacher

NAME = "distilbert"
STEP_KEYS = ("steps",)


@dataclass
class DistilBertRecipe:
    """Settings of the ``distilbert`` recipe (see the module docstring)."""

    out_dir: str = "runs/distilbert"
    progress: bool = True
    steps: int = 200
    student_layers: list[int] | None = None  # 0-based teacher layers; None: every other one (DistilBERT's choice)
    temperature: float = 2.0
    alpha_kd: float = 5.0
    alpha_mlm: float = 2.0
    alpha_cos: float = 1.0
    kd_rows: str = "auto"  # all | masked | auto (all live, masked from the cache): see the module docstring
    teacher: TeacherSettings = field(default_factory=TeacherSettings)
    data: DataSettings = field(default_factory=DataSettings)
    mlm: MaskingSettings = field(default_factory=lambda: MaskingSettings(probability=0.15, smoothing=0.7))
    train: TrainSettings = field(default_factory=lambda: TrainSettings(
        batch_size=16, lr=5e-4, weight_decay=0.0, warmup=0.05, max_grad_norm=5.0))

    def validate(self) -> None:
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        for name in ("alpha_kd", "alpha_mlm", "alpha_cos"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not (self.alpha_kd or self.alpha_mlm or self.alpha_cos):
            raise ValueError("alpha_kd, alpha_mlm and alpha_cos are all 0: nothing to train")
        common.resolve_kd_rows(self.kd_rows, self.teacher.source == "cache", exact=self.teacher.exact)


def every_other_layer(n_teacher: int) -> list[int]:
    """n_teacher // 2 layers spread evenly, keeping the first and the last: round(i (n - 1) / (m - 1)).
    For 12 layers this is DistilBERT's (0, 2, 4, 7, 9, 11)."""
    m = max(1, n_teacher // 2)
    if m == 1:
        return [0]
    return [int(i * (n_teacher - 1) / (m - 1) + 0.5) for i in range(m)]


def make_step_loss(cfg: DistilBertRecipe, student: torch.nn.Module, teacher: torch.nn.Module | None = None, *,
                   masker: Callable | None = None, n_teacher_layers: int,
                   backend: str = "auto", cached_head: common.LMHead | None = None) -> StageLoss:
    r"""The recipe's step loss: ``batch -> (loss, {term: float})`` with

        loss = alpha_kd KD + alpha_mlm MLM + alpha_cos (1 - cos(h_s^last, h_t^last))

    (module docstring), KD over ``cfg.kd_rows``. ``teacher``: a ``transformers`` masked-LM model (with its
    MLM head when ``alpha_kd`` > 0), or None to read the teacher from cache batches (masked
    ``input_ids``, ``labels``, top-k logits ``topk_ids`` / ``topk_values`` / ``topk_lse`` and
    ``hidden_{n_teacher_layers}``). ``masker`` masks live batches (:class:`common.Masker`).
    ``cached_head``: from a ``logits: head`` cache (:func:`common.cached_lm_head`), the teacher's
    output projection; its batches' ``head_input`` then gives the teacher's exact logits at every
    token, so KD runs on every real token (``kd_rows`` auto / all) as with a live teacher."""
    import kdfast

    cached = teacher is None
    exact = cached_head is not None
    kd_rows = common.resolve_kd_rows(cfg.kd_rows, cached, exact=exact)
    s_encoder = common.encoder_of(student, "student")
    t_head = cached_head
    if cached:
        source = CachedTeacher(n_teacher_layers)
    else:
        source = LiveTeacher(teacher.base_model)
        if cfg.alpha_kd:
            t_head = common.lm_head(teacher, "teacher")

    def step_loss(batch):
        am = batch["attention_mask"]
        if "labels" in batch:  # the cache holds the masked inputs and their labels
            ids, labels = batch["input_ids"], batch["labels"]
        else:
            ids, labels = masker(batch["input_ids"], am)
        h_s = s_encoder(input_ids=ids, attention_mask=am).last_hidden_state
        t_out = source(batch, {"input_ids": ids, "attention_mask": am})
        h_t = t_out.hidden_states[n_teacher_layers]  # the last layer's (None from a cache that kept no states)
        sparse = t_out.sparse_logits if cfg.alpha_kd and not exact else None
        head_in = t_out.head_input if exact else h_t  # what the teacher head's transform reads
        total, terms = 0.0, {}
        if cfg.alpha_kd or cfg.alpha_mlm:
            value = common.lm_distillation_loss(
                h_s, common.lm_head(student, "student"), labels, am, kd_rows=kd_rows, temperature=cfg.temperature,
                alpha_kd=cfg.alpha_kd, alpha_mlm=cfg.alpha_mlm, teacher_hidden=head_in, teacher_head=t_head,
                teacher_sparse=sparse, backend=backend)
            name = "kd_mlm" if cfg.alpha_kd and cfg.alpha_mlm else "kd" if cfg.alpha_kd else "mlm"
            weight = 1.0 if name == "kd_mlm" else cfg.alpha_kd or cfg.alpha_mlm  # kd_mlm is weighted as computed
            total, terms[name] = total + value, float(value.detach()) / weight
        if cfg.alpha_cos:
            value = kdfast.cosine_loss(h_s, h_t.to(h_s.dtype), am, backend=backend)
            total, terms["cos"] = total + cfg.alpha_cos * value, float(value.detach())
        return total, terms

    terms = common.lm_terms(cfg.alpha_kd, cfg.alpha_mlm, cached, exact)
    if cfg.alpha_cos:
        terms["cos"] = "cosine_loss"
    return StageLoss(step_loss, terms=terms)


def plan(cfg: DistilBertRecipe) -> Plan:
    """The recipe's one stage, ``distil``: the student initialised from every other teacher layer,
    trained on :func:`make_step_loss` (live teacher or cache); its plan saves the student and
    writes the report (also ``report.json``)."""
    from kdfast.models import distilbert_from_teacher

    run = common.RecipeRun(cfg, NAME)
    cached = run.cached
    # the KD term needs the teacher's MLM head; so does a cache (it stores logits to mask its inputs)
    teacher = load_teacher(run.tdir, mlm_head=bool(cfg.alpha_kd) or cached,
                           needed_by="alpha_kd" if not cached else "alpha_kd and alpha_mlm (or use "
                           "teacher.source=live)")
    n_t = teacher.config.num_hidden_layers
    layers = cfg.student_layers if cfg.student_layers is not None else every_other_layer(n_t)
    try:
        student = distilbert_from_teacher(teacher, layers=layers)
    except ValueError as e:
        raise ValueError(f"student_layers: {e}") from None
    common.check_student_size(cfg, student, run.tdir)
    if cached and not cfg.alpha_kd and not cfg.alpha_mlm:
        raise ValueError("teacher.source=cache with alpha_kd = alpha_mlm = 0 would cache unmasked text: "
                         "the cosine-only run needs teacher.source=live (or the demo)")
    # with alpha_kd = 0 the cache still masks (1 logit kept) so that the MLM labels exist
    caches = run.sources(logits=cfg.teacher.cache_logits(None if cfg.alpha_kd else 1), temperature=cfg.temperature,
                         layers=[n_t] if cfg.alpha_cos else [], qk=False)
    if cached:
        teacher = None  # the cache replaces it: its weights only initialised the student
    masker = None if cached else run.masker(student.config.vocab_size)
    head = common.cached_lm_head(caches[0]) if cfg.teacher.exact else None
    step_loss = make_step_loss(cfg, student, teacher, masker=masker, n_teacher_layers=n_t, cached_head=head)
    stage = run.stage("distil", student, step_loss, cfg.steps, run.out, teacher=teacher)
    return run.plan([stage], student, teacher_layers=n_t,
                    student_info={"layers": len(layers), "init_from_teacher_layers": list(layers)},
                    report={"kd_rows": common.resolve_kd_rows(cfg.kd_rows, cached, exact=cfg.teacher.exact)})
