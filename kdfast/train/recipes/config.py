"""Recipe settings: dataclasses holding the papers' defaults, loaded from YAML and ``--set`` flags.

Precedence, lowest first: the dataclass defaults < the YAML file < ``--set key=value`` (dotted
keys, values parsed as YAML scalars) < explicit command-line flags, except for the keys a recipe
lists in its ``YIELDING_KEYS`` class attribute: a flag sets those only where neither the YAML
file nor ``--set`` gives them (MobileBERT's ``--steps`` and an explicit ``pretrain.steps: 0``).
The shipped YAML files (``configs/``) hold the dataclass defaults. Every key is checked: an
unknown key, a value of the wrong type or a number that is not finite (YAML's ``.inf``, ``.nan``)
raises ``ValueError`` naming the dotted key.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

__all__ = ["DataSettings", "MaskingSettings", "TeacherSettings", "TrainSettings", "config_to_dict", "load_config",
           "parse_set", "validate_config"]


@dataclass
class TeacherSettings:
    """Where the teacher comes from. ``dir``: a local ``save_pretrained`` directory (default: the
    embedded all-MiniLM-L6-v2); ``source``: ``live`` (run frozen, in eval mode, under no_grad) or
    ``cache`` (targets read from a ``kdfast.cache`` built once into ``cache_dir``, default
    ``<out_dir>/teacher-cache``); ``logits``: what the cache keeps of the teacher's logits, ``topk``
    (``topk`` of them per masked token) or ``head`` / ``head:fp16|bf16|int8`` (exact: the input of
    the teacher's output projection at every token, and the projection once, so that KD on every
    real token runs from the cache); ``allow_larger_student``: accept a student with more
    parameters than the teacher (refused by default, before any work: distillation compresses)."""

    dir: str | None = None
    source: str = "live"
    cache_dir: str | None = None
    topk: int = 32
    logits: str = "topk"
    allow_larger_student: bool = False

    def validate(self) -> None:
        if self.source not in ("live", "cache"):
            raise ValueError(f"source must be 'live' or 'cache', got {self.source!r}")
        if self.topk < 1:
            raise ValueError(f"topk must be >= 1, got {self.topk}")
        if self.logits not in ("topk", "head", "head:fp16", "head:bf16", "head:int8"):
            raise ValueError(f"logits must be 'topk', 'head', 'head:fp16', 'head:bf16' or 'head:int8', "
                             f"got {self.logits!r}")

    @property
    def exact(self) -> bool:
        """Whether a cache of these settings holds the teacher's full logits (``logits: head``)."""
        return self.source == "cache" and self.logits.startswith("head")

    def cache_logits(self, topk: int | None = None) -> str:
        """The ``logits`` option of :func:`kdfast.cache.build_cache` for these settings."""
        return self.logits if self.logits.startswith("head") else f"topk:{self.topk if topk is None else topk}"


@dataclass
class DataSettings:
    """Local text files (``kdfast.data.load_texts``; empty: the prose of CPython's documentation,
    as in the demo); every ``held_out_every``-th text is held out for evaluation (0: none);
    ``max_texts`` keeps only the first texts (quick runs). ``packing``: the training texts are
    joined with [SEP] and cut into full ``max_length`` rows (:func:`kdfast.data.pack_texts`, as
    BERT's, RoBERTa's and DistilBERT's pretraining data), so no step or cache shard is mostly
    padding; false: one padded, truncated row per text. Held-out texts stay one row per text.
    Default true: every recipe reading this corpus (MLM pretraining, TinyBERT general distillation)
    distils language modelling over running text, not paragraphs."""

    files: list[str] = field(default_factory=list)
    text_column: str = "text"
    max_length: int = 128
    held_out_every: int = 10
    max_texts: int | None = None
    packing: bool = True

    def validate(self) -> None:
        if self.max_length < 8:
            raise ValueError(f"max_length must be >= 8, got {self.max_length}")
        if self.held_out_every < 0 or self.held_out_every == 1:
            raise ValueError(f"held_out_every must be 0 (no held-out split) or >= 2, got {self.held_out_every}")
        if self.max_texts is not None and self.max_texts < 2:
            raise ValueError(f"max_texts must be >= 2, got {self.max_texts}")


