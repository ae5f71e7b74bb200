"""GLUE tasks on local files: the task registry, loading train/dev splits, and the GLUE metrics.

Each task knows its text columns and label set under both spellings found in the wild: the
original GLUE TSV files (as the GLUE download script writes them, e.g. MRPC's ``#1 String``,
MNLI's ``sentence1`` / ``gold_label`` with string labels, CoLA without a header row) and the
Hugging Face ``glue`` dataset's columns (``sentence1``, ``premise``, ``label`` as an int, ...).
Label ids follow the Hugging Face ``glue`` order, so a model fine-tuned here agrees with one
fine-tuned on that dataset.

Metrics are those the GLUE paper reports: CoLA Matthews correlation; SST-2, MNLI (matched and
mismatched), QNLI, RTE, WNLI accuracy; MRPC and QQP F1 and accuracy; STS-B Pearson and Spearman.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from kdfast.data import DATASET_BUILDERS, root_cause_line
from kdfast.data import quiet_datasets as _quiet_datasets

__all__ = ["GLUE_TASKS", "GlueTask", "TaskExamples", "accuracy", "binary_f1", "compute_metrics", "find_split_files",
           "get_task", "load_split", "matthews_corrcoef", "pearson_corrcoef", "spearman_corrcoef"]

# file extensions looked for, in this order, for each split name
_SPLIT_EXTENSIONS = (".tsv", ".csv", ".jsonl", ".json")
# conventional file stems of each split: GLUE's names first, then the Hugging Face split names
_SPLIT_STEMS = {"train": ("train",), "dev": ("dev", "validation"),
                "dev_matched": ("dev_matched", "validation_matched"),
                "dev_mismatched": ("dev_mismatched", "validation_mismatched")}


@dataclass(frozen=True)
class GlueTask:
    """One GLUE task.

    ``text_columns``: one entry per text field (one for single-sentence tasks, two for pairs),
    each the accepted column names (Hugging Face name first). ``label_columns``: accepted names
    of the label column. ``labels``: class names in id order (``None``: regression, with
    ``label_range``). ``headerless_columns``: column names of the original GLUE TSVs that have no
    header row (CoLA). ``default_max_length``: TinyBERT's 64 for single sentences, 128 for pairs.
    """

    name: str
    text_columns: tuple[tuple[str, ...], ...]
    label_columns: tuple[str, ...]
    labels: tuple[str, ...] | None
    metrics: tuple[str, ...]
    dev_splits: tuple[str, ...] = ("dev",)
    headerless_columns: tuple[str, ...] | None = None
    label_range: tuple[float, float] | None = None

    @property
    def is_regression(self) -> bool:
        return self.labels is None

    @property
    def num_labels(self) -> int:
        return 1 if self.labels is None else len(self.labels)

    @property
    def default_max_length(self) -> int:
        return 64 if len(self.text_columns) == 1 else 128


_PAIR = (("sentence1",), ("sentence2",))
_NLI2 = ("entailment", "not_entailment")

GLUE_TASKS: dict[str, GlueTask] = {t.name: t for t in (
    GlueTask("cola", (("sentence",),), ("label",), ("unacceptable", "acceptable"), ("matthews_corr",),
             headerless_columns=("source", "label", "original_label", "sentence")),
    GlueTask("sst2", (("sentence",),), ("label",), ("negative", "positive"), ("accuracy",)),
    GlueTask("mrpc", (("sentence1", "#1 String"), ("sentence2", "#2 String")), ("label", "Quality"),
             ("not_equivalent", "equivalent"), ("f1", "accuracy")),
    GlueTask("qqp", (("question1",), ("question2",)), ("label", "is_duplicate"), ("not_duplicate", "duplicate"),
             ("f1", "accuracy")),
    GlueTask("stsb", _PAIR, ("label", "score"), None, ("pearson", "spearman"), label_range=(0.0, 5.0)),
    GlueTask("mnli", (("premise", "sentence1"), ("hypothesis", "sentence2")), ("label", "gold_label"),
             ("entailment", "neutral", "contradiction"), ("accuracy",), dev_splits=("dev_matched", "dev_mismatched")),
    GlueTask("qnli", (("question",), ("sentence",)), ("label",), _NLI2, ("accuracy",)),
    GlueTask("rte", _PAIR, ("label",), _NLI2, ("accuracy",)),
    GlueTask("wnli", _PAIR, ("label",), ("not_entailment", "entailment"), ("accuracy",)),
)}
_ALIASES = {"sst-2": "sst2", "sts-b": "stsb", "mnli-m": "mnli", "mnli_m": "mnli"}


def get_task(name: str) -> GlueTask:
    """The registry entry of ``name`` (case-insensitive; GLUE's ``SST-2`` / ``STS-B`` spellings too)."""
    key = str(name).lower()
    key = _ALIASES.get(key, key)
    if key not in GLUE_TASKS:
        raise ValueError(f"task must be one of {sorted(GLUE_TASKS)}, got {name!r}")
    return GLUE_TASKS[key]


# ---- files ---------------------------------------------------------------------------------------

def find_split_files(task: GlueTask, data_dir: str | Path) -> dict[str, Path]:
    """``{split: file}`` for ``train`` and each of ``task.dev_splits``, found in ``data_dir`` by
    conventional names (``train.tsv``, ``dev.tsv`` or ``validation.*``; MNLI: ``dev_matched`` and
    ``dev_mismatched``; extensions .tsv, .csv, .jsonl, .json). Raises ValueError for a missing
    directory, a missing split, or a split present under two names."""
    root = Path(data_dir)
    if not root.is_dir():
        raise ValueError(f"data_dir {str(root)!r} is not a directory")
    found = {}
    for split in ("train", *task.dev_splits):
        hits = [root / f"{stem}{ext}" for stem in _SPLIT_STEMS[split] for ext in _SPLIT_EXTENSIONS
                if (root / f"{stem}{ext}").is_file()]
        if not hits:
            names = ", ".join(f"{stem}.tsv" for stem in _SPLIT_STEMS[split])
            raise ValueError(f"data_dir {str(root)!r} has no {split} split for {task.name} (looked for {names}, "
                             f"or .csv / .jsonl / .json)")
        if len(hits) > 1:
            raise ValueError(f"data_dir {str(root)!r} has the {split} split twice: {[h.name for h in hits]}")
        found[split] = hits[0]
    return found


@dataclass
class TaskExamples:
    """One split: the text fields (one list per text column) and the labels (class ids, or floats
    for regression)."""

    texts: tuple[list[str], ...]
    labels: list

    def __len__(self) -> int:
        return len(self.labels)

    def head(self, n: int | None) -> TaskExamples:
        """The first ``n`` examples (all when ``n`` is None)."""
        if n is None:
            return self
        return TaskExamples(tuple(t[:n] for t in self.texts), self.labels[:n])


def _lines(path: Path, encoding: str = "utf-8"):
    try:
        with open(path, newline="", encoding=encoding) as f:
            yield from f
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start})") from None


