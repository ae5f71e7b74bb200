"""MobileBERT (Sun et al., 2020): progressive knowledge transfer, then pre-training distillation.

The student (:class:`kdfast.models.KDMobileBertForMaskedLM`) has the teacher's depth and an
inter-block width equal to the teacher's hidden size, so that its feature maps (layer outputs)
compare with the teacher's one to one; inside each block it is narrow (``intra_bottleneck_size``,
by default a quarter of the width as in the paper's 512 -> 128, rounded down to a multiple of the
head count). The head count defaults to the paper's 4 when the teacher's is a multiple of 4 (the
attention KL then maps each student head to the mean scores of its group of teacher heads, see
:func:`kdfast.flash_attention_transfer`), else to the teacher's.

Stage 1, progressive knowledge transfer: for l = 1..L one stage of ``pkt.steps_per_layer`` steps
trains layer l on

    L_l = alpha_feature_map * FMT(h_s^l, h_t^l) + alpha_attention * KL(A_t^l || A_s^l)

(:func:`kdfast.feature_map_loss`; attention KL from queries and keys, no L x L map). The layers
below l are frozen (``pkt.lower_lr_scale = 0``, the paper's PKT) or trained at
``lower_lr_scale`` x lr (the softer variant), through optimizer param groups; the embeddings are
trained with layer 1, then count as a lower layer. The layers above l are not run. (From a
cache built with logits, i.e. with ``pretrain.steps`` > 0, stage 1 sees the cache's masked
inputs; live, it sees the plain text.)

Stage 2, pre-training distillation: every parameter, on masked text (15%, 80/10/10),

    L = alpha_kd * KL(p_t || p_s) + alpha_mlm * CE(s, labels)    (T = 1, 0.5 / 0.5)

over the masked tokens, i.e. the student's MLM predictions against 0.5 teacher + 0.5 one-hot.
The student's prediction-head transform runs on the counted tokens only and the decoder
projection, KD and MLM run in one :func:`kdfast.fused_linear_kd_loss` call (with a live teacher,
its decoder projection too; from the cache, against its top-k logits), so no [tokens, vocabulary]
logits exist in a step. ``pretrain.kd_rows``: ``masked`` (default, the paper's: the KD term on
the masked tokens, as the 0.5 / 0.5 mixture reads), ``all`` (KD on every real token, live
teacher only) or ``auto`` (``all`` live, ``masked`` from the cache). The log's ``kd_mlm`` is
alpha_kd KD + alpha_mlm MLM as the fused call computes it. This needs a teacher with an MLM head;
set ``pretrain.steps`` to 0 for one without.

Defaults: the losses, the freezing scheme, 0.5 / 0.5 at T = 1 and the LAMB optimizer (used where
the Distiller offers it) follow the paper; the step counts, batch size and lr are sized for the
embedded corpus (the paper used 4096-sequence batches).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from kdfast.models.teachers import load_teacher
from kdfast.train.recipes import common
from kdfast.train.recipes.config import DataSettings, MaskingSettings, TeacherSettings, TrainSettings
from kdfast.train.stage import Plan, StageLoss, distillation_step
from kdfast.train.teacher import QK_PRESCALED, CachedTeacher, CapturedOutputs, LiveTeacher

NAME = "mobilebert"
STEP_KEYS = ("pkt.steps_per_layer", "pretrain.steps")


@dataclass
class MobileBertStudent:
    """Student shape; None: derived from the teacher (width = the teacher's hidden size, depth and
    heads = 4 (the paper's) when the teacher's head count is a multiple of 4, else the teacher's,
    intra-bottleneck = width / 4 rounded down to a multiple of the heads,
    FFN = 4 x intra-bottleneck, embedding = min(128, width))."""

    intra_bottleneck_size: int | None = None
    num_attention_heads: int | None = None
    num_hidden_layers: int | None = None
    intermediate_size: int | None = None
    embedding_size: int | None = None
    num_feedforward_networks: int = 4

    def validate(self) -> None:
        for name in ("intra_bottleneck_size", "num_attention_heads", "num_hidden_layers", "intermediate_size",
                     "embedding_size"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ValueError(f"{name} must be >= 1, got {v}")
        if self.num_feedforward_networks < 1:
            raise ValueError(f"num_feedforward_networks must be >= 1, got {self.num_feedforward_networks}")


@dataclass
class PKTSettings:
    """Progressive knowledge transfer (stage 1)."""

    steps_per_layer: int = 40
    lower_lr_scale: float = 0.0  # 0: layers below the current one frozen (the paper's PKT)
    alpha_feature_map: float = 1.0
    alpha_attention: float = 1.0
    lr: float | None = None  # None: train.lr

    def validate(self) -> None:
        if self.steps_per_layer < 0:
            raise ValueError(f"steps_per_layer must be >= 0, got {self.steps_per_layer}")
        if self.lower_lr_scale < 0:
            raise ValueError(f"lower_lr_scale must be >= 0 (0 = frozen), got {self.lower_lr_scale}")
        if self.alpha_feature_map < 0 or self.alpha_attention < 0 or not (self.alpha_feature_map or self.alpha_attention):
            raise ValueError("alpha_feature_map and alpha_attention must be >= 0, not both 0")


@dataclass
class PretrainSettings:
    """Pre-training distillation (stage 2)."""

    steps: int = 100
    alpha_kd: float = 0.5
    alpha_mlm: float = 0.5
    temperature: float = 1.0
    kd_rows: str = "masked"  # masked | all | auto: the tokens the KD term counts (module docstring)
    lr: float | None = None  # None: train.lr

    def validate(self) -> None:
        if self.kd_rows not in common.KD_ROWS:
            raise ValueError(f"kd_rows must be one of {common.KD_ROWS}, got {self.kd_rows!r}")
        if self.steps < 0:
            raise ValueError(f"steps must be >= 0, got {self.steps}")
        if self.alpha_kd < 0 or self.alpha_mlm < 0 or not (self.alpha_kd or self.alpha_mlm):
            raise ValueError("alpha_kd and alpha_mlm must be >= 0, not both 0")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")


@dataclass
class MobileBertRecipe:
    """Settings of the ``mobilebert`` recipe (see the module docstring). ``--steps`` sets
    ``pkt.steps_per_layer``, and ``pretrain.steps`` only where the YAML file and ``--set`` do not
    (an explicit ``pretrain.steps: 0`` keeps stage 2 off)."""

    YIELDING_KEYS: ClassVar[tuple[str, ...]] = ("pretrain.steps",)

    out_dir: str = "runs/mobilebert"
    progress: bool = True
    student: MobileBertStudent = field(default_factory=MobileBertStudent)
    pkt: PKTSettings = field(default_factory=PKTSettings)
    pretrain: PretrainSettings = field(default_factory=PretrainSettings)
    teacher: TeacherSettings = field(default_factory=TeacherSettings)
    data: DataSettings = field(default_factory=DataSettings)
    mlm: MaskingSettings = field(default_factory=lambda: MaskingSettings(probability=0.15, smoothing=0.0))
    train: TrainSettings = field(default_factory=lambda: TrainSettings(
        batch_size=16, lr=1e-3, weight_decay=0.01, warmup=0.1, max_grad_norm=1.0))

    def validate(self) -> None:
        if not (self.pkt.steps_per_layer or self.pretrain.steps):
            raise ValueError("pkt.steps_per_layer and pretrain.steps are both 0: nothing to train")
        common.resolve_kd_rows(self.pretrain.kd_rows, self.teacher.source == "cache", "pretrain.kd_rows",
                               exact=self.teacher.exact)


def student_config(settings: MobileBertStudent, teacher_config):
    """``transformers.MobileBertConfig`` of the student (see :class:`MobileBertStudent`)."""
    from kdfast.models import mobilebert_config

    width = teacher_config.hidden_size
    t_heads = teacher_config.num_attention_heads
    heads = settings.num_attention_heads or (4 if t_heads % 4 == 0 else t_heads)
    if t_heads % heads and heads % t_heads:
        raise ValueError(f"student.num_attention_heads {heads} and the teacher's {t_heads} must divide one another "
                         f"(the attention transfer maps groups of heads)")
    layers = settings.num_hidden_layers or teacher_config.num_hidden_layers
    if layers != teacher_config.num_hidden_layers:
        raise ValueError(f"student.num_hidden_layers ({layers}) must equal the teacher's "
                         f"({teacher_config.num_hidden_layers}): progressive transfer maps layer l to layer l")
    intra = settings.intra_bottleneck_size or max(heads, (width // 4) // heads * heads)
    if intra % heads:
        raise ValueError(f"student.intra_bottleneck_size {intra} must be divisible by student.num_attention_heads "
                         f"{heads}")
    emb = settings.embedding_size or min(128, width)
    if emb > width:
        raise ValueError(f"student.embedding_size {emb} must be <= the width {width} (the teacher's hidden size)")
    return mobilebert_config("mobilebert", vocab_size=teacher_config.vocab_size, hidden_size=width,
                             intra_bottleneck_size=intra, num_attention_heads=heads, num_hidden_layers=layers,
                             intermediate_size=settings.intermediate_size or 4 * intra, embedding_size=emb,
                             num_feedforward_networks=settings.num_feedforward_networks,
                             max_position_embeddings=teacher_config.max_position_embeddings,
                             type_vocab_size=teacher_config.type_vocab_size,
                             pad_token_id=getattr(teacher_config, "pad_token_id", 0))


def forward_to_layer(encoder, input_ids: torch.Tensor, attention_mask: torch.Tensor, upto: int) -> CapturedOutputs:
    """Run a ``KDMobileBert`` through layer ``upto`` only (1-based); hidden states and unscaled q / k
    of those layers, read by :func:`kdfast.capture` as every other driver reads them."""
    from kdfast.capture import capture
    from kdfast.models.mobilebert import additive_mask

    with capture(encoder, qk=True, num_layers=upto) as cap:
        x = encoder.embeddings(input_ids)
        mask = additive_mask(attention_mask, x.dtype)
        for layer in encoder.encoder.layer[:upto]:
            x, _ = layer(x, mask, False, False)
    return CapturedOutputs(hidden_states=cap.hidden_states, q=cap.q, k=cap.k)


def pkt_groups(model, layer: int, lower_lr_scale: float) -> list[dict]:
    """Trainable param groups of stage ``layer`` (1-based): that layer (plus the embeddings at
    layer 1) at the full lr; the embeddings and layers below at ``lower_lr_scale`` x lr, or frozen
    (left out, ``requires_grad`` off) when it is 0. Everything else is frozen."""
    enc = model.mobilebert
    model.requires_grad_(False)
    current = list(enc.encoder.layer[layer - 1].parameters())
    lower = [p for l in enc.encoder.layer[:layer - 1] for p in l.parameters()]
    (current if layer == 1 else lower).extend(enc.embeddings.parameters())
    groups = [{"params": current}]
    if lower and lower_lr_scale > 0:
        groups.append({"params": lower, "lr_scale": lower_lr_scale})
    for g in groups:
        for p in g["params"]:
            p.requires_grad_(True)
    return groups


def make_pretrain_step_loss(settings: PretrainSettings, student: torch.nn.Module,
                            teacher: torch.nn.Module | None = None, *, masker: Callable | None = None,
                            backend: str = "auto", cached_head: common.LMHead | None = None) -> StageLoss:
    r"""Stage 2's step loss: ``batch -> (loss, {"kd_mlm": float})`` with

        loss = alpha_kd T^2 KL(p_t || p_s) over ``settings.kd_rows`` + alpha_mlm CE(s, labels) over the masked tokens

    through :func:`common.lm_distillation_loss`. ``teacher``: a ``transformers`` BERT with its MLM
    head, or None to read cache batches (masked ``input_ids``, ``labels``, ``topk_ids`` /
    ``topk_values`` / ``topk_lse``, or ``head_input`` with ``cached_head``, the projection of a
    ``logits: head`` cache: exact logits at every token). ``masker`` masks live batches."""
    cached = teacher is None
    exact = cached_head is not None
    kd_rows = common.resolve_kd_rows(settings.kd_rows, cached, "pretrain.kd_rows", exact=exact)
    t_head = cached_head
    if cached:  # the student has the teacher's depth
        source = CachedTeacher(student.config.num_hidden_layers)
    else:
        source, t_head = LiveTeacher(common.encoder_of(teacher, "teacher")), common.lm_head(teacher, "teacher")

    def step_loss(batch):
        am = batch["attention_mask"]
        if "labels" in batch:
            ids, labels = batch["input_ids"], batch["labels"]
        else:
            ids, labels = masker(batch["input_ids"], am)
        h_s = student.mobilebert(ids, am).last_hidden_state
        t_out = source(batch, {"input_ids": ids, "attention_mask": am})
        h_t = t_out.head_input if exact else None if cached else t_out.hidden_states[-1]
        sparse = None if exact else t_out.sparse_logits
        total = common.lm_distillation_loss(
            h_s, common.lm_head(student, "student"), labels, am, kd_rows=kd_rows, temperature=settings.temperature,
            alpha_kd=settings.alpha_kd, alpha_mlm=settings.alpha_mlm, teacher_hidden=h_t, teacher_head=t_head,
            teacher_sparse=sparse, backend=backend)
        return total, {"kd_mlm": float(total.detach())}

    # logged as one term, whichever of KD and MLM it holds
    (loss,) = common.lm_terms(settings.alpha_kd, settings.alpha_mlm, cached, exact).values()
    return StageLoss(step_loss, terms={"kd_mlm": loss})


def plan(cfg: MobileBertRecipe) -> Plan:
    """One stage per layer of progressive knowledge transfer (``pkt layer l``), then pre-training
    distillation (``pretrain distill``); its plan saves the student (as a ``transformers``
    MobileBERT) and writes the report."""
    from transformers import AutoConfig

    import kdfast
    from kdfast.models import KDMobileBertForMaskedLM

    run = common.RecipeRun(cfg, NAME)
    tconf = AutoConfig.from_pretrained(run.tdir, local_files_only=True)
    scfg = student_config(cfg.student, tconf)
    student = KDMobileBertForMaskedLM(scfg)
    common.check_student_size(cfg, student, run.tdir)
    n = tconf.num_hidden_layers
    pkt, pre = cfg.pkt, cfg.pretrain
    need_head = pre.steps > 0
    want_qk = bool(pkt.steps_per_layer and pkt.alpha_attention)
    if run.cached and need_head:  # refuse a headless teacher before its random head is cached
        load_teacher(run.tdir, mlm_head=True, needed_by="pretrain.steps")
    caches = run.sources(logits=cfg.teacher.cache_logits() if need_head else "none", temperature=pre.temperature,
                         layers=list(range(n + 1)) if pkt.steps_per_layer else [], qk=want_qk)
    teacher = None
    if run.cached:
        teacher_source = CachedTeacher.for_cache(caches[0])
    else:
        teacher = load_teacher(run.tdir, mlm_head=need_head, needed_by="pretrain.steps")
        # the encoder alone: stage 1 needs no logits (a teacher loaded with its head for stage 2
        # would otherwise project every token onto the vocabulary here)
        teacher_source = LiveTeacher(getattr(teacher, "bert", teacher), qk=want_qk)
    masker = run.masker(tconf.vocab_size) if not run.cached and need_head else None

    stages = []
    for layer in range(1, n + 1) if pkt.steps_per_layer else ():
        loss_fn = kdfast.DistillationLoss({layer: layer}, {"feature_map": pkt.alpha_feature_map,
                                                           "attention": pkt.alpha_attention},
                                          attention="kl", attention_source="qk", qk_prescaled=QK_PRESCALED)

        def student_outputs(batch, inputs, layer=layer):
            return forward_to_layer(student.mobilebert, batch["input_ids"], batch["attention_mask"], layer)

        stages.append(run.stage(f"pkt layer {layer}", student, distillation_step(loss_fn, student_outputs,
                                                                                        teacher_source),
                                pkt.steps_per_layer, run.out / f"pkt-layer{layer:02d}", teacher=teacher,
                                trainable=lambda layer=layer: pkt_groups(student, layer, pkt.lower_lr_scale),
                                lr=pkt.lr, preferred_optimizer="lamb"))

    if pre.steps:
        def every_parameter():
            student.requires_grad_(True)

        head = common.cached_lm_head(caches[0]) if cfg.teacher.exact else None
        stages.append(run.stage("pretrain distill", student, make_pretrain_step_loss(pre, student, teacher,
                                                                                     masker=masker, cached_head=head),
                                pre.steps, run.out / "pretrain", teacher=teacher, trainable=every_parameter,
                                lr=pre.lr, preferred_optimizer="lamb"))

    return run.plan(stages, student, teacher_layers=n,
                    save=lambda path: student.to_transformers().save_pretrained(path),
                    student_info={"layers": n, "hidden_size": scfg.hidden_size,
                                  "intra_bottleneck_size": scfg.intra_bottleneck_size,
                                  "num_attention_heads": scfg.num_attention_heads})

