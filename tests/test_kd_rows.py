"""``kd_rows``: which rows the KD term counts is an explicit argument of every logit loss;
labels alone never change it. Float64 references for both settings, with and without MLM, on every
registered backend that runs here."""

from __future__ import annotations

import warnings
from functools import partial

import pytest
import torch

import kdfast
from tests.helpers import TOL_LOGITS, backends_of
from tests.helpers import assert_close as _assert_close
from tests.reference import kd_loss_reference, sparse_kd_loss_reference

assert_close = partial(_assert_close, tol=TOL_LOGITS)
KD_BACKENDS = backends_of("kd_rows")
SPARSE_BACKENDS = backends_of("sparse_kd_rows")
N, V, K = 29, 301, 7  # odd sizes: no block or thread count divides them


def make_rows(dtype=torch.float32):
    """Fresh logits, labels on about a third of the rows, a mask with zero rows (some labelled)."""
    s = (torch.randn(N, V, dtype=torch.float64) * 3).to(dtype)
    t = (torch.randn(N, V, dtype=torch.float64) * 3 + 0.5 * s.double()).to(dtype)
    labels = torch.full((N,), -100)
    picked = torch.randperm(N)[: N // 3]
    labels[picked] = torch.randint(0, V, (picked.numel(),))
    mask = torch.ones(N, dtype=torch.bool)
    mask[torch.randperm(N)[: N // 5]] = False
    assert (labels != -100).sum() < mask.sum()  # so that "all" and "masked" differ
    return s, t, labels, mask


def loss_and_grad(fn, s, grad_scale=1.3):
    x = s.detach().clone().requires_grad_()
    loss = fn(x)
    (loss.sum() * grad_scale).backward()
    return loss.detach(), x.grad


def check_against(ours, ref, dtype):
    (loss, grad), (ref_loss, ref_grad) = ours, ref
    assert grad.dtype == dtype
    assert_close(loss, ref_loss, dtype, "loss")
    assert_close(grad, ref_grad, dtype, "grad")


@pytest.mark.parametrize("backend", KD_BACKENDS)
@pytest.mark.parametrize("kd_rows", ["all", "masked"])
@pytest.mark.parametrize("alpha_mlm", [0.0, 0.6])
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "none"])
def test_kd_loss_matches_reference(backend, kd_rows, alpha_mlm, reduction):
    s, t, labels, mask = make_rows()
    kw = dict(temperature=2.0, labels=labels, mask=mask, alpha_kd=0.8, alpha_mlm=alpha_mlm, reduction=reduction,
              kd_rows=kd_rows)
    ours = loss_and_grad(lambda x: kdfast.kd_loss(x, t, backend=backend, **kw), s)
    ref = loss_and_grad(lambda x: kd_loss_reference(x, t.double(), **kw), s.double())
    check_against(ours, ref, torch.float32)


@pytest.mark.parametrize("backend", KD_BACKENDS)
def test_kd_loss_all_rows_with_mlm_in_place_and_16_bit(backend):
    """The two-pass form ("all" with an MLM term) with the gradient written over the student buffer,
    and with fp16 logits (the two passes' gradients are summed in the student's dtype)."""
    s, t, labels, mask = make_rows()
    kw = dict(temperature=1.5, labels=labels, mask=mask, alpha_mlm=0.5)
    _, ref_grad = loss_and_grad(lambda x: kd_loss_reference(x, t.double(), **kw), s.double(), 1.0)
    leaf = s.clone().requires_grad_()
    logits = leaf * 1.0
    loss = kdfast.kd_loss(logits, t, backend=backend, inplace=True, **kw)
    assert_close(logits.detach(), ref_grad, torch.float32, "buffer holds the gradient")
    loss.backward()
    assert_close(leaf.grad, ref_grad, torch.float32, "grad")
    s16, t16 = s.half(), t.half()
    ours = loss_and_grad(lambda x: kdfast.kd_loss(x, t16, backend=backend, **kw), s16)
    ref = loss_and_grad(lambda x: kd_loss_reference(x, t16.double(), **kw), s16.double())
    check_against(ours, ref, torch.float16)


@pytest.mark.parametrize("backend", KD_BACKENDS)
def test_labels_alone_never_change_the_kd_term(backend):
    s, t, labels, mask = make_rows()
    base = kdfast.kd_loss(s, t, temperature=2.0, mask=mask, backend=backend)
    with_labels = kdfast.kd_loss(s, t, temperature=2.0, mask=mask, labels=labels, backend=backend)
    torch.testing.assert_close(with_labels, base, rtol=0, atol=0)
    masked = kdfast.kd_loss(s, t, temperature=2.0, mask=mask, labels=labels, kd_rows="masked", backend=backend)
    assert not torch.allclose(masked, base)  # the choice is the argument's, and it matters here
    ref = kd_loss_reference(s.double(), t.double(), temperature=2.0, mask=mask & (labels != -100))
    assert_close(masked, ref, torch.float32, "masked = KD over the labelled, unmasked rows")


@pytest.mark.parametrize("backend", SPARSE_BACKENDS)
@pytest.mark.parametrize("kd_rows", ["all", "masked"])
@pytest.mark.parametrize("mode", ["topk", "sampled"])
@pytest.mark.parametrize("alpha_mlm", [0.0, 0.7])
def test_sparse_kd_loss_matches_reference(backend, kd_rows, mode, alpha_mlm):
    s, t, labels, mask = make_rows()
    if mode == "topk":
        ids, vals, lse = kdfast.sparsify_teacher_logits(t, K, temperature=2.0)
        extra = dict(teacher_logsumexp=lse)
    else:
        ids, vals = kdfast.sparsify_teacher_logits(t, K, mode="sampled", temperature=2.0)
        extra = {}
    kw = dict(mode=mode, temperature=2.0, labels=labels, mask=mask, alpha_mlm=alpha_mlm, kd_rows=kd_rows, **extra)
    ours = loss_and_grad(lambda x: kdfast.sparse_kd_loss(x, ids, vals, backend=backend, **kw), s)
    ref = loss_and_grad(lambda x: sparse_kd_loss_reference(x, ids, vals, **kw), s.double())
    check_against(ours, ref, torch.float32)
    if alpha_mlm == 0 and kd_rows == "all":  # labels alone change nothing
        plain = kdfast.sparse_kd_loss(s, ids, vals, backend=backend, **{**kw, "labels": None})
        torch.testing.assert_close(plain, ours[0], rtol=0, atol=0)


@pytest.mark.parametrize("kd_rows", ["all", "masked"])
def test_fused_linear_kd_loss_equals_kd_loss_on_the_logits(kd_rows):
    """fused_linear_kd_loss(kd_rows=...) is kd_loss(h W^T + b, ..., kd_rows=...) without the N x V logits."""
    h_s, w_s, b_s = torch.randn(N, 12), torch.randn(V, 12) * 0.5, torch.randn(V) * 0.3
    h_t, w_t = torch.randn(N, 20), torch.randn(V, 20) * 0.4
    _, _, labels, mask = make_rows()
    kw = dict(temperature=2.0, labels=labels, mask=mask, alpha_kd=0.9, alpha_mlm=0.4, kd_rows=kd_rows)
    fused = kdfast.fused_linear_kd_loss(h_s.double(), w_s.double(), h_t.double(), w_t.double(),
                                        student_bias=b_s.double(), chunk_size=8, backend="torch", **kw)
    ref = kd_loss_reference(h_s.double() @ w_s.double().t() + b_s.double(), h_t.double() @ w_t.double().t(), **kw)
    torch.testing.assert_close(fused, ref, rtol=1e-10, atol=1e-12)


def test_fused_restrict_to_masked_is_a_deprecated_alias():
    h_s, w_s = torch.randn(N, 12), torch.randn(V, 12) * 0.5
    h_t, w_t = torch.randn(N, 20), torch.randn(V, 20) * 0.4
    _, _, labels, mask = make_rows()
    f = partial(kdfast.fused_linear_kd_loss, h_s, w_s, h_t, w_t, labels=labels, mask=mask, temperature=2.0,
                alpha_mlm=0.3, backend="torch")
    for alias, kd_rows in ((True, "masked"), (False, "all")):
        with pytest.warns(DeprecationWarning, match="restrict_to_masked is deprecated"):
            old = f(restrict_to_masked=alias)
        torch.testing.assert_close(old, f(kd_rows=kd_rows), rtol=0, atol=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the new spelling warns about nothing
        assert not torch.allclose(f(), f(kd_rows="masked"))  # the default is "all"
    with pytest.raises(ValueError, match="kd_rows or restrict_to_masked"):
        f(kd_rows="all", restrict_to_masked=True)
    with pytest.raises(ValueError, match="kd_rows or restrict_to_masked"):
        kdfast.FusedLinearKDLoss(kd_rows="masked", restrict_to_masked=False)


@pytest.mark.parametrize("call", ["kd_loss", "KDLoss", "sparse_kd_loss", "SparseKDLoss", "fused_linear_kd_loss",
                                  "FusedLinearKDLoss"])
def test_bad_kd_rows_name_the_argument(call):
    s, t, labels, mask = make_rows()
    ids, vals, lse = kdfast.sparsify_teacher_logits(t, K)  # at T = 1, the calls' temperature
    h, w = torch.randn(N, 12), torch.randn(V, 12)
    calls = {
        "kd_loss": lambda **kw: kdfast.kd_loss(s, t, **kw),
        "KDLoss": lambda **kw: kdfast.KDLoss(**{k: v for k, v in kw.items() if k != "labels"})(s, t, kw.get("labels")),
        "sparse_kd_loss": lambda **kw: kdfast.sparse_kd_loss(s, ids, vals, **kw),
        "SparseKDLoss": lambda **kw: kdfast.SparseKDLoss(**{k: v for k, v in kw.items() if k != "labels"})(
            s, ids, vals, labels=kw.get("labels")),
        "fused_linear_kd_loss": lambda **kw: kdfast.fused_linear_kd_loss(h, w, teacher_sparse=(ids, vals, lse), **kw),
        "FusedLinearKDLoss": lambda **kw: kdfast.FusedLinearKDLoss(**{k: v for k, v in kw.items() if k != "labels"})(
            h, w, teacher_sparse=(ids, vals, lse), labels=kw.get("labels")),
    }
    with pytest.raises(ValueError, match=r"kd_rows must be one of \('all', 'masked'\), got 'labelled'"):
        calls[call](kd_rows="labelled")
    with pytest.raises(ValueError, match="kd_rows='masked' counts the rows with a label: it needs labels"):
        calls[call](kd_rows="masked")
    assert torch.isfinite(calls[call](kd_rows="masked", labels=labels))
