"""Fused linear KD (LM head + logit KD, forward + backward) against eager PyTorch, at BERT shapes.

A BERT MLM batch: B x L tokens, 15% of them masked (the only rows DistilBERT's KD counts with
``restrict_ce_to_mask``), teacher hidden 768, student hidden 768 (DistilBERT) or 312 (TinyBERT-4),
V = 30522, temperature 2. One step = student head forward + teacher head forward (no grad) + loss
+ backward to the student's hidden states, decoder weight and bias.

- ``eager``: what people write: full logits for every token through both heads, then the masked
  rows selected, log_softmax, kl_div(batchmean) * T^2;
- ``eager gathered``: the same on the masked rows gathered first (the obvious improvement);
- ``kdfast-<backend>``: :func:`kdfast.fused_linear_kd_loss` with its default chunk size;
- ``kdfast-<backend> liger-chunks``: the same with Liger-Kernel's chunk heuristic
  (``next_power_of_2(cdiv(rows, cdiv(V, H)))`` rows per chunk), to show what the budgeted
  chunk size buys;
- ``torch.compile`` (with ``compile_baseline``): the eager step compiled;
- with ``peers`` on a GPU where Liger-Kernel imports: ``liger fused-linear JSD(beta=0)``
  (``LigerFusedLinearJSD``, forward KL, no bias) and ``liger chunked JSD loss(beta=0)``
  (``liger_kernel.chunked_loss.LigerFusedLinearJSDLoss``, soft loss only, with the biases), both on
  the masked rows gathered first (their best case), at the same temperature.

``dtype`` sets the hidden states' and both heads' dtype (bf16 on a GPU: the case the fused loss's
fp32-output GEMMs are for).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

import kdfast
from kdfast.bench import BenchOptions, Progress, Table
from kdfast.bench.timing import Entry, Result, format_table, measure_all

SUITE = "flkd"
VOCAB = 30522
TEACHER_HIDDEN = 768
STUDENT_HIDDENS = (768, 312)


def liger_chunk_size(rows: int, vocab: int, hidden: int) -> int:
    """Liger-Kernel's fused-linear chunking: about cdiv(V, H) chunks, a power of two rows each."""
    chunks = math.ceil(vocab / hidden)
    return 1 << max(0, math.ceil(math.log2(max(1, math.ceil(rows / chunks)))))


def eager_step(h_s, w_s, b_s, h_t, w_t, b_t, labels, T, gather_first):
    sel = labels.reshape(-1) != -100
    hs, ht = h_s.reshape(-1, h_s.shape[-1]), h_t.reshape(-1, h_t.shape[-1])
    if gather_first:
        hs, ht = hs[sel], ht[sel]
    s = F.linear(hs, w_s, b_s)
    with torch.no_grad():
        t = F.linear(ht, w_t, b_t)
    if not gather_first:
        s, t = s[sel], t[sel]
    return F.kl_div(F.log_softmax(s / T, -1), F.log_softmax(t / T, -1), reduction="batchmean",
                    log_target=True) * T**2


def _step(loss_fn, h_s, w_s, b_s):
    def step():
        h, w, b = (x.detach().requires_grad_() for x in (h_s, w_s, b_s))
        loss_fn(h, w, b).backward()
        return h.grad, w.grad, b.grad
    return step


def _liger_peers(T: float):
    """(name, fn(h_s, w_s, b_s, h_t, w_t, b_t, labels) on gathered rows) of Liger-Kernel, or the reason why none."""
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss
        from liger_kernel.transformers import LigerFusedLinearJSD
    except Exception as e:  # not installed, or not importable with this torch / triton
        return [], f"liger-kernel not importable ({type(e).__name__}: {str(e)[:60]})"
    jsd = LigerFusedLinearJSD(jsd_beta=0.0, temperature=T)
    chunked = LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=0.0, temperature=T)
    return [("liger fused-linear JSD(beta=0)", lambda hs, ws, bs, ht, wt, bt, lab: jsd(hs, ws, ht, wt, lab)),
            ("liger chunked JSD loss(beta=0)",
             lambda hs, ws, bs, ht, wt, bt, lab: chunked(hs, ws, ht, wt, lab, bs, bt))], ""


