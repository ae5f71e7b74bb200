"""Training, checkpoints and the command line under hostile and careless input: training stops
at the first non-finite loss term or gradient and never writes NaN weights; settings refuse
non-finite and wrongly typed numbers; a run is reproducible from its seed (every recipe and the
demo); checkpoints are hashed and refused with a one-line reason when torn, altered, out of range,
of another model or of other settings; ``latest`` cannot leave the run; ``metrics.jsonl`` holds no
step twice after a resume; stale temporaries are cleaned; every bad input on the command line is
one line on stderr with exit status 2."""

import errno
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from kdfast.cache.format import sha256_file
from kdfast.cli import main
from kdfast.train import Distiller, TokenBatches, TrainConfig
from kdfast.train.distiller import CheckpointError, NonFiniteError

ROOT = Path(__file__).resolve().parents[2]

# ---- a small Distiller set-up --------------------------------------------------------------------


def make_run(tmp_path, name="run", *, steps=4, lr=1e-2, checkpoint_every=0, max_grad_norm=1.0, width=16,
             step_hook=None, seed=0):
    """Student, projection and a frozen teacher on random token ids; ``step_hook(step, loss, terms)``
    may replace the loss or its terms (to inject NaN / inf at a chosen step)."""
    gen = torch.Generator().manual_seed(123)
    student = nn.Sequential(nn.Embedding(50, width), nn.Linear(width, 16))
    teacher = nn.Sequential(nn.Embedding(50, 16), nn.Linear(16, 16)).eval()
    with torch.no_grad():
        for p in list(student.parameters()) + list(teacher.parameters()):
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    proj = nn.ModuleDict({"p": nn.Linear(16, 16)})
    ids = torch.randint(0, 50, (40, 7), generator=gen)
    data = TokenBatches(ids, torch.ones_like(ids), batch_size=8, seed=3, rank=0, world_size=1)
    calls = {"n": 0}

    def step_loss(batch):
        calls["n"] += 1
        with torch.no_grad():
            t = teacher(batch["input_ids"])
        s = proj["p"](student(batch["input_ids"]))
        mse = (s - t).pow(2).mean()
        loss, terms = mse, {"mse": mse.item()}
        if step_hook is not None:
            loss, terms = step_hook(calls["n"], loss, terms)
        return loss, terms

    cfg = TrainConfig(steps=steps, lr=lr, warmup=1, log_every=1, checkpoint_every=checkpoint_every,
                      max_grad_norm=max_grad_norm, out_dir=str(tmp_path / name), progress=False, seed=seed)
    return Distiller(student, step_loss, data, cfg, extra=proj), student


