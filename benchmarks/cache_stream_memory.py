"""Peak resident memory of ``kdfast cache build`` over a generated Parquet corpus of at least 2 GB
(streamed block by block):

    python benchmarks/cache_stream_memory.py [--gb 2.1] [--max-rows 0] [--ranks 1] [--keep]

Writes the corpus under /tmp (4 uncompressed files of ~1 KB texts in row groups of 5,000,
:func:`kdfast.bench.synthetic.write_parquet_corpus`), builds with the tiny BERT teacher of the tests
(2 layers of 32, :func:`kdfast.bench.synthetic.save_tiny_bert_teacher`; hidden states of layer 2
stored, top-2 logits, max_length 32, one padded row per text) in a child process, and samples the
builder's VmHWM / VmRSS from /proc every 0.2 s: the resident set at each percent of the rows
shows whether memory grows with the corpus. ``--max-rows N`` stops the build once N rows are listed
(0: the whole corpus); ``--ranks N`` builds under torchrun (gloo) and reports the largest rank.
Deletes the corpus and the cache afterwards unless ``--keep``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from kdfast.bench.synthetic import WORDS, save_tiny_bert_teacher, write_parquet_corpus


def _status_kib(pid: int, field: str) -> int:
    try:
        return int(Path(f"/proc/{pid}/status").read_text().split(f"{field}:")[1].split()[0])
    except (OSError, IndexError, ValueError):
        return 0


def _builders(pid: int) -> list[int]:
    """``pid`` and its descendants that run the build (torchrun's workers)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            todo += [int(c) for c in Path(f"/proc/{p}/task/{p}/children").read_text().split()]
        except OSError:
            pass
    return out


def _listed_rows(cache: Path) -> int:
    m = json.loads((cache / "manifest.json").read_text())
    return sum(s["rows"] for s in m["shards"])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gb", type=float, default=2.1)
    ap.add_argument("--max-rows", type=int, default=0)
    ap.add_argument("--ranks", type=int, default=1)
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="kdfast-stream-", dir="/tmp"))
    try:
        (root / "teacher").mkdir()
        save_tiny_bert_teacher(root / "teacher", sorted(set(WORDS)))
        (root / "corpus").mkdir()
        t0 = time.perf_counter()
        n = write_parquet_corpus(root / "corpus", int(args.gb * 1e9))
        size = sum(p.stat().st_size for p in (root / "corpus").iterdir())
        print(f"corpus: {n} texts, {size / 1e9:.2f} GB of Parquet on disk ({time.perf_counter() - t0:.0f} s)",
              flush=True)
        cli = ["-m", "kdfast.cli", "cache", "build", "--teacher", str(root / "teacher"), "--data",
               str(root / "corpus"), "--out", str(root / "cache"), "--logits", "topk:2", "--layers", "2",
               "--max-length", "32", "--batch-size", "256", "--rows-per-shard", "4096", "--no-progress"]
        launcher = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={args.ranks}"] \
            if args.ranks > 1 else [sys.executable]
        t0 = time.perf_counter()
        proc = subprocess.Popen(launcher + cli)
        peak_kib, rows, percents = 0, 0, {}
        while proc.poll() is None:
            pids = _builders(proc.pid)[1 if args.ranks > 1 else 0:]
            peak_kib = max([peak_kib, *(_status_kib(p, "VmHWM") for p in pids)])
            try:
                m = json.loads((root / "cache" / "manifest.json").read_text())
                rows = sum(s["rows"] for s in m["shards"])
            except (OSError, ValueError, KeyError):
                pass
            percent = rows * 100 // n
            if percent not in percents:
                percents[percent] = max(_status_kib(p, "VmRSS") for p in pids) / 2**20
                print(f"  {rows} rows listed after {time.perf_counter() - t0:.0f} s: resident set "
                      f"{percents[percent]:.2f} GiB, peak so far {peak_kib / 2**20:.2f} GiB", flush=True)
            if args.max_rows and rows >= args.max_rows:
                proc.terminate()
                break
            time.sleep(0.2)
        proc.wait()
        dt = time.perf_counter() - t0
        how = "capped at --max-rows" if args.max_rows and rows >= args.max_rows else \
            "complete" if proc.returncode == 0 else f"stopped, exit {proc.returncode}"
        if proc.returncode == 0:
            rows = _listed_rows(root / "cache")
        print("resident set (GiB) at each percent of the rows listed: " +
              ", ".join(f"{t}%: {v:.2f}" for t, v in sorted(percents.items())))
        print(f"build: {rows} rows of {n} texts in {dt:.0f} s ({how}, {args.ranks} process(es)); peak RSS "
              f"(VmHWM) of the builder {peak_kib / 2**20:.2f} GiB (bar: under 3 GB = 2.79 GiB)")
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
