"""Careless uses of DistillationTrainer with a live teacher and of ``kdfast eval``: each is refused
before any step in one line naming the argument, or its work is kept (the saved student carries
the tokenizer it was trained with, so ``kdfast eval`` scores it as with the teacher's)."""

import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from transformers import BertConfig, BertForMaskedLM, BertTokenizer, TrainingArguments

import kdfast
from kdfast.cli import main
from kdfast.integrations.transformers import DistillationTrainer
from kdfast.models import tinybert
from tests.train.glue_data import VOCAB, write_sst2

pytest.importorskip("accelerate")


def _arguments(out, **kw):
    base = dict(output_dir=str(out), max_steps=1, per_device_train_batch_size=4, learning_rate=0.1, optim="sgd",
                lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=0.0, logging_steps=1,
                save_strategy="no", report_to="none", disable_tqdm=True, use_cpu=True, seed=3)
    return TrainingArguments(**{**base, **kw})


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    """A tiny BertForMaskedLM teacher saved with its word-level tokenizer over the GLUE test words."""
    d = tmp_path_factory.mktemp("teacher")
    BertTokenizer(vocab={w: i for i, w in enumerate(VOCAB)}).save_pretrained(d)
    torch.manual_seed(0)
    BertForMaskedLM(BertConfig(vocab_size=len(VOCAB), hidden_size=24, num_hidden_layers=2, num_attention_heads=4,
                               intermediate_size=32, max_position_embeddings=64)).save_pretrained(d)
    return d


def _student(vocab=len(VOCAB), hidden=12):
    return tinybert("tinybert-4", vocab_size=vocab, hidden_size=hidden, num_hidden_layers=1, num_attention_heads=2,
                    intermediate_size=16, max_position_embeddings=64)


def _criterion(student_hidden=12):
    return kdfast.DistillationLoss((2, 1), {"hidden": 1.0, "attention": 1.0}, student_hidden_size=student_hidden,
                                   teacher_hidden_size=24, qk_prescaled=False)


def _data(teacher_dir, rows=8):
    tok = BertTokenizer.from_pretrained(teacher_dir)
    enc = tok([f"the movie was {w}" for w in ("good", "bad", "dull", "great", "fine", "awful", "nice", "poor")][:rows],
              padding="max_length", max_length=10)
    return Dataset.from_dict({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]})


def _teacher(teacher_dir):
    return BertForMaskedLM.from_pretrained(teacher_dir)


@pytest.mark.parametrize("case, match", [
    ("student vocabulary smaller than the teacher's ids", r"^model: its vocabulary of 10 is smaller than the teacher"),
    ("the student passed as its own teacher", r"^teacher is the same module as model"),
    ("a student wider than student_hidden_size", r"^model: its hidden size 16 differs from distillation_loss's "
                                                 r"student_hidden_size 12"),
    ("a layer map beyond the teacher's layers", r"^distillation_loss: its layer_map refers to teacher layers \[5\]"),
])
def test_live_teacher_mistakes_are_refused_before_any_step(teacher_dir, tmp_path, case, match):
    student, criterion = _student(), _criterion()
    teacher = _teacher(teacher_dir)
    if case.startswith("student vocabulary"):
        student = _student(vocab=10)
    elif case.startswith("the student passed"):
        teacher = student
        criterion = kdfast.DistillationLoss((1, 1), {"hidden": 1.0}, qk_prescaled=False)
    elif case.startswith("a student wider"):
        student = _student(hidden=16)
    else:
        criterion = kdfast.DistillationLoss({1: 5}, {"hidden": 1.0}, student_hidden_size=12, teacher_hidden_size=24,
                                            qk_prescaled=False)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    with pytest.raises(ValueError, match=match) as e:
        DistillationTrainer(model=student, args=_arguments(tmp_path / "o"), train_dataset=_data(teacher_dir),
                            teacher=teacher, distillation_loss=criterion)
    assert "\n" not in str(e.value)
    assert all(torch.equal(before[k], v) for k, v in student.state_dict().items())  # nothing trained


def _eval(model_dir, sst2, out, capsys):
    rc = main(["eval", "--task", "sst2", "--model", str(model_dir), "--data-dir", str(sst2), "--out", str(out),
               "--epochs", "1", "--lr", "3e-3", "--batch-size", "16", "--max-train-examples", "64", "--no-progress"])
    captured = capsys.readouterr()
    return rc, captured, (json.loads((Path(out) / "metrics.json").read_text()) if rc == 0 else None)