def weights_of(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def metric_steps(out: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def rehash(ckpt: Path) -> None:
    """Rewrite checkpoint.json's sizes and sha256 after an edit: what a careful tamperer does."""
    meta = json.loads((ckpt / "checkpoint.json").read_text())
    for name, rec in meta["files"].items():
        rec["sha256"], rec["bytes"] = sha256_file(ckpt / name), (ckpt / name).stat().st_size
    (ckpt / "checkpoint.json").write_text(json.dumps(meta))


def edit_meta(ckpt: Path, **changes) -> None:
    meta = json.loads((ckpt / "checkpoint.json").read_text())
    meta.update(changes)
    (ckpt / "checkpoint.json").write_text(json.dumps(meta))


# ---- non-finite training -------------------------------------------------------------------------


@pytest.mark.parametrize("term", ["mse", "loss"])
@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_non_finite_loss_stops_at_that_step_naming_the_term(tmp_path, term, value):
    def hook(n, loss, terms):
        if n == 3:
            if term == "loss":
                loss = loss * value
            else:
                terms = {**terms, "mse": value}
        return loss, terms

    d, student = make_run(tmp_path, step_hook=hook, checkpoint_every=1)
    with pytest.raises(NonFiniteError, match=rf"step 3: the loss{'' if term == 'loss' else ' term .mse.'} is "
                                             rf"{value}") as e:
        d.train()
    assert "\n" not in str(e.value)
    assert metric_steps(tmp_path / "run") == [1, 2]
    ckpts = tmp_path / "run" / "checkpoints"
    assert (ckpts / "latest").read_text() == "step-0000002" and not (ckpts / "step-0000003").exists()
    # the weights are those of step 2: the bad step updated nothing
    saved = load_file(str(ckpts / "step-0000002" / "weights.safetensors"))
    for k, v in weights_of(student).items():
        assert torch.equal(saved[f"student.{k}"], v)


@pytest.mark.parametrize("max_grad_norm", [1.0, 0.0])
def test_non_finite_gradient_stops_naming_the_parameter(tmp_path, max_grad_norm):
    d, student = make_run(tmp_path, max_grad_norm=max_grad_norm)
    before = {}

    def poison(grad):
        return grad * math.inf if d.step == 1 else grad  # during step 2

    student[1].weight.register_hook(poison)
    with pytest.raises(NonFiniteError, match=r"step 2: the gradient of student parameter '1.weight' is not finite"):
        d.train(on_log=lambda rec: before.update(weights_of(student)))
    for k, v in weights_of(student).items():
        assert torch.equal(before[k], v) and torch.isfinite(v).all()


@pytest.mark.parametrize("lr, steps, match", [
    (1e39, 1, "step 1: the optimizer's update overflows"),  # finite, but beyond float32 as a step size
    (1e37, 3, "step 2: the (loss|gradient)"),  # a finite update to ~1e38 weights: the next step overflows
])
def test_diverging_training_stops_with_a_named_error(tmp_path, lr, steps, match):
    d, student = make_run(tmp_path, steps=steps, lr=lr, max_grad_norm=0.0)
    with pytest.raises(NonFiniteError, match=match):
        d.train()
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_non_finite_weights_are_never_written(tmp_path):
    """Weights that turned non-finite after the last update are refused by the final save (a
    recipe saves its student only after that)."""
    d, student = make_run(tmp_path, steps=2)

    def spoil(rec):
        if rec["step"] == 2:
            with torch.no_grad():
                student[0].weight[3, 1] = math.nan

    with pytest.raises(NonFiniteError, match=r"step 2: the weights hold non-finite values \(student.0.weight\)"):
        d.train(on_log=spoil)
    ckpts = tmp_path / "run" / "checkpoints"
    assert not ckpts.exists() or not list(ckpts.iterdir())  # nothing written, no temporary left


@pytest.mark.parametrize("kwargs, match", [
    ({"lr": math.inf}, "lr must be finite"),
    ({"lr": math.nan}, "lr must be finite"),
    ({"lr": "2e-3"}, "lr must be a number"),
    ({"lr": True}, "lr must be a number"),
    ({"lr": 0.0}, "lr must be > 0"),
    ({"steps": 1.5}, "steps must be an int"),
    ({"steps": True}, "steps must be an int"),
    ({"seed": -1}, r"seed must be in \[0, "),
    ({"seed": 2**64}, r"seed must be in \[0, "),
    ({"max_grad_norm": math.inf}, "max_grad_norm must be finite"),
    ({"warmup": math.nan}, "warmup must be finite"),
    ({"weight_decay": -0.1}, "weight_decay must be >= 0"),
    ({"log_every": 0}, "log_every must be >= 1"),
    ({"grad_accum": 2.0}, "grad_accum must be an int"),
    ({"bf16": "yes"}, "bf16 must be None or a bool"),
])
def test_train_config_refuses_non_finite_and_wrongly_typed_numbers(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**kwargs)


@pytest.mark.parametrize("recipe, sets, match", [
    ("distilbert", ["train.lr=.inf"], "train.lr must be a finite number"),
    ("distilbert", ["train.lr=.nan"], "train.lr must be a finite number"),
    ("distilbert", ["alpha_kd=.nan"], "alpha_kd must be a finite number"),
    ("distilbert", ["temperature=-.inf"], "temperature must be a finite number"),
    ("distilbert", ["train.max_grad_norm=1e999"], "train.max_grad_norm must be a finite number"),
    ("distilbert", ["train.seed=-3"], r"train.seed must be in \[0, "),
    ("distilbert", ["train.seed=1.5"], "train.seed must be int"),
    ("distilbert", ["train.batch_size=true"], "train.batch_size must be int"),
    ("tinybert", ["alpha_hidden=.nan"], "alpha_hidden must be a finite number"),
    ("mobilebert", ["pkt.lr=.inf"], "pkt.lr must be a finite number"),
    ("mobilebert", ["pretrain.temperature=.nan"], "pretrain.temperature must be a finite number"),
])
def test_recipe_settings_refuse_non_finite_and_wrongly_typed_numbers(recipe, sets, match):
    from kdfast.train.recipes import recipe_config

    with pytest.raises(ValueError, match=match):
        recipe_config(recipe, None, sets)


def test_recipe_settings_built_in_python_are_checked_too(tiny, tmp_path):
    from kdfast.train.recipes import recipe_config, run_recipe

    cfg = recipe_config("tinybert", None, ["data.max_length=16"], {"teacher.dir": str(tiny / "teacher"),
                                                                   "out_dir": str(tmp_path / "o")})
    cfg.train.lr = math.inf
    with pytest.raises(ValueError, match="train.lr must be a finite number"):
        run_recipe("tinybert", cfg)
    assert not (tmp_path / "o").exists()


# ---- checkpoints ---------------------------------------------------------------------------------


@pytest.fixture
def finished(tmp_path):
    """A 4-step run with a checkpoint every 2 steps, and a function giving a fresh Distiller of it."""
    make_run(tmp_path, checkpoint_every=2)[0].train()
    return tmp_path / "run" / "checkpoints", lambda **kw: make_run(tmp_path, checkpoint_every=2, **kw)[0]


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x40
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _nan_weights(ckpt: Path) -> None:
    t = load_file(str(ckpt / "weights.safetensors"))
    key = "student.1.weight" if "student.1.weight" in t else max(k for k in t if t[k].is_floating_point())
    t[key].view(-1)[0] = math.nan
    save_file(t, str(ckpt / "weights.safetensors"))
    rehash(ckpt)


def _wrong_shape(ckpt: Path) -> None:
    t = load_file(str(ckpt / "weights.safetensors"))
    t["student.1.weight"] = torch.randn(16, 24)
    save_file(t, str(ckpt / "weights.safetensors"))
    rehash(ckpt)


def _trainer_step_changed(ckpt: Path) -> None:
    state = torch.load(ckpt / "trainer.pt", weights_only=True)
    state["step"] = 3
    torch.save(state, ckpt / "trainer.pt")
    rehash(ckpt)


TAMPERING = {
    "flipped weights byte": (lambda c: _flip_byte(c / "weights.safetensors"), "weights.safetensors does not match "
                                                                              "its sha256"),
    "flipped trainer byte": (lambda c: _flip_byte(c / "trainer.pt"), "trainer.pt does not match its sha256"),
    "truncated weights": (lambda c: _truncate(c / "weights.safetensors"), "truncated or altered"),
    "empty trainer.pt": (lambda c: (c / "trainer.pt").write_bytes(b""), "trainer.pt has 0 bytes"),
    "truncated weights, re-hashed": (lambda c: (_truncate(c / "weights.safetensors"), rehash(c)),
                                     "weights.safetensors is unreadable"),
    "garbage trainer.pt, re-hashed": (lambda c: ((c / "trainer.pt").write_bytes(b"\x80\x04not a pickle"), rehash(c)),
                                      "trainer.pt is unreadable"),
    "NaN weights, re-hashed": (_nan_weights, r"non-finite values \(student.1.weight\)"),
    "wrong shape, re-hashed": (_wrong_shape, r"student.1.weight is torch.float32 \(16, 24\)"),
    "trainer step differs, re-hashed": (_trainer_step_changed, "trainer.pt is at step 3, checkpoint.json at 2"),
    "step 10**9": (lambda c: edit_meta(c, step=10**9), "checkpoint.json says step 1000000000"),
    "step -5": (lambda c: edit_meta(c, step=-5), r"step must be an int >= 0, got -5"),
    "step '2'": (lambda c: edit_meta(c, step="2"), r"step must be an int >= 0, got '2'"),
    "no checkpoint.json": (lambda c: (c / "checkpoint.json").unlink(), r"incomplete \(checkpoint.json missing\)"),
    "checkpoint.json a list": (lambda c: (c / "checkpoint.json").write_text("[1, 2]"), "checkpoint.json is malformed"),
    "checkpoint.json binary": (lambda c: (c / "checkpoint.json").write_bytes(b"\xff\xfe\x00"), "is malformed"),
    "hash removed": (lambda c: edit_meta(c, files={}), "records no sha256 and size of weights.safetensors"),
}


@pytest.mark.parametrize("case", sorted(TAMPERING))
def test_tampered_checkpoint_is_refused_with_one_line(finished, case):
    ckpts, fresh = finished
    (ckpts / "latest").write_text("step-0000002")
    tamper, match = TAMPERING[case]
    tamper(ckpts / "step-0000002")
    d = fresh()
    before = weights_of(d.student)
    with pytest.raises(CheckpointError, match=match) as e:
        d.train(resume=True)
    assert "\n" not in str(e.value)
    assert all(torch.equal(before[k], v) for k, v in weights_of(d.student).items())  # nothing half-restored
    assert d.step == 0


def test_step_beyond_the_run_is_refused(finished, tmp_path):
    ckpts, fresh = finished
    d = make_run(tmp_path, steps=3)[0]  # the checkpoint is at step 4
    with pytest.raises(CheckpointError, match="at step 4, beyond this run's 3 steps"):
        d.load_checkpoint(allow_changed_settings=True)


@pytest.mark.parametrize("pointer, match", [
    ("../../other/checkpoints/step-0000002", "must name a checkpoint directory"),
    ("/etc", "must name a checkpoint directory"),
    ("step-0000002/../../../x", "must name a checkpoint directory"),
    ("\xff", "must name a checkpoint directory"),
])
def test_latest_pointer_cannot_leave_the_run_directory(finished, tmp_path, pointer, match):
    ckpts, fresh = finished
    make_run(tmp_path, "other", checkpoint_every=2)[0].train()  # a valid checkpoint outside this run
    (ckpts / "latest").write_bytes(pointer.encode("latin-1"))
    with pytest.raises(CheckpointError, match=match):
        fresh().train(resume=True)


def test_latest_pointer_to_a_symlinked_checkpoint_is_refused(finished, tmp_path):
    ckpts, fresh = finished
    make_run(tmp_path, "other", checkpoint_every=2)[0].train()
    (ckpts / "step-0000009").symlink_to(tmp_path / "other" / "checkpoints" / "step-0000002")
    (ckpts / "latest").write_text("step-0000009")
    with pytest.raises(CheckpointError, match="leads outside"):
        fresh().train(resume=True)


def test_resume_with_changed_settings_is_refused_or_applied(finished, tmp_path):
    ckpts, fresh = finished
    (ckpts / "latest").write_text("step-0000002")
    with pytest.raises(CheckpointError, match=r"other settings \(lr 0.01 -> 0.005\).*--allow-changed-settings"):
        fresh(lr=5e-3).train(resume=True)
    # bookkeeping settings may change freely
    d = make_run(tmp_path, checkpoint_every=1)[0]
    assert d.load_checkpoint() and d.step == 2

    resumed = fresh(lr=5e-3)
    hist = resumed.train(resume=True, allow_changed_settings=True)
    reference = make_run(tmp_path, "reference", lr=5e-3)[0]  # the new lr from the start
    ref_hist = reference.train()
    assert [h["step"] for h in hist] == [3, 4]
    assert [h["lr"] for h in hist] == [h["lr"] for h in ref_hist[2:]]  # the new lr took effect
    assert all(g["initial_lr"] == 5e-3 for g in resumed.opt.param_groups)
    # the checkpoint now records the new settings: a plain resume with them is accepted
    (ckpts / "latest").write_text("step-0000004")
    assert fresh(lr=5e-3).load_checkpoint()


def test_metrics_hold_no_step_twice_after_a_resume(finished):
    ckpts, fresh = finished
    out = ckpts.parent
    assert metric_steps(out) == [1, 2, 3, 4]
    (ckpts / "latest").write_text("step-0000002")
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "loss"')  # a torn last line
    fresh().train(resume=True)
    assert metric_steps(out) == [1, 2, 3, 4]
    with pytest.raises(ValueError, match="holds a previous run"):  # never overwritten silently
        fresh().train()
    assert metric_steps(out) == [1, 2, 3, 4]
    from kdfast.train.run_guard import remove_previous_run

    remove_previous_run(out)  # what --overwrite does: then a fresh run starts the record afresh
    fresh().train()
    assert metric_steps(out) == [1, 2, 3, 4]


def test_stale_temporaries_are_cleaned_and_nothing_else(finished):
    ckpts, fresh = finished
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True)
    pid = int(dead.stdout)
    (ckpts / f".step-0000006.tmp-{pid}").mkdir()
    (ckpts / f".step-0000006.tmp-{pid}" / "weights.safetensors").write_bytes(b"partial")
    (ckpts / f".latest.tmp-{pid}").write_text("step-0000006")
    live = ckpts / f".step-0000007.tmp-{os.getppid()}"  # a live process: possibly still saving
    live.mkdir()
    keep = [ckpts / "notes.txt", ckpts / ".step-0000006.tmp-x", ckpts / "step-notes"]
    for p in keep:
        p.write_text("the user's")
    fresh().train(resume=True)
    assert not (ckpts / f".step-0000006.tmp-{pid}").exists() and not (ckpts / f".latest.tmp-{pid}").exists()
    assert live.is_dir() and all(p.read_text() == "the user's" for p in keep)


def test_full_disk_during_a_checkpoint_leaves_no_temporary(tmp_path, monkeypatch):
    import kdfast.train.checkpoint as checkpoint

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(args[1]))

    d, _ = make_run(tmp_path, checkpoint_every=2)
    monkeypatch.setattr(checkpoint, "save_file", full)
    with pytest.raises(OSError, match="No space left"):
        d.train()
    ckpts = tmp_path / "run" / "checkpoints"
    assert list(ckpts.iterdir()) == []


