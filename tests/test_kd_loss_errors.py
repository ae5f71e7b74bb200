"""Bad input raises a ValueError naming the argument, never a wrong number or a kernel crash."""

import pytest
import torch

import kdfast
from tests.helpers import backends_of

CPU_BACKENDS = backends_of("kd_rows")


@pytest.fixture
def logits():
    return torch.randn(6, 50) * 2, torch.randn(6, 50) * 2


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_nan_or_inf_in_teacher(logits, backend):
    s, t = logits
    for bad in (float("nan"), float("inf")):
        t2 = t.clone()
        t2[2, 7] = bad
        with pytest.raises(ValueError, match=r"teacher_logits contains NaN or \+Inf"):
            kdfast.kd_loss(s, t2, temperature=2.0, backend=backend)
    # -inf is a valid logit (probability 0; tests/test_hostile_losses.py checks the value)
    t2 = t.clone()
    t2[2, 7] = -float("inf")
    assert torch.isfinite(kdfast.kd_loss(s, t2, temperature=2.0, backend=backend))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(temperature=0.0), "temperature"),
        (dict(temperature=-1.0), "temperature"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(kind="jsd"), "kind"),
        (dict(reduction="avg"), "reduction"),
        (dict(backend="metal"), "backend"),
        (dict(alpha_mlm=0.5), "labels are required"),
        (dict(labels=torch.tensor([1, 2, 50, -100, 0, 3]), alpha_mlm=0.5), r"labels must lie in \[0, 50\)"),
        (dict(labels=torch.tensor([1, 2, -3, -100, 0, 3])), r"labels must lie"),
        (dict(labels=torch.zeros(5, dtype=torch.long)), "labels has shape"),
        (dict(labels=torch.zeros(6)), "labels must be an integer"),
        (dict(mask=torch.ones(6, 1)), "mask has shape"),
        (dict(backend="cuda"), "backend='cuda'"),
    ],
)
def test_bad_arguments(logits, kwargs, match):
    s, t = logits
    with pytest.raises(ValueError, match=match):
        kdfast.kd_loss(s, t, **kwargs)


def test_shape_vocab_dtype_device_mismatch(logits):
    s, t = logits
    with pytest.raises(ValueError, match="teacher_logits vocabulary size mismatch"):
        kdfast.kd_loss(s, t[:, :40])
    with pytest.raises(ValueError, match="teacher_logits shape mismatch"):
        kdfast.kd_loss(s, t[:5])
    with pytest.raises(ValueError, match="teacher_logits has dtype"):
        kdfast.kd_loss(s, t.half())
    with pytest.raises(ValueError, match="teacher_logits is on meta"):
        kdfast.kd_loss(s, t.to("meta"))
    with pytest.raises(ValueError, match="student_logits must be float"):
        kdfast.kd_loss(s.long(), t)
    with pytest.raises(ValueError, match="student_logits must be a torch.Tensor"):
        kdfast.kd_loss(s.tolist(), t)
    with pytest.raises(ValueError, match="empty batch"):
        kdfast.kd_loss(s[:0], t[:0])


def test_cuda_backend_refuses_cpu_tensors_clearly(logits):
    s, t = logits
    status = kdfast.backends()["cuda"]
    if not torch.cuda.is_available():
        assert not status.available and status.reason
    with pytest.raises(ValueError, match="cuda"):
        kdfast.kd_loss(s, t, backend="cuda")


def test_compiled_op_refuses_bad_arguments_with_value_error():
    """The C++ op's own checks (csrc/ops/logit_kd/kd_args.h) raise ValueError, as the Python checks do."""
    if not kdfast.backends()["cpu"].available:
        pytest.skip("the compiled CPU kernel is not built here: " + kdfast.backends()["cpu"].reason)
    s, t = torch.randn(4, 9), torch.randn(4, 9)
    labels, w = torch.zeros(4, dtype=torch.long), torch.ones(4)
    op = torch.ops.kdfast.kd_fwd_bwd
    with pytest.raises(ValueError, match="must have the same shape"):
        op(s, t[:, :8], labels, w, torch.empty_like(s), 2.0, 1.0, 0.0, False)
    with pytest.raises(ValueError, match="labels must be contiguous int64"):
        op(s, t, labels.int(), w, torch.empty_like(s), 2.0, 1.0, 0.0, False)
    with pytest.raises(ValueError, match=r"labels of counted rows must lie in \[0, 9\)"):
        op(s, t, torch.tensor([0, 9, 1, 2]), w, torch.empty_like(s), 2.0, 1.0, 0.5, False)
    grad = torch.empty_like(s)
    rows = op(s, t, labels, w, grad, 2.0, 1.0, 0.0, False)  # and good arguments still run
    assert rows.shape == (4,) and torch.isfinite(rows).all() and torch.isfinite(grad).all()
