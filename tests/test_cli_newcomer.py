"""The newcomer's command line: ``--version``, help texts that name every default, numbers refused
at parse time (exit 2, nothing written), honest step numbers and a finished run left alone on
``--resume``, and ``--no-progress`` quieting the libraries' bars too."""

import argparse
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
    """The issue's case: the demo built its whole cache before refusing --steps 0."""
    proc = subprocess.run([sys.executable, "-m", "kdfast.cli", "demo", "--steps", "0", "--out", str(tmp_path / "d")],
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == "kdfast demo: error: argument --steps: must be >= 1, got 0"
    assert not (tmp_path / "d").exists()
