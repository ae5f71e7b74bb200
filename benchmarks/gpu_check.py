"""GPU day: one prepared command that proves every GPU kernel and measures every GPU bar (``make gpu-check``).

On a GPU machine that has no network and brings its own Python (``python3`` with torch, triton,
transformers), in the repository root:

1. ``environment``: versions, the device, ``nvidia-smi -L``;
2. ``wheels``: installs ``.whl/*.whl`` (made here by ``make gpu-wheels``) into ``$GPU_CHECK_SITE``
   (default ``/tmp/kdfast-site``) with pip, offline, and puts it on ``PYTHONPATH`` for every later step;
3. ``build``: ``setup.py build_ext --inplace`` with nvcc for sm_90 (``KDFAST_CUDA_ARCHS``) against the
   machine's torch;
4. ``backends``: ``kdfast backends``;
5. ``tests``: ``tests/test_gpu.py`` (every kernel family and backend that claims CUDA, fp32/fp16/bf16
   against float64, one distillation step live and cached);
6. ``bench-*``: the GPU benchmark suites at the bars' shapes, each against eager and ``torch.compile``
   (and Liger-Kernel / TextBrewer where installed) in the same process; every row beside its roofline
   floor on an H100 and an H200 (:mod:`kdfast.bench.roofline`) and, on either, measured / floor;
7. ``bars``: every bar read off the measured rows (met / missed / not measured).

Each step runs in its own process with its own time limit, carved out of one budget (480 s by
default: the whole run ends within 8 minutes); a failing or timed-out step is recorded and the next
one runs; the exit status is 1 if any step failed. Everything lands in ``$GPU_CHECK_OUT`` (default
``gpu-check-out/``), five flat files named after the device (the device tool returns at most 8):

    gpu-check-<device>.log       every step's command and output, in order
    tests-<device>.txt           the pytest report of step 5
    bench-<device>.txt           the printed tables of step 6, the floors
    bench-<device>.json          every measured row (suite, case, impl, ms, peak bytes, notes, floors)
    summary-<device>.json        per step: status, seconds, limit; the bars; versions

``--dry-run`` (``make gpu-check DRY_RUN=1``) runs the same steps here on the CPU: no wheel install and
no nvcc build (the existing ``kdfast._C`` is used), the tests on CPU tensors through the Triton
interpreter (``KDFAST_GPU_TESTS_ON_CPU=1``), the suites at tiny shapes without ``torch.compile``; the
device is called ``cpu-dry-run``. ``tests/test_gpu_check.py`` runs it in ``make test``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# (step, limit in seconds on a GPU, limit in the dry run). The GPU limits add up to the budget.
STEPS = [("environment", 15, 60), ("wheels", 20, 30), ("build", 125, 30), ("backends", 20, 60),
         ("tests", 90, 150), ("bench-kd_loss", 50, 60), ("bench-attention", 50, 60), ("bench-hidden", 35, 60),
         ("bench-fused_linear_kd", 50, 60), ("bench-e2e", 25, 90)]
BENCH_SUITES = ("kd_loss", "attention", "hidden", "fused_linear_kd", "e2e")
# The whole-step GPU rows: whole recipe steps at batch 32 x 512 in bf16 autocast (no torch.compile row: its
# compile alone would take the step's time), DistilBERT first; tiny shapes in the dry run.
E2E_STEPS = ("distilbert", "tinybert")
# The bars' shapes on a GPU; tiny ones for the dry run (same code paths, bars read off them too).
SHAPES = {
    False: {"kd": (16384, 30522, "bfloat16"), "attention": (32, 12, 512, 64), "map_L": 128,
            "long_context": ((4096, 8192), 64),
            "hidden": (4096, 312, 768), "flkd": ((32, 128), 30522, ("bfloat16", "float32"), (768,))},
    True: {"kd": (64, 500, "float32"), "attention": (2, 2, 24, 8), "map_L": 16, "long_context": ((40,), 8),
           "hidden": (64, 24, 40), "flkd": ((2, 16), 300, ("float32",), (32,))},
}


def device_slug(name: str) -> str:
    """A file-name-safe device name: 'NVIDIA H200' -> 'nvidia-h200'."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "device"


# --- the bench worker (one suite per process, rows written as soon as they are measured) -----------

