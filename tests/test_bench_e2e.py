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


@pytest.fixture(scope="module")
def results():
    # compile off (the compiled rows run the same loss function; compiling costs minutes here) and
    # no memory measurement (a gc and a heap trim per row): this checks what ran and what it computed
    return e2e.run(torch.device("cpu"), shape="tiny", repeat=1, compile_baseline=False, memory=False)


def _rows(results, step):
    return {r.impl: r for r in results if r.case.startswith(step + " ")}


@pytest.mark.parametrize("step", e2e.STEPS)
def test_every_row_ran_and_kdfast_matches_the_hand_written_loss(results, step):
    rows = _rows(results, step)
    expected = {"kdfast, live teacher", "kdfast, from the cache", e2e.HANDWRITTEN}
    if step == "distilbert":
        expected.add(f"{e2e.HANDWRITTEN}, masked KD")
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
    assert rows["kdfast, from the cache"].extra["kd_rows"].startswith("masked")


def test_report_lists_every_row(results):
    table = e2e.report(results)
    for r in results:
        assert r.impl in table
    assert "NO (" not in table


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
