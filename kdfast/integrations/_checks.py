"""What :class:`kdfast.integrations.transformers.DistillationTrainer` checks about a live teacher
before training, and the tokenizer it saves beside the student."""

from __future__ import annotations

import os
import warnings

from torch import nn

from kdfast.cache.format import TOKENIZER_FILES, tokenizer_sha256
from kdfast.cache.reader import TeacherCache
from kdfast.capture import _unwrap
from kdfast.losses.distillation import DistillationLoss


def check_student_fits_teacher(teacher: nn.Module, model: nn.Module, loss: DistillationLoss, *, hidden: bool,
                               layers: bool) -> None:
    """The checks a cache gets, for a live teacher, before any step.

    ValueError naming ``teacher`` when it is the student's own module; ``model`` for a vocabulary
    smaller than the teacher's (the batches hold the teacher's token ids, and the student needs an
    embedding row for each) or, with a logits term, another one; ``model`` / ``teacher`` for a
    hidden width other than the one ``loss``'s projections take / give (``hidden``: the loss has a
    hidden-state term), or different widths without projections; ``distillation_loss`` for a
    layer_map beyond either model's layers (``layers``: the loss reads captured layers).
    """
    if teacher is model or _unwrap(teacher) is _unwrap(model):
        raise ValueError("teacher is the same module as model: the student would be distilled into itself; "
                         "pass a separate (frozen) teacher, e.g. one loaded again from its checkpoint")
    cfg_s, cfg_t = getattr(model, "config", None), getattr(teacher, "config", None)
    if cfg_s is None or cfg_t is None:
        return
    vocab_s, vocab_t = getattr(cfg_s, "vocab_size", None), getattr(cfg_t, "vocab_size", None)
    if isinstance(vocab_s, int) and isinstance(vocab_t, int):
        if vocab_s < vocab_t:
            raise ValueError(f"model: its vocabulary of {vocab_s} is smaller than the teacher's {vocab_t}; both "
                             "read the same token ids (the teacher's tokenizer), so the student needs an embedding "
                             "row for each")
        if "logits" in loss.weights and vocab_s != vocab_t:
            raise ValueError(f"model: its vocabulary of {vocab_s} differs from the teacher's {vocab_t}; the logits "
                             "term compares the two")
    width_s, width_t = getattr(cfg_s, "hidden_size", None), getattr(cfg_t, "hidden_size", None)
    if hidden and isinstance(width_s, int) and isinstance(width_t, int):
        for m, projection in loss.projections.items():
            if projection.in_features != width_s:
                raise ValueError(f"model: its hidden size {width_s} differs from distillation_loss's "
                                 f"student_hidden_size {projection.in_features} (its projection of student state "
                                 f"{m}); build the loss with student_hidden_size={width_s}")
            if projection.out_features != width_t:
                raise ValueError(f"teacher: its hidden size {width_t} differs from distillation_loss's "
                                 f"teacher_hidden_size {projection.out_features}; build the loss with "
                                 f"teacher_hidden_size={width_t}")
        if not loss.projections and "hidden" in loss.weights and width_s != width_t:
            raise ValueError(f"model: its hidden size {width_s} differs from the teacher's {width_t} and "
                             "distillation_loss has no projections (build it with student_hidden_size and "
                             "teacher_hidden_size)")
    if not layers:
        return
    for who, cfg, side in (("model", cfg_s, 0), ("teacher", cfg_t, 1)):
        n = getattr(cfg, "num_hidden_layers", None)
        beyond = sorted({pair[side] for pair in loss.layer_map.items() if pair[side] > n}) if isinstance(n, int) else []
        if beyond:
            raise ValueError(f"distillation_loss: its layer_map refers to {who} layers {beyond}, but {who} has {n} "
                             f"(0 is the embeddings, 1..{n} the layers)")


def teacher_tokenizer_dir(teacher: nn.Module | TeacherCache) -> str | None:
    """The folder the teacher's tokenizer loads from: a cache's teacher folder (when its tokenizer
    still hashes as the cache recorded), or a live teacher's ``name_or_path`` when that is a local
    folder with tokenizer files; None when neither."""
    if isinstance(teacher, TeacherCache):
        path = teacher.settings["teacher"].get("path")
        expected = teacher.settings.get("tokenizer_sha256")
    else:
        model = _unwrap(teacher)
        path = getattr(model, "name_or_path", None) or getattr(getattr(model, "config", None), "_name_or_path", "")
        expected = None
    if not path or not os.path.isdir(path) or not any(os.path.isfile(os.path.join(path, n)) for n in TOKENIZER_FILES):
        return None
    return path if expected is None or tokenizer_sha256(path) == expected else None


def save_teacher_tokenizer(directory: str | os.PathLike, teacher: nn.Module | TeacherCache) -> bool:
    """Save the teacher's tokenizer (:func:`teacher_tokenizer_dir`) into ``directory``; warn and
    return False when there is none to save (the folder then needs one before ``kdfast eval``)."""
    source = teacher_tokenizer_dir(teacher)
    if source is None:
        warnings.warn(f"save_model: {os.fspath(directory)} has no tokenizer (no processing_class was given and the "
                      "teacher's could not be found); pass processing_class=tokenizer to DistillationTrainer",
                      stacklevel=3)
        return False
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(source, local_files_only=True).save_pretrained(directory)
    return True