def _bench_groups(suite: str, device, dry: bool):
    """(title, entries, notes) groups of one suite at the bars' shapes (tiny in the dry run)."""
    import torch

    from kdfast.bench import attention as att
    from kdfast.bench import fused_linear_kd as flkd
    from kdfast.bench import kd_loss as kd
    from kdfast.bench import long_context

    shapes, compile_rows = SHAPES[dry], not dry
    if suite == "kd_loss":
        N, V, dtype = shapes["kd"]
        ents, notes = kd.entries(device, N, V, getattr(torch, dtype), compile_baseline=compile_rows)
        yield "logit KD", ents, notes
    elif suite == "attention":
        B, H, L, dh = shapes["attention"]
        yield "attention from Q/K", att._attention_entries(device, B, H, L, dh, compile_baseline=compile_rows), []
        yield "score-map MSE", att._map_mse_entries(device, B, H, shapes["map_L"], dh), []
        lengths, window = shapes["long_context"]
        yield (f"long context, one layer from Q/K, global and local (w={window})",
               long_context.entries(device, lengths, window=window, H=2 if dry else 12, dh=8 if dry else 64), [])
    elif suite == "hidden":
        n, d_s, d_t = shapes["hidden"]
        yield "hidden MSE and cosine", att._hidden_entries(device, tokens=n, d_s=d_s, d_t=d_t,
                                                            compile_baseline=compile_rows), []
    elif suite == "fused_linear_kd":
        tokens, vocab, dtypes, widths = shapes["flkd"]
        for dtype in dtypes:
            for d_s in widths:
                yield (f"fused linear KD {dtype}",
                       flkd.entries(device, tokens, d_s, vocab=vocab, dtype=getattr(torch, dtype),
                                    compile_baseline=compile_rows, peers=True), [])
    else:
        raise ValueError(f"unknown suite {suite!r}; one of {BENCH_SUITES}")


def _slow(entry) -> bool:
    """Compiled baselines and peers: their first call compiles (tens of seconds on a GPU)."""
    return entry.impl == "torch.compile" or entry.impl.startswith(("liger", "textbrewer"))


def _slow_last(entries):
    """Slow rows last, so that if the step's time runs out it is theirs that are missing, not kdfast's
    or eager's."""
    return sorted(entries, key=_slow)


def bench_worker(suite: str, dry: bool, jsonl: Path, seconds: float) -> int:
    """Measure one suite entry by entry, appending each row to ``jsonl`` as soon as it is measured and
    printing each group's table. An entry is recorded as skipped instead of started when less of
    ``seconds`` is left than it may need (3 s; 25 s for a compiling one on a GPU), so that the step
    ends on its own rather than being killed."""
    from dataclasses import asdict

    import torch

    from kdfast.bench.timing import Result, copy_bandwidth_gbs, format_table, measure_all

    deadline = time.monotonic() + seconds
    device = torch.device("cpu" if dry else "cuda")
    copy_bw = copy_bandwidth_gbs(device) if device.type == "cuda" else None
    repeat, warmup = (1, 0) if dry else (5, 2)
    device_name = torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu"
    with open(jsonl, "a") as out:
        def emit(r):
            out.write(json.dumps(asdict(with_floor(r, device_name, dry))) + "\n")
            out.flush()

        if suite == "e2e":  # whole steps: one recipe at a time, each written as soon as it is measured
            from kdfast.bench import e2e

            for step in E2E_STEPS:
                if deadline - time.monotonic() < 3:
                    emit(Result(suite, f"{step} 32x512", "every row", None, None,
                                note="skipped: the step's time ran out"))
                    continue
                kw = (dict(shape="tiny", repeat=1, memory=False) if dry
                      else dict(batch=32, seq=512, long_seq=0, dtype=torch.bfloat16, repeat=3))
                results = e2e.run(device, steps=(step,), compile_baseline=False, use_textbrewer=not dry, **kw)
                for r in results:
                    emit(r)
                print(f"\n{step} whole step (e2e):\n{e2e.report(results)}", flush=True)
                print(floors_table(results, device_name), flush=True)
            return 0

        if copy_bw and suite == "kd_loss":
            emit(Result(suite, "device", "copy bandwidth", None, None, note=f"{copy_bw:.0f} GB/s"))
        for title, entries, notes in _bench_groups(suite, device, dry):
            results = []
            for e in _slow_last(entries):
                if deadline - time.monotonic() < (25 if _slow(e) and not dry else 3):
                    r = Result(e.suite, e.case, e.impl, None, None, note="skipped: the step's time ran out")
                else:
                    (r,) = measure_all([e], device, repeat=repeat, warmup=warmup, copy_bw_gbs=copy_bw)
                emit(r)
                results.append(r)
            for r in notes:
                emit(r)
            print(f"\n{title} ({suite}):\n{format_table(results + notes)}", flush=True)
            print(floors_table(results, device_name), flush=True)
            del entries
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return 0


