"""The distillation recipes end to end through `kdfast distill` on a tiny local teacher, live and
from the teacher cache; config precedence and errors; MobileBERT's progressive freezing."""

import json

import pytest
import torch
import yaml

from kdfast.cli import main
from kdfast.train.recipes import recipe_config


def run_cli(tiny, recipe, out, *extra):
    args = ["distill", "--recipe", recipe, "--teacher", str(tiny / "teacher"), "--data", str(tiny / "train.txt"),
            "--out", str(out), "--no-progress", "--set", "data.max_length=16", "--set", "train.batch_size=4",
            "--set", "train.eval_every=2", "--set", "train.log_every=1", *extra]
    return main(args)


SMALL = {"distilbert": (),
         "tinybert": ("--set", "student.hidden_size=16", "--set", "student.intermediate_size=32",
                      "--set", "student.num_attention_heads=4", "--set", "student.num_hidden_layers=2"),
         # 2 student heads against the teacher's 4: attention KL on the mean scores of head pairs
         "mobilebert": ("--set", "student.embedding_size=16", "--set", "student.intermediate_size=16",
                        "--set", "student.num_feedforward_networks=2", "--set", "student.num_attention_heads=2")}


@pytest.mark.parametrize("source", ["live", "cache"])
@pytest.mark.parametrize("recipe", ["distilbert", "tinybert", "mobilebert"])
def test_recipe_end_to_end(tiny, tmp_path, capsys, recipe, source):
    out = tmp_path / recipe
    rc = run_cli(tiny, recipe, out, "--steps", "3", "--set", f"teacher.source={source}", *SMALL[recipe])
    printed = capsys.readouterr().out
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    assert report["recipe"] == recipe and report["teacher"]["source"] == source
    assert report["student"]["params"] > 0 and report["teacher"]["params"] > 0
    stages = report["stages"]
    assert len(stages) == {"distilbert": 1, "tinybert": 1, "mobilebert": 4 + 1}[recipe]
    for st in stages:
        assert st["last"]["step"] == 3 and st["tokens_per_s"] > 0
        assert all(torch.isfinite(torch.tensor(v)) for k, v in st["last"].items() if isinstance(v, float))
        assert st["eval"]["step"] == 3 and "eval/loss" in st["eval"]
    terms = set(stages[0]["last"])
    expected = {"distilbert": {"kd_mlm", "cos"}, "tinybert": {"hidden", "attention"},
                "mobilebert": {"feature_map", "attention"}}[recipe]
    assert expected <= terms
    if recipe == "mobilebert":
        assert "kd_mlm" in stages[-1]["last"]
    assert "loss first -> last" in printed and "eval loss" in printed
    assert yaml.safe_load(printed.split("\n\n")[0].split("\n", 1)[1])["teacher"]["source"] == source
    assert (out / "student" / "config.json").is_file()
    assert (out / "loss.png").stat().st_size > 1000  # every stage's logged terms
    if source == "cache":
        assert (out / "teacher-cache" / "train" / "manifest.json").is_file()


