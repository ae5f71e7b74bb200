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
from kdfast.bench.timing import Result

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
        expected |= {f"{e2e.HANDWRITTEN}, masked KD", "kdfast, live teacher, masked KD", "kdfast, from a head cache"}
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
        if r.extra["ref"] and not r.extra["loss_match"].startswith("cache") and not r.note.startswith("not installed"):
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
    # the head cache gives the teacher's exact logits on every real token: the live objective, up to
    # the fp16 storage of the head input and of the hidden states
    head = rows["kdfast, from a head cache"]
    assert head.extra["kd_rows"].startswith("all real tokens (exact") and "B/token" in head.extra["kd_rows"]
    assert head.extra["loss0"] == pytest.approx(rows[e2e.HANDWRITTEN].extra["loss0"], rel=1e-2)


def test_report_lists_every_row(results):
    table = e2e.report(results)
    for r in results:
        assert r.impl in table
    assert "NO (" not in table


def test_progress_names_every_recipe_step_and_row(results):
    for step in e2e.STEPS:
        assert any(line.startswith(f"e2e: {step} 2x32 (") for line in PROGRESS), PROGRESS
        assert any(line.startswith(f"e2e: {step} 2x32 teacher") and "measured in" in line for line in PROGRESS)
    for r in results:  # a peer that is not installed (TextBrewer in CI's fresh venv) says so instead
        assert any(line.strip().startswith((f"{r.impl}: step 0", f"{r.impl}: not run: ")) for line in PROGRESS), r.impl
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


def _row(case, impl, tok_s_best, tok_s_median, peak_mb, loss_match="yes (0.0e+00)"):
    return Result(e2e.SUITE, case, impl, 1.0, None if peak_mb is None else peak_mb * 2**20,
                  extra={"tok_s_best": tok_s_best, "tok_s_median": tok_s_median, "loss_match": loss_match,
                         "ref": "", "kd_rows": "-", "loss0": 1.0, "tokens": 1024})


def test_bar_lines_judge_each_bar_on_the_best_round():
    case = "distilbert 8x128 teacher 12x768"
    res = [_row(case, e2e.HANDWRITTEN, 100.0, 90.0, 1200), _row(case, f"{e2e.HANDWRITTEN}, masked KD", 160.0, 150.0, 900),
           _row(case, "kdfast, live teacher", 117.0, 80.0, 390),  # 1.17x best (met), 0.89x median; 3.08x memory
           _row(case, "kdfast, live teacher, masked KD", 190.0, 185.0, 310),  # 1.19x < 1.25x; 2.90x memory
           _row(case, "kdfast, from the cache", 330.0, 300.0, 300, loss_match="cache, not judged (3.0e-02)"),
           _row("tinybert 8x512 teacher 12x768", e2e.HANDWRITTEN, 50.0, 50.0, 2000),
           _row("tinybert 8x512 teacher 12x768", "kdfast, live teacher", 70.0, 66.0, None, loss_match="NO (1e-3)")]
    lines = e2e.bar_lines(res)
    by_start = {line.split(": ")[1]: line for line in lines if line.startswith("distilbert")}
    assert len(lines) == 5 and len(by_start) == 4, lines
    line = by_start["kdfast, live teacher vs hand-written"]
    assert "1.17x best, 0.89x median (>= 1.15x: met)" in line and "memory 3.08x less (>= 3.0x: met)" in line
    line = by_start["kdfast, live teacher, masked KD vs hand-written, masked KD"]
    assert "1.19x best" in line and "(>= 1.25x: NOT met)" in line and "2.90x less (>= 3.0x: NOT met)" in line
    assert "2.06x best, 2.00x median (>= 2.0x: met)" in by_start["kdfast, from the cache vs hand-written, masked KD"]
    assert "3.30x best" in by_start["kdfast, from the cache vs hand-written"]
    tiny = [line for line in lines if line.startswith("tinybert")]
    assert tiny == ["tinybert 8x512 teacher 12x768: kdfast, live teacher vs hand-written: not judged, the step-0 "
                    "losses differ (NO (1e-3))"]
    assert "bars (CPU):" in e2e.report(res)
    # the bars are set at the default shapes: TinyBERT's at L = 512 (128 reported), nothing at other shapes
    res += [_row("tinybert 8x128 teacher 12x768", e2e.HANDWRITTEN, 50.0, 50.0, 400),
            _row("tinybert 8x128 teacher 12x768", "kdfast, live teacher", 60.0, 60.0, 300),
            _row("distilbert 4x64 teacher 2x192", e2e.HANDWRITTEN, 50.0, 50.0, 400),
            _row("distilbert 4x64 teacher 2x192", "kdfast, live teacher", 60.0, 60.0, 300)]
    more = [line for line in e2e.bar_lines(res) if line not in lines]
    assert len(more) == 1 and more[0].startswith("tinybert 8x128 teacher 12x768 (reported; the bar is at L = 512)")


def test_profile_shows_where_each_rows_step_time_goes():
    text = e2e.profile(torch.device("cpu"), "distilbert", ("kdfast, live teacher", e2e.HANDWRITTEN), shape="tiny",
                       row_limit=5)
    for impl in ("kdfast, live teacher", e2e.HANDWRITTEN):
        assert f"== distilbert 2x32: {impl}: one step " in text
    assert text.count("Self CPU %") == 2 and "aten::" in text
    with pytest.raises(ValueError, match="impls"):
        e2e.profile(torch.device("cpu"), "tinybert", ("no such row",), shape="tiny")
    with pytest.raises(ValueError, match="step"):
        e2e.profile(torch.device("cpu"), "bert", shape="tiny")


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