@dataclass
class MaskingSettings:
    """MLM masking: ``probability`` of the real tokens are chosen (80% [MASK], 10% random, 10%
    kept); ``smoothing`` > 0 chooses token j with probability proportional to count(j)^-smoothing
    over the training corpus (DistilBERT: 0.7), 0 is BERT's uniform choice."""

    probability: float = 0.15
    smoothing: float = 0.7

    def validate(self) -> None:
        if not 0 < self.probability < 1:
            raise ValueError(f"probability must be in (0, 1), got {self.probability}")
        if self.smoothing < 0:
            raise ValueError(f"smoothing must be >= 0, got {self.smoothing}")


@dataclass
class TrainSettings:
    """Optimisation settings passed to :class:`kdfast.train.TrainConfig` (``warmup``: a fraction of
    the steps when < 1, else a step count; ``eval_every``: held-out evaluation period, 0: never;
    ``optimizer``: passed through where the Distiller offers a choice, None: the recipe's)."""

    batch_size: int = 16
    lr: float = 5e-4
    weight_decay: float = 0.01
    warmup: float = 0.1
    max_grad_norm: float = 1.0
    grad_accum: int = 1
    seed: int = 0
    log_every: int = 10
    checkpoint_every: int = 0
    keep_checkpoints: int = 0  # keep only the newest this many checkpoints of each stage (0: all)
    eval_every: int = 50
    optimizer: str | None = None

    def validate(self) -> None:
        for name in ("batch_size", "grad_accum", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("checkpoint_every", "keep_checkpoints", "eval_every", "warmup", "weight_decay", "max_grad_norm"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        from kdfast.train.distiller import MAX_SEED, check_int

        check_int("seed", self.seed, 0, MAX_SEED)


# ---- loading --------------------------------------------------------------------------------------


_FLOAT_RE = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp, key: str):
    """``value`` checked against the annotation ``tp`` (ints are accepted for floats)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise ValueError(f"{key} must not be null")
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ValueError as e:
                errors.append(str(e))
        raise ValueError(errors[0] if len(errors) == 1 else f"{key}: {value!r} fits none of {_type_name(tp)}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ValueError(f"{key} must be a mapping of {sorted(f.name for f in dataclasses.fields(tp))}, "
                             f"got {value!r}")
        return _build(tp, value, key + ".")
    if origin is list:
        if not isinstance(value, list):
            raise ValueError(f"{key} must be a list, got {value!r}")
        (item,) = typing.get_args(tp)
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{key} must be a mapping, got {value!r}")
        return dict(value)
    ok = {bool: lambda v: isinstance(v, bool),
          int: lambda v: isinstance(v, int) and not isinstance(v, bool),
          float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
          str: lambda v: isinstance(v, str)}
    if tp not in ok:
        raise TypeError(f"{key}: unsupported annotation {tp!r}")
    if tp is float and isinstance(value, str) and _FLOAT_RE.fullmatch(value.strip()):
        value = float(value)  # PyYAML (YAML 1.1) reads 2e-3 as a string: take it as the number it spells
    if not ok[tp](value):
        raise ValueError(f"{key} must be {_type_name(tp)}, got {type(value).__name__} {value!r}")
    if tp is float:
        value = float(value)
        if not math.isfinite(value):  # .inf / .nan, or 1e999 spelled out: no setting takes them
            raise ValueError(f"{key} must be a finite number, got {value}")
    return value


def _build(cls, data: dict, prefix: str = ""):
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in names:
            raise ValueError(f"unknown key '{prefix}{key}' (known under {prefix.rstrip('.') or 'the top level'}: "
                             f"{', '.join(names)})")
    defaults = cls()
    kwargs = {}
    for name in names:
        if name in data:
            value = data[name]
            if dataclasses.is_dataclass(hints[name]) and isinstance(value, dict):
                # a partial section overrides the recipe's defaults of that section, key by key
                value = {**config_to_dict(getattr(defaults, name)), **value}
            kwargs[name] = _coerce(value, hints[name], prefix + name)
    obj = cls(**kwargs)
    if hasattr(obj, "validate"):
        try:
            obj.validate()
        except ValueError as e:
            raise ValueError(f"{prefix}{e}") from None
    return obj


def validate_config(cfg):
    """``cfg`` (a settings dataclass, possibly built in Python rather than loaded) checked key by
    key exactly as :func:`load_config` checks a file: types, finiteness and every ``validate``;
    returns an equal, checked copy, or raises ValueError naming the dotted key."""
    if not dataclasses.is_dataclass(cfg) or isinstance(cfg, type):
        raise ValueError(f"settings must be a recipe's settings dataclass, got {type(cfg).__name__}")
    return _build(type(cfg), config_to_dict(cfg))


def config_to_dict(cfg) -> dict:
    """The settings as plain YAML-able data."""
    return dataclasses.asdict(cfg)


def parse_set(assignment: str) -> tuple[list[str], Any]:
    """``a.b=value`` -> (["a", "b"], value parsed as YAML, e.g. ``3``, ``0.5``, ``true``, ``null``, ``[0, 2]``)."""
    key, sep, raw = assignment.partition("=")
    if not sep or not key.strip() or any(not part for part in key.strip().split(".")):
        raise ValueError(f"--set expects key=value with a dotted key, got {assignment!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ValueError(f"--set {key}: value {raw!r} is not valid YAML ({str(e).splitlines()[0]})") from None
    return key.strip().split("."), value


def _merge(base: dict, path: list[str], value: Any) -> None:
    node = base
    for i, part in enumerate(path[:-1]):
        nxt = node.setdefault(part, {})
        if not isinstance(nxt, dict):
            raise ValueError(f"{'.'.join(path[:i + 1])} is not a section, cannot set {'.'.join(path)}")
        node = nxt
    node[path[-1]] = value


def _given(data: dict, path: list[str]) -> bool:
    node = data
    for part in path:
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def load_config(cls, yaml_path: str | None = None, sets: list[str] | tuple = (),
                overrides: dict[str, Any] | None = None):
    """Build ``cls`` (a recipe's settings dataclass) from its defaults, then ``yaml_path``, then
    ``sets`` (``key=value``), then ``overrides`` ({dotted key: value}, the explicit flags); an
    override of a key in ``cls.YIELDING_KEYS`` applies only where the file and ``sets`` leave
    that key unset.

    Raises ValueError for a missing or malformed YAML file, a bad ``--set``, an unknown key or a
    value of the wrong type (naming the key)."""
    data: dict = {}
    if yaml_path is not None:
        path = Path(yaml_path)
        if not path.is_file():
            raise ValueError(f"config file {yaml_path} does not exist")
        try:
            loaded = yaml.safe_load(path.read_text())
        except yaml.YAMLError as e:
            raise ValueError(f"config file {yaml_path} is not valid YAML: {' '.join(str(e).split())}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ValueError(f"config file {yaml_path} must hold a mapping of settings, got {type(loaded).__name__}")
        for key, value in (loaded or {}).items():
            _merge(data, [str(key)], value)
    for assignment in sets:
        _merge(data, *parse_set(assignment))
    yielding = getattr(cls, "YIELDING_KEYS", ())
    for key, value in (overrides or {}).items():
        if key in yielding and _given(data, key.split(".")):
            continue
        _merge(data, key.split("."), value)
    return _build(cls, data)
