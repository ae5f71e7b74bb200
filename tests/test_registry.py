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


# --- every fallback is the registry's decision, and the report names what ran -------------------------

def _need_triton_on_cpu():
    from tests.conftest import CPU_BACKENDS

    if "triton" not in CPU_BACKENDS:
        pytest.skip("the Triton interpreter is not usable here (TRITON_INTERPRET=1 and triton installed)")


def test_select_returns_what_runs_and_record_notes_it(toy_op):
    x = torch.randn(3, 5)
    with registry.record() as ran:
        impl = registry.select(toy_op, "torch", x)
        assert torch.equal(impl.fn(x), x + 1) and impl.backend == "torch" and impl.op == toy_op
        registry.dispatch(toy_op, "auto", x.double())  # the cpu kernel takes float32 only: auto skips it
    assert ran == {toy_op: {"torch"}}
    assert registry.select(toy_op, "torch", x) is registry.impls(toy_op)["torch"]  # outside: nothing noted
    assert ran == {toy_op: {"torch"}}


def test_a_kernel_declares_its_width_and_fallback():
    name = "test_wide_op"
    registry.register(name, "torch", lambda x: x)
    registry.register(name, "triton", lambda x: -x, max_cols=4, fallback="torch")
    registry.register(name, "cpu", lambda x: 2 * x, max_cols=4)
    try:
        cpu = torch.device("cpu")
        usable = kdfast.backends()
        if usable["cpu"].available:  # auto skips a kernel whose rows are too wide
            assert registry.resolve(name, "auto", cpu, torch.float32, cols=4) == "cpu"
            assert registry.resolve(name, "auto", cpu, torch.float32, cols=5) == "torch"
            with pytest.raises(ValueError, match=r"backend='cpu' computes my_op for rows up to 4 wide, got 5"):
                registry.resolve(name, "cpu", cpu, torch.float32, cols=5, what="my_op")  # no fallback: refused
        if usable["triton"].available:
            assert registry.resolve(name, "triton", cpu, torch.float32, cols=5) == "torch"
            assert registry.resolve(name, "triton", cpu, torch.float64, cols=2) == "torch"
            assert registry.resolve(name, "triton", cpu, torch.float32, cols=4) == "triton"
        assert "rows up to 4 wide; else torch" in registry.format_matrix()
        with pytest.raises(ValueError, match="fallback must be another"):
            registry.register("test_bad_fallback", "triton", lambda x: x, fallback="triton")
    finally:
        registry._OPS.pop(name)


@pytest.mark.parametrize("case", ["hidden_mse float64", "cosine float64", "cosine wider than 8192"])
def test_each_documented_fallback_runs_torch_and_the_report_says_so(case, tmp_path):
    """An explicit backend='triton' on input its kernel does not take runs torch: the registry
    decides it, record() sees it, and a stage's report entry names torch."""
    from kdfast.ops.hidden_rows import MAX_COSINE_WIDTH
    from kdfast.train import TokenBatches, TrainConfig, stage

    _need_triton_on_cpu()
    torch.manual_seed(0)
    dtype = torch.float64 if "float64" in case else torch.float32
    width = MAX_COSINE_WIDTH + 1 if "wider" in case else 7
    loss_name, op = ("hidden_mse_loss", "hidden_mse_epilogue") if "hidden" in case else ("cosine_loss", "cosine_rows")
    fn = kdfast.hidden_mse_loss if "hidden" in case else kdfast.cosine_loss
    assert registry.impls(op)["triton"].unsupported(dtype, width) is not None  # the kernel declares it
    assert registry.resolve(op, "triton", torch.device("cpu"), dtype, cols=width) == "torch"
    target = torch.randn(3, width, dtype=dtype)
    model = torch.nn.Linear(width, width, dtype=dtype)
    ids = torch.randint(0, 9, (6, 3))

    def step(batch):
        value = fn(model(target), target * 0.5, backend="triton")
        return value, {"term": float(value.detach())}

    with registry.record() as ran:
        torch.testing.assert_close(step({})[0], fn(model(target), target * 0.5, backend="torch"))
    assert ran[op] == {"torch"}
    loss = stage.StageLoss(step, terms={"term": loss_name})
    config = TrainConfig(steps=1, lr=1e-3, out_dir=str(tmp_path / "run"), progress=False)
    entry = stage.run_stage(stage.Stage("fit", model, loss, TokenBatches(ids, torch.ones_like(ids), 2, seed=0,
                                                                          rank=0, world_size=1), config))
    assert entry["backends"] == {"term": {"loss": loss_name, "backend": "torch"}}


def test_the_report_names_triton_where_triton_ran(tmp_path):
    """The same stage on input the Triton kernel takes: the report says triton (it is not a guess)."""
    from kdfast.train import TokenBatches, TrainConfig, stage

    _need_triton_on_cpu()
    torch.manual_seed(0)
    model = torch.nn.Linear(7, 7)
    target = torch.randn(3, 7)
    ids = torch.randint(0, 9, (6, 3))

    def step(batch):
        value = kdfast.cosine_loss(model(target), target, backend="triton")
        return value, {}

    config = TrainConfig(steps=1, lr=1e-3, out_dir=str(tmp_path / "run"), progress=False)
    entry = stage.run_stage(stage.Stage("fit", model, stage.StageLoss(step, terms={"cos": "cosine_loss"}),
                                        TokenBatches(ids, torch.ones_like(ids), 2, seed=0, rank=0, world_size=1),
                                        config))
    assert entry["backends"] == {"cos": {"loss": "cosine_loss", "backend": "triton"}}
