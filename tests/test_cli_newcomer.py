"""The newcomer's command line: ``--version``, help texts that name every default, numbers refused
at parse time (exit 2, nothing written), honest step numbers and a finished run left alone on
``--resume``, and ``--no-progress`` quieting the libraries' bars too."""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import kdfast
from kdfast.cli import _HelpFormatter, build_parser, main

ROOT = Path(__file__).resolve().parents[1]


def _all_parsers(parser: argparse.ArgumentParser, name: str = "kdfast"):
    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub_name, sub in action.choices.items():
                yield from _all_parsers(sub, f"{name} {sub_name}")


def test_version_prints_the_package_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"kdfast {kdfast.__version__}"
    setup_py = (ROOT / "setup.py").read_text()
    assert f'version="{kdfast.__version__}"' in setup_py  # one version, declared twice: they must agree


def test_version_in_a_real_process():
    proc = subprocess.run([sys.executable, "-m", "kdfast.cli", "--version"], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == f"kdfast {kdfast.__version__}"


def test_every_option_of_every_subcommand_names_its_default():
    """Every option that takes a value says its default in its help (flags and required options
    have none to state); the demo's too."""
    parsers = dict(_all_parsers(build_parser()))
    assert {"kdfast demo", "kdfast bench", "kdfast distill", "kdfast eval", "kdfast cache build"} <= set(parsers)
    missing = []
    for name, parser in parsers.items():
        assert isinstance(parser._get_formatter(), _HelpFormatter), name
        for action in parser._actions:
            if isinstance(action, (argparse._HelpAction, argparse._VersionAction, argparse._SubParsersAction)):
                continue
            if not action.option_strings:  # positional: always given
                assert action.help, f"{name} {action.dest} has no help"
                continue
            assert action.help, f"{name} {action.option_strings[0]} has no help"
            if action.nargs == 0 or action.required:  # a flag, or nothing to default to
                continue
            text = parser._get_formatter()._get_help_string(action) % {"default": action.default}
            if "default" not in text.lower():
                missing.append(f"{name} {action.option_strings[0]}")
    assert not missing, missing


def test_demo_help_shows_the_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    text = capsys.readouterr().out
    for flag, default in (("--steps", "150"), ("--batch-size", "16"), ("--max-length", "128"), ("--lr", "0.0001"),
                          ("--seed", "0"), ("--out", "runs/demo")):
        assert flag in text and f"(default: {default})" in " ".join(text.split()), flag


BAD_NUMBERS = [
    ("demo", ["--steps", "0"], "--steps: must be >= 1"),
    ("demo", ["--steps", "2.5"], "--steps: expected an integer"),
    ("demo", ["--batch-size", "-3"], "--batch-size: must be >= 1"),
    ("demo", ["--max-length", "7"], "--max-length: must be >= 8"),
    ("demo", ["--lr", "nan"], "--lr: must be finite"),
    ("demo", ["--lr", "1e999"], "--lr: must be finite"),
    ("demo", ["--lr", "0"], "--lr: must be > 0"),
    ("demo", ["--seed", "-1"], r"--seed: must be in \[0, "),
    ("demo", ["--seed", str(2**32)], r"--seed: must be in \[0, "),
    ("distill", ["--recipe", "distilbert", "--steps", "0"], "--steps: must be >= 1"),
    ("bench", ["--repeat", "0"], "--repeat: must be >= 1"),
    ("bench", ["--size", "0x100"], "--size: .*ROWS >= 1"),
    ("bench", ["--tokens", "8x0"], "--tokens: .*LENGTH >= 1"),
    ("eval", ["--task", "sst2", "--model", "m", "--data-dir", "d", "--epochs", "-1"], "--epochs: must be >= 0"),
    ("eval", ["--task", "sst2", "--model", "m", "--data-dir", "d", "--lr=-inf"], "--lr: must be finite"),
    ("eval", ["--task", "sst2", "--model", "m", "--data-dir", "d", "--temperature", "0"], "--temperature: must be > 0"),
    ("eval", ["--task", "sst2", "--model", "m", "--data-dir", "d", "--max-train-examples", "0"],
     "--max-train-examples: must be >= 1"),
]


@pytest.mark.parametrize("command, args, match", BAD_NUMBERS)
def test_bad_numbers_are_usage_errors_before_any_work(tmp_path, capsys, monkeypatch, command, args, match):
    """Refused by the parser: exit 2, the last stderr line names the option, no traceback, nothing
    written (the command never starts)."""
    import re

    monkeypatch.chdir(tmp_path)  # the default output directories (runs/...) would land here
    out_flag = ["--out", str(tmp_path / "out")] if command in ("demo", "distill", "eval") else []
    with pytest.raises(SystemExit) as e:
        main([command, *args, *out_flag])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"kdfast {command}") and ": error: argument " in err[-1], err
    assert re.search(match, err[-1]), err[-1]
    assert list(tmp_path.iterdir()) == []