# ---- reproducibility -----------------------------------------------------------------------------


SMALL = {"distilbert": ("--set", "student_layers=[0, 3]"),
         "tinybert": ("--set", "student.hidden_size=16", "--set", "student.intermediate_size=32",
                      "--set", "student.num_attention_heads=4", "--set", "student.num_hidden_layers=2"),
         "mobilebert": ("--set", "student.embedding_size=16", "--set", "student.intermediate_size=16",
                        "--set", "student.num_feedforward_networks=2", "--set", "student.num_attention_heads=2",
                        "--set", "pkt.steps_per_layer=1", "--set", "pretrain.steps=2")}


def distill(tiny, recipe, out, *extra, steps=None):
    args = ["distill", "--recipe", recipe, "--teacher", str(tiny / "teacher"), "--data", str(tiny / "train.txt"),
            "--out", str(out), "--no-progress", "--set", "data.max_length=16", "--set", "train.batch_size=4",
            "--set", "train.eval_every=0", "--set", "data.max_texts=24", *SMALL[recipe], *extra]
    if steps is not None and recipe != "mobilebert":
        args += ["--steps", str(steps)]
    return main(args)


def student_weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "student" / "model.safetensors"))


@pytest.mark.parametrize("recipe, source", [("distilbert", "live"), ("tinybert", "live"), ("mobilebert", "live"),
                                            ("distilbert", "cache")])
