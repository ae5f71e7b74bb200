"""TinyBERT (Jiao et al., 2020): general distillation, then (optionally) task distillation.

General distillation, on plain (unmasked) text with the uniform layer map g(m) = m N / M
(:func:`kdfast.models.uniform_layer_map`, embeddings 0 -> 0):

    L = alpha_hidden * sum_{m=0..M} MSE(h_s^m W_m, h_t^g(m)) + alpha_attention * sum_{m=1..M} MSE(S_s^m, S_t^g(m))

with learned projections W_m (d_s -> d_t, owned by :class:`kdfast.DistillationLoss` and trained
with the student) and S the pre-softmax attention scores, computed from queries and keys
(:func:`kdfast.flash_attention_transfer`, no L x L map). The general student is saved with
``save_pretrained``; with a ``task`` section, ``kdfast.train.task.task_distill`` then runs task
distillation (intermediate layers, then the prediction layer's soft cross-entropy against a
fine-tuned teacher) starting from it.

Defaults: the loss (weights 1, uniform map, projections, score MSE) and the TinyBERT-4 shape
(d = 312, d_i = 1200, 12 heads) follow the paper (a head count that divides the teacher's, or
that it divides, works too: a student head is taught the mean scores of its group of teacher
heads, :func:`kdfast.losses.map_teacher_heads`); M defaults to the largest divisor of the
teacher's layer count not above the preset's (4 for a 12-layer teacher, 3 for the 6-layer
MiniLM); lr, steps and batch size are sized for the embedded corpus (the paper's general
distillation used 256 x 128-token batches for 3 epochs of a large corpus).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kdfast.models.teachers import load_teacher
from kdfast.train.recipes import common
from kdfast.train.recipes.config import DataSettings, TeacherSettings, TrainSettings
from kdfast.train.stage import Plan, distillation_step
from kdfast.train.teacher import QK_PRESCALED, CachedTeacher, LiveTeacher, capture_outputs

NAME = "tinybert"
STEP_KEYS = ("steps",)


@dataclass
class TinyBertStudent:
    """``kdfast.models.tinybert(preset, ...)`` with these overrides (None: the preset's; vocabulary,
    positions and token types always the teacher's; ``num_hidden_layers`` None: the largest
    divisor of the teacher's layer count not above the preset's)."""

    preset: str = "tinybert-4"
    num_hidden_layers: int | None = None
    hidden_size: int | None = None
    intermediate_size: int | None = None
    num_attention_heads: int | None = None

    def validate(self) -> None:
        from kdfast.models.students import TINYBERT_PRESETS

        if self.preset not in TINYBERT_PRESETS:
            raise ValueError(f"preset must be one of {sorted(TINYBERT_PRESETS)}, got {self.preset!r}")
        for name in ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ValueError(f"{name} must be >= 1, got {v}")


@dataclass
class TaskSettings:
    """Task distillation after the general stage: ``name`` (None: skip), the fine-tuned teacher's
    directory, the task's local data directory and further ``options`` for ``task_distill``."""

    name: str | None = None
    teacher_dir: str | None = None
    data_dir: str | None = None
    options: dict = field(default_factory=dict)

    def validate(self) -> None:
        if self.name is not None and (not self.teacher_dir or not self.data_dir):
            raise ValueError(f"teacher_dir and data_dir are required for task {self.name!r}")


