"""pytest-benchmark suite for the logit-distillation loss (forward + backward).

    .venv/bin/python -m pytest benchmarks --benchmark-only            # CPU
    .venv/bin/python -m pytest benchmarks --benchmark-only --benchmark-group-by=param:size

Each group holds eager PyTorch and every kdfast backend usable on the device, on the same
inputs, so pytest-benchmark's table shows the ratios. ``kdfast bench`` prints the same
comparison with peak memory and torch.compile / Liger baselines.
"""

import pytest
import torch

import kdfast
from kdfast.bench.kd_loss import _fwd_bwd, eager_kd

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
SIZES = [(1024, 30522), (256, 30522)] if DEVICE.type == "cpu" else [(16384, 30522), (4096, 30522)]
DTYPE = torch.float32 if DEVICE.type == "cpu" else torch.bfloat16
IMPLS = ["eager"] + [f"kdfast-{b}" for b in ("triton", "cuda", "cpu") if kdfast.backends()[b].available
                     and (b == "cpu") == (DEVICE.type == "cpu")]


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("impl", IMPLS)
def test_kd_loss_fwd_bwd(benchmark, size, impl):
    N, V = size
    s = (torch.randn(N, V, device=DEVICE) * 3).to(DTYPE)
    t = (torch.randn(N, V, device=DEVICE) * 3).to(DTYPE)
    if impl == "eager":
        step = _fwd_bwd(lambda x, y: eager_kd(x, y, 2.0), s, t)
    else:
        step = _fwd_bwd(lambda x, y: kdfast.kd_loss(x, y, temperature=2.0, backend=impl.split("-")[1]), s, t)

    def synced():
        g = step()
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()
        return g

    benchmark.group = f"kd_loss {N}x{V}"
    grad = benchmark(synced)
    assert torch.isfinite(grad).all()
