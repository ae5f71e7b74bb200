"""kdfast.kd_loss against the float64 reference, on every backend that runs here."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import kdfast
from tests.helpers import assert_logits_close as assert_close
from tests.helpers import backends_of
from tests.inputs import logit_inputs as make_inputs
from tests.inputs import reference_loss_and_grad

CPU_BACKENDS = backends_of("kd_rows")  # every registered kd_rows backend that runs here

# Triton under the interpreter computes in numpy with fp32 loads; bf16 arithmetic in the
# interpreter is unreliable, so bf16 runs on the C++ CPU kernel and torch here, Triton on GPU.
DTYPES = {"triton": [torch.float32, torch.float16], "cpu": [torch.float32, torch.float16, torch.bfloat16],
          "torch": [torch.float32, torch.float16, torch.bfloat16]}


def run(s, t, grad_scale=1.0, **kw):
    s = s.detach().clone().requires_grad_()
    loss = kdfast.kd_loss(s, t, **kw)
    (loss.sum() * grad_scale).backward()
    return loss.detach(), s.grad


CASES = [(backend, dtype) for backend in CPU_BACKENDS for dtype in DTYPES[backend]]


@pytest.mark.parametrize("backend,dtype", CASES)
@pytest.mark.parametrize("V", [30522, 1000, 7])
@pytest.mark.parametrize("kind", ["kl", "soft_ce"])
@pytest.mark.parametrize("T", [1.0, 2.0, 4.0])
def test_matches_reference(backend, dtype, V, kind, T):
    N = 37 if V > 1000 else 53  # not a multiple of any block or thread count
    s, t, labels, mask = make_inputs(N, V, dtype)
    alpha_mlm = 0.0 if T == 4.0 else 0.7  # also exercises the MLM term at T = 1 (shared soft-max) and T = 2
    kw = dict(temperature=T, labels=labels, mask=mask, alpha_kd=0.9, alpha_mlm=alpha_mlm, kind=kind)
    loss, grad = run(s, t, backend=backend, **kw)
    ref_loss, ref_grad = reference_loss_and_grad(s, t, **kw)
    assert grad.dtype == dtype and grad.shape == s.shape
    assert loss.dtype == torch.float32
    assert_close(loss, ref_loss, dtype, "loss")
    assert_close(grad, ref_grad, dtype, "grad")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "mean", "none"])
def test_reductions_and_leading_shape(backend, reduction):
    s, t, labels, mask = make_inputs(3 * 13, 517, torch.float32, lead=(3, 13))
    kw = dict(temperature=2.0, labels=labels, mask=mask, alpha_mlm=0.5, reduction=reduction)
    # a non-unit upstream gradient: backward must scale the stored gradient
    loss, grad = run(s, t, grad_scale=2.5, backend=backend, **kw)
    ref_loss, ref_grad = reference_loss_and_grad(s, t, grad_scale=2.5, **kw)
    assert loss.shape == ref_loss.shape
    assert_close(loss, ref_loss, torch.float32, "loss")
    assert_close(grad, ref_grad, torch.float32, "grad")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "mean", "none"])
def test_all_masked_rows_give_zero_not_nan(backend, reduction):
    s, t, labels, _ = make_inputs(9, 300, torch.float32, masked=False)
    labels[:] = -100
    loss, grad = run(s, t, temperature=2.0, labels=labels, kd_rows="masked", reduction=reduction, backend=backend)
    assert torch.equal(loss, torch.zeros_like(loss))
    assert torch.equal(grad, torch.zeros_like(grad))
    mask = torch.zeros(9, dtype=torch.bool)
    loss, grad = run(s, t, temperature=2.0, mask=mask, reduction=reduction, backend=backend)
    assert torch.equal(loss, torch.zeros_like(loss)) and torch.equal(grad, torch.zeros_like(grad))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_masked_rows_are_never_read(backend):
    """NaN in uncounted rows (padding) must not leak into the loss or gradient."""
    s, t, labels, mask = make_inputs(20, 301, torch.float32)
    uncounted = (labels == -100) | ~mask
    t[uncounted] = float("nan")
    s[uncounted] = float("inf")
    loss, grad = run(s, t, temperature=2.0, labels=labels, mask=mask, kd_rows="masked", backend=backend)
    s_clean = torch.where(uncounted[:, None], 0.0, s)
    t_clean = torch.where(uncounted[:, None], 0.0, t)
    ref_loss, ref_grad = reference_loss_and_grad(s_clean, t_clean, temperature=2.0, labels=labels, mask=mask,
                                                 kd_rows="masked")
    assert_close(loss, ref_loss, torch.float32, "loss")
    assert_close(grad, ref_grad, torch.float32, "grad")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("T", [1.0, 2.0, 4.0])
def test_equals_torch_kl_div_batchmean(backend, T):
    s, t, _, _ = make_inputs(29, 1000, torch.float32, masked=False)
    loss, grad = run(s, t, temperature=T, backend=backend)
    sd = s.double().requires_grad_()
    ref = F.kl_div(F.log_softmax(sd / T, -1), F.log_softmax(t.double() / T, -1), reduction="batchmean",
                   log_target=True) * T**2
    ref.backward()
    assert_close(loss, ref.detach(), torch.float32, "loss")
    assert_close(grad, sd.grad, torch.float32, "grad")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_non_contiguous_inputs(backend):
    base_s = torch.randn(12, 2 * 333, dtype=torch.float64).float() * 3
    base_t = torch.randn(333, 12, dtype=torch.float64).float() * 3
    s = base_s[:, ::2]            # column stride 2
    t = base_t.t()                # transposed
    s_rows = torch.randn(12, 400) * 3
    s2 = s_rows[:, 50:383]        # row stride 400, unit column stride
    for student in (s, s2):
        loss, grad = run(student, t, temperature=2.0, backend=backend)
        ref_loss, ref_grad = reference_loss_and_grad(student, t, temperature=2.0)
        assert_close(loss, ref_loss, torch.float32, "loss")
        assert_close(grad, ref_grad, torch.float32, "grad")


@pytest.mark.parametrize("backend", [b for b in CPU_BACKENDS if b != "triton"])
@pytest.mark.parametrize("kind", ["kl", "soft_ce"])
def test_gradcheck_double(backend, kind):
    """Backends that compute in float64 for float64 input: full finite-difference gradcheck."""
    s = torch.randn(5, 11, dtype=torch.float64, requires_grad=True)
    t = torch.randn(5, 11, dtype=torch.float64)
    labels = torch.tensor([3, -100, 0, 10, 7])
    for T in (1.0, 2.5):
        assert torch.autograd.gradcheck(
            lambda x: kdfast.kd_loss(x, t, temperature=T, labels=labels, alpha_mlm=0.3, kind=kind, backend=backend,
                                     reduction="none"),
            (s,),
        )


def test_triton_chunked_path_matches_single_block():
    """Rows longer than the block are folded chunk by chunk (the GPU path for V=30522)."""
    if "triton" not in CPU_BACKENDS:
        pytest.skip("triton backend not available here")
    from kdfast.ops.logit_kd.triton import kd_fwd_bwd_triton

    for V, block in ((30522, 4096), (1000, 128)):
        s, t, labels, mask = make_inputs(11, V, torch.float32)
        w = (mask & (labels != -100)).float()
        for T, alpha_mlm, soft_ce in ((2.0, 0.5, False), (1.0, 0.5, True), (3.0, 0.0, False)):
            g_single, g_chunk = torch.empty_like(s), torch.empty_like(s)
            l_single = kd_fwd_bwd_triton(s, t, labels, w, g_single, T, 1.0, alpha_mlm, soft_ce)
            l_chunk = kd_fwd_bwd_triton(s, t, labels, w, g_chunk, T, 1.0, alpha_mlm, soft_ce, block_v=block)
            ref_loss, ref_grad = reference_loss_and_grad(s, t, temperature=T, labels=labels, mask=mask,
                                                         alpha_mlm=alpha_mlm, kind="soft_ce" if soft_ce else "kl",
                                                         reduction="sum", kd_rows="masked")  # the rows of w
            assert_close(l_chunk.sum(), ref_loss, torch.float32, "chunked loss")
            assert_close(g_chunk, ref_grad, torch.float32, "chunked grad")
            assert_close(l_single.sum(), ref_loss, torch.float32, "single-block loss")
            assert_close(g_single, ref_grad, torch.float32, "single-block grad")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_inplace_writes_gradient_into_student_buffer(backend):
    s, t, labels, mask = make_inputs(17, 1000, torch.float32)
    _, ref_grad = reference_loss_and_grad(s, t, temperature=2.0, labels=labels, mask=mask, alpha_mlm=0.5)
    leaf = s.clone().requires_grad_()
    logits = leaf * 1.0  # a non-leaf whose producer (mul by a constant) does not save its output
    loss = kdfast.kd_loss(logits, t, temperature=2.0, labels=labels, mask=mask, alpha_mlm=0.5, backend=backend,
                          inplace=True)
    assert_close(logits.detach(), ref_grad, torch.float32, "buffer holds the gradient")
    loss.backward()
    assert_close(leaf.grad, ref_grad, torch.float32, "grad")


def test_kdloss_module_equals_function():
    s, t, labels, mask = make_inputs(10, 200, torch.float32)
    mod = kdfast.KDLoss(temperature=2.0, alpha_kd=0.5, alpha_mlm=0.5, kind="soft_ce")
    assert "temperature=2.0" in repr(mod)
    a = mod(s, t, labels, mask)
    b = kdfast.kd_loss(s, t, temperature=2.0, labels=labels, mask=mask, alpha_kd=0.5, alpha_mlm=0.5,
                       kind="soft_ce")
    assert torch.equal(a, b)


def test_backends_agree_with_each_other():
    s, t, labels, mask = make_inputs(23, 30522, torch.float32)
    results = {b: run(s, t, temperature=2.0, labels=labels, mask=mask, alpha_mlm=0.4, backend=b)
               for b in CPU_BACKENDS}
    ref_loss, ref_grad = results["torch"]
    for b, (loss, grad) in results.items():
        assert_close(loss, ref_loss, torch.float32, f"{b} loss")
        assert_close(grad, ref_grad, torch.float32, f"{b} grad")


def test_torch_compile_fullgraph_on_cpu():
    """The custom ops have fake implementations: no graph break, same numbers as eager."""
    s, t, labels, mask = make_inputs(16, 300, torch.float32)

    def step(student, teacher, lab, m):
        return 2.0 * kdfast.kd_loss(student, teacher, temperature=2.0, labels=lab, mask=m, alpha_mlm=0.5)

    compiled = torch.compile(step, fullgraph=True)
    for _ in range(2):
        s1 = s.clone().requires_grad_()
        loss_c = compiled(s1, t, labels, mask)
        loss_c.backward()
        s2 = s.clone().requires_grad_()
        loss_e = step(s2, t, labels, mask)
        loss_e.backward()
        torch.testing.assert_close(loss_c, loss_e)
        torch.testing.assert_close(s1.grad, s2.grad)
