"""Attention transfer losses against the float64 references in kdfast.kernels.reference."""

from __future__ import annotations

import pytest
import torch

import kdfast
from kdfast.kernels.reference import attention_kl_reference, attention_mse_reference, attention_scores_reference
from tests.conftest import CPU_BACKENDS

TOL = {torch.float32: (2e-5, 2e-6), torch.float16: (2e-3, 2e-3), torch.float64: (1e-10, 1e-12)}


def assert_close(actual, expected, dtype, what):
    rtol, atol = TOL[dtype]
    atol = atol * max(1.0, float(expected.abs().max()))
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


def make_mask(B, L, *, full_row=False):
    """A [B, L] padding mask: random lengths (>= 1), optionally one fully padded sequence."""
    lengths = torch.randint(1, L + 1, (B,))
    lengths[0] = L
    mask = torch.arange(L)[None, :] < lengths[:, None]
    if full_row and B > 2:
        mask[-1] = False
    return mask


def make_scores(B, H, L, dtype, mask=None):
    """Correlated student / teacher scores; the additive mask (finfo.min) applied to both."""
    t = torch.randn(B, H, L, L, dtype=torch.float64) * 3
    s = 0.6 * t + torch.randn(B, H, L, L, dtype=torch.float64) * 2
    if mask is not None:
        add = torch.zeros(mask.shape, dtype=torch.float64).masked_fill(~mask, torch.finfo(dtype).min)[:, None, None, :]
        s, t = s + add, t + add
    return s.to(dtype).clamp_min(torch.finfo(dtype).min), t.to(dtype).clamp_min(torch.finfo(dtype).min)


def ref_loss_and_grad(fn, s, t, *args):
    sd = s.detach().double().requires_grad_()
    loss = fn(sd, t.double(), *args)
    loss.backward()
    return loss.detach(), sd.grad


def run(fn, s, t, *args, **kw):
    x = s.detach().clone().requires_grad_()
    loss = fn(x, t, *args, **kw)
    loss.backward()
    return loss.detach(), x.grad


# --- materialised maps -------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("L", [37, 130])
@pytest.mark.parametrize("masking", ["none", "mask", "additive", "both"])
def test_attention_mse_matches_reference(dtype, L, masking):
    B, H = 3, 2
    mask = make_mask(B, L)
    s, t = make_scores(B, H, L, dtype, mask if masking in ("additive", "both") else None)
    m = mask if masking in ("mask", "both") else None
    loss, grad = run(kdfast.attention_mse_loss, s, t, m)
    ref_loss, ref_grad = ref_loss_and_grad(attention_mse_reference, s, t, m)
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert grad.dtype == dtype
    assert_close(loss, ref_loss, dtype, "loss")
    assert_close(grad, ref_grad, dtype, "grad")


def test_attention_mse_definition_by_hand():
    """Additive mask and token mask give the same loss; the mean is over counted elements only."""
    B, H, L = 2, 3, 9
    mask = make_mask(B, L)
    s, t = make_scores(B, H, L, torch.float64)
    cnt = mask[:, None, :, None] & mask[:, None, None, :]
    expected = ((s - t)[cnt.expand_as(s)] ** 2).mean()
    torch.testing.assert_close(kdfast.attention_mse_loss(s, t, mask), expected)
    # additive masking only removes the padded keys; the mask also removes padded query rows
    sa, ta = make_scores(B, H, L, torch.float64, mask)
    sa.copy_(torch.where(sa > -1e2, s, sa))
    ta.copy_(torch.where(ta > -1e2, t, ta))
    keys = mask[:, None, None, :].expand_as(s)
    torch.testing.assert_close(kdfast.attention_mse_loss(sa, ta), ((s - t)[keys] ** 2).mean())
    torch.testing.assert_close(kdfast.attention_mse_loss(sa, ta, mask), expected)


# the interpreter is slow: Triton on the two extreme maskings only
KL_CASES = [(b, m) for b in CPU_BACKENDS for m in ("none", "mask", "additive", "both")
            if b != "triton" or m in ("none", "both")]


@pytest.mark.parametrize("backend,masking", KL_CASES)
@pytest.mark.parametrize("L", [37, 130])
def test_attention_kl_matches_reference(backend, L, masking):
    B, H = 3, 2
    mask = make_mask(B, L, full_row=True)
    s, t = make_scores(B, H, L, torch.float32, mask if masking in ("additive", "both") else None)
    m = mask if masking in ("mask", "both") else None
    loss, grad = run(kdfast.attention_kl_loss, s, t, m, backend=backend)
    ref_loss, ref_grad = ref_loss_and_grad(attention_kl_reference, s, t, m)
    # with "additive" only, the fully padded sequence's rows are finfo.min everywhere: uniform in
    # both maps, KL 0, still counted (no token mask), in the reference too
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    assert_close(loss, ref_loss, torch.float32, "loss")
    assert_close(grad, ref_grad, torch.float32, "grad")


def test_attention_kl_float64_and_equals_kl_div():
    B, H, L = 2, 2, 13
    s, t = make_scores(B, H, L, torch.float64)
    loss, grad = run(kdfast.attention_kl_loss, s, t, backend="torch")
    expected = torch.nn.functional.kl_div(s.log_softmax(-1), t.log_softmax(-1), log_target=True,
                                          reduction="sum") / (B * H * L)
    torch.testing.assert_close(loss, expected)
    _, ref_grad = ref_loss_and_grad(attention_kl_reference, s, t)
    assert_close(grad, ref_grad, torch.float64, "grad")


@pytest.mark.parametrize("fn", [kdfast.attention_mse_loss, kdfast.attention_kl_loss])
def test_map_losses_bad_arguments(fn):
    s = torch.randn(2, 3, 5, 5)
    with pytest.raises(ValueError, match="student_scores must be a torch.Tensor"):
        fn(s.tolist(), s)
    with pytest.raises(ValueError, match=r"student_scores must be \[B, H, L, L\]"):
        fn(torch.randn(2, 3, 5, 4), torch.randn(2, 3, 5, 4))
    with pytest.raises(ValueError, match="student_scores must have at least 4"):
        fn(torch.randn(3, 5, 5), torch.randn(3, 5, 5))
    with pytest.raises(ValueError, match="teacher_scores head count mismatch"):
        fn(s, torch.randn(2, 6, 5, 5))
    with pytest.raises(ValueError, match="teacher_scores shape mismatch"):
        fn(s, torch.randn(2, 3, 6, 6))
    with pytest.raises(ValueError, match="teacher_scores has dtype"):
        fn(s, s.double())
    with pytest.raises(ValueError, match="teacher_scores is on meta"):
        fn(s, s.to("meta"))
    with pytest.raises(ValueError, match="student_scores must be float"):
        fn(s.long(), s.long())
    with pytest.raises(ValueError, match="mask has shape"):
        fn(s, s, torch.ones(2, 4))
    with pytest.raises(ValueError, match="mask is on meta"):
        fn(s, s, torch.ones(2, 5, device="meta"))