def test_two_fresh_runs_with_one_seed_give_the_same_student(tiny, tmp_path, recipe, source):
    outs = []
    for i, seed in enumerate((5, 5, 6)):
        torch.manual_seed(1000 + i)  # whatever the process drew before must not matter
        out = tmp_path / f"run{i}"
        assert distill(tiny, recipe, out, "--set", f"train.seed={seed}", "--set", f"teacher.source={source}",
                       steps=2) == 0
        outs.append(student_weights(out))
    a, b, c = outs
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)  # the seed matters: the check can fail


def test_two_fresh_demo_runs_give_the_same_student(tmp_path, monkeypatch):
    from kdfast.train import demo

    # the evaluation is not what is compared here: the student is
    monkeypatch.setattr(demo, "latency_ms", lambda runs: {name: {"best": 1.0, "median": 1.0} for name in runs})
    monkeypatch.setattr(demo, "retrieval_accuracy", lambda model, tokenizer, paragraphs: 0.5)
    monkeypatch.setattr(demo, "mean_pooled", lambda model, tokenizer, texts: torch.ones(len(texts), 4) / 2)
    outs = []
    for i, seed in enumerate((3, 3, 4)):
        torch.manual_seed(2000 + i)
        demo.run_demo(str(tmp_path / f"demo{i}"), steps=2, batch_size=4, max_length=16, max_paragraphs=15,
                      seed=seed, progress=False)
        out = tmp_path / f"demo{i}"
        outs.append({**student_weights(out),  # the 3-layer student and the compressed one
                     **{f"compressed.{k}": v for k, v in load_file(str(out / "compressed" / "model.safetensors")).items()}})
    a, b, c = outs
    assert any(k.startswith("compressed.") for k in a) and all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a if k.startswith("compressed."))
    assert any(not torch.equal(a[k], c[k]) for k in a if not k.startswith("compressed."))


