"""Careless runs into an output folder: a second run into a busy --out, a rerun into a finished
one, Ctrl-C (SIGINT / SIGTERM) in the middle of a run. Each is refused in one line or keeps the
work; nothing kdfast did not write is removed, and an interrupted-then-resumed run equals an
uninterrupted one (student and report)."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from kdfast.cli import main
from kdfast.train.run_guard import RunBusyError, prune_checkpoints, remove_previous_run, run_lock

ROOT = Path(__file__).resolve().parents[2]
SMALL = ("--set", "student_layers=[0, 3]", "--set", "data.max_length=16", "--set", "train.batch_size=4",
         "--set", "train.eval_every=0", "--set", "data.max_texts=24")


def distill_args(tiny, out, *extra, steps=3):
    return ["distill", "--recipe", "distilbert", "--teacher", str(tiny / "teacher"), "--data", str(tiny / "train.txt"),
            "--out", str(out), "--no-progress", "--steps", str(steps), *SMALL, *extra]


def one_line_error(capsys, command):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"kdfast {command}: error:"), err
    return err[0]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("guard") / "run"
    assert main(distill_args(tiny, out)) == 0
    return out


def test_a_second_run_into_a_busy_out_is_refused_and_writes_nothing(tiny, tmp_path, capsys):
    out = tmp_path / "busy"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom kdfast.train.run_guard import run_lock\n"
                               f"with run_lock({str(out)!r}):\n    print('held', flush=True)\n    time.sleep(120)"],
                              stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert holder.stdout.readline().strip() == "held"
        assert main(distill_args(tiny, out)) == 2
        assert "another kdfast run is writing to it" in one_line_error(capsys, "distill")
        assert list(out.iterdir()) == []
        with pytest.raises(RunBusyError, match="out_dir"):
            with run_lock(out):
                pass
    finally:
        holder.kill()
        holder.wait()
    with run_lock(out), run_lock(out):  # free again once the holder died; re-entrant in one process
        pass


def test_rerunning_into_a_finished_out_without_resume_is_refused_and_keeps_it(tiny, finished, capsys):
    before = snapshot(finished)
    assert main(distill_args(tiny, finished, "--set", "train.seed=9")) == 2
    line = one_line_error(capsys, "distill")
    assert "holds a previous run (checkpoints up to step 3" in line and "--resume" in line and "--overwrite" in line
    assert snapshot(finished) == before


def test_resume_and_overwrite_together_are_refused(tiny, finished, capsys):
    assert main(distill_args(tiny, finished, "--resume", "--overwrite")) == 2
    assert "give one of them" in one_line_error(capsys, "distill")


def test_overwrite_removes_only_what_kdfast_wrote(tiny, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(distill_args(tiny, out, steps=2)) == 0
    (out / "notes.txt").write_text("mine")
    (out / "mine").mkdir()
    (out / "mine" / "data.bin").write_bytes(b"\x00\x01")
    (out / "checkpoints" / "README").write_text("also mine")
    first = load_file(str(out / "student" / "model.safetensors"))
    capsys.readouterr()
    assert main(distill_args(tiny, out, "--overwrite", "--set", "train.seed=7", steps=2)) == 0
    assert "--overwrite: removed the previous run's" in capsys.readouterr().out
    assert (out / "notes.txt").read_text() == "mine" and (out / "mine" / "data.bin").read_bytes() == b"\x00\x01"
    assert (out / "checkpoints" / "README").read_text() == "also mine"
    second = load_file(str(out / "student" / "model.safetensors"))
    assert any(not torch.equal(first[k], second[k]) for k in first)  # a new run (another seed), not the old one
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]  # no record of the removed run


def test_resume_says_where_it_resumes_or_that_there_is_nothing(tiny, tmp_path, finished, capsys):
    assert main(distill_args(tiny, tmp_path / "new", "--resume", steps=1)) == 0
    assert "nothing to resume" in capsys.readouterr().out
    assert main(distill_args(tiny, finished, "--resume")) == 0
    assert "already finished at step 3" in capsys.readouterr().out


def test_steps_beyond_a_billion_are_a_usage_error(tiny, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(distill_args(tiny, tmp_path / "o", steps=10**20))
    assert e.value.code == 2 and "--steps: must be <= 1000000000" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    from kdfast.train import TrainConfig

    with pytest.raises(ValueError, match="steps must be"):  # --set steps=... and Python callers
        TrainConfig(steps=10**20)


def test_keep_checkpoints_keeps_only_the_newest(tiny, tmp_path):
    out = tmp_path / "run"
    assert main(distill_args(tiny, out, "--set", "train.checkpoint_every=1", "--set", "train.keep_checkpoints=2",
                             steps=4)) == 0
    assert sorted(p.name for p in (out / "checkpoints").glob("step-*")) == ["step-0000003", "step-0000004"]
    assert (out / "checkpoints" / "latest").read_text() == "step-0000004"
    assert prune_checkpoints(out / "checkpoints", 1) == ["step-0000003"]
    assert prune_checkpoints(out / "checkpoints", 0) == []


def test_remove_previous_run_leaves_a_teacher_cache_and_foreign_files(tmp_path):
    out = tmp_path / "o"
    (out / "general" / "checkpoints" / "step-0000001").mkdir(parents=True)
    (out / "general" / "checkpoints" / "latest").write_text("step-0000001")
    (out / "general" / "metrics.jsonl").write_text("{}\n")
    (out / "teacher-cache").mkdir()
    (out / "teacher-cache" / "manifest.json").write_text("{}")
    (out / "student").mkdir()
    (out / "student" / "config.json").write_text("{}")
    (out / "report.json").write_text("{}")
    (out / ".git").mkdir()
    removed = remove_previous_run(out)
    assert removed == ["general/checkpoints/latest", "general/checkpoints/step-0000001", "general/metrics.jsonl",
                       "report.json", "student"]
    assert sorted(p.name for p in out.iterdir()) == [".git", "teacher-cache"]


def _student_and_report(out: Path):
    report = json.loads((out / "report.json").read_text())
    timing = ("seconds", "tokens_per_s", "timing_s", "out_dir", "dir")

    def strip(x):
        if isinstance(x, dict):
            return {k: strip(v) for k, v in x.items() if k not in timing}
        if isinstance(x, list):
            return [strip(v) for v in x]
        return x

    return load_file(str(out / "student" / "model.safetensors")), strip(report), report


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_at_a_random_step_keeps_the_work_and_resume_equals_an_uninterrupted_run(tiny, tmp_path, sig):
    """A real process: the signal lands at a random step of 12, the step finishes, a checkpoint is
    written, one line says so, exit 128 + signal; --resume then ends with the uninterrupted run's
    student (bit for bit) and report (first loss and every record), its time the sum of both parts."""
    steps = 12
    extra = ("--set", "train.log_every=1", "--set", "train.checkpoint_every=0", "--set", "train.seed=4")
    reference = tmp_path / "reference"
    assert main(distill_args(tiny, reference, *extra, steps=steps)) == 0

    out = tmp_path / "interrupted"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "kdfast.cli", *distill_args(tiny, out, *extra, steps=steps)]
    at = random.Random(int(sig)).randint(1, steps - 3)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= at:
            proc.send_signal(sig)
            break
        time.sleep(0.01)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + sig, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    stopped = int(lines[0].split("after step ")[1].split()[0])
    assert lines[0].startswith(f"kdfast distill: stopped by {signal.Signals(sig).name} after step {stopped} of {steps}")
    assert at <= stopped < steps and "continue with --resume" in lines[0]
    assert (out / "checkpoints" / "latest").read_text() == f"step-{stopped:07d}"
    assert not (out / "report.json").exists()

    resumed = subprocess.run([*cmd, "--resume"], capture_output=True, text=True, env=env, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert f"at step {stopped}" in resumed.stdout
    s_ref, r_ref, raw_ref = _student_and_report(reference)
    s_res, r_res, raw_res = _student_and_report(out)
    assert s_ref.keys() == s_res.keys() and all(torch.equal(s_ref[k], s_res[k]) for k in s_ref)
    assert r_res == r_ref
    first_part = json.loads((out / "checkpoints" / "seconds.json").read_text())[f"step-{stopped:07d}"]
    assert raw_res["stages"][0]["seconds"] > first_part > 0


# ---- teacher.cache_dir: a compatible cache is reused, an incompatible one refused, neither written

def _build_cache(tiny, out, *extra):
    return main(["cache", "build", "--teacher", str(tiny / "teacher"), "--data", str(tiny / "train.txt"), "--out",
                 str(out), "--logits", "topk:32", "--temperature", "2", "--packing", "--max-length", "16",
                 "--batch-size", "4", "--rows-per-shard", "16", "--no-progress", *extra])


def _cached_distill(tiny, out, cache, *extra):
    return main(["distill", "--recipe", "distilbert", "--teacher", str(tiny / "teacher"), "--data",
                 str(tiny / "train.txt"), "--out", str(out), "--no-progress", "--steps", "2",
                 "--set", "student_layers=[0, 3]", "--set", "data.max_length=16", "--set", "train.batch_size=4",
                 "--set", "train.eval_every=0", "--set", "data.held_out_every=0", "--set", "teacher.source=cache",
                 "--set", f"teacher.cache_dir={cache}", *extra])


def test_a_compatible_cache_is_reused_and_an_incompatible_one_refused_both_untouched(tiny, tmp_path, capsys):
    cache = tmp_path / "cache"
    assert _build_cache(tiny, cache) == 0
    before = snapshot(cache)
    assert _cached_distill(tiny, tmp_path / "run", cache) == 0
    assert snapshot(cache) == before  # read, never written
    assert not (tmp_path / "run" / "teacher-cache").exists()
    capsys.readouterr()
    assert _cached_distill(tiny, tmp_path / "run2", cache, "--set", "temperature=3.0") == 2
    line = one_line_error(capsys, "distill")
    assert "is a cache built for other settings" in line and "logits.temperature 2.0 (this run: 3.0)" in line
    assert _cached_distill(tiny, tmp_path / "run3", cache, "--set", "data.held_out_every=10") == 2
    assert "data.held_out_every=0" in one_line_error(capsys, "distill")
    assert snapshot(cache) == before
    assert not (tmp_path / "run2" / "student").exists()


def test_a_student_larger_than_its_teacher_is_refused_unless_asked(tiny, tmp_path, capsys):
    big = ("--set", "student.hidden_size=64", "--set", "student.intermediate_size=256",
           "--set", "student.num_attention_heads=4", "--set", "student.num_hidden_layers=2")
    args = ["distill", "--recipe", "tinybert", "--teacher", str(tiny / "teacher"), "--data", str(tiny / "train.txt"),
            "--no-progress", "--steps", "1", "--set", "data.max_length=16", "--set", "train.batch_size=4",
            "--set", "train.eval_every=0", "--set", "data.max_texts=24", *big]
    assert main([*args, "--out", str(tmp_path / "a")]) == 2
    line = one_line_error(capsys, "distill")
    assert "its teacher's" in line and "teacher.allow_larger_student=true" in line
    assert not (tmp_path / "a" / "general").exists()
    assert main([*args, "--out", str(tmp_path / "b"), "--set", "teacher.allow_larger_student=true"]) == 0


def test_a_cache_dir_of_another_runs_texts_is_refused_and_left_as_it_was(tiny, tmp_path, capsys):
    cache = tmp_path / "shared-cache"
    run = ["distill", "--recipe", "distilbert", "--teacher", str(tiny / "teacher"), "--data", str(tiny / "train.txt"),
           "--no-progress", "--steps", "1", "--set", "student_layers=[0, 3]", "--set", "data.max_length=16",
           "--set", "train.batch_size=4", "--set", "train.eval_every=0", "--set", "teacher.source=cache",
           "--set", f"teacher.cache_dir={cache}"]
    assert main([*run, "--out", str(tmp_path / "a"), "--set", "data.max_texts=24"]) == 0
    before = snapshot(cache)
    assert main([*run, "--out", str(tmp_path / "b"), "--set", "data.max_texts=24"]) == 0  # the same: reused
    assert snapshot(cache) == before
    capsys.readouterr()
    assert main([*run, "--out", str(tmp_path / "c"), "--set", "data.max_texts=30"]) == 2
    assert "holds the train cache of other texts" in one_line_error(capsys, "distill")
    assert snapshot(cache) == before