def entries(device: torch.device, tokens: tuple[int, int], d_s: int, temperature: float = 2.0,
            mask_frac: float = 0.15, seed: int = 0, vocab: int = VOCAB, dtype: torch.dtype = torch.float32,
            compile_baseline: bool = False, peers: bool = False) -> list[Entry]:
    g = torch.Generator(device="cpu").manual_seed(seed)
    B, L = tokens
    n = B * L
    h_s = torch.randn(B, L, d_s, generator=g).to(device, dtype)
    w_s = (torch.randn(vocab, d_s, generator=g) * 0.05).to(device, dtype)
    b_s = (torch.randn(vocab, generator=g) * 0.1).to(device, dtype)
    h_t = torch.randn(B, L, TEACHER_HIDDEN, generator=g).to(device, dtype)
    w_t = (torch.randn(vocab, TEACHER_HIDDEN, generator=g) * 0.05).to(device, dtype)
    b_t = (torch.randn(vocab, generator=g) * 0.1).to(device, dtype)
    labels = torch.full((n,), -100, dtype=torch.int64)
    masked = torch.randperm(n, generator=g)[: round(mask_frac * n)]
    labels[masked] = torch.randint(0, vocab, (masked.numel(),), generator=g)
    labels = labels.reshape(B, L).to(device)
    rows = masked.numel()
    T = temperature
    case = f"{B}x{L} tok ({rows} masked) d_s={d_s} {str(dtype).replace('torch.', '')}"
    out = [
        Entry(SUITE, case, "eager", _step(lambda h, w, b: eager_step(h, w, b, h_t, w_t, b_t, labels, T, False),
                                          h_s, w_s, b_s)),
        Entry(SUITE, case, "eager gathered", _step(
            lambda h, w, b: eager_step(h, w, b, h_t, w_t, b_t, labels, T, True), h_s, w_s, b_s)),
    ]
    if compile_baseline:
        compiled = torch.compile(eager_step, dynamic=False)
        out.append(Entry(SUITE, case, "torch.compile", _step(
            lambda h, w, b: compiled(h, w, b, h_t, w_t, b_t, labels, T, False), h_s, w_s, b_s)))
    if peers and device.type == "cuda":
        sel = (labels.reshape(-1) != -100).nonzero().squeeze(1)
        ht_g, lab_g = h_t.reshape(n, -1)[sel], labels.reshape(-1)[sel]
        fns, why = _liger_peers(T)
        for name, fn in fns:
            out.append(Entry(SUITE, case, name, _step(
                lambda h, w, b, fn=fn: fn(h.reshape(n, -1)[sel], w, b, ht_g, w_t, b_t, lab_g), h_s, w_s, b_s)))
        if why:
            out.append(Entry(SUITE, case, "liger", _unavailable(why)))
    status = kdfast.backends()
    ours = [b for b in ("triton", "cuda") if device.type == "cuda" and status[b].available]
    ours += ["cpu"] if device.type == "cpu" and status["cpu"].available else []
    ours = ours or ["torch"]
    liger = liger_chunk_size(rows, vocab, d_s)
    for be in ours:
        out.append(Entry(SUITE, case, f"kdfast-{be}", _step(
            lambda h, w, b, be=be: kdfast.fused_linear_kd_loss(h, w, h_t, w_t, student_bias=b, teacher_bias=b_t,
                                                               labels=labels, kd_rows="masked", temperature=T, backend=be),
            h_s, w_s, b_s)))
    be = ours[0]
    out.append(Entry(SUITE, case, f"kdfast-{be} liger-chunks({liger})", _step(
        lambda h, w, b: kdfast.fused_linear_kd_loss(h, w, h_t, w_t, student_bias=b, teacher_bias=b_t, labels=labels,
                                                    temperature=T, backend=be, chunk_size=liger, kd_rows="masked"),
        h_s, w_s, b_s)))
    return out


def _unavailable(why: str):
    def step():
        raise RuntimeError(why)
    return step


def run(device: torch.device, tokens: tuple[int, int] | None = None, *, student_hiddens=STUDENT_HIDDENS,
        repeat: int = 3, warmup: int = 1, vocab: int = VOCAB, progress: Progress | None = None) -> list[Result]:
    """Time and peak memory per student width. ``tokens`` = (batch, length); default 32 x 128 on a
    GPU and 8 x 128 on a CPU (eager's full-vocabulary GEMMs over 4096 tokens take ~10 s a step on
    a 2-core CPU)."""
    if tokens is None:
        tokens = (32, 128) if device.type == "cuda" else (8, 128)
    results: list[Result] = []
    for d_s in student_hiddens:
        ents = entries(device, tokens, d_s, vocab=vocab)
        results += measure_all(ents, device, repeat=repeat, warmup=warmup, progress=progress)
        del ents
    return results


def run_suite(opts: BenchOptions) -> Table:
    """``kdfast bench --suites fused_linear_kd``: :func:`run` at ``opts.tokens`` (batch x length)."""
    results = run(opts.device, opts.tokens, repeat=opts.repeat, progress=opts.progress)
    return Table(results, format_table(results))