# ---- the command line ----------------------------------------------------------------------------


def one_line_error(capsys, command: str, stdout_lacks: str | None = None) -> str:
    captured = capsys.readouterr()
    if stdout_lacks is not None:
        assert stdout_lacks not in captured.out
    err = captured.err.strip()
    assert "Traceback" not in err
    last = err.splitlines()[-1] if err else ""
    assert last.startswith(f"kdfast {command}: error:"), err
    return last


#: (content, the distill error, the cache build error): the cache streams its corpus, and takes a
#: directory of data files, so it words an empty corpus or an empty directory its own way
DATA_FILES = {
    "binary": (b"\x00\x01\x02PK\x03\x04" + bytes(range(256)), "is binary, not text", "is binary, not text"),
    "empty": (b"", "are empty", "no text to cache"),
    "blank lines only": (b"\n   \n\t\n\n", "hold no non-blank text", "no text to cache"),
    "latin-1": ("café au lait\nnaïve\n".encode("latin-1"), "is not UTF-8 text (byte 0xe9",
                "is not UTF-8 text (byte 0xe9"),
    "directory": (None, "is a directory, not a file", "holds no data file"),
}


@pytest.mark.parametrize("case", sorted(DATA_FILES))
def test_bad_data_file_is_one_line_exit_2_for_distill_and_cache_build(tiny, tmp_path, capsys, case):
    content, match, cache_match = DATA_FILES[case]
    path = tmp_path / "data.txt"
    if content is None:
        path.mkdir()
    else:
        path.write_bytes(content)
    rc = main(["distill", "--recipe", "tinybert", "--teacher", str(tiny / "teacher"), "--data", str(path),
               "--out", str(tmp_path / "o"), "--no-progress", "--set", "data.max_length=16", "--steps", "1"])
    assert rc == 2 and match in one_line_error(capsys, "distill")
    rc = main(["cache", "build", "--teacher", str(tiny / "teacher"), "--data", str(path), "--out",
               str(tmp_path / "c"), "--max-length", "16", "--no-progress"])
    assert rc == 2 and cache_match in one_line_error(capsys, "cache build")


