"""Fine-tuning and TinyBERT task distillation on tiny local GLUE files, and ``kdfast eval``."""

import json
import re
from pathlib import Path

import pytest
import torch

from kdfast.cli import main
from kdfast.train import TokenBatches
from kdfast.train.task import finetune_and_eval, task_distill
from tests.train.glue_data import NLI_LABELS, save_tiny_bert, write_mnli, write_sst2

FAST = dict(batch_size=16, seed=0, progress=False)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("glue")
    return {"sst2": write_sst2(root / "sst2"), "mnli": write_mnli(root / "mnli"),
            "bert": save_tiny_bert(root / "bert"),
            "student": save_tiny_bert(root / "student", hidden=16, layers=1, heads=4, seed=1)}


@pytest.fixture(scope="module")
def sst2_teacher(files, tmp_path_factory):
    """The tiny BERT fine-tuned on the learnable SST-2 files (also the TinyBERT teacher below)."""
    out = tmp_path_factory.mktemp("teacher")
    return finetune_and_eval(str(files["bert"]), "sst2", str(files["sst2"]), str(out), epochs=8, lr=3e-3, **FAST)


def test_finetuning_learns_sst2_above_the_majority_class(sst2_teacher, files):
    r = sst2_teacher
    acc, majority = r["metrics"]["dev"]["accuracy"], r["majority"]["dev"]["accuracy"]
    assert acc >= majority + 0.25, (acc, majority)
    hist = r["train"]["history"]
    assert hist[-1]["loss"] < 0.5 * hist[0]["loss"]
    saved = json.loads((Path(r["model_dir"]).parent / "metrics.json").read_text())
    assert saved["metrics"] == r["metrics"] and saved["train"]["steps"] == 8 * (160 // 16)


def test_mnli_reports_matched_and_mismatched_as_the_saved_model_predicts(files, tmp_path):
    """The reported accuracies equal those of the saved model run example by example, unpadded,
    with the labels read straight from the TSV's gold_label column."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    r = finetune_and_eval(str(files["bert"]), "mnli", str(files["mnli"]), str(tmp_path), epochs=2, lr=1e-3, **FAST)
    assert set(r["metrics"]) == {"dev_matched", "dev_mismatched"}
    model = AutoModelForSequenceClassification.from_pretrained(r["model_dir"], local_files_only=True).eval()
    tok = AutoTokenizer.from_pretrained(r["model_dir"], local_files_only=True)
    assert model.config.num_labels == 3
    for split in ("dev_matched", "dev_mismatched"):
        lines = (files["mnli"] / f"{split}.tsv").read_text().splitlines()
        header = lines[0].split("\t")
        correct = 0
        for line in lines[1:]:
            f = line.split("\t")
            enc = tok(f[header.index("sentence1")], f[header.index("sentence2")], return_tensors="pt")
            with torch.no_grad():
                pred = int(model(**enc).logits.argmax(-1))
            correct += pred == NLI_LABELS.index(f[header.index("gold_label")])
        assert r["metrics"][split]["accuracy"] == pytest.approx(correct / (len(lines) - 1), abs=1e-12)


def test_task_distill_runs_both_steps_and_the_student_learns_from_the_teacher(sst2_teacher, files, tmp_path):
    r = task_distill(sst2_teacher["model_dir"], str(files["student"]), "sst2", str(files["sst2"]), str(tmp_path),
                     intermediate_epochs=3, prediction_epochs=10, intermediate_lr=3e-3, prediction_lr=3e-3, **FAST)
    a, b = r["train"]["intermediate"]["history"], r["train"]["prediction"]["history"]
    assert a[0]["step"] >= 1 and {"hidden", "attention"} <= set(a[0])
    assert a[-1]["loss"] < a[0]["loss"] and a[-1]["hidden"] < a[0]["hidden"]
    assert b[-1]["loss"] < b[0]["loss"] - 0.2
    assert r["train"]["intermediate"]["steps"] == 3 * 10 and r["train"]["prediction"]["steps"] == 10 * 10
    acc, majority = r["metrics"]["dev"]["accuracy"], r["majority"]["dev"]["accuracy"]
    assert r["teacher_metrics"] == sst2_teacher["metrics"]
    assert acc >= majority + 0.25, (acc, majority)
    assert r["config"]["layer_map"] == {0: 0, 1: 2}
    from transformers import AutoModelForSequenceClassification

    saved = AutoModelForSequenceClassification.from_pretrained(r["model_dir"], local_files_only=True)
    assert saved.config.num_hidden_layers == 1 and saved.config.hidden_size == 16


def test_stsb_regression_finetunes_and_distills_with_one_output(files, tmp_path):
    d = tmp_path / "stsb"
    d.mkdir()
    g = torch.Generator().manual_seed(3)
    words = ["good", "bad", "movie", "the", "cat", "dog", "sky", "blue"]
    for split, n in (("train", 24), ("dev", 12)):
        rows = ["index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore"]
        for i in range(n):
            s1 = " ".join(words[int(j)] for j in torch.randint(0, 8, (4,), generator=g))
            s2 = " ".join(words[int(j)] for j in torch.randint(0, 8, (4,), generator=g))
            score = float(torch.rand((), generator=g) * 5)
            rows.append(f"{i}\tmain\tx\t2012\t{i}\tnone\tnone\t{s1}\t{s2}\t{score:.3f}")
        (d / f"{split}.tsv").write_text("\n".join(rows) + "\n")
    t = finetune_and_eval(str(files["bert"]), "stsb", str(d), str(tmp_path / "t"), epochs=2, lr=1e-3, **FAST)
    assert set(t["metrics"]["dev"]) == {"pearson", "spearman"} and t["majority"] is None
    s = task_distill(t["model_dir"], str(files["student"]), "stsb", str(d), str(tmp_path / "s"),
                     intermediate_epochs=1, prediction_epochs=3, prediction_lr=1e-3, **FAST)
    assert all(-1 <= v <= 1 for v in s["metrics"]["dev"].values())
    hist = s["train"]["prediction"]["history"]
    assert hist[-1]["loss"] < hist[0]["loss"]  # MSE between the two regression outputs


def test_task_distill_resumed_after_step_a_equals_an_uninterrupted_run(sst2_teacher, files, tmp_path):
    import shutil

    from safetensors.torch import load_file

    opts = dict(intermediate_epochs=2, prediction_epochs=2, intermediate_lr=3e-3, prediction_lr=3e-3,
                max_train_examples=32, **FAST)
    args = (sst2_teacher["model_dir"], str(files["student"]), "sst2", str(files["sst2"]))
    full = task_distill(*args, str(tmp_path / "full"), **opts)
    task_distill(*args, str(tmp_path / "cut"), **opts)
    # as if killed between the two steps: step A's checkpoints survive, nothing of step B
    shutil.rmtree(tmp_path / "cut" / "prediction")
    shutil.rmtree(tmp_path / "cut" / "student")
    log_a = tmp_path / "cut" / "intermediate" / "metrics.jsonl"
    records_a = log_a.read_text()
    resumed = task_distill(*args, str(tmp_path / "cut"), resume=True, **opts)
    assert log_a.read_text() == records_a  # step A was restored from its checkpoint, not run again
    a, b = (load_file(str(tmp_path / run / "student" / "model.safetensors")) for run in ("full", "cut"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["metrics"] == full["metrics"]


def test_task_errors(files, sst2_teacher, tmp_path):
    with pytest.raises(ValueError, match="task must be one of"):
        finetune_and_eval(str(files["bert"]), "squad", str(files["sst2"]), str(tmp_path))
    with pytest.raises(ValueError, match="model_dir .* is not a model directory"):
        finetune_and_eval(str(tmp_path), "sst2", str(files["sst2"]), str(tmp_path))
    with pytest.raises(ValueError, match="data_dir .* is not a directory"):
        finetune_and_eval(str(files["bert"]), "sst2", str(tmp_path / "none"), str(tmp_path))
    with pytest.raises(ValueError, match="epochs must be an int >= 1"):
        finetune_and_eval(str(files["bert"]), "sst2", str(files["sst2"]), str(tmp_path), epochs=0)
    with pytest.raises(ValueError, match="max_train_examples"):
        finetune_and_eval(str(files["bert"]), "sst2", str(files["sst2"]), str(tmp_path), max_train_examples=0)
    with pytest.raises(ValueError, match="teacher_dir .* has 2 outputs but mnli needs 3"):
        task_distill(sst2_teacher["model_dir"], str(files["student"]), "mnli", str(files["mnli"]), str(tmp_path))
    with pytest.raises(ValueError, match="temperature must be > 0"):
        task_distill(sst2_teacher["model_dir"], str(files["student"]), "sst2", str(files["sst2"]), str(tmp_path),
                     temperature=0.0)
    with pytest.raises(ValueError, match="prediction_epochs must be an int >= 0"):
        task_distill(sst2_teacher["model_dir"], str(files["student"]), "sst2", str(files["sst2"]), str(tmp_path),
                     prediction_epochs=-1)
    three_heads = save_tiny_bert(tmp_path / "three_heads", hidden=24, layers=1, heads=3)
    with pytest.raises(ValueError, match="needs head counts where one divides the other: student_dir has 3, "
                                         "teacher_dir 4"):
        task_distill(sst2_teacher["model_dir"], str(three_heads), "sst2", str(files["sst2"]), str(tmp_path / "x"),
                     intermediate_epochs=1, prediction_epochs=0, **FAST)


def test_task_distill_maps_teacher_heads_onto_fewer_student_heads(sst2_teacher, files, tmp_path):
    two_heads = save_tiny_bert(tmp_path / "two_heads", hidden=16, layers=1, heads=2)
    r = task_distill(sst2_teacher["model_dir"], str(two_heads), "sst2", str(files["sst2"]), str(tmp_path / "run"),
                     intermediate_epochs=2, prediction_epochs=0, intermediate_lr=3e-3, **FAST)
    hist = r["train"]["intermediate"]["history"]
    assert len(hist) == 20 and r["train"]["prediction"] is None
    assert all(0 < h["attention"] < float("inf") for h in hist)
    first, last = (sum(h["loss"] for h in part) / 5 for part in (hist[:5], hist[-5:]))
    assert last < first


def test_token_batches_carry_extra_fields():
    ids = torch.randint(0, 50, (10, 6))
    labels = torch.randint(0, 3, (10,))
    data = TokenBatches(ids, torch.ones_like(ids), 4, seed=1, extra={"labels": labels})
    for batch in data.batches(0):
        rows = [int((ids == r).all(1).nonzero()[0]) for r in batch["input_ids"]]
        assert torch.equal(batch["labels"], labels[rows])
    with pytest.raises(ValueError, match=r"extra\['labels'\] must be a tensor with 10 rows"):
        TokenBatches(ids, torch.ones_like(ids), 4, extra={"labels": labels[:9]})


# ---- CLI -----------------------------------------------------------------------------------------

def test_cli_eval_finetunes_and_prints_the_metric(files, tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["eval", "--task", "sst2", "--model", str(files["bert"]), "--data-dir", str(files["sst2"]),
               "--out", str(out), "--epochs", "1", "--lr", "1e-3", "--batch-size", "16", "--max-train-examples", "32",
               "--no-progress"])
    text = capsys.readouterr().out
    assert rc == 0
    report = json.loads((out / "metrics.json").read_text())
    assert report["train"]["examples"] == 32 and report["train"]["steps"] == 2
    line = next(line for line in text.splitlines() if line.startswith("dev "))
    assert line.split()[1] == "accuracy" and float(line.split()[2]) == pytest.approx(
        report["metrics"]["dev"]["accuracy"], abs=5e-5)


def test_cli_eval_with_teacher_runs_task_distillation(files, sst2_teacher, tmp_path, capsys):
    out = tmp_path / "distil"
    rc = main(["eval", "--task", "sst2", "--model", str(files["student"]), "--teacher", sst2_teacher["model_dir"],
               "--data-dir", str(files["sst2"]), "--out", str(out), "--epochs", "1", "--intermediate-epochs", "1",
               "--batch-size", "16", "--max-train-examples", "32", "--no-progress"])
    text = capsys.readouterr().out
    assert rc == 0 and "task distillation" in text and "teacher" in text.splitlines()[1]
    report = json.loads((out / "metrics.json").read_text())
    assert report["train"]["intermediate"]["steps"] == 2 and report["train"]["prediction"]["steps"] == 2
    assert (out / "student" / "config.json").is_file()


@pytest.mark.parametrize("student_layers,expected", [(4, {1: None, 2: 4, 3: None, 4: 4}), (2, {1: 4, 2: 4})])
def test_cli_eval_with_a_modernbert_teacher_compares_local_layers_on_their_band(files, tmp_path, monkeypatch, capsys,
                                                                               student_layers, expected):
    """A ModernBERT teacher (layers global, local, global, local; local_attention 8: the band
    |i - j| <= 4): the score MSE of every pair with a local layer runs on that band, not on the
    whole L x L map; a global student layer against a local teacher layer on the teacher's band."""
    import kdfast.losses.attention as attention
    from tests.tiny_teachers import save_tiny_teacher
    from tests.train.conftest import WORDS

    # a BPE vocabulary learnt from other words: the task's words split into several tokens each
    teacher = save_tiny_teacher(tmp_path / "teacher", "modernbert", WORDS)
    student = save_tiny_teacher(tmp_path / "student", "modernbert", WORDS, layers=student_layers, seed=1)
    seen, flash = [], attention.flash_attention_transfer

    def spy(q_s, *args, window=None, **kw):
        seen.append((window, q_s.shape[2]))
        return flash(q_s, *args, window=window, **kw)

    monkeypatch.setattr(attention, "flash_attention_transfer", spy)
    out = tmp_path / "distil"
    rc = main(["eval", "--task", "sst2", "--model", str(student), "--teacher", str(teacher),
               "--data-dir", str(files["sst2"]), "--out", str(out), "--epochs", "1", "--intermediate-epochs", "1",
               "--batch-size", "16", "--max-train-examples", "16", "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    # step A's attention term ran on each pair's band (pairs of one window share a call), at lengths
    # L > 2 w + 1, where the band is not the whole row
    assert {w for w, _ in seen} == set(expected.values()) and min(length for _, length in seen) > 9
    report = json.loads((out / "metrics.json").read_text())
    assert report["config"]["attention_windows"] == {str(m): w for m, w in expected.items()}


@pytest.mark.parametrize("case, message", [
    ("unknown_task", "task must be one of"),
    ("missing_model", "--model .* is not a directory"),
    ("missing_data", "--data-dir .* is not a directory"),
    ("malformed", "malformed"),
])
def test_cli_eval_errors_are_one_line_exit_2(files, tmp_path, capsys, case, message):
    data = files["sst2"]
    model = str(files["bert"])
    task = "sst2"
    if case == "unknown_task":
        task = "squad"
    elif case == "missing_model":
        model = str(tmp_path / "no_model")
    elif case == "missing_data":
        data = tmp_path / "no_data"
    else:
        data = tmp_path / "bad"
        data.mkdir()
        (data / "train.tsv").write_text("sentence\tlabel\ngood\t1\nbad\t0\textra\n")
        (data / "dev.tsv").write_text("sentence\tlabel\ngood\t1\n")
    rc = main(["eval", "--task", task, "--model", model, "--data-dir", str(data), "--out", str(tmp_path / "o"),
               "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1
    assert err[0].startswith("kdfast eval: error:")
    assert re.search(message, err[0]), err[0]


def test_cli_eval_help(capsys):
    with pytest.raises(SystemExit) as e:
        main(["eval", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--task", "--model", "--data-dir", "--out", "--epochs", "--lr", "--batch-size", "--max-length",
                 "--max-train-examples", "--seed", "--teacher"):
        assert flag in text



def test_tinybert_recipe_hands_its_student_to_task_distillation(files, sst2_teacher, tmp_path, capsys):
    """General distillation (`kdfast distill --recipe tinybert`) then, from its `task` section, this
    module's task_distill on the general student: the two halves of TinyBERT joined."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join((files["sst2"] / "train.tsv").read_text().splitlines()[1:41]).replace("\t", " ") + "\n")
    options = "{intermediate_epochs: 1, prediction_epochs: 1, batch_size: 16, max_train_examples: 32, progress: false}"
    rc = main(["distill", "--recipe", "tinybert", "--teacher", str(files["bert"]), "--data", str(corpus),
               "--out", str(tmp_path / "tb"), "--steps", "2", "--no-progress",
               "--set", "student.hidden_size=16", "--set", "student.intermediate_size=32",
               "--set", "student.num_attention_heads=4", "--set", "student.num_hidden_layers=1",
               "--set", "train.batch_size=8", "--set", "data.max_length=16",
               "--set", "task.name=sst2", "--set", f"task.teacher_dir={sst2_teacher['model_dir']}",
               "--set", f"task.data_dir={files['sst2']}", "--set", f"task.options={options}"])
    capsys.readouterr()
    assert rc == 0
    report = json.loads((tmp_path / "tb" / "report.json").read_text())
    task = report["task"]
    assert task["task"] == "sst2" and set(task["metrics"]["dev"]) == {"accuracy"}
    assert task["train"]["intermediate"]["steps"] == 2 and task["train"]["prediction"]["steps"] == 2
    assert task["config"]["student_dir"] == report["student"]["dir"]