def with_floor(r, device_name: str, dry: bool):
    """``r`` (a Result) with its roofline floor on each GPU in ``extra`` (kdfast.bench.roofline) and,
    on an H100 / H200, measured / floor."""
    from kdfast.bench.roofline import floor_extra, work_for_row

    # the long-context rows' labels carry no head width: theirs is the attention rows' (64; 8 in the dry run)
    work = work_for_row(r.suite, r.case, r.impl, r.extra, vocab=SHAPES[dry]["flkd"][1],
                        head_dim=SHAPES[dry]["attention"][3])
    r.extra = {**r.extra, **floor_extra(work, r.ms, device_name)}
    return r


def floors_table(results, device_name: str) -> str:
    """The floor column of measured rows: each row's floor on an H100 and an H200, measured / floor."""
    from dataclasses import asdict

    from kdfast.bench.roofline import format_floors

    return "roofline floors (ms):\n" + format_floors([asdict(r) for r in results], device_name)


def render_tables(rows: list[dict]) -> str:
    """The tables of every measured row, grouped by suite (rendered from the rows, so that a step cut
    short still shows what it measured)."""
    from kdfast.bench.timing import Result, format_table

    text = []
    for suite in dict.fromkeys(r["suite"] for r in rows):
        res = [Result(**r) for r in rows if r["suite"] == suite]
        text.append(format_table(res, baseline="eager"))
    return "\n\n".join(text)


# --- the bars -------------------------------------------------------------------------------------

def _row(rows, suite, case_has, impl):
    return next((r for r in rows if r["suite"] == suite and case_has in r["case"] and r["impl"] == impl
                 and r.get("ms")), None)


def _rows(rows, suite, case_has, impl_prefix):
    return [r for r in rows if r["suite"] == suite and case_has in r["case"] and r["impl"].startswith(impl_prefix)
            and r.get("ms")]


def evaluate_bars(rows: list[dict], shapes: dict) -> list[dict]:
    """Each bar at ``shapes`` (``SHAPES[dry]``): the measured value, the bar, and met
    (True / False) or None (not measured)."""
    bars = []

    def bar(name, value, target, met, detail=""):
        bars.append({"bar": name, "measured": value, "target": target, "met": met, "detail": detail})

    def speedup(name, base, ours, target, strict=False):
        sp = None if not (base and ours) else base["ms"] / ours["ms"]
        met = None if sp is None else (sp > target if strict else sp >= target)
        bar(name, None if sp is None else f"{sp:.2f}x" + (f" ({ours['impl']})" if "kdfast" in ours["impl"] else ""),
            f"{'>' if strict else '>='} {target}x", met)

    N, V, dtype = shapes["kd"]
    case = f"N={N} V={V} {dtype}"
    eager = _row(rows, "kd_loss", case, "eager")
    ours = [r for r in _rows(rows, "kd_loss", case, "kdfast-") if "+producer" not in r["case"]]
    best = min(ours, key=lambda r: r["ms"]) if ours else None
    bw = next((r for r in rows if r["impl"] == "copy bandwidth"), None)
    share = best and best.get("extra", {}).get("of_copy_bw")
    bar(f"logit KD {case}: share of the measured copy bandwidth", share and f"{share} ({best['impl']})", ">= 80%",
        None if not share else float(share.rstrip("%")) >= 80, bw["note"] if bw else "")
    speedup(f"logit KD {case}: speed-up over eager", eager, best, 4)
    liger = _row(rows, "kd_loss", case, "liger JSD(beta=0)")
    speedup(f"logit KD {case}: against Liger's JSD(beta=0)", liger, best, 1, strict=True)

    tokens, _, dtypes, widths = shapes["flkd"]
    for dtype in dtypes:
        c = f"d_s={widths[0]} {dtype}"
        eager = _row(rows, "flkd", c, "eager")
        ours = [r for r in _rows(rows, "flkd", c, "kdfast-") if "liger-chunks" not in r["impl"]]
        best = min(ours, key=lambda r: r["ms"]) if ours else None
        speedup(f"fused linear KD {tokens[0]}x{tokens[1]} {c}: speed-up over eager", eager, best, 1.5)
        mem = None if not (eager and best and eager.get("peak_bytes") and best.get("peak_bytes")) else \
            eager["peak_bytes"] / best["peak_bytes"]
        bar(f"fused linear KD {c}: eager peak / kdfast peak", None if mem is None else f"{mem:.2f}x", ">= 4x",
            None if mem is None else mem >= 4)
        peers = _rows(rows, "flkd", c, "liger")
        speedup(f"fused linear KD {c}: against Liger's fastest", min(peers, key=lambda r: r["ms"]) if peers else None,
                best, 1, strict=True)

    B, H, L, _ = shapes["attention"]
    for loss in ("KL", "MSE"):
        c = f"{loss} B={B} H={H} L={L}"
        speedup(f"attention {c} from Q/K: speed-up over materialised eager", _row(rows, "attention", c, "eager"),
                _row(rows, "attention", c, "kdfast flash") or _row(rows, "attention", c, "kdfast flash cpu"), 2)
    n, d_s, d_t = shapes["hidden"]
    c = f"hidden MSE N={n} {d_s}->{d_t}"
    speedup(f"{c}: speed-up over eager", _row(rows, "attention", c, "eager"),
            _row(rows, "attention", c, "kdfast fused") or _row(rows, "attention", c, "kdfast fused cpu"), 1.3)
    return bars


