"""Teacher cache: bytes per token of every storage option, write throughput, and one
distillation step fed by the cache against the same step with the live teacher.

Teacher: all-MiniLM-L6-v2 (6 x 384; no MLM head, so the logit options are measured with a
random BERT-vocabulary MLM teacher of the same tokenizer: their size does not depend on the
weights). Corpus: paragraphs of CPython's pydoc topics. Student: 3 x 384 BERT, hidden-state MSE
to teacher layers 2, 4, 6 (TinyBERT's uniform map), AdamW.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from kdfast.bench import BenchOptions, Progress, Table, no_progress
from kdfast.bench.timing import Result, format_table
from kdfast.cache import CacheDataset, Prefetcher, TeacherCache, build_cache
from kdfast.defaults import minilm_teacher_dir, pydoc_paragraphs, write_corpus

SUITE = "cache"


def _mlm_teacher_like(minilm: Path, out: Path) -> Path:
    from transformers import AutoConfig, BertForMaskedLM

    cfg = AutoConfig.from_pretrained(minilm, local_files_only=True)
    cfg.num_hidden_layers = 1
    BertForMaskedLM(cfg).save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        if (minilm / name).exists():
            shutil.copy(minilm / name, out / name)
    return out


def run(device: torch.device, *, rows: int = 128, max_length: int = 128, batch_size: int = 16, steps: int = 6,
        repeat: int = 5, progress: Progress | None = None) -> list[Result]:
    del repeat  # steps play that role here
    say = progress or no_progress
    results: list[Result] = []
    teacher_dir = minilm_teacher_dir()
    with tempfile.TemporaryDirectory(prefix="kdfast-cache-bench-") as tmp:
        tmp = Path(tmp)
        corpus = write_corpus(tmp / "corpus.txt", pydoc_paragraphs()[:rows])
        mlm = _mlm_teacher_like(teacher_dir, tmp / "mlm-teacher")
        common = dict(max_length=max_length, batch_size=batch_size, rows_per_shard=4 * batch_size, progress=False)

        # bytes per token, per option (padding included: rows are stored at max_length)
        options = [("topk:8", mlm, dict(logits="topk:8", hidden="none")),
                   ("topk:32", mlm, dict(logits="topk:32", hidden="none")),
                   ("topk:128", mlm, dict(logits="topk:128", hidden="none")),
                   ("sampled:12", mlm, dict(logits="sampled:12", hidden="none")),
                   ("hidden fp16 x1 layer", teacher_dir, dict(logits="none", hidden="fp16", layers=[6])),
                   ("hidden int8 x1 layer", teacher_dir, dict(logits="none", hidden="int8", layers=[6])),
                   ("Q+K fp16 x6 layers", teacher_dir, dict(logits="none", hidden="none", qk=True))]
        for name, teacher, kw in options:
            say(f"{SUITE}: bytes/token: {name}")
            out = tmp / name.replace(" ", "_").replace(":", "-")
            t0 = time.perf_counter()
            build_cache(str(teacher), [str(corpus)], str(out), **kw, **common)
            dt = time.perf_counter() - t0
            info = TeacherCache(str(out)).info()
            fields = {k: v for k, v in info["bytes_per_token"].items()
                      if k not in ("input_ids", "attention_mask", "labels", "logit_offsets")}
            stored = sum(fields.values())
            inputs = info["bytes_per_token_total"] - stored
            r = Result(SUITE, "bytes/token", name, None, None, note=f"{stored:.1f} B/token (+{inputs:.1f} inputs)")
            if teacher == teacher_dir:
                r.extra = {"write": f"{info['tokens'] / dt:.0f} tok/s, {info['bytes'] / dt / 2**20:.1f} MiB/s"}
            results.append(r)

        # distillation step: live teacher vs cache (hidden states of layers 2, 4, 6 in fp16)
        cache_dir = tmp / "hidden-246"
        build_cache(str(teacher_dir), [str(corpus)], str(cache_dir), logits="none", hidden="fp16", layers=[2, 4, 6],
                    **common)
        say(f"{SUITE}: step b={batch_size} L={max_length}: live teacher, cached teacher")
        live_ms = _step_ms(teacher_dir, cache_dir, batch_size, steps, live=True)
        cached_ms = _step_ms(teacher_dir, cache_dir, batch_size, steps, live=False)
        case = f"step b={batch_size} L={max_length}"
        results.append(Result(SUITE, case, "live teacher", live_ms, None))
        results.append(Result(SUITE, case, "cached teacher", cached_ms, None,
                              note=f"{live_ms / cached_ms:.2f}x faster; teacher weights not loaded"))
    return results


def _student(settings: dict) -> torch.nn.Module:
    from transformers import BertConfig, BertModel

    t = settings["teacher"]
    cfg = BertConfig(vocab_size=t["vocab_size"], hidden_size=t["hidden_size"], num_hidden_layers=3,
                     num_attention_heads=t["num_attention_heads"], intermediate_size=4 * t["hidden_size"])
    torch.manual_seed(0)
    return BertModel(cfg, add_pooling_layer=False)


def _step_ms(teacher_dir: Path, cache_dir: Path, batch_size: int, steps: int, live: bool) -> float:
    cache = TeacherCache(str(cache_dir))
    student = _student(cache.settings).train()
    opt = torch.optim.AdamW(student.parameters(), lr=1e-4)
    teacher = None
    if live:  # only the live path ever loads the teacher's weights
        from transformers import AutoModel

        teacher = AutoModel.from_pretrained(teacher_dir, local_files_only=True).eval()
    layer_map = {1: 2, 2: 4, 3: 6}
    times = []
    batches = Prefetcher(CacheDataset(cache, batch_size, drop_last=True))
    it = iter(batches)
    for i in range(steps + 1):
        try:
            batch = next(it)
        except StopIteration:
            it = iter(batches)
            batch = next(it)
        t0 = time.perf_counter()
        ids, am = batch["input_ids"], batch["attention_mask"]
        if live:
            with torch.no_grad():
                th = teacher(input_ids=ids, attention_mask=am, output_hidden_states=True).hidden_states
            targets = {s: th[t] for s, t in layer_map.items()}
        else:
            targets = {s: batch[f"hidden_{t}"].float() for s, t in layer_map.items()}
        sh = student(input_ids=ids, attention_mask=am, output_hidden_states=True).hidden_states
        mask = am[..., None].float()
        loss = sum(F.mse_loss(sh[s] * mask, targets[s] * mask) for s in layer_map)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if i:  # the first step warms up
            times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return times[len(times) // 2]


def run_suite(opts: BenchOptions) -> Table:
    """``kdfast bench --suites cache``: :func:`run`, the cached step's ratios against the live teacher's."""
    results = run(opts.device, progress=opts.progress)
    return Table(results, format_table(results, baseline="live teacher"))
