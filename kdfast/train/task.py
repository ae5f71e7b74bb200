"""Task-specific training on local GLUE-format data: fine-tuning and TinyBERT's task distillation.

``finetune_and_eval``: fine-tune a (student) BERT on a GLUE task with the ``Distiller`` loop and
report the task's GLUE metric on the dev split(s). ``task_distill``: TinyBERT stage 2,
intermediate-layer then prediction-layer distillation from a fine-tuned teacher, then the same
evaluation. Both write ``metrics.json`` and the trained model under ``out_dir``.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdfast.data import check_max_length, model_positions
from kdfast.losses._checks import check_positive
from kdfast.train import stage
from kdfast.train.data import TokenBatches
from kdfast.train.distiller import MAX_SEED, TrainConfig, check_finite, check_int, check_out_dir, seed_everything
from kdfast.train.glue import GlueTask, TaskExamples, compute_metrics, find_split_files, get_task, load_split
from kdfast.train.teacher import QK_PRESCALED, LiveTeacher, capture_outputs

__all__ = ["encode_examples", "evaluate", "finetune_and_eval", "format_eval_table", "load_task_data", "predict", "task_distill"]


# ---- data ----------------------------------------------------------------------------------------

def load_task_data(task: GlueTask, data_dir: str, max_train_examples: int | None = None
                   ) -> tuple[TaskExamples, dict[str, TaskExamples]]:
    """The train split (its first ``max_train_examples``) and every dev split of ``task``."""
    if max_train_examples is not None and (isinstance(max_train_examples, bool) or max_train_examples < 1):
        raise ValueError(f"max_train_examples must be a positive int or None, got {max_train_examples!r}")
    files = find_split_files(task, data_dir)
    train = load_split(task, files["train"]).head(max_train_examples)
    return train, {split: load_split(task, files[split]) for split in task.dev_splits}


def encode_examples(tokenizer, task: GlueTask, examples: TaskExamples, max_length: int) -> dict[str, Tensor]:
    """``input_ids``, ``attention_mask``, ``token_type_ids`` [E, L] (padded to the longest example,
    at most ``max_length``; pairs truncated longest-first) and ``labels`` [E] (int64 class ids, or
    float32 scores for regression)."""
    if max_length < 8:
        raise ValueError(f"max_length must be >= 8, got {max_length}")
    enc = tokenizer(*examples.texts, truncation=True, max_length=max_length, padding="longest",
                    return_token_type_ids=True, return_tensors="pt")
    dtype = torch.float32 if task.is_regression else torch.int64
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
            "token_type_ids": enc["token_type_ids"], "labels": torch.tensor(examples.labels, dtype=dtype)}


def _model_inputs(model: nn.Module, batch: dict[str, Tensor]) -> dict[str, Tensor]:
    """The batch cut to its longest real example; token types only for models that have them
    (a DistilBERT-style student keeps one token type and must not see type 1)."""
    length = int(batch["attention_mask"].sum(1).max())
    inputs = {"input_ids": batch["input_ids"][:, :length], "attention_mask": batch["attention_mask"][:, :length]}
    if "token_type_ids" in batch and getattr(model.config, "type_vocab_size", 1) > 1:
        inputs["token_type_ids"] = batch["token_type_ids"][:, :length]
    return inputs


# ---- models --------------------------------------------------------------------------------------

# A tokenizer needs its vocabulary: one of these (the rest of TOKENIZER_FILES is configuration).
# A folder without one still "loads" a tokenizer of a few special tokens that maps every word to
# [UNK], so it is refused instead.
VOCABULARY_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "spiece.model", "sentencepiece.bpe.model",
                    "tokenizer.model")


def _load_tokenizer(*model_dirs: str):
    """The tokenizer of the first of ``model_dirs`` that holds one (a vocabulary file, one of
    ``VOCABULARY_FILES``); ValueError naming the folders and the files missing from them."""
    from transformers import AutoTokenizer

    for d in model_dirs:
        if not any((Path(d) / name).is_file() for name in VOCABULARY_FILES):
            continue
        try:
            return AutoTokenizer.from_pretrained(d, local_files_only=True)
        except (OSError, ValueError):
            continue
    raise ValueError(f"no usable tokenizer in {' or '.join(repr(d) for d in model_dirs)}: none of "
                     f"{', '.join(VOCABULARY_FILES)} is there (save the tokenizer the model was trained with "
                     f"beside it: tokenizer.save_pretrained(folder))")


def _check_tokenizer_fits(tokenizer, model: nn.Module, name: str, model_dir: str) -> None:
    """Warn when the tokenizer's vocabulary is far smaller than the model's (under half): most of
    the model's embedding rows would never be read, a sign of another model's tokenizer."""
    import warnings

    vocab = getattr(model.config, "vocab_size", None)
    if isinstance(vocab, int) and len(tokenizer) < vocab // 2:
        warnings.warn(f"{name} {model_dir!r}: its tokenizer has {len(tokenizer)} tokens but the model's vocabulary "
                      f"{vocab}; is it the tokenizer the model was trained with?", stacklevel=3)


def _check_model_dir(name: str, path: str) -> None:
    if not Path(path).is_dir() or not (Path(path) / "config.json").is_file():
        raise ValueError(f"{name} {path!r} is not a model directory (no config.json; save_pretrained layout expected)")


def _load_classifier(model_dir: str, task: GlueTask, name: str = "model_dir"):
    """A sequence classifier for ``task`` from ``model_dir``: a base or MLM checkpoint gets a fresh
    head; a classifier with another label count gets its head replaced."""
    from transformers import AutoModelForSequenceClassification

    from kdfast.models.teachers import load_quietly

    _check_model_dir(name, model_dir)
    labels = task.labels or ("score",)
    try:  # the classification head (and a pooler an MLM checkpoint lacks) start fresh by design
        model, _ = load_quietly(
            AutoModelForSequenceClassification, model_dir, fresh=("classifier.", "pooler.", "score.", "pre_classifier."),
            num_labels=task.num_labels, ignore_mismatched_sizes=True,
            problem_type="regression" if task.is_regression else "single_label_classification",
            id2label=dict(enumerate(labels)), label2id={n: i for i, n in enumerate(labels)})
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"{name} {model_dir!r}: cannot load a sequence classifier ({e})") from None
    return model


def _load_teacher(teacher_dir: str, task: GlueTask):
    from transformers import AutoModelForSequenceClassification

    from kdfast.models.teachers import check_teacher_architecture

    _check_model_dir("teacher_dir", teacher_dir)
    check_teacher_architecture(teacher_dir, "teacher_dir")
    try:
        teacher = AutoModelForSequenceClassification.from_pretrained(teacher_dir, local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"teacher_dir {teacher_dir!r}: cannot load a sequence classifier ({e})") from None
    if teacher.config.num_labels != task.num_labels:
        raise ValueError(f"teacher_dir {teacher_dir!r} has {teacher.config.num_labels} outputs but {task.name} needs "
                         f"{task.num_labels}: the teacher must be fine-tuned on the task first")
    return teacher.eval().requires_grad_(False)


def _task_loss(task: GlueTask, logits: Tensor, labels: Tensor) -> Tensor:
    """Cross-entropy on class ids, or MSE on the single regression output."""
    if task.is_regression:
        return F.mse_loss(logits.squeeze(-1).float(), labels.float())
    return F.cross_entropy(logits.float(), labels)


# ---- evaluation ----------------------------------------------------------------------------------

@torch.no_grad()
def predict(model: nn.Module, encoded: dict[str, Tensor], batch_size: int = 64) -> Tensor:
    """The model's logits [E, num_labels] for encoded examples, in eval mode, in batches."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out = []
    try:
        for i in range(0, encoded["input_ids"].shape[0], batch_size):
            batch = {k: v[i:i + batch_size].to(device) for k, v in encoded.items() if k != "labels"}
            out.append(model(**_model_inputs(model, batch)).logits.float().cpu())
    finally:
        model.train(was_training)
    return torch.cat(out)