def format_bars(bars: list[dict]) -> str:
    lines = [f"{'bar':<72} {'measured':<30} {'target':<8} status"]
    for b in bars:
        status = "not measured" if b["met"] is None else ("met" if b["met"] else "MISSED")
        lines.append(f"{b['bar']:<72} {str(b['measured'] or '-'):<30} {b['target']:<8} {status}")
    return "\n".join(lines)


# --- the driver -----------------------------------------------------------------------------------

class Run:
    def __init__(self, out: Path, slug: str, budget_s: float, dry: bool) -> None:
        self.out, self.slug, self.dry = out, slug, dry
        self.deadline = time.monotonic() + budget_s
        self.log_path = out / f"gpu-check-{slug}.log"
        self.log = open(self.log_path, "w")
        self.steps: list[dict] = []
        self.env = dict(os.environ)
        self.env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), self.env.get("PYTHONPATH")) if p)
        self.env["PYTHONUNBUFFERED"] = "1"
        self.env.setdefault("TRITON_INTERPRET", "1" if dry else "0")

    def say(self, text: str) -> None:
        print(text, flush=True)
        self.log.write(text + "\n")
        self.log.flush()

    def step(self, name: str, limit: float, argv: list[str] | None, *, skip: str | None = None,
             tee: Path | None = None, env: dict | None = None) -> dict:
        """Run ``argv`` under ``limit`` seconds (less if the budget is shorter); record the outcome."""
        t0 = time.monotonic()
        left = self.deadline - t0
        rec = {"step": name, "limit_s": round(min(limit, max(left, 0)), 1), "seconds": 0.0}
        self.say(f"\n=== {name} " + "=" * max(3, 60 - len(name)))
        if skip:
            rec["status"] = "skipped"
            rec["reason"] = skip
            self.say(f"skipped: {skip}")
        elif left < 5:
            rec["status"] = "skipped"
            rec["reason"] = "out of time (the run's budget is spent)"
            self.say("skipped: out of time")
        else:
            self.say("$ " + " ".join(shlex.quote(a) for a in argv))
            start = self.log.tell()
            # The child writes straight into the log (nothing is lost if this process is killed) and gets
            # its own process group, so that a timeout also ends its children (pytest-xdist workers).
            with subprocess.Popen(argv, cwd=ROOT, env=env or self.env, stdout=self.log, stderr=subprocess.STDOUT,
                                  start_new_session=True) as proc:
                try:
                    rc = proc.wait(timeout=rec["limit_s"])
                    rec["status"] = "ok" if rc == 0 else "failed"
                    rec["returncode"] = rc
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
                    rec["status"] = "timed out"
            self.log.seek(0, os.SEEK_END)
            with open(self.log_path, "rb") as f:
                f.seek(start)
                output = f.read().decode(errors="replace")
            if tee is not None:
                with open(tee, "a") as f:
                    f.write(output)
            tail = output.strip().splitlines()[-3:]
            self.say(f"--> {rec['status']} in {time.monotonic() - t0:.1f} s" + ("".join(f"\n    {x}" for x in tail)
                                                                              if rec["status"] != "ok" else ""))
        rec["seconds"] = round(time.monotonic() - t0, 1)
        self.steps.append(rec)
        return rec


