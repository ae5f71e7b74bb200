"""DistillationLoss: one call per loss family against one call per mapped layer, same process.

    python benchmarks/distillation_one_call.py [--repeat 5] [--threads N]

Forward + backward at TinyBERT-4 shapes against BERT-base (student 312 wide, 12 heads of 26;
teacher 768, 12 heads of 64), B=8, L=128, 4 mapped layers (one padded sequence in two):
- hidden MSE through the four 312 -> 768 projections;
- attention KL / MSE from pre-scaled Q and K (flash form);
- attention KL on materialised score maps [B, 12, L, L].
"per-layer" is ``DistillationLoss(stack_layers=False)`` (the default: one functional call per layer,
summed), "one call" is ``stack_layers=True`` (one call per family over all layers).
The two are timed alternately (the shared CI machine's load moves between runs, so consecutive
repeats of one then the other would compare different loads); best-of and median both printed.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import kdfast
from kdfast.bench.timing import peak_memory_bytes


def make_outputs(B, L, n, n_t, d_s, d_t, H, dh_s, dh_t):
    """Dict outputs of an n-layer student and an n_t-layer teacher (pre-scaled Q, K and score maps)."""
    g = torch.Generator().manual_seed(0)
    mask = torch.ones(B, L, dtype=torch.bool)
    mask[B // 2:, L - L // 4:] = False

    def r(*shape):
        return torch.randn(*shape, generator=g)

    s = {"hidden_states": [r(B, L, d_s) for _ in range(n + 1)], "q": [r(B, H, L, dh_s) * dh_s**-0.5 for _ in range(n)],
         "k": [r(B, H, L, dh_s) for _ in range(n)]}
    t = {"hidden_states": [r(B, L, d_t) for _ in range(n_t + 1)],
         "q": [r(B, H, L, dh_t) * dh_t**-0.5 for _ in range(n_t)], "k": [r(B, H, L, dh_t) for _ in range(n_t)]}
    for o in (s, t):
        o["scores"] = [(q @ k.transpose(-1, -2)).masked_fill(~mask[:, None, None, :], -1e4) for q, k in zip(o["q"], o["k"])]
    return s, t, mask


def student_leaves(s, keys):
    return {k: [x.detach().requires_grad_() for x in s[k]] for k in keys}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    B, L, n, d_s, d_t, H = 8, 128, 4, 312, 768, 12
    s, t, mask = make_outputs(B, L, n, 3 * n, d_s, d_t, H, 26, 64)
    layer_map = {m: 3 * m for m in range(n + 1)}  # TinyBERT's uniform map: 5 hidden pairs, 4 attention layers
    entries = []  # (case, per-layer fn, one-call fn)

    cases = [(f"hidden {d_s}->{d_t} x{n + 1} B={B} L={L}", dict(weights={"hidden": 1.0}, student_hidden_size=d_s,
                                                                  teacher_hidden_size=d_t), ("hidden_states",))]
    cases += [(f"attention {loss} {source} x{n} H={H} L={L}",
               dict(weights={"attention": 1.0}, attention=loss, attention_source=source),
               ("q", "k") if source == "qk" else ("scores",))
              for loss, source in (("kl", "qk"), ("mse", "qk"), ("kl", "scores"))]
    for case, kw, keys in cases:
        per_layer = kdfast.DistillationLoss(layer_map, stack_layers=False, **kw)
        one_call = kdfast.DistillationLoss(layer_map, stack_layers=True, **kw)
        one_call.load_state_dict(per_layer.state_dict())  # the same projections

        def step(dl=None, keys=keys):
            out = {**s, **student_leaves(s, keys)}
            dl(out, t, mask)[0].backward()
        entries.append((case, lambda dl=per_layer, f=step: f(dl), lambda dl=one_call, f=step: f(dl)))

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, forward + backward, {args.repeat} "
          f"alternating repeats; ratio = per-layer / one call (> 1: one call faster)")
    print(f"{'case':<34} {'per-layer ms':>22} {'one call ms':>22} {'ratio':>14} {'peak MB':>16}")
    print(f"{'':<34} {'best / median':>22} {'best / median':>22} {'best / median':>14} {'per-layer / one':>16}")
    for case, a, b in entries:
        times = ([], [])
        for fn in (a, b):  # warm-up
            fn()
        for _ in range(args.repeat):
            for fn, ts in zip((a, b), times):
                t0 = time.perf_counter()
                fn()
                ts.append((time.perf_counter() - t0) * 1e3)
        best = [min(ts) for ts in times]
        med = [statistics.median(ts) for ts in times]
        mem = [peak_memory_bytes(fn, torch.device("cpu")) / 2**20 for fn in (a, b)]
        print(f"{case:<34} {best[0]:>10.1f} / {med[0]:>9.1f} {best[1]:>10.1f} / {med[1]:>9.1f} "
              f"{best[0] / best[1]:>6.2f} / {med[0] / med[1]:>5.2f} {mem[0]:>7.1f} / {mem[1]:>6.1f}")


if __name__ == "__main__":
    main()