def test_demo_steps_0_in_a_real_process_writes_nothing(tmp_path):
    """The demo once built its whole cache before refusing --steps 0."""
    proc = subprocess.run([sys.executable, "-m", "kdfast.cli", "demo", "--steps", "0", "--out", str(tmp_path / "d")],
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == "kdfast demo: error: argument --steps: must be >= 1, got 0"
    assert not (tmp_path / "d").exists()


# ---- reports that do not mislead: steps counted from 1, a finished run left alone ----------------

from tests.train.conftest import tiny  # noqa: E402,F401  (the tiny BERT teacher and corpus fixture)


def _tiny_distiller(out: Path, *, steps: int, log_every: int, settings: dict | None = None, checkpoint_every=0):
    """A student and projection regressing a frozen random teacher on random token ids."""
    import torch
    from torch import nn

    from kdfast.train import Distiller, TokenBatches, TrainConfig

    gen = torch.Generator().manual_seed(7)
    student = nn.Sequential(nn.Embedding(31, 12), nn.Linear(12, 9))
    teacher = nn.Sequential(nn.Embedding(31, 9), nn.Tanh())
    proj = nn.ModuleDict({"p": nn.Linear(9, 9)})
    with torch.no_grad():
        for p in [*student.parameters(), *teacher.parameters(), *proj.parameters()]:
            p.copy_(torch.randn(p.shape, generator=gen) * 0.4)
    ids = torch.randint(0, 31, (27, 5), generator=gen)

    def step_loss(batch):
        with torch.no_grad():
            target = teacher(batch["input_ids"])
        mse = (proj["p"](student(batch["input_ids"])) - target).pow(2).mean()
        return mse, {"mse": mse.item()}

    cfg = TrainConfig(steps=steps, lr=1e-2, warmup=1, log_every=log_every, checkpoint_every=checkpoint_every,
                      out_dir=str(out), progress=False)
    return Distiller(student, step_loss, TokenBatches(ids, torch.ones_like(ids), batch_size=4, seed=1), cfg,
                     extra=proj, settings=settings)


def _metrics(out: Path) -> list[dict]:
    import json

    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def test_first_logged_step_is_step_1_and_steps_count_updates(tmp_path):
    """metrics.jsonl, the returned history and the checkpoint all count optimizer steps done from 1;
    step 1 is logged even when log_every is larger, so a report's "first" loss is the first one."""
    out = tmp_path / "run"
    d = _tiny_distiller(out, steps=7, log_every=3)
    history = d.train()
    assert [r["step"] for r in history] == [1, 3, 6, 7]
    assert [r["step"] for r in _metrics(out)] == [1, 3, 6, 7]
    assert (out / "checkpoints" / "latest").read_text() == "step-0000007"
    # step 1's loss is the loss of the untouched student on the first batch: recompute it
    fresh = _tiny_distiller(tmp_path / "other", steps=7, log_every=3)
    first = next(iter(fresh.data.batches(0, 0)))
    assert history[0]["mse"] == pytest.approx(fresh.step_loss(first)[1]["mse"], rel=1e-6)


def test_progress_bar_counts_steps_done(tmp_path, capsys):
    out = tmp_path / "run"
    d = _tiny_distiller(out, steps=5, log_every=2)
    d.cfg.progress = True
    d.train()
    bar = capsys.readouterr().err
    assert "5/5" in bar and "0/5" in bar and "6/5" not in bar


def test_resumed_finished_distiller_trains_nothing_and_keeps_its_checkpoint(tmp_path):
    out = tmp_path / "run"
    first = _tiny_distiller(out, steps=4, log_every=2)
    history = first.train()
    ckpt = out / "checkpoints" / "step-0000004"
    before = {f.name: (f.read_bytes(), f.stat().st_mtime_ns) for f in ckpt.iterdir()}
    again = _tiny_distiller(out, steps=4, log_every=2)
    assert again.train(resume=True) == history
    assert again.already_finished and again.step == 4
    assert {f.name: (f.read_bytes(), f.stat().st_mtime_ns) for f in ckpt.iterdir()} == before
    assert [r["step"] for r in _metrics(out)] == [1, 2, 4]
    # an interrupted run is not finished: resumed, it trains on
    part = tmp_path / "part"
    _tiny_distiller(part, steps=4, log_every=2, checkpoint_every=2).train()
    (part / "checkpoints" / "latest").write_text("step-0000002")
    resumed = _tiny_distiller(part, steps=4, log_every=2, checkpoint_every=2)
    resumed.train(resume=True)
    assert not resumed.already_finished and [r["step"] for r in resumed.history] == [4]


def test_finished_run_needs_report_final_checkpoint_and_same_settings(tmp_path):
    import json

    from kdfast.train.distiller import finished_run

    out = tmp_path / "run"
    settings = {"steps": 3, "train": {"lr": 0.01}}
    _tiny_distiller(out, steps=3, log_every=1, settings=settings, checkpoint_every=1).train()
    assert finished_run(out) is None  # no report: the command that ran it did not finish
    (out / "report.json").write_text(json.dumps({"done": True}))
    assert finished_run(out) == 3
    assert finished_run(out, {"steps": 3, "train": {"lr": 0.01}}) == 3
    assert finished_run(out, {"steps": 3, "train": {"lr": 0.02}}) is None
    assert finished_run(out, {"steps": 5}) is None
    (out / "checkpoints" / "latest").write_text("step-0000002")  # an interrupted later run
    assert finished_run(out) is None
    (out / "checkpoints" / "latest").write_text("step-0000003")
    weights = out / "checkpoints" / "step-0000003" / "weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + b"\0")  # altered: the resume path must report it
    assert finished_run(out) is None


def _distill(tiny, out, *extra):
    return main(["distill", "--recipe", "distilbert", "--teacher", str(tiny / "teacher"), "--data",
                 str(tiny / "train.txt"), "--out", str(out), "--no-progress", "--steps", "2", "--set",
                 "data.max_length=16", "--set", "train.batch_size=4", "--set", "train.eval_every=0", "--set",
                 "train.log_every=5", "--set", "data.max_texts=24", "--set", "student_layers=[0, 3]", *extra])


def test_distill_resume_of_a_finished_run_says_so_and_keeps_report_json(tiny, tmp_path, capsys):
    out = tmp_path / "d"
    assert _distill(tiny, out) == 0
    capsys.readouterr()
    report = json.loads((out / "report.json").read_text())
    assert report["stages"][0]["first"]["step"] == 1 and report["stages"][0]["last"]["step"] == 2
    before = ((out / "report.json").read_bytes(), (out / "report.json").stat().st_mtime_ns,
              (out / "student" / "model.safetensors").stat().st_mtime_ns)
    assert _distill(tiny, out, "--resume") == 0
    printed = capsys.readouterr().out.strip().splitlines()
    assert printed[-1] == f"run in {out} already finished at step 2; nothing to do"
    assert before == ((out / "report.json").read_bytes(), (out / "report.json").stat().st_mtime_ns,
                      (out / "student" / "model.safetensors").stat().st_mtime_ns)
    # more steps, allowed: not finished, it trains on to step 3
    assert _distill(tiny, out, "--resume", "--allow-changed-settings", "--steps", "3") == 0
    assert json.loads((out / "report.json").read_text())["stages"][0]["last"]["step"] == 3


def test_demo_resume_of_a_finished_run_does_no_work(tmp_path, capsys, monkeypatch):
    """The demo's command checks before building anything: run_demo is never called."""
    import kdfast.train.demo as demo

    out = tmp_path / "demo"
    settings = {"steps": 2, "batch_size": 16, "max_length": 128, "lr": 1e-4, "seed": 0, "max_paragraphs": None}
    _tiny_distiller(out, steps=2, log_every=1, settings=settings).train()
    (out / "report.json").write_text('{"finished": true}')

    def no_work(*a, **k):
        raise AssertionError("run_demo was called on a finished run")

    monkeypatch.setattr(demo, "run_demo", no_work)
    assert main(["demo", "--out", str(out), "--steps", "2", "--resume", "--no-progress"]) == 0
    assert capsys.readouterr().out.strip() == f"run in {out} already finished at step 2; nothing to do"
    assert (out / "report.json").read_text() == '{"finished": true}'
    with pytest.raises(AssertionError, match="run_demo was called"):  # 3 steps: not finished, resumed
        main(["demo", "--out", str(out), "--steps", "3", "--resume", "--no-progress"])


# ---- --no-progress quiets the libraries too ------------------------------------------------------

BAR_MARKS = ("Loading weights", "Generating", "Map", "%|", "it/s]")


def test_no_progress_quiets_transformers_and_datasets_bars(tiny, tmp_path):
    """A real process (the libraries' bars are process-wide switches): distill with --no-progress
    loads the teacher (transformers' "Loading weights") and reads the text files (datasets'
    "Generating train split", "Map"), and stderr holds none of their bars."""
    proc = subprocess.run(
        [sys.executable, "-m", "kdfast.cli", "distill", "--recipe", "distilbert", "--teacher", str(tiny / "teacher"),
         "--data", str(tiny / "train.txt"), "--out", str(tmp_path / "d"), "--no-progress", "--steps", "1",
         "--set", "data.max_length=16", "--set", "train.batch_size=4", "--set", "train.eval_every=0",
         "--set", "data.max_texts=24", "--set", "student_layers=[0, 3]"],
        capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not [m for m in BAR_MARKS if m in proc.stderr], proc.stderr[-2000:]
    assert (tmp_path / "d" / "report.json").is_file()


def test_no_progress_restores_the_library_switches(tmp_path, capsys):
    """In-process callers (tests, notebooks) get their bars back after the command."""
    import datasets
    from transformers.utils import logging as hf_logging

    assert main(["distill", "--recipe", "distilbert", "--teacher", str(tmp_path / "none"), "--out",
                 str(tmp_path / "x"), "--no-progress"]) == 2  # refused early: the switches are restored on errors too
    assert "kdfast distill: error:" in capsys.readouterr().err
    assert hf_logging.is_progress_bar_enabled() and datasets.is_progress_bar_enabled()


@pytest.mark.parametrize("argv, func", [
    (["demo"], "cmd_demo"),
    (["distill", "--recipe", "tinybert"], "cmd_distill"),
    (["eval", "--task", "sst2", "--model", "m", "--data-dir", "d"], "cmd_eval"),
    (["cache", "build", "--teacher", "t", "--data", "d", "--out", "o"], "cmd_cache"),
])
def test_every_no_progress_command_runs_with_the_library_bars_off(monkeypatch, argv, func):
    import datasets
    from transformers.utils import logging as hf_logging

    import kdfast.cli as cli

    seen = []
    monkeypatch.setattr(cli, func, lambda args: seen.append(
        (hf_logging.is_progress_bar_enabled(), datasets.is_progress_bar_enabled())) or 0)
    assert main([*argv, "--no-progress"]) == 0
    assert main(argv) == 0
    assert seen == [(False, False), (True, True)]
