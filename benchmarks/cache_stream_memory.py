"""Peak resident memory of ``kdfast cache build`` over a generated Parquet corpus of at least 2 GB
(streamed through ``datasets``):

    python benchmarks/cache_stream_memory.py [--gb 2.1] [--max-rows 100000] [--keep]

Writes the corpus under /tmp (4 files, ~1 KB texts), builds with a tiny BERT teacher (2 layers of 32,
hidden states of layer 2 stored, top-2 logits, max_length 32) in a child process, samples the child's
VmHWM / VmRSS from /proc every 0.2 s, and stops the build once ``--max-rows`` rows are recorded (a
full pass of the teacher over 2 GB of text takes too long on a small CPU; the corpus is hashed in
full and the rows are streamed, so what is capped is the number of teacher rows). Deletes the corpus
and the cache afterwards unless ``--keep``.
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

WORDS = ("the cat sat on a mat while dogs ran far away from home under blue skies and green trees every "
         "morning birds sing songs of light wind rain sun moon stars river stone").split()


def make_teacher(d: Path) -> None:
    import torch
    from transformers import BertConfig, BertForMaskedLM, BertTokenizer

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *sorted(set(WORDS))]
    BertTokenizer(vocab={w: i for i, w in enumerate(vocab)}).save_pretrained(d)
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=64)
    BertForMaskedLM(cfg).eval().save_pretrained(d)


def make_corpus(d: Path, gb: float) -> int:
    """Parquet files (no compression, no dictionary: the bytes on disk are the text's) of ~1 KB texts
    until ``gb`` GB; a pool of random texts is rotated so that generating stays cheap. Returns the
    number of texts."""
    import random

    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = random.Random(0)
    pool = [" ".join(rng.choices(WORDS, k=190)) for _ in range(20_000)]
    target, written, n, part = int(gb * 1e9), 0, 0, 0
    per_file = target // 4 + 1
    while written < target:
        with pq.ParquetWriter(str(d / f"part-{part}.parquet"), pa.schema([("text", pa.string())]),
                              compression="none", use_dictionary=False) as w:
            in_file = 0
            while in_file < per_file and written < target:
                shift = n % len(pool)
                texts = [f"{n + i} {t}" for i, t in enumerate(pool[shift:] + pool[:shift])]
                size = sum(len(t) for t in texts)
                w.write_table(pa.table({"text": texts}), row_group_size=5_000)
                in_file += size
                written += size
                n += len(texts)
        part += 1
    return n


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gb", type=float, default=2.1)
    ap.add_argument("--max-rows", type=int, default=100_000)
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="kdfast-stream-", dir="/tmp"))
    try:
        (root / "teacher").mkdir()
        make_teacher(root / "teacher")
        (root / "corpus").mkdir()
        t0 = time.perf_counter()
        n = make_corpus(root / "corpus", args.gb)
        size = sum(p.stat().st_size for p in (root / "corpus").iterdir())
        print(f"corpus: {n} texts, {size / 1e9:.2f} GB of Parquet on disk ({time.perf_counter() - t0:.0f} s)")
        cmd = [sys.executable, "-m", "kdfast.cli", "cache", "build", "--teacher", str(root / "teacher"), "--data",
               str(root / "corpus"), "--out", str(root / "cache"), "--logits", "topk:2", "--layers", "2",
               "--max-length", "32", "--batch-size", "256", "--rows-per-shard", "4096", "--no-progress"]
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd)
        peak_kib, rows = 0, 0
        while proc.poll() is None:
            try:
                status = Path(f"/proc/{proc.pid}/status").read_text()
                peak_kib = max(peak_kib, int(status.split("VmHWM:")[1].split()[0]))
            except (OSError, IndexError):
                pass
            try:
                m = json.loads((root / "cache" / "manifest.json").read_text())
                rows = sum(s["rows"] for s in m["shards"])
            except (OSError, ValueError, KeyError):
                pass
            if rows >= args.max_rows:
                proc.terminate()
                break
            time.sleep(0.2)
        proc.wait()
        dt = time.perf_counter() - t0
        how = "capped at --max-rows" if rows >= args.max_rows else "complete" if proc.returncode == 0 else \
            f"stopped, exit {proc.returncode}"
        print(f"build: {rows} rows recorded in {dt:.0f} s ({how}); "
              f"peak RSS (VmHWM) of the builder {peak_kib / 2**20:.2f} GiB (bar: under 3 GB)")
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