def test_saved_student_carries_the_teachers_tokenizer_and_evaluates_as_with_it(teacher_dir, tmp_path, capsys):
    """The careless path: no processing_class. save_model still writes the teacher's tokenizer, and
    ``kdfast eval`` of the saved folder equals ``kdfast eval`` of the same weights beside a copy of
    the teacher's tokenizer files; the folder with the tokenizer removed is refused in one line."""
    student = _student()
    trainer = DistillationTrainer(model=student, args=_arguments(tmp_path / "o"), train_dataset=_data(teacher_dir),
                                  teacher=_teacher(teacher_dir), distillation_loss=_criterion())
    trainer.train()
    saved = tmp_path / "student"
    trainer.save_model(str(saved))
    saved_vocab = json.loads((saved / "tokenizer.json").read_text())["model"]["vocab"]
    assert saved_vocab == json.loads((Path(teacher_dir) / "tokenizer.json").read_text())["model"]["vocab"]
    sst2 = write_sst2(tmp_path / "sst2")
    rc, _, report = _eval(saved, sst2, tmp_path / "eval-saved", capsys)
    assert rc == 0

    with_teacher_tok = tmp_path / "with-teacher-tokenizer"
    with_teacher_tok.mkdir()
    for f in ("config.json", "model.safetensors"):
        shutil.copy(saved / f, with_teacher_tok / f)
    for f in Path(teacher_dir).iterdir():
        if f.name not in ("config.json", "model.safetensors"):
            shutil.copy(f, with_teacher_tok / f.name)
    rc, _, reference = _eval(with_teacher_tok, sst2, tmp_path / "eval-teacher-tok", capsys)
    assert rc == 0
    assert report["metrics"] == reference["metrics"]

    bare = tmp_path / "bare"
    bare.mkdir()
    for f in ("config.json", "model.safetensors"):
        shutil.copy(saved / f, bare / f)
    rc, captured, _ = _eval(bare, sst2, tmp_path / "eval-bare", capsys)
    err = captured.err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "no usable tokenizer" in err[0] and "tokenizer.json" in err[0], err
    assert not (tmp_path / "eval-bare" / "metrics.json").exists()


def test_eval_warns_when_the_tokenizer_is_far_smaller_than_the_model(teacher_dir, tmp_path, capsys):
    d = tmp_path / "mismatched"
    _student(vocab=4 * len(VOCAB)).save_pretrained(d)
    BertTokenizer(vocab={w: i for i, w in enumerate(VOCAB)}).save_pretrained(d)
    sst2 = write_sst2(tmp_path / "sst2", n_train=32, n_dev=16)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rc, _, _ = _eval(d, sst2, tmp_path / "e", capsys)
    assert rc == 0
    assert any(f"its tokenizer has {len(VOCAB)} tokens but the model's vocabulary {4 * len(VOCAB)}" in str(w.message)
               for w in caught)


def test_save_model_without_any_tokenizer_to_save_warns(tmp_path):
    teacher = BertForMaskedLM(BertConfig(vocab_size=len(VOCAB), hidden_size=24, num_hidden_layers=2,
                                         num_attention_heads=4, intermediate_size=32, max_position_embeddings=64))
    ids = torch.randint(5, len(VOCAB), (4, 6))
    data = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    trainer = DistillationTrainer(model=_student(), args=_arguments(tmp_path / "o"), train_dataset=data,
                                  teacher=teacher, distillation_loss=_criterion())
    with pytest.warns(UserWarning, match="has no tokenizer.*processing_class"):
        trainer.save_model(str(tmp_path / "s"))
    assert (tmp_path / "s" / "config.json").is_file()


def test_eval_progress_bar_names_its_stage_not_distil(teacher_dir, tmp_path, capfd):
    """Whatever reaches the terminal (file descriptors, as transformers' logging writes there): the
    bar is the fine-tuning's, and no load report for the head kdfast adds on purpose."""
    d = tmp_path / "model"
    _student().save_pretrained(d)
    BertTokenizer(vocab={w: i for i, w in enumerate(VOCAB)}).save_pretrained(d)
    sst2 = write_sst2(tmp_path / "sst2", n_train=32, n_dev=16)
    rc = main(["eval", "--task", "sst2", "--model", str(d), "--data-dir", str(sst2), "--out", str(tmp_path / "e"),
               "--epochs", "1", "--batch-size", "16"])
    err = capfd.readouterr().err
    assert rc == 0 and "finetune:" in err and "distil:" not in err
    assert "LOAD REPORT" not in err and "newly initialized" not in err
