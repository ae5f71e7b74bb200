"""Packed against padded pretraining rows on the embedded corpus, in one process.

    python benchmarks/packing.py [--max-length 128] [--cache-texts 300] [--steps 6] [--repeat 2]

Corpus: the demo's prose paragraphs of CPython's documentation (``pydoc_data``); tokenizer and
teacher: the embedded all-MiniLM-L6-v2. Prints, padded (one truncated row per paragraph, what
``data.packing: false`` gives) against packed (:func:`kdfast.data.pack_texts`):

1. real tokens per row over the whole corpus;
2. teacher-cache bytes per real token: two caches of the first ``--cache-texts`` paragraphs
   (hidden states of layers 3 and 6 in fp16, no logits), shard bytes on disk / real tokens;
3. step time per real token of the ``tinybert`` recipe (live teacher, a 2-layer 128-wide
   student): runs alternate padded / packed ``--repeat`` times after one warm-up round each, and
   the medians of the per-step real tokens/s are compared.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import tempfile
from pathlib import Path

import torch


def cache_bytes_per_token(teacher: Path, corpus: Path, out: Path, max_length: int, packing: bool) -> tuple:
    from kdfast.cache import build_cache

    m = build_cache(str(teacher), [str(corpus)], str(out), layers=[3, 6], logits="none", hidden="fp16",
                    max_length=max_length, batch_size=16, rows_per_shard=64, progress=False, packing=packing)
    size = sum((out / s.file).stat().st_size for s in m.shards)
    return m.rows, m.tokens, size


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--cache-texts", type=int, default=300)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=8)
    args = ap.parse_args()

    from transformers import AutoTokenizer

    from kdfast.data import pack_texts
    from kdfast.defaults import minilm_teacher_dir, pydoc_paragraphs, write_corpus
    from kdfast.train.recipes import recipe_config, run_recipe
    from kdfast.train.recipes.common import tokenize

    L = args.max_length
    teacher = minilm_teacher_dir()
    tok = AutoTokenizer.from_pretrained(teacher, local_files_only=True)
    texts = [t.replace("\n", " ") for t in pydoc_paragraphs()]
    print(f"packed vs padded rows, max_length {L}; {platform.machine()}, {os.cpu_count()} cpus, "
          f"{torch.get_num_threads()} threads, load average at start {os.getloadavg()[0]:.1f} "
          f"(the 2 cores are shared with other jobs: timings are noisy)")

    pids, pam = tokenize(tok, texts, L)
    kids, kam = pack_texts(tok, texts, L)
    corpus_tokens = sum(len(d) for d in tok(texts, add_special_tokens=False, verbose=False)["input_ids"])
    pad_real, pack_real = int(pam.sum()), int(kam.sum())
    print(f"\n1. corpus: {len(texts)} paragraphs, {corpus_tokens} word-piece tokens")
    print(f"   padded: {pids.shape[0]:6d} rows, {pad_real / pids.shape[0]:6.1f} real tokens/row "
          f"({pad_real / pam.numel():.1%} of positions), {pam.numel() - pad_real} padding positions, "
          f"{corpus_tokens + 2 * len(texts) - pad_real} tokens cut by truncation")
    print(f"   packed: {kids.shape[0]:6d} rows, {pack_real / kids.shape[0]:6.1f} real tokens/row "
          f"({pack_real / kam.numel():.1%} of positions), {kam.numel() - pack_real} padding positions")
    print(f"   real tokens per row, packed / padded: {pack_real / kids.shape[0] / (pad_real / pids.shape[0]):.2f}x")

    root = Path(tempfile.mkdtemp(prefix="kdfast-packing-bench-"))
    try:
        corpus = write_corpus(root / "corpus.txt", texts[:args.cache_texts])
        per_token = {}
        print(f"\n2. teacher cache of the first {args.cache_texts} paragraphs (hidden 3 and 6, fp16, no logits)")
        for packing in (False, True):
            rows, tokens, size = cache_bytes_per_token(teacher, corpus, root / f"cache-{packing}", L, packing)
            per_token[packing] = size / tokens
            print(f"   {'packed' if packing else 'padded'}: {rows:5d} rows, {tokens:7d} real tokens, "
                  f"{size / 2**20:7.2f} MiB, {size / tokens:8.1f} bytes/real token")
        print(f"   bytes per real token, padded / packed: {per_token[False] / per_token[True]:.2f}x")

        rates: dict[bool, list[float]] = {False: [], True: []}
        for rep in range(args.repeat + 1):  # round 0 warms up: not counted
            for packing in (False, True):
                cfg = recipe_config("tinybert", None, [
                    f"data.packing={str(packing).lower()}", "data.held_out_every=0", f"data.max_length={L}",
                    f"data.max_texts={args.cache_texts}", f"train.batch_size={args.batch_size}",
                    "train.eval_every=0", "train.log_every=1", "progress=false", "student.hidden_size=128",
                    "student.intermediate_size=256", "student.num_attention_heads=4",
                    "student.num_hidden_layers=2"],
                    {"steps": args.steps, "out_dir": str(root / f"run-{packing}-{rep}")})
                report = run_recipe("tinybert", cfg)
                if rep:
                    rates[packing].append(report["stages"][0]["tokens_per_s"])
        pad, pack = statistics.median(rates[False]), statistics.median(rates[True])
        print(f"\n3. tinybert recipe step (live MiniLM teacher, 2 x 128 student), batch {args.batch_size} x {L}, "
              f"{args.steps} steps; median per-step real tokens/s over {args.repeat} alternated runs")
        print(f"   padded: {pad:8.0f} real tokens/s = {1e6 / pad:7.1f} us/real token   "
              f"runs {[round(r) for r in rates[False]]}")
        print(f"   packed: {pack:8.0f} real tokens/s = {1e6 / pack:7.1f} us/real token   "
              f"runs {[round(r) for r in rates[True]]}")
        print(f"   step time per real token, padded / packed: {pack / pad:.2f}x")
        print(f"\nload average at end {os.getloadavg()[0]:.1f}")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