def evaluate(model: nn.Module, task: GlueTask, encoded_splits: dict[str, dict[str, Tensor]],
             batch_size: int = 64) -> dict[str, dict[str, float]]:
    """``{split: {metric: value}}``: the task's GLUE metrics of the model's predictions (arg-max
    class, or the regression output) against each split's labels."""
    results = {}
    for split, enc in encoded_splits.items():
        logits = predict(model, enc, batch_size)
        pred = logits.squeeze(-1) if task.is_regression else logits.argmax(-1)
        results[split] = compute_metrics(task, pred, enc["labels"])
    return results


def _majority_metrics(task: GlueTask, train: TaskExamples, devs: dict[str, TaskExamples]) -> dict | None:
    """The metrics of always predicting the most common training label (None for regression)."""
    if task.is_regression:
        return None
    majority = Counter(train.labels).most_common(1)[0][0]
    return {split: compute_metrics(task, [majority] * len(ex), ex.labels) for split, ex in devs.items()}


# ---- training ------------------------------------------------------------------------------------

def _batches(encoded: dict[str, Tensor], batch_size: int, seed: int) -> TokenBatches:
    extra = {k: v for k, v in encoded.items() if k not in ("input_ids", "attention_mask")}
    n = encoded["input_ids"].shape[0]
    return TokenBatches(encoded["input_ids"], encoded["attention_mask"], min(batch_size, n), seed=seed,
                        extra=extra)


