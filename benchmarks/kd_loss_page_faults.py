"""Where the CPU time of ``kd_loss`` goes at N=1024, V=30522 (fp32, T=2, fwd+bwd), in one process:

    python benchmarks/kd_loss_page_faults.py
    THP_MEM_ALLOC_ENABLE=1 python benchmarks/kd_loss_page_faults.py   # PyTorch's huge-page switch

- ``kernel, preallocated grad``: the C++ op alone, writing into one gradient buffer reused every call;
- ``kd_loss``: the public function, which allocates a fresh N x V gradient each call (glibc maps
  such a block with fresh pages, so every call pays the page faults of filling it);
- ``eager``: KLDivLoss on log-softmaxes, the baseline of ``kdfast bench``.
Median of 7 timed calls after 2 warm-up calls each; ratios are eager / the row.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

import kdfast
from kdfast.bench.timing import time_ms


def main() -> None:
    torch.manual_seed(0)
    N, V, T = 1024, 30522, 2.0
    s = torch.randn(N, V, requires_grad=True)
    t = torch.randn(N, V)
    labels = torch.full((N,), -100, dtype=torch.long)
    row_weight = torch.full((N,), 1.0 / N)
    grad = torch.empty(N, V)
    cpu = torch.device("cpu")

    def kernel():
        torch.ops.kdfast.kd_fwd_bwd(s.detach(), t, labels, row_weight, grad, T, 1.0, 0.0, False, 0)

    def fused():
        s.grad = None
        kdfast.kd_loss(s, t, temperature=T).backward()

    def eager():
        s.grad = None
        loss = F.kl_div(F.log_softmax(s / T, -1), F.log_softmax(t / T, -1), log_target=True, reduction="batchmean")
        (loss * T * T).backward()

    thp = os.environ.get("THP_MEM_ALLOC_ENABLE", "unset")
    print(f"kd_loss N={N} V={V} fp32 fwd+bwd, {torch.get_num_threads()} threads, THP_MEM_ALLOC_ENABLE={thp}")
    rows = [("eager", time_ms(eager, cpu, repeat=7)), ("kd_loss", time_ms(fused, cpu, repeat=7)),
            ("kernel, preallocated grad", time_ms(kernel, cpu, repeat=7))]
    base = rows[0][1]
    for name, ms in rows:
        print(f"  {name:<28} {ms:8.1f} ms   {base / ms:6.2f}x eager")


if __name__ == "__main__":
    main()
