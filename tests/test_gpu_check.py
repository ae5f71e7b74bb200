"""`make gpu-check DRY_RUN=1`: the GPU day's script, every step, here on the CPU, so that it cannot
rot between GPU slots; and its failure paths (no GPU without --dry-run, a spent budget)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"
sys.path.insert(0, str(SCRIPT.parent))
import gpu_check  # noqa: E402

from kdfast.bench.roofline import GPUS  # noqa: E402

FILES = ("gpu-check-cpu-dry-run.log", "tests-cpu-dry-run.txt", "bench-cpu-dry-run.txt", "bench-cpu-dry-run.json",
         "summary-cpu-dry-run.json")


def _run(*args, timeout=300):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TRITON_INTERPRET": "1"}
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-check-out")
    (out / "notes.txt").write_text("not kdfast's")  # something the script did not write
    (out / "bench-cpu-dry-run.txt").write_text("a stale table from an earlier run\n")
    p = _run("--dry-run", "--out", str(out))
    return out, p


def test_dry_run_passes_and_writes_its_files(dry_run):
    out, p = dry_run
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert sorted(x.name for x in out.iterdir()) == sorted((*FILES, "notes.txt"))
    assert (out / "notes.txt").read_text() == "not kdfast's"
    summary = json.loads((out / "summary-cpu-dry-run.json").read_text())
    assert summary["dry_run"] is True and summary["failed_steps"] == []
    assert [s["step"] for s in summary["steps"]] == [name for name, _, _ in gpu_check.STEPS]
    status = {s["step"]: s["status"] for s in summary["steps"]}
    assert status.pop("wheels") == status.pop("build") == "skipped"
    assert set(status.values()) == {"ok"}, status
    assert summary["files"] == list(FILES)


def test_dry_run_ran_the_gpu_tests_on_cpu_tensors(dry_run):
    out, _ = dry_run
    report = (out / "tests-cpu-dry-run.txt").read_text()
    assert " passed" in report and " failed" not in report and "error" not in report.lower()
    # only the stated hardware reasons may skip a test
    for line in report.splitlines():
        if line.startswith("SKIPPED"):
            assert "CUDA" in line or "GPU" in line or "nvcc" in line, line
    log = (out / "gpu-check-cpu-dry-run.log").read_text()
    for name, _, _ in gpu_check.STEPS:
        assert f"=== {name} " in log
    assert "triton" in log and "torch " in log  # kdfast backends, versions


def test_dry_run_measured_every_suite_and_read_the_bars(dry_run):
    out, _ = dry_run
    rows = json.loads((out / "bench-cpu-dry-run.json").read_text())["rows"]
    for suite, case in (("kd_loss", "N=64 V=500"), ("attention", "KL B=2 H=2 L=24"),
                        ("attention", "map MSE"), ("attention", "hidden MSE"), ("attention", "cosine"),
                        ("flkd", "d_s=32 float32"), ("attention", "L=40 global"), ("attention", "L=40 local w=8")):
        got = [r for r in rows if r["suite"] == suite and case in r["case"]]
        impls = {r["impl"] for r in got if r["ms"] and r["ms"] > 0}
        assert "eager" in impls and any(i.startswith("kdfast") for i in impls), (suite, case, got)
    for step in ("distilbert", "tinybert"):  # the whole recipe steps, kdfast against hand-written
        got = {r["impl"]: r for r in rows if r["suite"] == "e2e" and r["case"].startswith(step)}
        assert {"kdfast, live teacher", "kdfast, from the cache", "hand-written"} <= set(got), (step, list(got))
        assert all(r["ms"] and r["ms"] > 0 for r in got.values()), got
        assert got["kdfast, live teacher"]["extra"]["loss_match"].startswith("yes"), got
    summary = json.loads((out / "summary-cpu-dry-run.json").read_text())
    measured = [b for b in summary["bars"] if b["met"] is not None]
    # on the CPU: no copy bandwidth (a GPU figure) and no Liger; every other bar is read off a row
    assert {b["bar"].split(":")[0] for b in measured} >= {"logit KD N=64 V=500 float32", "hidden MSE N=64 24->40"}
    assert len(measured) == len(summary["bars"]) - 3
    table = (out / "bench-cpu-dry-run.txt").read_text()
    assert "stale table" not in table and "\nbars:\n" in table and "KL B=2 H=2 L=24" in table
    assert "attention from Q/K (attention):" in (out / "gpu-check-cpu-dry-run.log").read_text()  # the workers' tables


def test_dry_run_prints_the_floor_of_every_row(dry_run):
    """Every row carries its roofline floor on an H100 and an H200 (kdfast.bench.roofline) and the tables
    show it; measured / floor only on one of those GPUs, so not here."""
    from kdfast.bench.roofline import work_for_row

    out, _ = dry_run
    rows = json.loads((out / "bench-cpu-dry-run.json").read_text())["rows"]
    assert rows
    for r in rows:
        fl = r["extra"].get("floor_ms")
        assert fl and set(fl) == {"h100", "h200"} and fl["h200"] <= fl["h100"] and fl["h200"] > 0, r
        work = work_for_row(r["suite"], r["case"], r["impl"], r["extra"], vocab=gpu_check.SHAPES[True]["flkd"][1],
                            head_dim=gpu_check.SHAPES[True]["attention"][3])
        assert fl["h100"] == pytest.approx(work.floor_ms(GPUS["h100"]), rel=1e-3), r
        assert "x_floor" not in r["extra"], r
    table = (out / "bench-cpu-dry-run.txt").read_text()
    floors = table[table.index("roofline floors (ms), measured / floor:"):table.index("\nbars:\n")]
    assert "H100 floor" in floors and "H200 floor" in floors
    lines = floors.splitlines()
    for r in rows:
        assert any(r["case"][:44] in x and r["impl"][:34] in x and f"{r['extra']['floor_ms']['h100']:.4g}" in x
                   for x in lines), r
    log = (out / "gpu-check-cpu-dry-run.log").read_text()
    assert log.count("roofline floors (ms):") >= len(gpu_check.BENCH_SUITES) and "=== floors " in log


def test_without_a_gpu_the_real_run_refuses_in_one_line(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is here: the real run would start")
    p = _run("--out", str(tmp_path / "o"), timeout=120)
    assert p.returncode == 2 and "DRY_RUN=1" in p.stderr and "Traceback" not in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1


def test_a_spent_budget_skips_the_steps_and_fails(tmp_path):
    p = _run("--dry-run", "--out", str(tmp_path), "--budget", "1", timeout=120)
    assert p.returncode == 1
    summary = json.loads((tmp_path / "summary-cpu-dry-run.json").read_text())
    assert "tests" in summary["failed_steps"] and "bench-kd_loss" in summary["failed_steps"]
    assert all(s["status"] == "skipped" for s in summary["steps"])


def test_device_slug():
    assert gpu_check.device_slug("NVIDIA H200") == "nvidia-h200"
    assert gpu_check.device_slug("NVIDIA A100-SXM4-80GB") == "nvidia-a100-sxm4-80gb"


def test_bench_worker_out_of_time_records_skipped_rows(tmp_path):
    """A worker whose time is spent starts no measurement but still says which rows it skipped."""
    jsonl = tmp_path / "rows.jsonl"
    p = _run("--bench-worker", "hidden", "--dry-run", "--jsonl", str(jsonl), "--seconds", "0", timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    rows = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert {r["impl"] for r in rows} >= {"eager", "kdfast fused cpu"}
    assert all(r["ms"] is None and r["note"].startswith("skipped") for r in rows)


def test_step_failure_and_timeout_are_recorded_and_the_run_goes_on(tmp_path):
    """A failing step keeps its output and exit status; a step past its limit is killed with its
    children (here a grandchild that would outlive it) and the run carries on."""
    import time

    run = gpu_check.Run(tmp_path, "unit", budget_s=60, dry=True)
    failed = run.step("fails", 30, ["bash", "-c", "echo boom-$((40 + 2)); exit 3"])
    t0 = time.monotonic()
    late = run.step("hangs", 1, ["bash", "-c", "sleep 30 & echo started; wait"])
    assert time.monotonic() - t0 < 10
    ok = run.step("after", 30, ["bash", "-c", "echo still-running"])
    run.log.close()
    assert (failed["status"], failed["returncode"]) == ("failed", 3)
    assert late["status"] == "timed out" and ok["status"] == "ok"
    log = (tmp_path / "gpu-check-unit.log").read_text()
    assert "boom-42" in log and "started" in log and "still-running" in log
    assert log.index("=== fails") < log.index("boom-42") < log.index("=== hangs") < log.index("still-running")