def _python_snippet(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="run every step here on the CPU at tiny shapes")
    ap.add_argument("--out", default=os.environ.get("GPU_CHECK_OUT", "gpu-check-out"),
                    help="output folder (env GPU_CHECK_OUT; default gpu-check-out/)")
    ap.add_argument("--budget", type=float, default=float(os.environ.get("GPU_CHECK_BUDGET_S", 480)),
                    help="seconds for the whole run (default 480: done within 8 minutes)")
    ap.add_argument("--bench-worker", choices=BENCH_SUITES, help=argparse.SUPPRESS)
    ap.add_argument("--jsonl", help=argparse.SUPPRESS)
    ap.add_argument("--seconds", type=float, default=60.0, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.bench_worker:
        return bench_worker(args.bench_worker, args.dry_run, Path(args.jsonl), args.seconds)

    t_start = time.monotonic()
    dry = args.dry_run
    out = Path(args.out)
    if not out.is_absolute():
        out = Path.cwd() / out
    out.mkdir(parents=True, exist_ok=True)
    probe = subprocess.run([sys.executable, "-c", "import json, platform, torch; print(json.dumps({'gpu': "
                            "torch.cuda.get_device_name(0) if torch.cuda.is_available() else '', 'python': "
                            "platform.python_version(), 'torch': torch.__version__, 'cuda': torch.version.cuda}))"],
                           capture_output=True, text=True)
    try:
        versions = json.loads(probe.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        print(f"gpu-check: {sys.executable} cannot import torch: {probe.stderr.strip()[-300:]}", file=sys.stderr)
        return 2
    gpu_name = versions.pop("gpu")
    if not dry and not gpu_name:
        print("gpu-check: no CUDA device answers here (torch.cuda.is_available() is False); "
              "run `make gpu-check DRY_RUN=1` for the CPU rehearsal", file=sys.stderr)
        return 2
    slug = "cpu-dry-run" if dry else device_slug(gpu_name)
    # Only our own outputs are replaced; anything else in the folder is left alone.
    tests_txt, bench_txt = out / f"tests-{slug}.txt", out / f"bench-{slug}.txt"
    bench_json, summary_json = out / f"bench-{slug}.json", out / f"summary-{slug}.json"
    bench_jsonl = out / f".bench-{slug}.jsonl"
    for p in (tests_txt, bench_txt, bench_json, summary_json, bench_jsonl):
        p.unlink(missing_ok=True)
    run = Run(out, slug, args.budget, dry)
    run.say(f"kdfast gpu-check {'(dry run on the CPU) ' if dry else ''}on {gpu_name or platform.processor() or 'CPU'}"
            f"; budget {args.budget:.0f} s; output {out}")
    limits = {name: (dry_s if dry else gpu_s) for name, gpu_s, dry_s in STEPS}

    run.step("environment", limits["environment"], ["bash", "-c", (
        f"{shlex.quote(sys.executable)} -c 'import sys, torch, triton, transformers; "
        "print(\"python\", sys.version.split()[0]); print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda); "
        "print(\"triton\", triton.__version__); print(\"transformers\", transformers.__version__); "
        "print(\"device\", torch.cuda.get_device_name(0) if torch.cuda.is_available() else \"cpu\")'; "
        "(nvidia-smi -L || true) 2>&1; (nvcc --version | tail -2 || true) 2>&1; nproc; "
        f"{shlex.quote(sys.executable)} -m pip list 2>/dev/null | grep -iE "
        "'^(pyarrow|fsspec|huggingface.hub|pandas|tensorboard|pytest|pytest.xdist|setuptools|ninja) ' || true")])

    wheels = sorted((ROOT / ".whl").glob("*.whl"))
    site = os.environ.get("GPU_CHECK_SITE", "/tmp/kdfast-site")
    if dry:
        run.step("wheels", limits["wheels"], None, skip=f"dry run ({len(wheels)} wheels in .whl/ not installed)")
    elif not wheels:
        run.step("wheels", limits["wheels"], None, skip="no .whl/*.whl (make gpu-wheels here, then carry .whl)")
    else:
        rec = run.step("wheels", limits["wheels"], [sys.executable, "-m", "pip", "install", "-q", "--no-index",
                                                    "--no-deps", "--no-compile", "--no-cache-dir", "--upgrade",
                                                    "--target", site, *map(str, wheels)])
        if rec["status"] == "ok":
            run.env["PYTHONPATH"] = os.pathsep.join((str(ROOT), site, run.env.get("PYTHONPATH", "")))

    if dry:
        run.step("build", limits["build"], None, skip="dry run (the kdfast._C already built here is used)")
    else:
        build_env = {**run.env, "KDFAST_CUDA_ARCHS": os.environ.get("KDFAST_CUDA_ARCHS", "90"),
                     "MAX_JOBS": str(os.cpu_count() or 8)}
        run.step("build", limits["build"], [sys.executable, "setup.py", "-q", "build_ext", "--inplace"],
                 env=build_env)
    peers = ("import importlib\nfor m in ('datasets', 'liger_kernel', 'textbrewer'):\n    try:\n"
             "        mod = importlib.import_module(m); print(m, getattr(mod, '__version__', '?'))\n"
             "    except Exception as e:\n        print(m, 'not importable:', type(e).__name__, str(e)[:100])")
    run.step("backends", limits["backends"], ["bash", "-c", f"{shlex.quote(sys.executable)} -m kdfast.cli backends && "
                                                            f"{shlex.quote(sys.executable)} -c {shlex.quote(peers)}"])

    test_env = dict(run.env)
    pytest_args = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-rfEs", "tests/test_gpu.py"]
    if dry:
        test_env["KDFAST_GPU_TESTS_ON_CPU"] = "1"
        pytest_args.append("-q")
    else:
        pytest_args += ["-v", "--durations=10"]
        has_xdist = subprocess.run([sys.executable, "-c", "import xdist"], capture_output=True).returncode == 0
        if has_xdist:  # the Triton JIT compiles are CPU-bound: spread them over the machine's cores
            pytest_args += ["-n", str(min(8, os.cpu_count() or 1))]
    run.step("tests", limits["tests"], pytest_args, tee=tests_txt, env=test_env)

    for suite in BENCH_SUITES:
        name = f"bench-{suite}"
        seconds = min(limits[name], run.deadline - time.monotonic()) - 2  # the worker stops starting rows first
        run.step(name, limits[name], [sys.executable, str(Path(__file__).resolve()), "--bench-worker", suite,
                                      "--jsonl", str(bench_jsonl), "--seconds", f"{seconds:.0f}"]
                 + (["--dry-run"] if dry else []))

    rows = [json.loads(line) for line in bench_jsonl.read_text().splitlines()] if bench_jsonl.exists() else []
    bench_jsonl.unlink(missing_ok=True)
    bench_json.write_text(json.dumps({"device": gpu_name or "cpu (dry run)", "dry_run": dry, "rows": rows},
                                     indent=1))
    bars = evaluate_bars(rows, SHAPES[dry])
    run.say("\n=== bars " + "=" * 56 + "\n" + format_bars(bars))
    sys.path.insert(0, str(ROOT))
    from kdfast.bench.roofline import format_floors

    floors = "roofline floors (ms), measured / floor:\n" + format_floors(rows, gpu_name or "cpu")
    run.say("\n=== floors " + "=" * 54 + "\n" + floors)
    bench_txt.write_text(f"kdfast gpu-check on {gpu_name or 'the CPU (dry run: tiny shapes, not a measurement)'}; "
                         "ratios against eager in the same process\n\n" + render_tables(rows)
                         + "\n\n" + floors + "\n\nbars:\n" + format_bars(bars) + "\n")
    failed = [s["step"] for s in run.steps
              if s["status"] in ("failed", "timed out") or s.get("reason", "").startswith("out of time")]
    summary = {"device": gpu_name or "cpu (dry run)", "dry_run": dry, "versions": versions, "budget_s": args.budget,
               "seconds": round(time.monotonic() - t_start, 1), "steps": run.steps, "failed_steps": failed,
               "bars": bars, "files": [p.name for p in (run.log_path, tests_txt, bench_txt, bench_json, summary_json)]}
    summary_json.write_text(json.dumps(summary, indent=1))
    run.say(f"\ngpu-check {'FAILED: ' + ', '.join(failed) if failed else 'passed'} in {summary['seconds']:.0f} s; "
            f"files in {out}: " + ", ".join(summary["files"]))
    run.log.close()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
