"""DistilBERT (Sanh et al., 2019): a student of every other teacher layer, initialised from them,
trained on masked text with

    L = alpha_kd * T^2 KL(softmax(t/T) || softmax(s/T)) + alpha_mlm * CE(s, labels) + alpha_cos * (1 - cos(h_s, h_t))

(T = 2, 5.0 / 2.0 / 1.0; cosine between the last hidden states over real tokens), MLM masking of
15% (80/10/10) with the original's frequency smoothing (token j chosen with probability
proportional to count(j)^-0.7). The KD term counts every real token with a live teacher; from the
cache (top-k logits kept at the masked tokens only) it counts the masked tokens, and the masking
is the cache's (plain 15%, no smoothing).

Defaults: loss weights, temperature, masking, layer choice, lr 5e-4, warm-up 5%, no weight decay
and clipping at 5.0 follow the original training script; steps, batch size (the original used
about 4K sequences per batch) and max_length (512 there) are sized for the embedded corpus.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from kdfast.train.recipes import common
from kdfast.train.recipes.config import DataSettings, MaskingSettings, TeacherSettings, TrainSettings, config_to_dict

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


def every_other_layer(n_teacher: int) -> list[int]:
    """n_teacher // 2 layers spread evenly, keeping the first and the last: round(i (n - 1) / (m - 1)).
    For 12 layers this is DistilBERT's (0, 2, 4, 7, 9, 11)."""
    m = max(1, n_teacher // 2)
    if m == 1:
        return [0]
    return [int(i * (n_teacher - 1) / (m - 1) + 0.5) for i in range(m)]


def run(cfg: DistilBertRecipe, *, resume: bool = False, allow_changed_settings: bool = False) -> dict:
    """Distil the teacher into a DistilBERT-style student; returns the report (also ``report.json``)."""
    import kdfast
    from transformers import AutoTokenizer

    from kdfast.models import count, distilbert_from_teacher

    t_start = time.perf_counter()
    out = Path(cfg.out_dir)
    tdir = common.prepare_run(cfg)  # checked and seeded before any random initialisation
    stage_opts = dict(settings=common.run_settings(cfg), allow_changed_settings=allow_changed_settings)
    train, held_out = common.load_corpus(cfg.data)
    cached = cfg.teacher.source == "cache"
    # the KD term needs the teacher's MLM head; so does a cache (it stores logits to mask its inputs)
    teacher = common.load_teacher(tdir, mlm_head=bool(cfg.alpha_kd) or cached,
                                  needed_by="alpha_kd" if not cached else "alpha_kd and alpha_mlm (or use "
                                  "teacher.source=live)")
    tokenizer = AutoTokenizer.from_pretrained(tdir, local_files_only=True)
    n_t = teacher.config.num_hidden_layers
    layers = cfg.student_layers if cfg.student_layers is not None else every_other_layer(n_t)
    try:
        student = distilbert_from_teacher(teacher, layers=layers)
    except ValueError as e:
        raise ValueError(f"student_layers: {e}") from None
    n_s = len(layers)
    out.mkdir(parents=True, exist_ok=True)

    t0 = time.perf_counter()
    caches = None
    if cached:
        if not cfg.alpha_kd and not cfg.alpha_mlm:
            raise ValueError("teacher.source=cache with alpha_kd = alpha_mlm = 0 would cache unmasked text: "
                             "the cosine-only run needs teacher.source=live (or the demo)")
        # with alpha_kd = 0 the cache still masks (1 logit kept) so that the MLM labels exist
        caches = common.prepare_cache(cfg, tdir, train, held_out, logits=f"topk:{cfg.teacher.topk if cfg.alpha_kd else 1}",
                                      temperature=cfg.temperature, layers=[n_t] if cfg.alpha_cos else [], qk=False)
        teacher = None  # the cache replaces it: its weights only initialised the student
    cache_s = time.perf_counter() - t0
    source, held = common.data_sources(cfg, tokenizer, train, held_out, caches)
    masker = None
    if not cached:
        ids, am = common.tokenize(tokenizer, train, cfg.data.max_length)
        masker = common.Masker(cfg.mlm, tokenizer, student.config.vocab_size, ids, am)

    cosine = kdfast.DistillationLoss({n_s: n_t}, {"cosine": 1.0}) if cfg.alpha_cos else None
    kd = kdfast.DistillationLoss({n_s: n_t}, {"logits": 1.0}, temperature=cfg.temperature) if cfg.alpha_kd else None

    def step_loss(batch):
        am = batch["attention_mask"]
        if "labels" in batch:  # the cache holds the masked inputs and their labels
            ids, labels = batch["input_ids"], batch["labels"]
        else:
            ids, labels = masker(batch["input_ids"], am)
        s = student(input_ids=ids, attention_mask=am, output_hidden_states=True)
        s_out = {"hidden_states": s.hidden_states, "logits": s.logits}
        if cached:
            t_out = common.cached_teacher_outputs(batch, n_t, 1, s.logits.dtype)
        else:
            with torch.no_grad():
                t_out = common.bert_outputs(teacher, ids, am)
        total, terms = 0.0, {}
        if cfg.alpha_kd:
            if cached:
                rows = labels != -100
                value = kdfast.sparse_kd_loss(s.logits[rows], batch["topk_ids"], batch["topk_values"],
                                              teacher_logsumexp=batch["topk_lse"], temperature=cfg.temperature)
            else:
                value = kd(s_out, t_out, am)[0]
            total, terms["kd"] = total + cfg.alpha_kd * value, float(value.detach())
        if cfg.alpha_mlm:
            value = F.cross_entropy(s.logits.flatten(0, -2).float(), labels.flatten(), ignore_index=-100)
            total, terms["mlm"] = total + cfg.alpha_mlm * value, float(value.detach())
        if cfg.alpha_cos:
            value = cosine(s_out, t_out, am)[0]
            total, terms["cos"] = total + cfg.alpha_cos * value, float(value.detach())
        return total, terms

    tc = common.train_config(cfg.train, cfg.steps, out, cfg.progress)
    stage = common.run_stage("distil", student, step_loss, source, held, tc, resume=resume, seed=cfg.train.seed,
                             **stage_opts)
    student.save_pretrained(out / "student")
    tokenizer.save_pretrained(out / "student")
    report = {
        "recipe": NAME, "out_dir": str(out), "config": config_to_dict(cfg),
        "teacher": {"dir": str(tdir), "source": cfg.teacher.source, "params": common.teacher_params(tdir),
                    "layers": n_t},
        "student": {"dir": str(out / "student"), "params": int(count(student)["params"]), "layers": n_s,
                    "init_from_teacher_layers": list(layers)},
        "kd_rows": "masked tokens (cached logits)" if cached else "all real tokens",
        "stages": [stage],
        "timing_s": {"cache": round(cache_s, 2), "total": round(time.perf_counter() - t_start, 2)},
    }
    common.write_report(out, report)
    return report