def _read_header(path: Path, delimiter: str) -> list[str]:
    line = next(_lines(path, "utf-8-sig"), "").rstrip("\r\n")  # utf-8-sig: MRPC's source files start with a BOM
    return next(csv.reader([line], delimiter=delimiter, quoting=csv.QUOTE_NONE if delimiter == "\t" else
                           csv.QUOTE_MINIMAL), [])


def _has_rows(path: Path, skip: int) -> bool:
    """Whether the file has a non-blank line after its first ``skip`` lines (a header)."""
    return any(line.strip() for i, line in enumerate(_lines(path)) if i >= skip)


def _load_table(task: GlueTask, path: Path):
    """The file as a ``datasets.Dataset``; delimited files are read with every column as a string
    (so a sentence such as "1984" stays text) and, for TSV, without quote handling (GLUE's TSVs
    hold unbalanced quotes, which the GLUE loaders also read verbatim)."""
    import datasets

    ext = path.suffix.lower()
    kwargs: dict = {}
    if DATASET_BUILDERS[ext] == "csv":
        delimiter = "\t" if ext == ".tsv" else ","
        header = _read_header(path, delimiter)
        known = {c for group in task.text_columns for c in group} | set(task.label_columns)
        columns = header
        if task.headerless_columns is not None and not known & set(header) \
                and len(header) == len(task.headerless_columns):
            columns = list(task.headerless_columns)
            kwargs.update(header=None, column_names=columns)
        if not _has_rows(path, 0 if "header" in kwargs else 1):
            raise ValueError(f"{path} holds no examples")
        if len(set(columns)) != len(columns):
            raise ValueError(f"{path}: duplicate column names in the header {columns}")
        features = datasets.Features({c: datasets.Value("string") for c in columns})
        kwargs.update(delimiter=delimiter, features=features, keep_default_na=False, na_filter=False)
        if ext == ".tsv":
            kwargs["quoting"] = csv.QUOTE_NONE
    elif not _has_rows(path, 0):
        raise ValueError(f"{path} holds no examples")
    with _quiet_datasets():
        try:
            return datasets.load_dataset(DATASET_BUILDERS[ext], data_files=str(path), split="train", **kwargs)
        except Exception as e:  # pandas / pyarrow / json each have their own parse errors, wrapped by datasets
            raise ValueError(f"{path} is malformed for {task.name}: {root_cause_line(e)}") from None


