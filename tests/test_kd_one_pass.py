"""KD on every row plus MLM on the labelled rows in one kernel pass: the ``mlm_weight`` argument of
the ``kd_rows`` and ``sparse_kd_rows`` ops, on every backend that runs here, against float64
references (loss rows and gradient), and the losses calling their kernel once."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

import kdfast
from kdfast.ops import registry
from tests.helpers import TOL_LOGITS, assert_close, backends_of
from tests.reference import kd_loss_reference, sparse_kd_loss_reference

KD_BACKENDS = backends_of("kd_rows")
SPARSE_BACKENDS = backends_of("sparse_kd_rows")
N, V, K = 23, 257, 6


def rows_case(dtype: torch.dtype, seed: int):
    """Fresh logits; KD weights on most rows (two rows off), MLM weights on a labelled subset, labels
    -100 (never to be read) where the MLM weight is 0."""
    g = torch.Generator().manual_seed(seed)
    s = (torch.randn(N, V, generator=g, dtype=torch.float64) * 2.5).to(dtype)
    t = (torch.randn(N, V, generator=g, dtype=torch.float64) * 2.5 + 0.4 * s.double()).to(dtype)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    kd_on = torch.ones(N, dtype=torch.bool)
    kd_on[torch.randperm(N, generator=g)[:2]] = False
    mlm_on = kd_on & (torch.rand(N, generator=g) < 0.4)
    mlm_on[torch.nonzero(kd_on)[0]] = True  # at least one labelled row
    labels = torch.where(mlm_on, torch.randint(0, V, (N,), generator=g), torch.full((N,), -100))
    w = kd_on.to(acc) * (0.5 + torch.rand(N, generator=g, dtype=acc))
    m = mlm_on.to(acc) * (0.5 + torch.rand(N, generator=g, dtype=acc))
    return s, t, labels, w, m


def rows_reference(s, t, labels, w, m, T, a_kd, a_mlm, soft_ce):
    """Float64: loss_r = w_r a_kd T^2 kd_r + m_r a_mlm ce_r, gradient by autograd."""
    x = s.double().clone().requires_grad_()
    td = t.double()
    log_q, log_p = F.log_softmax(x / T, -1), F.log_softmax(td / T, -1)
    p = log_p.exp()
    kd = (-(p * log_q).sum(-1)) if soft_ce else (p * (log_p - log_q)).sum(-1)
    ce = torch.logsumexp(x, -1) - x.gather(1, labels.clamp_min(0)[:, None]).squeeze(1)
    rows = torch.where(w != 0, w.double() * a_kd * T * T * kd, 0.0) + torch.where(
        (w != 0) & (m != 0), m.double() * a_mlm * ce, 0.0)
    rows.sum().backward()
    return rows.detach(), x.grad


@pytest.mark.parametrize("backend", KD_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("soft_ce", [False, True])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_kd_rows_mlm_weight_matches_float64(backend, dtype, soft_ce, temperature):
    impl = registry.impls("kd_rows")[backend]
    if not impl.takes(dtype):  # triton accumulates in float32: it refuses float64 by registration
        assert backend == "triton" and dtype == torch.float64
        return
    kernel = impl.fn
    s, t, labels, w, m = rows_case(dtype, seed=int(temperature * 10) + soft_ce)
    grad = torch.empty_like(s)
    rows = kernel(s, t, labels, w, grad, temperature, 0.7, 0.45, soft_ce, mlm_weight=m)
    ref_rows, ref_grad = rows_reference(s, t, labels, w, m, temperature, 0.7, 0.45, soft_ce)
    rtol, atol = TOL_LOGITS[dtype]
    torch.testing.assert_close(rows.double(), ref_rows, rtol=rtol, atol=atol)
    assert grad.dtype == dtype
    torch.testing.assert_close(grad.double(), ref_grad, rtol=rtol, atol=atol)
    assert torch.equal(grad[w == 0], torch.zeros_like(grad[w == 0]))


@pytest.mark.parametrize("backend", KD_BACKENDS)
def test_kd_rows_mlm_weight_in_place(backend):
    """grad == student (in-place mode): the label logit is read before the row is overwritten."""
    kernel = registry.impls("kd_rows")[backend].fn
    s, t, labels, w, m = rows_case(torch.float32, seed=7)
    ref_rows, ref_grad = rows_reference(s, t, labels, w, m, 2.0, 1.0, 0.6, False)
    buf = s.clone()
    rows = kernel(buf, t, labels, w, buf, 2.0, 1.0, 0.6, False, mlm_weight=m)
    torch.testing.assert_close(rows.double(), ref_rows, rtol=2e-5, atol=2e-6)
    torch.testing.assert_close(buf.double(), ref_grad, rtol=2e-5, atol=2e-6)


def test_triton_chunked_rows_take_the_mlm_weight():
    """The Triton kernel's multi-block path (a row longer than one block) with MLM weights."""
    if "triton" not in KD_BACKENDS:
        pytest.skip("triton does not run here")
    from kdfast.ops.logit_kd.triton import kd_fwd_bwd_triton

    s, t, labels, w, m = rows_case(torch.float32, seed=3)
    ref_rows, ref_grad = rows_reference(s, t, labels, w, m, 2.0, 0.9, 0.3, False)
    grad = torch.empty_like(s)
    rows = kd_fwd_bwd_triton(s, t, labels, w, grad, 2.0, 0.9, 0.3, False, block_v=64, mlm_weight=m)
    torch.testing.assert_close(rows.double(), ref_rows, rtol=2e-5, atol=2e-6)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("backend", SPARSE_BACKENDS)