def test_max_length_beyond_the_teachers_positions_is_refused_before_any_work(tiny, tmp_path, capsys):
    out = tmp_path / "o"
    rc = main(["distill", "--recipe", "distilbert", "--teacher", str(tiny / "teacher"), "--data",
               str(tiny / "train.txt"), "--out", str(out), "--no-progress", "--set", "data.max_length=65"])
    assert rc == 2 and "data.max_length 65 exceeds the 64 positions" in one_line_error(capsys, "distill")
    assert not out.exists()
    rc = main(["demo", "--out", str(out), "--max-length", "513", "--no-progress"])
    assert rc == 2 and "max_length 513 exceeds the 512 positions" in one_line_error(capsys, "demo")
    assert not out.exists()


def test_eval_max_length_beyond_the_models_positions_is_refused(tiny, tmp_path, capsys):
    data = tmp_path / "sst2"
    data.mkdir()
    rows = "sentence\tlabel\n" + "".join(f"w{i} w{i + 1}\t{i % 2}\n" for i in range(8))
    (data / "train.tsv").write_text(rows)
    (data / "dev.tsv").write_text(rows)
    rc = main(["eval", "--task", "sst2", "--model", str(tiny / "teacher"), "--data-dir", str(data), "--out",
               str(tmp_path / "e"), "--max-length", "100", "--no-progress"])
    assert rc == 2 and "max_length 100 exceeds the 64 positions" in one_line_error(capsys, "eval")


