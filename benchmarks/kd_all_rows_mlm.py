"""KD on every row plus MLM on the labelled rows costs about one KD pass (N = 1024, V = 30522, T = 2,
fp32, forward + backward, 15% of the rows labelled), in one process, the calls alternated:

    python benchmarks/kd_all_rows_mlm.py [--backend auto|cpu|torch|cuda|triton] [--reps 9]

- ``kd only``: ``kd_loss(kd_rows="all")`` without labels;
- ``kd + mlm, one pass``: ``kd_loss(kd_rows="all", labels=..., alpha_mlm=2.0)``: the kernel weights
  the MLM term per row (its ``mlm_weight``);
- ``kd + mlm, two passes``: what that call did before, the kernel run once for the MLM rows and once
  for the KD rows, gradients summed (for reference).
Prints best-of and median milliseconds of each and their ratios to ``kd only``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import kdfast
from kdfast.losses._checks import row_weights
from kdfast.ops import logit_kd, registry


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--n", type=int, default=1024)
    ap.add_argument("--vocab", type=int, default=30522)
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    N, V, T = args.n, args.vocab, 2.0
    s = torch.randn(N, V, device=device, requires_grad=True)
    t = torch.randn(N, V, device=device)
    labels = torch.full((N,), -100, dtype=torch.long, device=device)
    picked = torch.randperm(N, device=device)[: int(0.15 * N)]
    labels[picked] = torch.randint(0, V, (picked.numel(),), device=device)
    impl = registry.select(logit_kd.OP, args.backend, device=device, dtype=torch.float32, cols=V, what="bench")
    name, kernel = impl.backend, impl.fn

    def kd_only():
        s.grad = None
        kdfast.kd_loss(s, t, temperature=T, alpha_kd=5.0, backend=name).backward()

    def one_pass():
        s.grad = None
        kdfast.kd_loss(s, t, temperature=T, labels=labels, alpha_kd=5.0, alpha_mlm=2.0, kd_rows="all",
                       backend=name).backward()

    kd_w = row_weights(torch.ones(N, dtype=torch.bool, device=device), "batchmean", torch.float32)
    mlm_w = row_weights(labels != -100, "batchmean", torch.float32)

    def two_passes():
        grad, g_mlm = torch.empty(N, V, device=device), torch.empty(N, V, device=device)
        rows = kernel(s.detach(), t, labels, mlm_w, g_mlm, T, 0.0, 2.0, False)
        rows = rows + kernel(s.detach(), t, labels, kd_w, grad, T, 5.0, 0.0, False)
        grad.add_(g_mlm)
        return rows.sum()

    runs = {"kd only": kd_only, "kd + mlm, one pass": one_pass, "kd + mlm, two passes": two_passes}
    times: dict[str, list[float]] = {k: [] for k in runs}
    for fn in runs.values():  # warm-up
        fn()
    for _ in range(args.reps):
        for k, fn in runs.items():  # alternated
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[k].append((time.perf_counter() - t0) * 1e3)
    base_best, base_med = min(times["kd only"]), statistics.median(times["kd only"])
    print(f"kd_rows kernel: {name} on {device}; N={N} V={V} T={T} fp32, fwd+bwd, {args.reps} alternated reps")
    print(f"{'call':<24} {'best ms':>9} {'median ms':>10} {'x kd best':>10} {'x kd median':>12}")
    for k, v in times.items():
        best, med = min(v), statistics.median(v)
        print(f"{k:<24} {best:9.1f} {med:10.1f} {best / base_best:10.3f} {med / base_med:12.3f}")


if __name__ == "__main__":
    main()
