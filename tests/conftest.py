"""Test set-up: without a GPU, Triton kernels run on CPU tensors through the interpreter.

TRITON_INTERPRET must be set before any module that defines a Triton kernel is imported,
hence here, before kdfast is. On a CUDA machine it defaults to 0 so that tests/test_gpu.py
runs the real compiled kernels.
"""

import os

import torch

if "TRITON_INTERPRET" not in os.environ:
    os.environ["TRITON_INTERPRET"] = "0" if torch.cuda.is_available() else "1"

import pytest  # noqa: E402

import kdfast  # noqa: E402

CPU_BACKENDS = [name for name in ("triton", "cpu", "torch") if kdfast.backends()[name].available
                and (name != "triton" or os.environ["TRITON_INTERPRET"] == "1")]


@pytest.fixture(autouse=True)
def _seed(request):
    # a fresh but reproducible stream per test: never the same inputs twice across tests
    torch.manual_seed(hash(request.node.nodeid) % (2**31))
    yield
