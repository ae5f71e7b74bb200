"""`distilbert` recipe: training tokens/s with the live teacher against the teacher cache, in one process.

    python benchmarks/recipe_live_vs_cache.py [--shape tiny|minilm] [--steps 12] [--repeat 3]

Teacher: a random-weight BertForMaskedLM (``tiny``: 4 x 32, 65-token vocabulary; ``minilm``: the
6 x 384 all-MiniLM-L6-v2 shape with its 30522-token tokenizer and an MLM head), student: every
other teacher layer. The cache (top-32 logits at T=2 + the last hidden state) is built once,
outside the timing; runs alternate live / cache ``--repeat`` times and the median of the
per-step tokens/s of each is compared.
"""

from __future__ import annotations

import argparse
import random
import shutil
import statistics
import tempfile
from pathlib import Path

import torch


def make_teacher(shape: str, root: Path) -> Path:
    from transformers import AutoConfig, BertConfig, BertForMaskedLM, BertTokenizer

    out = root / "teacher"
    torch.manual_seed(0)
    if shape == "tiny":
        vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *[f"w{i}" for i in range(60)]]
        BertTokenizer(vocab={w: i for i, w in enumerate(vocab)}).save_pretrained(out)
        cfg = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                         intermediate_size=64, max_position_embeddings=64)
    else:
        from kdfast.defaults import minilm_teacher_dir

        src = minilm_teacher_dir()
        cfg = AutoConfig.from_pretrained(src, local_files_only=True)
        out.mkdir(parents=True)
        for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
            if (src / name).exists():
                shutil.copy(src / name, out / name)
    BertForMaskedLM(cfg).save_pretrained(out)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=["tiny", "minilm"], default="tiny")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=64)
    args = ap.parse_args()

    from kdfast.train.recipes import recipe_config, run_recipe

    root = Path(tempfile.mkdtemp(prefix="kdfast-recipe-bench-"))
    try:
        teacher = make_teacher(args.shape, root)
        if args.shape == "tiny":
            rng = random.Random(1)
            words = [f"w{i}" for i in range(60)]
            texts = [" ".join(rng.choices(words, [1 / (i + 1) for i in range(60)], k=rng.randint(20, 60)))
                     for _ in range(400)]
            corpus = root / "train.txt"
            corpus.write_text("\n".join(texts) + "\n")
            files = [str(corpus)]
        else:
            files = []  # the pydoc corpus
        rates: dict[str, list[float]] = {"live": [], "cache": []}
        for rep in range(args.repeat + 1):  # the first round builds the cache and warms up: not counted
            for source in ("live", "cache"):
                cfg = recipe_config("distilbert", None, [
                    f"teacher.source={source}", f"teacher.cache_dir={root / 'cache'}", "data.held_out_every=0",
                    f"data.max_length={args.max_length}", f"train.batch_size={args.batch_size}", "train.eval_every=0",
                    "train.log_every=1", "progress=false", "data.max_texts=400"],
                    {"teacher.dir": str(teacher), "data.files": files, "steps": args.steps,
                     "out_dir": str(root / f"run-{source}-{rep}")})
                report = run_recipe("distilbert", cfg)
                if rep:
                    rates[source].append(report["stages"][0]["tokens_per_s"])
        live, cache = statistics.median(rates["live"]), statistics.median(rates["cache"])
        print(f"distilbert recipe, {args.shape} teacher, batch {args.batch_size} x {args.max_length}, "
              f"{args.steps} steps, {torch.get_num_threads()} threads; median per-step tokens/s over {args.repeat} runs")
        print(f"  live teacher  {live:10.0f}   runs {[round(r) for r in rates['live']]}")
        print(f"  teacher cache {cache:10.0f}   runs {[round(r) for r in rates['cache']]}")
        print(f"  cache / live  {cache / live:10.2f}x")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