def _pick_column(names: tuple[str, ...], columns: list[str], what: str, path: Path) -> str:
    for n in names:
        if n in columns:
            return n
    raise ValueError(f"{path}: no {what} column (expected one of {list(names)}; the file has {columns})")


def _label_id(task: GlueTask, value, row: int, path: Path):
    """A class id (or a float for regression) from an int, a numeric string or a label name."""
    bad = ValueError(f"{path}: row {row} has label {value!r}, outside the {task.name} label set "
                     + (f"{list(task.labels)} (or ids 0..{task.num_labels - 1})" if task.labels
                        else f"[{task.label_range[0]}, {task.label_range[1]}]"))
    if value is None or (isinstance(value, str) and not value.strip()):
        raise ValueError(f"{path}: row {row} has no label")
    if task.is_regression:
        try:
            y = float(value)
        except (TypeError, ValueError):
            raise bad from None
        lo, hi = task.label_range
        if not (math.isfinite(y) and lo <= y <= hi):
            raise bad
        return y
    if isinstance(value, bool):
        raise bad
    if isinstance(value, str):
        v = value.strip()
        if v in task.labels:
            return task.labels.index(v)
        try:
            value = int(v)
        except ValueError:
            raise bad from None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or not 0 <= value < task.num_labels:
        raise bad
    return value