def test_out_naming_an_existing_file_is_refused_and_the_file_kept(tiny, tmp_path, capsys):
    out = tmp_path / "report.txt"
    out.write_text("mine")
    rc = main(["distill", "--recipe", "tinybert", "--teacher", str(tiny / "teacher"), "--data",
               str(tiny / "train.txt"), "--out", str(out), "--no-progress", "--set", "data.max_length=16"])
    assert rc == 2 and "is an existing file, not a directory" in one_line_error(capsys, "distill")
    assert main(["demo", "--out", str(out), "--no-progress"]) == 2
    assert "is an existing file" in one_line_error(capsys, "demo")
    data = tmp_path / "sst2"
    data.mkdir()
    (data / "train.tsv").write_text("sentence\tlabel\nw1 w2\t1\nw3\t0\n")
    (data / "dev.tsv").write_text("sentence\tlabel\nw1 w2\t1\nw3\t0\n")
    rc = main(["eval", "--task", "sst2", "--model", str(tiny / "teacher"), "--data-dir", str(data), "--out", str(out),
               "--no-progress"])
    assert rc == 2 and "is an existing file" in one_line_error(capsys, "eval")
    assert out.read_text() == "mine"


def test_bench_json_into_a_missing_folder_is_refused_before_benchmarking(tmp_path, capsys):
    rc = main(["bench", "--quick", "--size", "8x16", "--json", str(tmp_path / "missing" / "r.json")])
    # refused before any benchmark ran
    assert rc == 2 and "does not exist" in one_line_error(capsys, "bench", stdout_lacks="kdfast bench on")
    rc = main(["bench", "--quick", "--size", "8x16", "--json", str(tmp_path)])
    assert rc == 2 and "is a directory" in one_line_error(capsys, "bench")


def test_full_disk_is_one_line_exit_2(tiny, tmp_path, capsys, monkeypatch):
    import kdfast.train.checkpoint as checkpoint

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(args[1]))

    monkeypatch.setattr(checkpoint, "save_file", full)
    rc = distill(tiny, "tinybert", tmp_path / "o", steps=1)
    assert rc == 2 and "No space left on device" in one_line_error(capsys, "distill")
    assert not (tmp_path / "o" / "student").exists()


@pytest.mark.parametrize("sets, match", [
    (["train.lr=.inf"], "train.lr must be a finite number, got inf"),
    (["train.lr=.nan"], "train.lr must be a finite number, got nan"),
    (["train.lr=1e39"], r"step 1: the optimizer's update overflows"),  # finite, but not as a float32 step
    # finite steps to ~1e38 weights: step 2 overflows (the fused loss names the student's states that did)
    (["train.lr=1e37"], r"step 2: (the (loss|gradient)|student_hidden contains NaN or Inf)"),
])
def test_non_finite_training_is_one_line_exit_2_and_writes_no_student(tiny, tmp_path, capsys, sets, match):
    out = tmp_path / "o"
    rc = distill(tiny, "distilbert", out, *(x for s in sets for x in ("--set", s)), "--set", "train.max_grad_norm=0",
                 "--set", "train.warmup=0", steps=3)
    assert rc == 2 and re_search(match, one_line_error(capsys, "distill"))
    assert not (out / "student").exists() and not (out / "report.json").exists()


def re_search(pattern: str, text: str) -> bool:
    return re.search(pattern, text) is not None


@pytest.fixture(scope="module")
def cli_run(tiny, tmp_path_factory):
    """A finished 2-step distilbert run through the command line (a checkpoint at step 2)."""
    out = tmp_path_factory.mktemp("cli") / "run"
    assert distill(tiny, "distilbert", out, steps=2) == 0
    return out


@pytest.mark.parametrize("case", ["flipped weights byte", "truncated weights", "empty trainer.pt",
                                  "wrong shape, re-hashed", "NaN weights, re-hashed", "step 10**9", "step -5"])
def test_distill_resume_on_a_bad_checkpoint_is_one_line_exit_2(tiny, cli_run, tmp_path, capsys, case):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(cli_run, out)
    ckpt = out / "checkpoints" / "step-0000002"
    tamper, match = TAMPERING[case]
    if case == "wrong shape, re-hashed":  # the recipe's student has other names
        t = load_file(str(ckpt / "weights.safetensors"))
        key = "student.cls.predictions.transform.dense.weight"
        t[key] = torch.randn(5, 3)
        save_file(t, str(ckpt / "weights.safetensors"))
        rehash(ckpt)
        match = re.escape("transform.dense.weight is torch.float32 (5, 3)")
    elif case == "NaN weights, re-hashed":
        tamper(ckpt)
        match = r"the weights hold non-finite values \(student\."
    else:
        tamper(ckpt)
    report = (out / "report.json").read_bytes()
    rc = distill(tiny, "distilbert", out, "--resume", steps=2)
    assert rc == 2 and re_search(match, one_line_error(capsys, "distill"))
    assert (out / "report.json").read_bytes() == report


