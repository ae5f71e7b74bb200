"""The CUDA kernel's row algorithm (online statistics per thread, warp/block merge), replayed on
the host with the same csrc/common/kd_math.h, against the float64 reference. Machines without
a GPU cannot run the kernel itself; this checks its math (tests/test_gpu.py checks the kernel)."""

import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from tests.helpers import assert_logits_close as assert_close
from tests.inputs import reference_loss_and_grad

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def replay_binary(tmp_path_factory):
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    exe = tmp_path_factory.mktemp("kd_row") / "kd_row_host"
    subprocess.run([cxx, "-O2", "-std=c++17", str(ROOT / "csrc/tests/kd_row_host.cpp"), "-o", str(exe)], check=True)
    return exe


def replay(exe, s, t, labels, weight, T, alpha_kd, alpha_mlm, soft_ce):
    N, V = s.shape
    lines = [f"{N} {V} {T} {alpha_kd} {alpha_mlm} {int(soft_ce)}"]
    for r in range(N):
        lines.append(f"{int(labels[r])} {float(weight[r])!r}")
        lines.append(" ".join(repr(float(x)) for x in s[r]))
        lines.append(" ".join(repr(float(x)) for x in t[r]))
    out = subprocess.run([str(exe)], input="\n".join(lines), capture_output=True, text=True, check=True).stdout
    rows = torch.tensor([[float(x) for x in line.split()] for line in out.strip().splitlines()], dtype=torch.float64)
    return rows[:, 0], rows[:, 1:]


@pytest.mark.parametrize("V", [1000, 300, 7])
@pytest.mark.parametrize("T,alpha_mlm,kind", [(1.0, 0.5, "kl"), (2.0, 0.5, "soft_ce"), (4.0, 0.0, "kl")])
def test_cuda_row_algorithm_matches_reference(replay_binary, V, T, alpha_mlm, kind):
    N = 5
    s = torch.randn(N, V) * 4
    t = torch.randn(N, V) * 4
    s[1, :3] = -float("inf")  # a row that starts with -inf logits (a masked vocabulary entry)
    labels = torch.randint(3, V, (N,)) if V > 3 else torch.randint(0, V, (N,))
    loss, grad = replay(replay_binary, s, t, labels, torch.ones(N), T, 1.0, alpha_mlm, kind == "soft_ce")
    ref_loss, ref_grad = reference_loss_and_grad(s, t, temperature=T, labels=labels, alpha_mlm=alpha_mlm, kind=kind,
                                                 reduction="none")
    finite = torch.isfinite(ref_loss)
    assert torch.equal(torch.isfinite(loss), finite)  # KL is +inf where the student gives p=0 to a teacher token
    assert_close(loss[finite], ref_loss[finite], torch.float32, "loss")
    assert_close(grad, ref_grad, torch.float32, "grad")