def load_split(task: GlueTask, path: str | Path) -> TaskExamples:
    """Read one split file of ``task`` (TSV, CSV, JSON or JSON lines via ``datasets``).

    Raises ValueError naming the file for an unknown extension, an unreadable file, a missing text
    or label column, an empty split, a missing text, or a label outside the task's label set.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"split file {str(path)!r} does not exist")
    if path.suffix.lower() not in _SPLIT_EXTENSIONS:
        raise ValueError(f"split file {path} must end in one of {_SPLIT_EXTENSIONS}")
    ds = _load_table(task, path)
    columns = list(ds.column_names)
    text_cols = [_pick_column(names, columns, "text", path) for names in task.text_columns]
    label_col = _pick_column(task.label_columns, columns, "label", path)
    if len(ds) == 0:
        raise ValueError(f"{path} holds no examples")
    texts = []
    for col in text_cols:
        values = ds[col]
        for i, t in enumerate(values):
            if not isinstance(t, str):
                raise ValueError(f"{path}: row {i} has no text in column {col!r} (got {t!r})")
        texts.append(list(values))
    labels = [_label_id(task, v, i, path) for i, v in enumerate(ds[label_col])]
    return TaskExamples(tuple(texts), labels)


# ---- metrics -------------------------------------------------------------------------------------

def _vectors(pred, target, name_pred: str = "predictions", name_target: str = "labels") -> tuple[Tensor, Tensor]:
    p, t = torch.as_tensor(pred).reshape(-1), torch.as_tensor(target).reshape(-1)
    if p.numel() == 0:
        raise ValueError(f"{name_pred} is empty: a metric needs at least one example")
    if p.shape != t.shape:
        raise ValueError(f"{name_pred} has {p.numel()} entries but {name_target} has {t.numel()}")
    return p, t


def accuracy(pred, labels) -> float:
    """Fraction of examples with ``pred == labels``."""
    p, t = _vectors(pred, labels)
    return float((p == t).double().mean())


def binary_f1(pred, labels) -> float:
    """F1 of the positive class 1: 2 TP / (2 TP + FP + FN); 0 when there is no positive at all."""
    p, t = _vectors(pred, labels)
    p, t = p == 1, t == 1
    tp = int((p & t).sum())
    denom = 2 * tp + int((p & ~t).sum()) + int((~p & t).sum())
    return 2 * tp / denom if denom else 0.0


def matthews_corrcoef(pred, labels) -> float:
    """Matthews correlation (multi-class, Gorodkin's R_K) from the confusion matrix C over K classes:

        (c s - sum_k p_k t_k) / sqrt((s^2 - sum_k p_k^2) (s^2 - sum_k t_k^2))

    with c = trace(C), s = number of examples, t_k / p_k = true / predicted count of class k.
    For two classes it is (TP TN - FP FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN)). 0 when the
    denominator is 0 (all predictions, or all labels, one class), as in scikit-learn.
    """
    p, t = _vectors(pred, labels)
    classes, inverse = torch.unique(torch.cat([p, t]), return_inverse=True)
    k, n = classes.numel(), p.numel()
    conf = torch.zeros(k, k, dtype=torch.float64)
    conf.index_put_((inverse[n:], inverse[:n]), torch.ones(n, dtype=torch.float64), accumulate=True)
    t_k, p_k = conf.sum(1), conf.sum(0)
    c, s = conf.trace(), float(n)
    denom = math.sqrt(float((s * s - (p_k * p_k).sum()) * (s * s - (t_k * t_k).sum())))
    return float(c * s - (p_k * t_k).sum()) / denom if denom else 0.0


def pearson_corrcoef(x, y) -> float:
    """sum (x - mean x)(y - mean y) / sqrt(sum (x - mean x)^2 sum (y - mean y)^2), in float64;
    0 when either side is constant (the correlation is undefined)."""
    a, b = _vectors(x, y, "x", "y")
    a, b = a.double() - a.double().mean(), b.double() - b.double().mean()
    denom = math.sqrt(float((a * a).sum() * (b * b).sum()))
    return float((a * b).sum()) / denom if denom else 0.0


def average_ranks(x) -> Tensor:
    """1-based ranks of ``x``, tied values sharing the mean of the ranks they span."""
    values = torch.as_tensor(x).reshape(-1).double()
    _, inverse, counts = torch.unique(values, return_inverse=True, return_counts=True)
    last = counts.cumsum(0).double()  # rank of the last member of each group of equal values
    return (last - (counts.double() - 1) / 2)[inverse]


def spearman_corrcoef(x, y) -> float:
    """Spearman's rho: :func:`pearson_corrcoef` of the :func:`average_ranks` of x and y."""
    a, b = _vectors(x, y, "x", "y")
    return pearson_corrcoef(average_ranks(a), average_ranks(b))


_METRICS = {"accuracy": accuracy, "f1": binary_f1, "matthews_corr": matthews_corrcoef,
            "pearson": pearson_corrcoef, "spearman": spearman_corrcoef}


def compute_metrics(task: GlueTask, pred, labels) -> dict[str, float]:
    """``{metric: value}`` for each of the task's GLUE metrics (predicted class ids, or scores for
    STS-B, against the labels)."""
    return {name: _METRICS[name](pred, labels) for name in task.metrics}