def test_distill_resume_with_changed_settings(tiny, cli_run, tmp_path, capsys):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(cli_run, out)
    rc = distill(tiny, "distilbert", out, "--resume", "--set", "alpha_cos=0.5", steps=2)
    err = one_line_error(capsys, "distill")
    assert rc == 2 and "alpha_cos 1.0 -> 0.5" in err and "--allow-changed-settings" in err
    rc = distill(tiny, "distilbert", out, "--resume", "--set", "alpha_cos=0.5", "--allow-changed-settings",
                 steps=2)
    assert rc == 0
    meta = json.loads((out / "checkpoints" / "step-0000002" / "checkpoint.json").read_text())
    assert meta["settings"]["alpha_cos"] == 0.5


def test_cli_error_reaches_a_real_process_as_one_line(tiny, tmp_path):
    """The same path in a real process: exit status 2, one stderr line, no traceback."""
    bad = tmp_path / "data.txt"
    bad.write_bytes("caf\xe9\n".encode("latin-1"))
    proc = subprocess.run([sys.executable, "-m", "kdfast.cli", "distill", "--recipe", "tinybert", "--teacher",
                           str(tiny / "teacher"), "--data", str(bad), "--out", str(tmp_path / "o"), "--no-progress",
                           "--set", "data.max_length=16"], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and proc.stderr.strip().splitlines()[-1].startswith("kdfast distill: error:")
    assert "is not UTF-8 text" in proc.stderr


def test_distill_resume_with_a_changed_lr_applies_it(tiny, tmp_path, capsys):
    """Killed after step 1 of 3, resumed with a new train.lr: refused, then (allowed) the new lr is
    the one the schedule scales from the resumed step on."""
    out = tmp_path / "run"
    common = ("--set", "train.checkpoint_every=1", "--set", "train.warmup=1", "--set", "train.log_every=1")
    assert distill(tiny, "tinybert", out, *common, steps=3) == 0
    (out / "general" / "checkpoints" / "latest").write_text("step-0000001")
    assert distill(tiny, "tinybert", out, *common, "--set", "train.lr=0.004", "--resume", steps=3) == 2
    assert "train.lr 0.0001 -> 0.004" in one_line_error(capsys, "distill")
    assert distill(tiny, "tinybert", out, *common, "--set", "train.lr=0.004", "--resume",
                   "--allow-changed-settings", steps=3) == 0
    records = [json.loads(x) for x in (out / "general" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    # warm-up of 1 step, then linear decay to 0 at step 3: after step 2 the lr is 0.5 x the new lr
    assert records[0]["lr"] == pytest.approx(1e-4) and records[1]["lr"] == pytest.approx(0.5 * 0.004)


@pytest.mark.parametrize("args, match", [
    (["--lr", "inf"], "--lr: must be finite"),
    (["--lr", "nan"], "--lr: must be finite"),
    (["--steps", "0"], "--steps: must be >= 1"),
    (["--seed", "-1"], r"--seed: must be in \[0, "),
    (["--batch-size", "0"], "--batch-size: must be >= 1"),
])
def test_demo_bad_numbers_are_one_line_exit_2_before_any_work(tmp_path, capsys, args, match):
    out = tmp_path / "demo"
    with pytest.raises(SystemExit) as e:  # refused by the parser, before run_demo starts
        main(["demo", "--out", str(out), "--no-progress", *args])
    assert e.value.code == 2
    assert re_search(match, one_line_error(capsys, "demo"))
    assert not out.exists()


@pytest.mark.parametrize("kwargs, match", [
    ({"lr": math.nan}, "lr must be (> 0 and )?finite"),
    ({"warmup": math.inf}, "warmup must be finite"),
    ({"seed": "0"}, "seed must be an int"),
])
def test_finetune_bad_numbers_are_refused_before_any_work(tiny, tmp_path, kwargs, match):
    from kdfast.train.task import finetune_and_eval

    with pytest.raises(ValueError, match=match):
        finetune_and_eval(str(tiny / "teacher"), "sst2", str(tmp_path), str(tmp_path / "e"), **kwargs)
    assert not (tmp_path / "e").exists()
