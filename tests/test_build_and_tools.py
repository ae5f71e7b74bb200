"""The build, the backend report, the ahead-of-time Triton compile and the command line."""

import os
import subprocess
import sys

import pytest
import torch

import kdfast


def test_extension_builds_and_reports_backends():
    status = kdfast.backends()
    assert set(status) == {"triton", "cuda", "cpu", "torch"}
    assert status["cpu"].available, status["cpu"].reason
    assert status["torch"].available
    for st in status.values():
        assert st.reason
    from kdfast import _C

    assert _C.cpu_capability in ("AVX512", "AVX2", "DEFAULT")
    if _C.with_cuda and not torch.cuda.is_available():
        assert not status["cuda"].available and "no CUDA device" in status["cuda"].reason


def test_cuda_kernels_are_linked_when_nvcc_exists():
    import shutil

    from kdfast import _C

    nvcc = shutil.which("nvcc") or os.path.exists("/usr/local/cuda/bin/nvcc")
    if os.environ.get("KDFAST_NO_CUDA") == "1" or not nvcc:
        pytest.skip("nvcc absent or KDFAST_NO_CUDA=1: the CUDA kernels are left out by design")
    assert _C.with_cuda and _C.cuda_runtime_version >= 11000


def test_auto_backend_resolution():
    from kdfast.ops import registry

    assert registry.resolve("kd_rows", "auto", torch.device("cpu"), torch.float32) == "cpu"
    assert registry.resolve("kd_rows", "torch", torch.device("cpu"), torch.float32) == "torch"
    with pytest.raises(ValueError, match="backend must be one of"):
        registry.resolve("kd_rows", "gpu", torch.device("cpu"))
    with pytest.raises(ValueError, match="backend='cpu' needs CPU tensors"):
        registry.resolve("kd_rows", "cpu", torch.device("meta"))


def test_cli_backends_and_small_bench():
    out = subprocess.run([sys.executable, "-m", "kdfast.cli", "backends"], capture_output=True, text=True)
    assert out.returncode == 0 and "cpu" in out.stdout
    out = subprocess.run([sys.executable, "-m", "kdfast.cli", "bench", "--size", "64x1000", "--repeat", "1",
                          "--no-compile"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "kdfast-cpu" in out.stdout and "eager" in out.stdout and "speed-up" in out.stdout
    bad = subprocess.run([sys.executable, "-m", "kdfast.cli", "bench", "--size", "64by1000"], capture_output=True,
                         text=True)
    assert bad.returncode != 0 and "ROWSxVOCAB" in bad.stderr