@dataclass
class TinyBertRecipe:
    """Settings of the ``tinybert`` recipe (see the module docstring)."""

    out_dir: str = "runs/tinybert"
    progress: bool = True
    steps: int = 200
    alpha_hidden: float = 1.0
    alpha_attention: float = 1.0
    student: TinyBertStudent = field(default_factory=TinyBertStudent)
    teacher: TeacherSettings = field(default_factory=TeacherSettings)
    data: DataSettings = field(default_factory=DataSettings)
    train: TrainSettings = field(default_factory=lambda: TrainSettings(
        batch_size=16, lr=1e-4, weight_decay=0.01, warmup=0.1, max_grad_norm=1.0))
    task: TaskSettings = field(default_factory=TaskSettings)

    def validate(self) -> None:
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        for name in ("alpha_hidden", "alpha_attention"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not (self.alpha_hidden or self.alpha_attention):
            raise ValueError("alpha_hidden and alpha_attention are both 0: nothing to train")


def student_layers(n_teacher: int, preset_layers: int) -> int:
    """The largest divisor of ``n_teacher`` that is <= ``preset_layers`` (a uniform map needs one)."""
    return max(d for d in range(1, min(n_teacher, preset_layers) + 1) if n_teacher % d == 0)


def build_student(settings: TinyBertStudent, teacher_config):
    """:func:`kdfast.models.students.tinybert_student` of the teacher: a BERT, or for a ModernBERT
    teacher a ModernBERT whose layers take the attention types of the teacher layers they map to."""
    from kdfast.models.students import TINYBERT_PRESETS, tinybert_student

    preset = TINYBERT_PRESETS[settings.preset]
    overrides = {k: getattr(settings, k) for k in ("hidden_size", "intermediate_size", "num_attention_heads")
                 if getattr(settings, k) is not None}
    overrides["num_hidden_layers"] = settings.num_hidden_layers or student_layers(
        teacher_config.num_hidden_layers, preset["num_hidden_layers"])
    try:
        return tinybert_student(teacher_config, settings.preset, **overrides)
    except ValueError as e:
        raise ValueError(f"student: {e}") from None


def plan(cfg: TinyBertRecipe) -> Plan:
    """The ``general`` stage (and, with a ``task`` section, task distillation after it, from the
    saved student); its plan saves the student and writes the report."""
    from transformers import AutoConfig

    import kdfast
    from kdfast.models import uniform_layer_map
    from kdfast.models.modernbert import attention_windows

    run = common.RecipeRun(cfg, NAME)
    tconf = AutoConfig.from_pretrained(run.tdir, local_files_only=True)
    student = build_student(cfg.student, tconf)
    common.check_student_size(cfg, student, run.tdir)
    n_t, n_s = tconf.num_hidden_layers, student.config.num_hidden_layers
    try:
        layer_map = uniform_layer_map(n_t, n_s)
    except ValueError as e:
        raise ValueError(f"student.num_hidden_layers: {e}") from None
    heads_s, heads_t = student.config.num_attention_heads, tconf.num_attention_heads
    if cfg.alpha_attention and max(heads_s, heads_t) % min(heads_s, heads_t):
        # the attention term maps groups of heads (kdfast.losses.map_teacher_heads): one count must divide the other
        raise ValueError(f"student.num_attention_heads ({heads_s}) and the teacher's ({heads_t}) must divide one "
                         f"another for the attention term (or set alpha_attention to 0)")
    weights = {"hidden": cfg.alpha_hidden, "attention": cfg.alpha_attention}
    # ModernBERT's local layers: each attention pair compares its band (the student's layers take
    # the types of the teacher layers they map to, so the pairs' windows agree)
    t_windows, s_windows = attention_windows(tconf), attention_windows(student.config)
    windows = dict(teacher_windows=t_windows, student_windows=s_windows) \
        if any(w is not None for w in t_windows + s_windows) else {}
    loss_fn = kdfast.DistillationLoss(layer_map, weights, student_hidden_size=student.config.hidden_size,
                                      teacher_hidden_size=tconf.hidden_size, attention="mse",
                                      attention_source="qk", qk_prescaled=QK_PRESCALED, **windows)
    want_qk = bool(cfg.alpha_attention)
    caches = run.sources(logits="none", temperature=1.0,
                         layers=sorted(set(layer_map.values())) if cfg.alpha_hidden else [], qk=want_qk)
    live = None
    if run.cached:
        teacher = CachedTeacher.for_cache(caches[0])
    else:
        live = load_teacher(run.tdir, mlm_head=False)
        teacher = LiveTeacher(live, qk=want_qk)
    # the encoder alone: general distillation uses no logits, and the MLM head's [B, L, V] would be waste
    s_encoder = student.base_model
    step_loss = distillation_step(loss_fn, lambda batch, inputs: capture_outputs(s_encoder, inputs, qk=want_qk),
                                         teacher)
    stage = run.stage("general", student, step_loss, cfg.steps, run.out / "general", teacher=live)

    def task_distillation(report: dict) -> None:
        try:
            from kdfast.train.task import task_distill
        except ImportError as e:
            raise ValueError(f"task: task distillation needs kdfast.train.task.task_distill, which this build "
                             f"lacks ({e}); remove the task section to run general distillation only") from None
        report["task"] = task_distill(cfg.task.teacher_dir, report["student"]["dir"], cfg.task.name,
                                      cfg.task.data_dir, str(run.out / "task"), **cfg.task.options)

    return run.plan([stage], student, teacher_layers=n_t,
                    student_info={"layers": n_s, "hidden_size": student.config.hidden_size},
                    report={"layer_map": layer_map}, then=task_distillation if cfg.task.name is not None else None)
