"""Student models: inference latency (batch 1, seq 128) of BERT-base, the DistilBERT and
TinyBERT-4 students and MobileBERT (kdfast's implementation and transformers' own), as
speed-ups over BERT-base next to the papers' claims; and MobileBERT forward + backward at
batch 8, seq 128: transformers, kdfast eager and kdfast with its fused kernels
(:func:`kdfast.models.fused.enable_fused_kernels`), with outputs and gradients compared."""

from __future__ import annotations

import torch
from transformers import BertConfig, BertModel, MobileBertModel

from kdfast.bench import BenchOptions, Progress, Table
from kdfast.bench.timing import Entry, Result, format_table, measure_all, time_ms
from kdfast.models import KDMobileBert, distilbert_from_teacher, mobilebert_config, tinybert_config
from kdfast.models.fused import disable_fused_kernels, enable_fused_kernels

SUITE = "models"
# Seed slides: speed-up over BERT-base at inference.
CLAIMS = {"DistilBERT": "1.6x", "TinyBERT-4": "9.4x", "MobileBERT (transformers)": "5.5x",
          "MobileBERT (kdfast)": "5.5x"}


def _inputs(batch: int, seq: int, vocab: int, device: torch.device):
    ids = torch.randint(0, vocab, (batch, seq), device=device)
    mask = torch.ones(batch, seq, dtype=torch.long, device=device)
    mask[batch // 2:, seq - seq // 4:] = 0  # padding in half the batch
    return ids, mask


def run(device: torch.device, *, repeat: int = 5, seq: int = 128, progress: Progress | None = None) -> list[Result]:
    torch.manual_seed(0)
    bert = BertModel(BertConfig(), add_pooling_layer=False).to(device).eval()
    models = {
        "BERT-base": bert,
        "DistilBERT": getattr(student := distilbert_from_teacher(bert), "bert", student).to(device).eval(),
        "TinyBERT-4": BertModel(tinybert_config("tinybert-4"), add_pooling_layer=False).to(device).eval(),
    }
    mb_hf = MobileBertModel(mobilebert_config("mobilebert"), add_pooling_layer=False).to(device).eval()
    mb_kd = KDMobileBert(mobilebert_config("mobilebert"), add_pooling_layer=False).to(device).eval()
    mb_kd.load_state_dict(mb_hf.state_dict())
    models["MobileBERT (transformers)"] = mb_hf
    models["MobileBERT (kdfast)"] = mb_kd

    ids, mask = _inputs(1, seq, 30522, device)
    case = f"latency b=1 L={seq}"

    def infer(m):
        def step():
            with torch.inference_mode():
                out = m(input_ids=ids, attention_mask=mask)
            return out[0] if isinstance(out, tuple) else out.last_hidden_state
        return step

    entries = [Entry(SUITE, case, name, infer(m)) for name, m in models.items()]
    results = measure_all(entries, device, repeat=repeat, progress=progress)
    base = results[0].ms
    for r in results:
        if r.ms and r.impl in CLAIMS:
            r.extra = {"vs_BERT-base": f"{base / r.ms:.1f}x", "paper": CLAIMS[r.impl]}

    # Training step of the MobileBERT student: same weights, same inputs, outputs and gradients compared.
    ids8, mask8 = _inputs(8, seq, 30522, device)
    mb_hf.train(False)
    mb_kd.train(False)  # dropout off so the two are comparable

    def train_step(m, fused: bool = False):
        def step():
            if fused:
                enable_fused_kernels()
            try:
                m.zero_grad(set_to_none=True)
                out = m(input_ids=ids8, attention_mask=mask8)
                hidden = out[0] if isinstance(out, tuple) else out.last_hidden_state
                hidden.float().pow(2).mean().backward()
            finally:
                if fused:
                    disable_fused_kernels()
            return hidden
        return step

    steps = {"MobileBERT (transformers)": train_step(mb_hf), "MobileBERT (kdfast)": train_step(mb_kd),
             "MobileBERT (kdfast fused)": train_step(mb_kd, fused=True)}
    ref = steps["MobileBERT (transformers)"]().detach()
    ref_grads = {n: p.grad.clone() for n, p in mb_hf.named_parameters() if p.grad is not None}
    diffs = {}
    for name in ("MobileBERT (kdfast)", "MobileBERT (kdfast fused)"):
        out = steps[name]().detach()
        grads = dict(mb_kd.named_parameters())
        # largest gradient difference over all parameters, relative to the largest gradient (per-parameter
        # ratios are meaningless where the exact gradient is 0, e.g. the key bias: rounding noise of ~1e-17)
        g_diff = max((grads[n].grad - g).abs().max().item() for n, g in ref_grads.items())
        g_scale = max(g.abs().max().item() for g in ref_grads.values())
        diffs[name] = {"max_abs_diff_vs_transformers": f"{(out - ref).abs().max().item():.1e}",
                       "max_grad_diff/max_grad": f"{g_diff / g_scale:.1e}"}

    case8 = f"fwd+bwd b=8 L={seq}"
    train = measure_all([Entry(SUITE, case8, name, fn) for name, fn in steps.items()], device, repeat=repeat,
                        progress=progress)
    if progress is not None:
        progress(f"{SUITE}: {case8}: {repeat} interleaved rounds")
    # The CPU here is shared: also time the three interleaved, round-robin, and compare the fastest rounds.
    best = dict.fromkeys(steps, float("inf"))
    for _ in range(repeat):
        for name, fn in steps.items():
            best[name] = min(best[name], time_ms(fn, device, warmup=0, repeat=1))
    for r in train:
        r.extra = {**diffs.get(r.impl, {}),
                   "interleaved_best_ms": f"{best[r.impl]:.0f}",
                   "interleaved_speedup": f"{best['MobileBERT (transformers)'] / best[r.impl]:.2f}x"}
    return results + train


def run_suite(opts: BenchOptions) -> Table:
    """``kdfast bench --suites models``: :func:`run`, ratios against transformers' MobileBERT."""
    results = run(opts.device, repeat=opts.repeat, progress=opts.progress)
    return Table(results, format_table(results, baseline="MobileBERT (transformers)"))