@pytest.mark.parametrize("mode", ["topk", "sampled"])
def test_sparse_kd_rows_mlm_weight_matches_float64(backend, mode):
    """sparse_kd_rows with MLM weights equals its own KD-only pass plus a float64 MLM term."""
    kernel = registry.impls("sparse_kd_rows")[backend].fn
    s, t, labels, w, m = rows_case(torch.float32, seed=11)
    if mode == "topk":
        ids, vals, lse = kdfast.sparsify_teacher_logits(t, K, temperature=2.0)
    else:
        ids, vals = kdfast.sparsify_teacher_logits(t, K, mode="sampled", temperature=2.0)
        lse = None
    ids = ids.long()
    g_one = torch.empty_like(s)
    rows = kernel(s, ids, vals, lse, labels, w, g_one, 2.0, 0.8, 0.5, mode == "sampled", mlm_weight=m)
    # the KD term alone against sparse_kd_loss's float64 oracle (sum reduction: no division)
    kd_ref = sparse_kd_loss_reference(s.double(), ids, vals, mode=mode, temperature=2.0, reduction="none",
                                      **({"teacher_logsumexp": lse} if lse is not None else {}))
    x = s.double().clone().requires_grad_()
    ce = torch.logsumexp(x, -1) - x.gather(1, labels.clamp_min(0)[:, None]).squeeze(1)
    mlm_rows = torch.where((w != 0) & (m != 0), m.double() * 0.5 * ce, 0.0)
    mlm_rows.sum().backward()
    ref_rows = torch.where(w != 0, w.double() * 0.8 * kd_ref.detach().double(), 0.0) + mlm_rows.detach()
    torch.testing.assert_close(rows.double(), ref_rows, rtol=2e-5, atol=2e-6)
    g_kd = torch.empty_like(s)
    kernel(s, ids, vals, lse, labels, w, g_kd, 2.0, 0.8, 0.0, mode == "sampled")
    torch.testing.assert_close(g_one.double(), g_kd.double() + x.grad, rtol=2e-5, atol=2e-6)


class _Counting:
    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.fn(*args, **kwargs)


@pytest.mark.parametrize("backend", KD_BACKENDS)
def test_kd_loss_all_rows_with_mlm_is_one_kernel_call(backend, monkeypatch):
    labels = torch.full((N,), -100)
    labels[::3] = torch.randint(0, V, labels[::3].shape)
    mask = torch.ones(N, dtype=torch.bool)
    mask[1] = False
    s, t = torch.randn(N, V) * 2, torch.randn(N, V) * 2
    counter = _Counting(registry.impls("kd_rows")[backend].fn)
    real = registry.select
    monkeypatch.setattr(registry, "select", lambda *a, **k: dataclasses.replace(real(*a, **k), fn=counter))
    kw = dict(temperature=2.0, labels=labels, mask=mask, alpha_kd=0.8, alpha_mlm=0.6, kd_rows="all")
    x = s.clone().requires_grad_()
    loss = kdfast.kd_loss(x, t, backend=backend, **kw)
    loss.backward()
    assert counter.calls == 1
    xr = s.double().clone().requires_grad_()
    ref = kd_loss_reference(xr, t.double(), **kw)
    ref.backward()
    assert_close(loss.detach(), ref.detach(), torch.float32, "loss")
    assert_close(x.grad, xr.grad, torch.float32, "grad")
