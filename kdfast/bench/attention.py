"""Layer transfer, forward + backward, at BERT-base shapes.

- attention: the materialised eager loss (what people write: scores = q k^T / sqrt(dh) + mask,
  log_softmax, KL) against kdfast's KL on materialised maps and its flash transfer from Q and K
  (no L x L map);
- hidden states: TinyBERT's MSE through a learned projection (student 312 -> teacher 768), eager
  ``F.mse_loss(F.linear(h_s, W, b), h_t)`` against kdfast's fused ``hidden_mse_loss``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

import kdfast
from kdfast.benchmarking import Entry, Result, measure_all

SUITE = "attention"


def eager_scores(q, k, key_mask):
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    return s.masked_fill(~key_mask[:, None, None, :], -10000.0)


def eager_kl(q_s, k_s, q_t, k_t, key_mask):
    """KL(softmax(teacher scores) || softmax(student scores)) per real query row, mean over rows."""
    log_s = F.log_softmax(eager_scores(q_s, k_s, key_mask), -1)
    with torch.no_grad():
        log_t = F.log_softmax(eager_scores(q_t, k_t, key_mask), -1)
    rows = (log_t.exp() * (log_t - log_s)).sum(-1)  # [B, H, L]
    m = key_mask[:, None, :].expand_as(rows)
    return rows[m].mean()


def _inputs(B, H, L, dh_s, dh_t, device):
    g = torch.Generator(device="cpu").manual_seed(0)
    q_s, k_s = (torch.randn(B, H, L, dh_s, generator=g).to(device) for _ in range(2))
    q_t, k_t = (torch.randn(B, H, L, dh_t, generator=g).to(device) for _ in range(2))
    key_mask = torch.ones(B, L, dtype=torch.bool, device=device)
    key_mask[B // 2:, L - L // 4:] = False  # padding in half the batch
    return q_s, k_s, q_t, k_t, key_mask


def run(device: torch.device, *, lengths=(128, 512), B: int = 32, H: int = 12, dh: int = 64,
        repeat: int = 3) -> list[Result]:
    results: list[Result] = []
    for L in lengths:
        q_s, k_s, q_t, k_t, key_mask = _inputs(B, H, L, dh, dh, device)
        case = f"KL B={B} H={H} L={L} dh={dh}"

        def step(fn):
            def go():
                qs, ks = q_s.detach().requires_grad_(), k_s.detach().requires_grad_()
                fn(qs, ks).backward()
                return qs.grad, ks.grad
            return go

        entries = [
            Entry(SUITE, case, "eager", step(lambda qs, ks: eager_kl(qs, ks, q_t, k_t, key_mask))),
            Entry(SUITE, case, "kdfast maps", step(lambda qs, ks: kdfast.attention_kl_loss(
                eager_scores(qs, ks, key_mask), eager_scores(q_t, k_t, key_mask).detach(), mask=key_mask))),
            Entry(SUITE, case, "kdfast flash", step(lambda qs, ks: kdfast.flash_attention_transfer(
                qs, ks, q_t, k_t, key_mask=key_mask, loss="kl"))),
        ]
        results += measure_all(entries, device, repeat=repeat, warmup=1)
        del q_s, k_s, q_t, k_t
    results += run_hidden(device, tokens=B * 128, repeat=repeat)
    return results


def run_hidden(device: torch.device, *, tokens: int = 4096, d_s: int = 312, d_t: int = 768,
               repeat: int = 3) -> list[Result]:
    g = torch.Generator(device="cpu").manual_seed(0)
    h_s = torch.randn(tokens, d_s, generator=g).to(device)
    h_t = torch.randn(tokens, d_t, generator=g).to(device)
    w = (torch.randn(d_t, d_s, generator=g) / d_s**0.5).to(device)
    b = torch.zeros(d_t, device=device)
    case = f"hidden MSE N={tokens} {d_s}->{d_t}"

    def step(fn):
        def go():
            hs, ww, bb = (x.detach().requires_grad_() for x in (h_s, w, b))
            fn(hs, ww, bb).backward()
            return hs.grad, ww.grad, bb.grad
        return go

    return measure_all([
        Entry(SUITE, case, "eager", step(lambda hs, ww, bb: F.mse_loss(F.linear(hs, ww, bb), h_t))),
        Entry(SUITE, case, "kdfast fused", step(lambda hs, ww, bb: kdfast.hidden_mse_loss(hs, h_t, ww, bb))),
    ], device, repeat=repeat, warmup=1)
