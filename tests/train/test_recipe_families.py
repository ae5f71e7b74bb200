"""Every accepted teacher family through the recipes: tiny RoBERTa, XLM-RoBERTa, ELECTRA and
ModernBERT teachers (each with its own tokenizer: ModernBERT's BPE mask and separator are not
[MASK] / [SEP]) distil through the DistilBERT and TinyBERT recipes, ModernBERT also from the cache;
the student reloads with AutoModelForMaskedLM; two seeded runs are identical; a DeBERTa-v2 teacher
is refused in one line, exit 2, before any work."""

import json

import pytest
import torch

from kdfast.cli import main
from tests.tiny_teachers import save_tiny_teacher
from tests.train.conftest import WORDS


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    for family in ("roberta", "xlm-roberta", "electra", "modernbert"):
        save_tiny_teacher(root / family, family, WORDS)
    import random

    rng = random.Random(2)
    lines = [" ".join(rng.choices(WORDS, k=rng.randint(5, 14))) for _ in range(40)]
    (root / "train.txt").write_text("\n".join(lines) + "\n")
    return root


def distill(teachers, family, recipe, out, *extra):
    args = ["distill", "--recipe", recipe, "--teacher", str(teachers / family), "--data", str(teachers / "train.txt"),
            "--out", str(out), "--no-progress", "--steps", "2", "--set", "data.max_length=24",
            "--set", "train.batch_size=4", "--set", "train.log_every=1", *extra]
    if recipe == "tinybert":
        args += ["--set", "student.hidden_size=12", "--set", "student.intermediate_size=13",
                 "--set", "student.num_attention_heads=3", "--set", "student.num_hidden_layers=2"]
    return main(args)


def check_run(out, family):
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    report = json.loads((out / "report.json").read_text())
    last = report["stages"][0]["last"]
    assert last["step"] == 2 and all(torch.isfinite(torch.tensor(v)) for v in last.values() if isinstance(v, float))
    student = AutoModelForMaskedLM.from_pretrained(out / "student")
    tok = AutoTokenizer.from_pretrained(out / "student")
    if family == "modernbert":
        assert student.config.model_type == "modernbert" and tok.mask_token == "<|mask|>"
    with torch.no_grad():
        logits = student(**tok(["w1 w2 w3"], return_tensors="pt")).logits
    assert torch.isfinite(logits).all()
    return report


@pytest.mark.parametrize("recipe", ["distilbert", "tinybert"])
@pytest.mark.parametrize("family", ["roberta", "xlm-roberta", "electra", "modernbert"])
def test_each_family_distils_live(teachers, tmp_path, family, recipe):
    out = tmp_path / f"{family}-{recipe}"
    assert distill(teachers, family, recipe, out) == 0
    report = check_run(out, family)
    if family == "modernbert" and recipe == "tinybert":
        # the student's layers take the types of the teacher layers they map to
        from transformers import AutoConfig

        t = AutoConfig.from_pretrained(teachers / family)
        s = AutoConfig.from_pretrained(out / "student")
        step = t.num_hidden_layers // s.num_hidden_layers
        assert s.layer_types == [t.layer_types[(m + 1) * step - 1] for m in range(s.num_hidden_layers)]
        assert report["stages"][0]["last"]["attention"] > 0


@pytest.mark.parametrize("recipe", ["distilbert", "tinybert"])
def test_modernbert_from_the_cache_and_two_seeded_runs_are_identical(teachers, tmp_path, recipe):
    from safetensors.torch import load_file

    runs = []
    for name in ("a", "b"):
        out = tmp_path / name
        assert distill(teachers, "modernbert", recipe, out, "--set", "teacher.source=cache") == 0
        check_run(out, "modernbert")
        runs.append(load_file(str(out / "student" / "model.safetensors")))
    assert runs[0].keys() == runs[1].keys() and all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])


def test_deberta_v2_teacher_is_refused_in_one_line_before_any_work(tmp_path, capsys):
    from transformers import DebertaV2Config

    teacher = tmp_path / "deberta"
    teacher.mkdir()
    DebertaV2Config(vocab_size=40, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                    intermediate_size=8).save_pretrained(teacher)  # a config alone: nothing else is read
    (tmp_path / "t.txt").write_text("w1 w2\n")
    for recipe in ("distilbert", "tinybert"):
        out = tmp_path / recipe
        rc = main(["distill", "--recipe", recipe, "--teacher", str(teacher), "--data", str(tmp_path / "t.txt"),
                   "--out", str(out), "--no-progress"])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1, err
        assert "deberta-v2" in err[0] and "ModernBERT" in err[0] and "Traceback" not in err[0]
        assert not out.exists()
