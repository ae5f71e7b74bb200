"""Optimizer step: kdfast's LAMB against torch's AdamW (its default, foreach, implementation, and
its per-tensor loop) on the parameters of BERT-base with MLM head (110M), in the Distiller's
decay / no-decay groups."""

from __future__ import annotations

import torch
from transformers import BertConfig, BertForMaskedLM

from kdfast.bench import BenchOptions, Progress, Table
from kdfast.bench.timing import Entry, Result, format_table, measure_all
from kdfast.train.optim import Lamb

SUITE = "optim"


def _bert_base_params(device: torch.device) -> list[torch.nn.Parameter]:
    """Fresh copies of BERT-base's parameters (tied ones once), each with a random gradient."""
    shapes = [p.shape for p in BertForMaskedLM(BertConfig()).parameters()]
    params = [torch.nn.Parameter(torch.randn(s, device=device) * 0.02) for s in shapes]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    return params


def _groups(params: list[torch.nn.Parameter]) -> list[dict]:
    return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.01},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]


def run(device: torch.device, *, repeat: int = 5, progress: Progress | None = None) -> list[Result]:
    """Median ``step()`` time and peak memory of AdamW (the default is "eager") and Lamb, in one process."""
    torch.manual_seed(0)
    optimizers = {"eager": lambda ps: torch.optim.AdamW(_groups(ps), lr=1e-4),
                  "AdamW foreach=False": lambda ps: torch.optim.AdamW(_groups(ps), lr=1e-4, foreach=False),
                  "kdfast Lamb": lambda ps: Lamb(_groups(ps), lr=1e-4)}
    entries = []
    for name, make in optimizers.items():
        params = _bert_base_params(device)
        n = sum(p.numel() for p in params)
        entries.append(Entry(SUITE, f"step, {n / 1e6:.0f}M params fp32", name, make(params).step))
    results = measure_all(entries, device, repeat=repeat, progress=progress)
    results[0].note = "torch.optim.AdamW"
    return results


def run_suite(opts: BenchOptions) -> Table:
    """``kdfast bench --suites optim``: :func:`run`, ratios against AdamW's default implementation."""
    results = run(opts.device, repeat=opts.repeat, progress=opts.progress)
    return Table(results, format_table(results))
