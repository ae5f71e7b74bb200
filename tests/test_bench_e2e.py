"""``kdfast bench --suites e2e`` at tiny shapes: every row of every recipe step runs, and the
recipe's own step computes the same step-0 loss as the hand-written step (same objective, same
KD rows, same batch). A correctness test: nothing here is timed."""

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kdfast.bench import e2e

ROOT = Path(__file__).resolve().parents[1]


PROGRESS: list[str] = []


@pytest.fixture(scope="module")
def results():
    # compile off (the compiled rows run the same loss function; compiling costs minutes here) and
    # no memory measurement (a gc and a heap trim per row): this checks what ran and what it computed
    return e2e.run(torch.device("cpu"), shape="tiny", repeat=1, compile_baseline=False, memory=False,
                   progress=PROGRESS.append)


def _rows(results, step):
    return {r.impl: r for r in results if r.case.startswith(step + " ")}


@pytest.mark.parametrize("step", e2e.STEPS)
def test_every_row_ran_and_kdfast_matches_the_hand_written_loss(results, step):
    rows = _rows(results, step)
    expected = {"kdfast, live teacher", "kdfast, from the cache", e2e.HANDWRITTEN}
    if step == "distilbert":  # like for like: KD on every real token and on the masked tokens, on both sides
        expected |= {f"{e2e.HANDWRITTEN}, masked KD", "kdfast, live teacher, masked KD"}
    if step == "tinybert":
        expected.add("TextBrewer GeneralDistiller")
    assert expected <= set(rows), sorted(rows)
    for impl in expected:
        r = rows[impl]
        if impl.startswith("TextBrewer") and r.note.startswith("not installed"):
            continue  # a peer, not a dependency: its row says so
        assert r.note == "", (impl, r.note)
        assert r.ms is not None and r.ms > 0, impl
        assert r.extra["tok_s_best"] > 0 and r.extra["tok_s_median"] > 0, impl
        assert math.isfinite(r.extra["loss0"]) and r.extra["loss0"] > 0, impl
        # every row of the batch is full (packed rows: only the corpus's last one is short), so the
        # hand-written objectives, which count padded positions as the original scripts do, are the recipe's
        assert r.extra["tokens"] == 2 * 32 and "full" not in r.case, (impl, r.extra["tokens"], r.case)
    for impl, r in rows.items():
        if r.extra["ref"] and not impl.endswith("from the cache") and not r.note.startswith("not installed"):
            ref = rows[r.extra["ref"]]
            assert r.extra["loss0"] == pytest.approx(ref.extra["loss0"], rel=1e-4), impl
            assert r.extra["loss_match"].startswith("yes"), (impl, r.extra["loss_match"])
    # the cached step reads the same teacher's states in fp16: close, not equal (top-k logits of a
    # random teacher keep too little of its mass to compare: those rows only show the difference)
    cached, ref = rows["kdfast, from the cache"], rows[rows["kdfast, from the cache"].extra["ref"]]
    assert cached.extra["loss_match"].startswith("cache, not judged")
    if "top-" not in cached.extra["kd_rows"]:
        assert cached.extra["loss0"] == pytest.approx(ref.extra["loss0"], rel=1e-2)


def test_distilbert_kd_rows_differ_and_weigh_in(results):
    """KD over every real token and over the masked tokens are two objectives: their step-0 losses
    must differ, else the loss comparison could not tell the rows apart."""
    rows = _rows(results, "distilbert")
    every, masked = rows[e2e.HANDWRITTEN].extra["loss0"], rows[f"{e2e.HANDWRITTEN}, masked KD"].extra["loss0"]
    assert abs(every - masked) > 1e-3 * abs(every)
    assert rows["kdfast, live teacher"].extra["kd_rows"] == "all real tokens"
    assert rows["kdfast, live teacher, masked KD"].extra["ref"] == f"{e2e.HANDWRITTEN}, masked KD"
    assert rows["kdfast, live teacher, masked KD"].extra["loss0"] == pytest.approx(masked, rel=1e-4)
    assert rows["kdfast, from the cache"].extra["kd_rows"].startswith("masked")


def test_report_lists_every_row(results):
    table = e2e.report(results)
    for r in results:
        assert r.impl in table
    assert "NO (" not in table


def test_progress_names_every_recipe_step_and_row(results):
    for step in e2e.STEPS:
        assert any(line.startswith(f"e2e: {step} 2x32 (") for line in PROGRESS), PROGRESS
        assert any(line.startswith(f"e2e: {step} 2x32 teacher") and "measured in" in line for line in PROGRESS)
    for r in results:
        assert any(line.strip().startswith(f"{r.impl}: step 0") for line in PROGRESS), r.impl
    assert not any("compiles" in line for line in PROGRESS)  # no compiled row in this run


@pytest.mark.parametrize("where", ["at its first call", "when asked to compile"])
def test_a_failing_torch_compile_is_reported_in_its_row(monkeypatch, where):
    """torch.compile failing (no C++ compiler, an unsupported Python) must not stop the suite: the
    compiled row says why, every other row is measured."""
    def fake_compile(fn, *args, **kwargs):
        if where == "when asked to compile":
            raise RuntimeError("torch.compile is not supported here")

        def compiled(*a, **k):
            raise RuntimeError("no working C++ compiler")
        return compiled

    monkeypatch.setattr(torch, "compile", fake_compile)
    res = e2e.run(torch.device("cpu"), shape="tiny", repeat=2, steps=("tinybert",), memory=False,
                  use_textbrewer=False)
    rows = {r.impl: r for r in res}
    broken = rows[f"{e2e.HANDWRITTEN} + torch.compile"]
    why = "not supported here" if where == "when asked to compile" else "no working C++ compiler"
    assert broken.ms is None and broken.note.startswith("failed: RuntimeError") and why in broken.note
    for impl, r in rows.items():
        if impl != broken.impl:
            assert r.ms is not None and r.note == "" and math.isfinite(r.extra["loss0"]), impl
    table = e2e.report(res)
    assert why in table and "Traceback" not in table


def test_bad_arguments_name_themselves():
    with pytest.raises(ValueError, match="shape"):
        e2e.run(torch.device("cpu"), shape="huge")
    with pytest.raises(ValueError, match="dtype"):
        e2e.run(torch.device("cpu"), shape="tiny", dtype=torch.float16)
    with pytest.raises(ValueError, match="steps"):
        e2e.run(torch.device("cpu"), shape="tiny", steps=("bert",))
    with pytest.raises(ValueError, match="repeat"):
        e2e.run(torch.device("cpu"), shape="tiny", repeat=0)


def test_cli_refuses_an_fp16_e2e_run_in_one_line():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    p = subprocess.run([sys.executable, "-m", "kdfast.cli", "bench", "--suites", "e2e", "--dtype", "fp16"],
                       capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert p.returncode == 2, p.stderr
    assert "Traceback" not in p.stderr
    assert "--dtype" in p.stderr and "kdfast bench on" not in p.stdout  # refused before any suite ran
