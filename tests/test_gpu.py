"""GPU tests: the Triton and CUDA C++ kernels on real CUDA tensors (bf16 included)."""

import pytest
import torch

import kdfast
from tests.test_kd_loss import assert_close, make_inputs, reference_loss_and_grad

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none here)")

GPU_BACKENDS = [b for b in ("triton", "cuda", "torch") if kdfast.backends()[b].available]


def _run_cuda(s, t, **kw):
    x = s.detach().cuda().requires_grad_()
    loss = kdfast.kd_loss(x, t.cuda(), **kw)
    loss.sum().backward()
    return loss.detach().cpu(), x.grad.cpu()


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("V", [30522, 1000, 7])
@pytest.mark.parametrize("kind", ["kl", "soft_ce"])
@pytest.mark.parametrize("T", [1.0, 2.0])
def test_gpu_matches_reference(backend, dtype, V, kind, T):
    s, t, labels, mask = make_inputs(301, V, dtype)
    kw = dict(temperature=T, labels=labels, mask=mask, alpha_mlm=0.5, kind=kind)
    loss, grad = _run_cuda(s, t, backend=backend, labels=labels.cuda(), mask=mask.cuda(),
                           **{k: v for k, v in kw.items() if k not in ("labels", "mask")})
    ref_loss, ref_grad = reference_loss_and_grad(s, t, **kw)
    assert grad.dtype == dtype
    assert_close(loss, ref_loss, dtype, "loss")
    assert_close(grad, ref_grad, dtype, "grad")


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gpu_inplace_and_all_masked(backend):
    s, t, labels, mask = make_inputs(64, 30522, torch.bfloat16)
    _, ref_grad = reference_loss_and_grad(s, t, temperature=2.0, labels=labels, mask=mask)
    y = s.cuda().clone()
    loss = kdfast.kd_loss(y, t.cuda(), temperature=2.0, labels=labels.cuda(), mask=mask.cuda(), backend=backend,
                          inplace=True)
    assert torch.isfinite(loss)
    assert_close(y.cpu(), ref_grad, torch.bfloat16, "in-place gradient")
    zero = kdfast.kd_loss(s.cuda(), t.cuda(), temperature=2.0, mask=torch.zeros(64, dtype=torch.bool).cuda(),
                          backend=backend)
    assert zero.item() == 0.0

