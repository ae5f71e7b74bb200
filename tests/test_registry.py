"""The op registry: one place resolves ``auto``, explicit choices fail in one line, every family registers."""

import pytest
import torch

import kdfast
from kdfast.ops import registry


@pytest.fixture
def toy_op():
    name = "test_toy_op"
    registry.register(name, "torch", lambda x: x + 1)
    registry.register(name, "cpu", lambda x: x + 2, dtypes=(torch.float32,))
    registry.register(name, "triton", lambda x: x + 3)
    yield name
    registry._OPS.pop(name)


def test_auto_prefers_the_compiled_cpu_kernel_and_falls_back_by_dtype(toy_op):
    cpu = torch.device("cpu")
    want = "cpu" if kdfast.backends()["cpu"].available else "torch"
    assert registry.resolve(toy_op, "auto", cpu, torch.float32) == want
    assert registry.resolve(toy_op, "auto", cpu, torch.float64) == "torch"
    x = torch.randn(3)
    assert torch.equal(registry.dispatch(toy_op, "auto", x), x + (2 if want == "cpu" else 1))


def test_triton_never_takes_float64(toy_op):
    if not kdfast.backends()["triton"].available:
        pytest.skip("triton not usable here: " + kdfast.backends()["triton"].reason)
    with pytest.raises(ValueError, match="backend='triton' computes test_toy_op for float32"):
        registry.resolve(toy_op, "triton", torch.device("cpu"), torch.float64)


@pytest.mark.parametrize("backend, message", [
    ("cuda", "backend='cuda' has no my_loss kernel; use 'triton', 'cpu', 'torch' or 'auto'"),
    ("gpu", "backend must be one of"),
])
def test_explicit_choices_that_cannot_run_name_the_argument(toy_op, backend, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        registry.resolve(toy_op, backend, torch.device("cpu"), torch.float32, what="my_loss")


def test_a_second_implementation_for_one_backend_is_refused(toy_op):
    with pytest.raises(ValueError, match="already has a 'torch' implementation"):
        registry.register(toy_op, "torch", lambda x: x)


def test_unknown_ops_are_named():
    with pytest.raises(ValueError, match="unknown op 'no_such_op'"):
        registry.impls("no_such_op")


def test_every_family_registers_a_torch_implementation_of_each_op():
    names = registry.ops()
    assert names, "no op registered"
    for op in names:
        assert "torch" in registry.impls(op), f"{op} has no torch implementation"
    text = registry.format_matrix()
    assert all(op in text for op in names)


def test_kdfast_backends_prints_the_op_matrix():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "kdfast.cli", "backends"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    for op in registry.ops():
        assert op in out.stdout
    assert str(kdfast.backends()) == out.stdout.rstrip("\n")
    assert kdfast.backends()["torch"].available  # still the {name: BackendStatus} mapping