def test_distilbert_training_lowers_the_loss_and_live_equals_its_own_resume(tiny, tmp_path):
    """More steps on a fixed batch order: the held-out loss falls; a resumed run ends where an
    uninterrupted one does."""
    common = ("--set", "train.lr=2e-3", "--set", "train.warmup=0")
    assert run_cli(tiny, "distilbert", tmp_path / "full", "--steps", "8", *common) == 0
    full = json.loads((tmp_path / "full" / "report.json").read_text())["stages"][0]
    assert full["eval"]["eval/loss"] < full["eval_first"]["eval/loss"]
    assert run_cli(tiny, "distilbert", tmp_path / "part", "--steps", "8", "--set", "train.checkpoint_every=4",
                   *common) == 0
    ckpts = tmp_path / "part" / "checkpoints"
    (ckpts / "latest").write_text("step-0000004")  # as if killed after step 4
    assert run_cli(tiny, "distilbert", tmp_path / "part", "--steps", "8", "--resume", *common) == 0
    a = torch.load(tmp_path / "full" / "checkpoints" / "step-0000008" / "trainer.pt", weights_only=True)
    b = torch.load(ckpts / "step-0000008" / "trainer.pt", weights_only=True)
    assert a["step"] == b["step"] == 8
    from safetensors.torch import load_file
    wa = load_file(str(tmp_path / "full" / "checkpoints" / "step-0000008" / "weights.safetensors"))
    wb = load_file(str(ckpts / "step-0000008" / "weights.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_config_precedence(tmp_path):
    yml = tmp_path / "c.yaml"
    yml.write_text("temperature: 3.0\nalpha_kd: 4.0\ntrain: {lr: 0.01, batch_size: 7}\nsteps: 11\n")
    cfg = recipe_config("distilbert")
    assert (cfg.temperature, cfg.alpha_kd, cfg.train.lr, cfg.steps) == (2.0, 5.0, 5e-4, 200)  # paper defaults
    assert cfg.train.max_grad_norm == 5.0 and cfg.mlm.smoothing == 0.7
    cfg = recipe_config("distilbert", str(yml))
    assert (cfg.temperature, cfg.alpha_kd, cfg.train.lr, cfg.train.batch_size, cfg.steps) == (3.0, 4.0, 0.01, 7, 11)
    assert cfg.train.max_grad_norm == 5.0  # a partial section keeps the recipe's other defaults
    cfg = recipe_config("distilbert", str(yml), ["alpha_kd=1.5", "train.lr=2e-3", "steps=12"])
    assert (cfg.temperature, cfg.alpha_kd, cfg.train.lr, cfg.steps) == (3.0, 1.5, 2e-3, 12)
    cfg = recipe_config("distilbert", str(yml), ["steps=12", "teacher.dir=/a"], {"steps": 13, "teacher.dir": "/b"})
    assert cfg.steps == 13 and cfg.teacher.dir == "/b"
    cfg = recipe_config("mobilebert", None, [], {"steps": 5})
    assert cfg.pkt.steps_per_layer == 5 and cfg.pretrain.steps == 5
    cfg = recipe_config("distilbert", None, ["student_layers=[0, 2]", "train.optimizer=null"])
    assert cfg.student_layers == [0, 2] and cfg.train.optimizer is None


@pytest.mark.parametrize("sets, match", [
    (["nope=1"], "unknown key 'nope'"),
    (["train.nope=1"], "unknown key 'train.nope'"),
    (["train.lr=fast"], "train.lr must be float"),
    (["steps=1.5"], "steps must be int"),
    (["progress=1"], "progress must be bool"),
    (["student_layers=[0, x]"], r"student_layers\[1\] must be int"),
    (["teacher=3"], "teacher must be a mapping"),
    (["teacher.source=remote"], "teacher.source must be 'live' or 'cache'"),
    (["mlm.probability=1.5"], r"mlm.probability must be in \(0, 1\)"),
    (["noequals"], "--set expects key=value"),
    (["teacher.source.x=1"], "teacher.source must be str"),
    (["teacher.source=cache", "teacher.source.x=1"], "teacher.source is not a section"),
])
def test_bad_settings_name_the_key(sets, match):
    with pytest.raises(ValueError, match=match):
        recipe_config("distilbert", None, sets)


def test_cli_errors_are_one_line_exit_2(tiny, tmp_path, capsys):
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("steps: [1,\n")
    list_yaml = tmp_path / "list.yaml"
    list_yaml.write_text("- 1\n- 2\n")
    base = ["distill", "--recipe", "distilbert", "--no-progress", "--out", str(tmp_path / "o")]
    cases = [
        (["--config", str(tmp_path / "missing.yaml")], "does not exist"),
        (["--config", str(bad_yaml)], "not valid YAML"),
        (["--config", str(list_yaml)], "must hold a mapping"),
        (["--set", "bogus=1"], "unknown key"),
        (["--teacher", str(tmp_path / "no-teacher"), "--data", str(tiny / "train.txt")], "not a local model directory"),
        (["--teacher", str(tiny / "teacher"), "--data", str(tmp_path / "none.txt"), "--set", "data.max_length=16"],
         "does not exist"),
    ]
    for extra, match in cases:
        assert main(base + extra) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("kdfast distill: error:") and match in err and "\n" not in err
    with pytest.raises(SystemExit) as e:
        main(["distill", "--recipe", "nosuch"])
    assert e.value.code == 2
    assert main(base + ["--print-config", "--set", "alpha_mlm=0.25"]) == 0
    assert yaml.safe_load(capsys.readouterr().out.split("\n", 1)[1])["alpha_mlm"] == 0.25
    for recipe in ("distilbert", "tinybert", "mobilebert"):
        with pytest.raises(SystemExit) as e:
            main(["distill", "--recipe", recipe, "--help"])
        assert e.value.code == 0


@pytest.mark.parametrize("recipe, extra, match", [
    ("distilbert", (), "alpha_kd to 0"),
    ("distilbert", ("--set", "teacher.source=cache"), "alpha_kd and alpha_mlm"),
    ("mobilebert", SMALL["mobilebert"], "pretrain.steps to 0"),
])
def test_teacher_without_mlm_head_is_refused(tiny, tmp_path, capsys, recipe, extra, match):
    rc = main(["distill", "--recipe", recipe, "--teacher", str(tiny / "headless"), "--data", str(tiny / "train.txt"),
               "--out", str(tmp_path / "o"), "--no-progress", "--steps", "1", "--set", "data.max_length=16", *extra])
    err = capsys.readouterr().err
    assert rc == 2 and "has no MLM head" in err and "cls.predictions" in err and match in err
    assert not (tmp_path / "o" / "teacher-cache" / "train" / "manifest.json").exists()


def test_headless_teacher_runs_the_terms_that_need_no_head(tiny, tmp_path):
    common = ("--teacher", str(tiny / "headless"), "--data", str(tiny / "train.txt"), "--no-progress",
              "--set", "data.max_length=16", "--set", "train.batch_size=4")
    assert main(["distill", "--recipe", "distilbert", "--out", str(tmp_path / "d"), *common, "--steps", "2",
                 "--set", "alpha_kd=0"]) == 0  # MLM on the student's own head + cosine
    # (--steps would set pretrain.steps too: explicit flags come last)
    assert main(["distill", "--recipe", "mobilebert", "--out", str(tmp_path / "m"), *common, *SMALL["mobilebert"],
                 "--set", "pkt.steps_per_layer=2", "--set", "pretrain.steps=0"]) == 0


@pytest.mark.parametrize("scale", [0.0, 0.5])
def test_mobilebert_pkt_freezes_or_slows_lower_layers(tiny, scale, monkeypatch, tmp_path):
    """During stage l the layers below l change only when lower_lr_scale > 0; layers above l never."""
    from kdfast.train import stage
    from kdfast.train.recipes import run_recipe

    snapshots = {}
    real = stage.run_stage

    def spy(st, **kwargs):
        before = {k: v.detach().clone() for k, v in st.model.state_dict().items()}
        res = real(st, **kwargs)
        snapshots[st.name] = (before, {k: v.detach().clone() for k, v in st.model.state_dict().items()})
        return res

    monkeypatch.setattr(stage, "run_stage", spy)
    cfg = recipe_config("mobilebert", None, [
        "data.max_length=16", "train.batch_size=4", "train.eval_every=0", "student.embedding_size=16",
        "student.intermediate_size=16", "student.num_feedforward_networks=2", "pretrain.steps=0",
        f"pkt.lower_lr_scale={scale}", "progress=false", "train.warmup=0"],
        {"teacher.dir": str(tiny / "teacher"), "data.files": [str(tiny / "train.txt")], "steps": 2,
         "out_dir": str(tmp_path / "m")})
    run_recipe("mobilebert", cfg)

    def changed(before, after, prefix):
        keys = [k for k in before if k.startswith(prefix)]
        assert keys
        return any(not torch.equal(before[k], after[k]) for k in keys)

    before, after = snapshots["pkt layer 3"]
    for l in (0, 1):
        assert changed(before, after, f"mobilebert.encoder.layer.{l}.") == (scale > 0)
    assert changed(before, after, "mobilebert.embeddings.") == (scale > 0)
    assert changed(before, after, "mobilebert.encoder.layer.2.")
    assert not changed(before, after, "mobilebert.encoder.layer.3.")
    assert not changed(before, after, "cls.predictions.transform.")
    before, after = snapshots["pkt layer 1"]
    assert changed(before, after, "mobilebert.embeddings.") and changed(before, after, "mobilebert.encoder.layer.0.")


def test_mobilebert_student_heads_default_to_the_papers_four_and_must_divide_the_teachers():
    from transformers import BertConfig

    from kdfast.train.recipes.mobilebert import MobileBertStudent, student_config

    minilm = BertConfig(hidden_size=384, num_attention_heads=12, num_hidden_layers=6, intermediate_size=1536)
    cfg = student_config(MobileBertStudent(), minilm)
    assert (cfg.num_attention_heads, cfg.intra_bottleneck_size, cfg.hidden_size) == (4, 96, 384)
    odd = BertConfig(hidden_size=60, num_attention_heads=6, num_hidden_layers=2, intermediate_size=120)
    assert student_config(MobileBertStudent(), odd).num_attention_heads == 6
    with pytest.raises(ValueError, match="num_attention_heads 5"):
        student_config(MobileBertStudent(num_attention_heads=5, intra_bottleneck_size=10), minilm)
