"""Test set-up: Triton kernels run on CPU tensors through the interpreter.

TRITON_INTERPRET must be set before any module that defines a Triton kernel is imported,
hence here, before kdfast is. On a CUDA machine the GPU tests use the real compiler instead
(see tests/test_gpu.py, run with TRITON_INTERPRET=0).
"""

import os

if not os.environ.get("KDFAST_GPU_TESTS"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import kdfast  # noqa: E402

CPU_BACKENDS = [name for name in ("triton", "cpu", "torch") if kdfast.backends()[name].available]


@pytest.fixture(autouse=True)
def _seed(request):
    # a fresh but reproducible stream per test: never the same inputs twice across tests
    torch.manual_seed(hash(request.node.nodeid) % (2**31))
    yield