def _check_count(name: str, value, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def _check_training_numbers(seed: int, warmup: float, weight_decay: float) -> None:
    """What TrainConfig checks, before any data or model is loaded."""
    check_int("seed", seed, 0, MAX_SEED)
    check_finite("warmup", warmup, 0.0)
    check_finite("weight_decay", weight_decay, 0.0)


def _stage(name: str, model: nn.Module, step_loss: stage.StageLoss, data: TokenBatches, epochs: int, lr: float,
           out_dir: Path, *, seed: int, warmup: float, weight_decay: float, progress: bool,
           teacher: nn.Module | None = None) -> stage.Stage:
    """The stage of ``epochs`` passes over ``data``; its report entry (``history`` holds every
    logged record) also gives the epochs, batch size and lr."""
    steps = epochs * data.num_batches()
    cfg = TrainConfig(steps=steps, lr=lr, warmup=warmup, weight_decay=weight_decay, seed=seed,
                      log_every=max(1, steps // 50), out_dir=str(out_dir), progress=progress,
                      progress_label=name)
    return stage.Stage(name, model, step_loss, data, cfg, teacher=teacher,
                       report={"epochs": epochs, "batch_size": data.batch_size, "lr": lr})


def _save(model: nn.Module, tokenizer, path: Path) -> None:
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)


def _write_report(report: dict, out: Path) -> None:
    (out / "metrics.json").write_text(json.dumps(report, indent=2))


def finetune_and_eval(model_dir: str, task: str, data_dir: str, out_dir: str, *, epochs: int = 3, lr: float = 2e-5,
                      batch_size: int = 32, max_length: int | None = None, seed: int = 0,
                      max_train_examples: int | None = None, warmup: float = 0.1, weight_decay: float = 0.01,
                      eval_batch_size: int = 64, progress: bool = True, resume: bool = False) -> dict:
    """Fine-tune the model in ``model_dir`` on a GLUE task and evaluate it on the dev split(s).

    The model gets a sequence-classification head for the task (fresh unless it already has one of
    the right size) and is trained with the :class:`~kdfast.train.Distiller` loop on

        classification: L = CE(logits, y) = -log softmax(logits)_y
        regression (STS-B): L = (logit - y)^2

    averaged over the batch, AdamW with linear warm-up (``warmup`` of the steps) and decay,
    ``epochs`` passes over the train split (its first ``max_train_examples``). Defaults are BERT's
    GLUE fine-tuning (3 epochs, batch 32, lr 2e-5, 128 tokens; fewer where the model has fewer
    positions, and an explicit ``max_length`` beyond them is refused).

    Writes under ``out_dir``: ``model/`` (the fine-tuned model and tokenizer), ``metrics.json``
    (this function's return value), ``train/metrics.jsonl`` and checkpoints (``resume=True``
    continues an interrupted run).

    Returns ``{"task", "model_dir", "metrics": {split: {metric: value}}, "majority":
    {split: {metric: value}} | None, "train": {...}, "config": {...}}``, splits being ``dev`` or
    MNLI's ``dev_matched`` / ``dev_mismatched``.

    Raises ValueError for an unknown task, a missing or malformed data or model directory, or a
    bad option.
    """
    spec = get_task(task)
    _check_model_dir("model_dir", model_dir)
    if max_length is None:  # BERT's 128, or fewer where the model has fewer positions
        max_length = min(128, model_positions(model_dir) or 128)
    for name, value in (("epochs", epochs), ("batch_size", batch_size), ("max_length", max_length)):
        _check_count(name, value)
    check_max_length(max_length, model_dir, "max_length")
    check_out_dir(out_dir)
    check_positive("lr", lr)
    _check_training_numbers(seed, warmup, weight_decay)
    train, devs = load_task_data(spec, data_dir, max_train_examples)
    tokenizer = _load_tokenizer(model_dir)
    seed_everything(seed)  # before the fresh head's initialisation
    model = _load_classifier(model_dir, spec)
    _check_tokenizer_fits(tokenizer, model, "model_dir", model_dir)
    enc_train = encode_examples(tokenizer, spec, train, max_length)
    enc_devs = {s: encode_examples(tokenizer, spec, ex, max_length) for s, ex in devs.items()}

    def step_loss(batch):
        loss = _task_loss(spec, model(**_model_inputs(model, batch)).logits, batch["labels"])
        return loss, {}

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    finetune = _stage("finetune", model, stage.StageLoss(step_loss), _batches(enc_train, batch_size, seed), epochs,
                      lr, out / "train", seed=seed, warmup=warmup, weight_decay=weight_decay, progress=progress)

    def finish(entries: list[dict]) -> dict:
        _save(model, tokenizer, out / "model")
        report = {
            "task": spec.name, "model_dir": str(out / "model"),
            "metrics": evaluate(model, spec, enc_devs, eval_batch_size),
            "majority": _majority_metrics(spec, train, devs),
            "train": {"examples": len(train), **entries[0]},
            "config": {"source_model": str(model_dir), "data_dir": str(data_dir), "epochs": epochs, "lr": lr,
                       "batch_size": batch_size, "max_length": max_length, "seed": seed,
                       "max_train_examples": max_train_examples, "warmup": warmup, "weight_decay": weight_decay},
        }
        _write_report(report, out)
        return report

    return stage.run_plan(stage.Plan([finetune], finish), resume=resume)


def _attention_windows(teacher: nn.Module, student: nn.Module, layer_map: dict[int, int]) -> dict:
    """:class:`kdfast.DistillationLoss`'s window arguments for the score MSE of ``layer_map``'s pairs:
    each model's per-layer windows (ModernBERT's local layers; every layer of other families is
    global), and, for a pair whose two layers' windows differ, the narrower band (the scores both
    layers compute), given explicitly. Empty when every layer of both is global."""
    from kdfast.models.modernbert import attention_windows

    t_windows, s_windows = attention_windows(teacher), attention_windows(student)
    if all(w is None for w in t_windows + s_windows):
        return {}
    explicit = {}
    for m, g in layer_map.items():
        if not (isinstance(m, int) and isinstance(g, int) and 1 <= m <= len(s_windows) and 1 <= g <= len(t_windows)):
            continue  # not an attention pair, or out of range: DistillationLoss says which
        w_s, w_t = s_windows[m - 1], t_windows[g - 1]
        if w_s != w_t:
            explicit[m] = w_t if w_s is None else w_s if w_t is None else min(w_s, w_t)
    return dict(teacher_windows=t_windows, student_windows=s_windows, windows=explicit or None)


def task_distill(teacher_dir: str, student_dir: str, task: str, data_dir: str, out_dir: str, *,
                 intermediate_epochs: int = 20, intermediate_lr: float = 5e-5, prediction_epochs: int = 3,
                 prediction_lr: float = 3e-5, batch_size: int = 32, max_length: int | None = None,
                 temperature: float = 1.0, hidden_weight: float = 1.0, attention_weight: float = 1.0,
                 layer_map: dict[int, int] | None = None, seed: int = 0, max_train_examples: int | None = None,
                 warmup: float = 0.1, weight_decay: float = 0.01, eval_batch_size: int = 64,
                 progress: bool = True, resume: bool = False) -> dict:
    r"""TinyBERT's task-specific distillation (stage 2) on a local GLUE task, then evaluation.

    ``teacher_dir``: a sequence classifier fine-tuned on ``task`` (e.g. by :func:`finetune_and_eval`);
    ``student_dir``: a general-distilled BERT (base, MLM or classifier checkpoint; it gets a fresh
    classification head). Teacher and student must share the tokenizer (the student's is used,
    else the teacher's); for the attention term one head count must divide the other (a student
    head is taught the mean score of its group of teacher heads, or several student heads one
    teacher head: :func:`kdfast.losses.map_teacher_heads`).

    Step A, intermediate layers (``intermediate_epochs``, ``intermediate_lr``), over the layer map
    (default TinyBERT's uniform map m -> m * N/M with the embeddings 0 -> 0) with
    :class:`kdfast.DistillationLoss`:

        L_A = hidden_weight * sum_m MSE(H_s^m W_m + b_m, H_t^{g(m)})          (m = 0: embeddings)
            + attention_weight * sum_{m>=1} MSE(S_s^m, S_t^{g(m)})

    with learned projections W_m (student width -> teacher width) and S the pre-softmax attention
    scores q k^T / sqrt(d_h) over real tokens, computed from the captured queries and keys by
    :func:`kdfast.flash_attention_transfer` (no L x L map is stored). On ModernBERT's local
    (sliding-window) layers a pair compares the scores of its band |i - j| <= w only, the narrower
    band where the two layers' windows differ.

    Step B, prediction layer (``prediction_epochs``, ``prediction_lr``), with
    :func:`kdfast.kd_loss` ``kind="soft_ce"``:

        L_B = -sum_j softmax(z_t / T)_j log softmax(z_s / T)_j      (T^2-scaled; T = 1 by default)

    or, for STS-B (one regression output), L_B = (z_s - z_t)^2.

    Defaults are the paper's (Jiao et al. 2020, sec. 4.2): 20 intermediate epochs at lr 5e-5,
    3 prediction epochs at lr 3e-5 (from {1e-5, 2e-5, 3e-5}), batch 32, T = 1, sequences of 64
    tokens (single sentence) / 128 (pairs), or fewer where a model has fewer positions (an explicit
    ``max_length`` beyond them is refused). Out of scope: TinyBERT's data augmentation (GloVe /
    BERT word replacement that grows the train set about 20-fold); this trains on the train split
    as given, so expect the paper's no-augmentation ablation, not its headline numbers.

    Writes under ``out_dir``: ``student/`` (model + tokenizer), ``metrics.json`` (the return value),
    ``intermediate/`` and ``prediction/`` (each stage's ``metrics.jsonl`` and checkpoints;
    ``resume=True`` continues an interrupted run at the right stage).

    Returns ``{"task", "model_dir", "metrics": {split: {metric: value}}, "teacher_metrics": {...},
    "majority": {...} | None, "train": {"intermediate": {...}, "prediction": {...}}, "config": {...}}``.

    Raises ValueError for an unknown task, a missing or malformed directory, a teacher with the
    wrong label count, a vocabulary or head-count mismatch, or a bad option.
    """
    import kdfast

    spec = get_task(task)
    _check_model_dir("teacher_dir", teacher_dir)
    _check_model_dir("student_dir", student_dir)
    _check_count("intermediate_epochs", intermediate_epochs, 0)
    _check_count("prediction_epochs", prediction_epochs, 0)
    _check_count("batch_size", batch_size)
    for name, value in (("intermediate_lr", intermediate_lr), ("prediction_lr", prediction_lr),
                        ("temperature", temperature)):
        check_positive(name, value)
    _check_training_numbers(seed, warmup, weight_decay)
    for name, value in (("hidden_weight", hidden_weight), ("attention_weight", attention_weight)):
        check_finite(name, value, 0.0)
    if max_length is None:  # the paper's length, or fewer where a model has fewer positions
        max_length = min([spec.default_max_length] + [n for n in map(model_positions, (teacher_dir, student_dir)) if n])
    _check_count("max_length", max_length)
    for model_dir in (teacher_dir, student_dir):
        check_max_length(max_length, model_dir, "max_length")
    check_out_dir(out_dir)
    train, devs = load_task_data(spec, data_dir, max_train_examples)
    tokenizer = _load_tokenizer(student_dir, teacher_dir)
    teacher = _load_teacher(teacher_dir, spec)
    seed_everything(seed)  # before the fresh head's and the projections' initialisation
    student = _load_classifier(student_dir, spec, "student_dir")
    _check_tokenizer_fits(tokenizer, student, "student_dir", student_dir)
    if student.config.vocab_size != teacher.config.vocab_size:
        raise ValueError(f"student_dir vocabulary ({student.config.vocab_size}) differs from teacher_dir's "
                         f"({teacher.config.vocab_size}): task distillation needs a shared tokenizer")
    enc_train = encode_examples(tokenizer, spec, train, max_length)
    enc_devs = {s: encode_examples(tokenizer, spec, ex, max_length) for s, ex in devs.items()}
    data = _batches(enc_train, batch_size, seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    options = dict(seed=seed, warmup=warmup, weight_decay=weight_decay, progress=progress, teacher=teacher)
    stages = []

    # step A: intermediate layers
    weights = {"hidden": hidden_weight, "attention": attention_weight}
    criterion = None
    if intermediate_epochs:
        heads_s, heads_t = student.config.num_attention_heads, teacher.config.num_attention_heads
        if attention_weight and max(heads_s, heads_t) % min(heads_s, heads_t):  # caught before any training
            raise ValueError(f"attention_weight > 0 needs head counts where one divides the other: student_dir "
                             f"has {heads_s}, teacher_dir {heads_t} (or set attention_weight=0)")
        from kdfast.models import uniform_layer_map

        pairs = layer_map if layer_map is not None else uniform_layer_map(teacher.config.num_hidden_layers,
                                                                           student.config.num_hidden_layers)
        criterion = kdfast.DistillationLoss(
            pairs, weights, student_hidden_size=student.config.hidden_size,
            teacher_hidden_size=teacher.config.hidden_size, attention="mse", attention_source="qk",
            qk_prescaled=QK_PRESCALED, **_attention_windows(teacher, student, pairs))
        teacher_layers = LiveTeacher(teacher, qk=True)
        intermediate_loss = stage.distillation_step(
            criterion, lambda batch, inputs: capture_outputs(student, inputs, qk=True),
            lambda batch, inputs: teacher_layers(batch, _model_inputs(teacher, batch)),
            inputs=lambda batch: _model_inputs(student, batch))
        stages.append(_stage("intermediate", student, intermediate_loss, data, intermediate_epochs, intermediate_lr,
                             out / "intermediate", **options))

    # step B: prediction layer
    teacher_logits = LiveTeacher(teacher, hidden_states=False)

    def prediction_loss(batch):
        z_t = teacher_logits(batch, _model_inputs(teacher, batch)).logits.float()
        z_s = student(**_model_inputs(student, batch)).logits.float()
        if spec.is_regression:  # [B, 1] scores: the mean over the batch of (z_s - z_t)^2
            return kdfast.hidden_mse_loss(z_s, z_t), {}
        return kdfast.kd_loss(z_s, z_t, temperature=temperature, kind="soft_ce"), {}

    if prediction_epochs:
        terms = {"prediction": "hidden_mse_loss" if spec.is_regression else "kd_loss"}
        stages.append(_stage("prediction", student, stage.StageLoss(prediction_loss, terms=terms), data,
                             prediction_epochs, prediction_lr, out / "prediction", **options))

    def finish(entries: list[dict]) -> dict:
        trained = {e["name"]: e for e in entries}
        _save(student, tokenizer, out / "student")
        report = {
            "task": spec.name, "model_dir": str(out / "student"),
            "metrics": evaluate(student, spec, enc_devs, eval_batch_size),
            "teacher_metrics": evaluate(teacher, spec, enc_devs, eval_batch_size),
            "majority": _majority_metrics(spec, train, devs),
            "train": {"examples": len(train), "intermediate": trained.get("intermediate"),
                      "prediction": trained.get("prediction")},
            "backends": {name: trained[name].get("backends") if name in trained else None
                         for name in ("intermediate", "prediction")},
            "config": {"teacher_dir": str(teacher_dir), "student_dir": str(student_dir), "data_dir": str(data_dir),
                       "intermediate_epochs": intermediate_epochs, "intermediate_lr": intermediate_lr,
                       "prediction_epochs": prediction_epochs, "prediction_lr": prediction_lr,
                       "batch_size": batch_size, "max_length": max_length, "temperature": temperature,
                       "weights": weights, "layer_map": criterion.layer_map if criterion is not None else None,
                       "attention_windows": criterion.pair_windows if criterion is not None else None,
                       "seed": seed,
                       "max_train_examples": max_train_examples, "warmup": warmup, "weight_decay": weight_decay},
        }
        _write_report(report, out)
        return report

    return stage.run_plan(stage.Plan(stages, finish), resume=resume)


def format_eval_table(report: dict) -> str:
    """One row per (dev split, metric): the model, and the teacher / majority-class baseline when known."""
    teacher, majority = report.get("teacher_metrics"), report.get("majority")
    head = f"{'split':<16} {'metric':<14} {'model':>8}"
    head += f" {'teacher':>8}" if teacher else ""
    head += f" {'majority':>9}" if majority else ""
    lines = [head, "-" * len(head)]
    for split, metrics in report["metrics"].items():
        for name, value in metrics.items():
            row = f"{split:<16} {name:<14} {value:>8.4f}"
            row += f" {teacher[split][name]:>8.4f}" if teacher else ""
            row += f" {majority[split][name]:>9.4f}" if majority else ""
            lines.append(row)
    return "\n".join(lines)
