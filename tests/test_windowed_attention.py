"""Local (sliding-window) attention transfer: the band |i - j| <= w on every attention-transfer op and
backend, against the float64 oracles of tests/reference.py (scores materialised, the band masked)."""

from __future__ import annotations

import pytest
import torch

import kdfast
from tests.helpers import assert_close, backends_of, make_mask
from tests.inputs import make_scores
from tests.reference import (
    attention_kl_reference,
    attention_mse_reference,
    attention_scores_reference,
    teacher_heads_reference,
)

FLASH_BACKENDS = backends_of("attention_transfer")
MSE_MAP_BACKENDS = backends_of("score_mse_fwd")
KL_MAP_BACKENDS = backends_of("attention_kl_maps")
REFS = {"kl": attention_kl_reference, "mse": attention_mse_reference}
# every dtype each backend claims (Triton's interpreter gets bf16 wrong: bf16 on a GPU only)
FLASH_DTYPES = {"torch": (torch.float64, torch.float32, torch.float16),
                "cpu": (torch.float64, torch.float32, torch.float16, torch.bfloat16),
                "triton": (torch.float32, torch.float16)}
MAP_DTYPES = {"torch": (torch.float64, torch.float32), "cpu": (torch.float64, torch.float32, torch.float16,
                                                             torch.bfloat16), "triton": (torch.float32,)}


def token_mask(kind: str, B: int, L: int) -> torch.Tensor | None:
    """none; padded (right padding, one full row); scattered (holes and left padding); packed
    (pack_texts' rows: every row full but the last, which is padded at its end)."""
    if kind == "none":
        return None
    if kind == "padded":
        return make_mask(B, L, full_row=True)
    if kind == "packed":
        mask = torch.ones(B, L, dtype=torch.bool)
        mask[-1, L - L // 3:] = False
        return mask
    mask = torch.rand(B, L) > 0.3
    mask[0] = True
    mask[-1, : L // 4] = False
    return mask


def make_qk(B, H_s, H_t, L, ds, dt, dtype):
    """Student Q / K correlated with the (grouped) teacher's, as the loss tests make them."""
    q_t = torch.randn(B, H_t, L, dt, dtype=torch.float64)
    k_t = torch.randn(B, H_t, L, dt, dtype=torch.float64)
    proj = torch.randn(dt, ds, dtype=torch.float64) / dt**0.5
    q_s = teacher_heads_reference(q_t @ proj, H_s) + 0.5 * torch.randn(B, H_s, L, ds, dtype=torch.float64)
    k_s = teacher_heads_reference(k_t @ proj, H_s) + 0.5 * torch.randn(B, H_s, L, ds, dtype=torch.float64)
    return tuple(x.to(dtype) for x in (q_s, k_s, q_t, k_t))


def flash_reference(q_s, k_s, q_t, k_t, mask, loss, window):
    """Materialise float64 scores (teacher heads grouped by their mean score), mask the band, take
    the map oracle; gradients by autograd."""
    H = q_s.shape[1]
    q = q_s.detach().double().requires_grad_()
    k = k_s.detach().double().requires_grad_()
    s = attention_scores_reference(q, k, q_s.shape[-1] ** -0.5, mask, window)
    t = teacher_heads_reference(attention_scores_reference(q_t, k_t, q_t.shape[-1] ** -0.5), H)
    if mask is not None:  # the additive key mask after the group mean, as flash_attention_transfer does
        t = t.masked_fill(~mask[:, None, None, :].bool(), torch.finfo(torch.float64).min)
    value = REFS[loss](s, t, mask, window=window)
    value.backward()
    return value.detach(), q.grad, k.grad


def run_flash(q_s, k_s, q_t, k_t, mask, **kw):
    q = q_s.detach().clone().requires_grad_()
    k = k_s.detach().clone().requires_grad_()
    value = kdfast.flash_attention_transfer(q, k, q_t, k_t, mask, **kw)
    value.backward()
    return value.detach(), q.grad, k.grad


def check(got, ref, dtype, names=("loss", "dq_s", "dk_s")):
    for what, a, e in zip(names, got, ref):
        assert torch.isfinite(a).all(), what
        assert_close(a, e, dtype, what)


# (window, L): windows 1 and 7 at odd L = 37; 64 at L = 131 (band narrower than the row, several
# C++ query blocks); the interpreter runs Triton on fewer cases
FLASH_CASES = [(b, d, w, L, masking)
               for b in FLASH_BACKENDS for d in FLASH_DTYPES.get(b, (torch.float32,))
               for (w, L), masking in zip(((1, 37), (7, 37), (64, 131)), ("padded", "scattered", "packed"))
               if b != "triton" or (d == torch.float32 or w == 7)]


@pytest.mark.parametrize("backend,dtype,window,L,masking", FLASH_CASES)
@pytest.mark.parametrize("loss", ["kl", "mse"])
def test_flash_window_matches_oracle(backend, dtype, window, L, masking, loss):
    """Forward and both gradients, a teacher of twice the student's heads (grouped), head dims
    that differ."""
    B, H = (2, 2) if backend != "triton" or L < 100 else (1, 1)
    q_s, k_s, q_t, k_t = make_qk(B, H, 2 * H, L, 16, 12, dtype)
    mask = token_mask(masking, B, L)
    got = run_flash(q_s, k_s, q_t, k_t, mask, loss=loss, window=window, backend=backend)
    check(got, flash_reference(q_s, k_s, q_t, k_t, mask, loss, window), dtype)


@pytest.mark.parametrize("backend", FLASH_BACKENDS)
@pytest.mark.parametrize("loss", ["kl", "mse"])
def test_flash_window_as_wide_as_the_row_is_global(backend, loss):
    """w >= L - 1 is the global layer; w = L - 2 is not (the corner pairs drop out)."""
    B, H, L = 2, 2, 23
    q_s, k_s, q_t, k_t = make_qk(B, H, H, L, 8, 8, torch.float32)
    mask = token_mask("padded", B, L)
    glob = run_flash(q_s, k_s, q_t, k_t, mask, loss=loss, backend=backend)
    for w in (L - 1, L, 10 * L):
        check(run_flash(q_s, k_s, q_t, k_t, mask, loss=loss, window=w, backend=backend), glob, torch.float32)
    near = run_flash(q_s, k_s, q_t, k_t, None, loss=loss, window=L - 2, backend=backend)
    check(near, flash_reference(q_s, k_s, q_t, k_t, None, loss, L - 2), torch.float32)
    assert not torch.allclose(near[0], run_flash(q_s, k_s, q_t, k_t, None, loss=loss, backend=backend)[0])


def test_triton_window_skips_tiles():
    """Small tiles: with w = 7 most key tiles of a query tile (and query tiles of a key tile) lie
    outside the band, so the loops start and end inside the row."""
    if "triton" not in FLASH_BACKENDS:
        pytest.skip("triton backend not available here")
    from kdfast.ops.attention_transfer.triton import attention_transfer_fwd_bwd_triton

    B, H, L, w = 2, 2, 83, 7
    q_s, k_s, q_t, k_t = make_qk(B, H, H, L, 16, 32, torch.float32)
    mask = token_mask("scattered", B, L)
    for loss in ("kl", "mse"):
        ref_loss, ref_dq, ref_dk = flash_reference(q_s, k_s, q_t, k_t, mask, loss, w)
        n = kdfast.losses.attention.band_counts(mask, w)
        count = H * ((n * mask).sum() if loss == "mse" else mask.sum())
        rows, dq, dk = attention_transfer_fwd_bwd_triton(q_s, k_s, q_t, k_t, mask, mask.float() / count,
                                                         16**-0.5, 32**-0.5, loss == "mse", True, block=16, window=w)
        check((rows.sum(), dq, dk), (ref_loss, ref_dq, ref_dk), torch.float32)


@pytest.mark.skipif("cpu" not in FLASH_BACKENDS, reason="kdfast._C is not built")
@pytest.mark.parametrize("threads", [1, 3])
def test_flash_cpu_window_same_bits_for_any_thread_count(threads):
    """dK of a (b, h) split between thread ranges: the same bits for any split."""
    B, H, L = 1, 3, 300
    q_s, k_s, q_t, k_t = make_qk(B, H, H, L, 8, 12, torch.float32)
    mask = token_mask("scattered", B, L)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        ref = run_flash(q_s, k_s, q_t, k_t, mask, loss="kl", window=9, backend="cpu")
        torch.set_num_threads(threads)
        got = run_flash(q_s, k_s, q_t, k_t, mask, loss="kl", window=9, backend="cpu")
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(a, b) for a, b in zip(got, ref))
    check(got, flash_reference(q_s, k_s, q_t, k_t, mask, "kl", 9), torch.float32)


@pytest.mark.parametrize("backend", [b for b in ("cpu", "torch") if b in FLASH_BACKENDS])
def test_flash_window_gradcheck(backend):
    q_s, k_s, q_t, k_t = make_qk(2, 2, 2, 9, 4, 6, torch.float64)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1, 1, 1, 1], [1, 1, 0, 1, 1, 1, 0, 0, 0]])
    for loss in ("kl", "mse"):
        assert torch.autograd.gradcheck(
            lambda q, k: kdfast.flash_attention_transfer(q, k, q_t, k_t, mask, loss=loss, window=2, backend=backend),
            (q_s.requires_grad_(), k_s.requires_grad_()), fast_mode=True)


# --- on given maps ---------------------------------------------------------------------------

def map_cases(backends, dtypes):
    # w = 7 at L = 37: the band rows (2 w + 1 < L); w = 20: 2 w + 1 >= L but w < L - 1
    return [(b, d, w, masking) for b in backends for d in dtypes.get(b, (torch.float32,))
            for w, masking in ((1, "scattered"), (7, "padded"), (20, "packed"), (64, "none"))
            if b != "triton" or w in (7, 20)]


def check_map_window(loss_fn, reference, backend, dtype, window, masking, scale):
    """Out-of-band scores are never read: NaN there changes nothing; the gradient is 0 there."""
    B, H, L = 2, 3, 37
    mask = token_mask(masking, B, L)
    s, t = make_scores(B, H, L, dtype, mask)
    band = (torch.arange(L)[:, None] - torch.arange(L)[None, :]).abs() <= window
    dirty_s, dirty_t = s.masked_fill(~band, float("nan")), t.masked_fill(~band, float("nan"))
    x = dirty_s.clone().requires_grad_()
    loss = loss_fn(x, dirty_t, mask, window=window, backend=backend)
    (scale * loss).backward()
    sd = s.double().requires_grad_()
    ref = reference(sd, t.double(), mask, window=window)
    (scale * ref).backward()
    check((loss.detach(), x.grad), (ref.detach(), sd.grad), dtype, ("loss", "grad"))
    assert not x.grad[..., ~band].any()


@pytest.mark.parametrize("backend,dtype,window,masking", map_cases(KL_MAP_BACKENDS, MAP_DTYPES))
def test_attention_kl_maps_window(backend, dtype, window, masking):
    check_map_window(kdfast.attention_kl_loss, attention_kl_reference, backend, dtype, window, masking, 1.0)


@pytest.mark.parametrize("backend,dtype,window,masking", map_cases(MSE_MAP_BACKENDS, MAP_DTYPES))
def test_attention_mse_maps_window(backend, dtype, window, masking):
    check_map_window(kdfast.attention_mse_loss, attention_mse_reference, backend, dtype, window, masking, -1.5)


@pytest.mark.parametrize("loss", ["kl", "mse"])
def test_flash_window_equals_maps_window(loss):
    """The flash form of a local layer equals the map loss on the materialised scores, same window."""
    B, H, L, w = 2, 2, 29, 5
    q_s, k_s, q_t, k_t = make_qk(B, H, H, L, 8, 8, torch.float64)
    mask = token_mask("padded", B, L)
    flash = kdfast.flash_attention_transfer(q_s, k_s, q_t, k_t, mask, loss=loss, window=w)
    s = attention_scores_reference(q_s, k_s, 8**-0.5, mask)
    t = attention_scores_reference(q_t, k_t, 8**-0.5, mask)
    fn = kdfast.attention_kl_loss if loss == "kl" else kdfast.attention_mse_loss
    torch.testing.assert_close(flash, fn(s, t, mask, window=w))


# --- arguments and DistillationLoss ----------------------------------------------------------

@pytest.mark.parametrize("bad", [-1, 2.0, True, "8", [4]])
def test_bad_window_is_a_value_error_naming_it(bad):
    q = torch.randn(1, 2, 6, 4)
    s = torch.randn(1, 2, 6, 6)
    calls = (lambda: kdfast.flash_attention_transfer(q, q, q, q, window=bad),
             lambda: kdfast.attention_kl_loss(s, s, window=bad),
             lambda: kdfast.attention_mse_loss(s, s, window=bad))
    for call in calls:
        with pytest.raises(ValueError, match="window must be None .* or an int >= 0"):
            call()


def _outputs(qs, ks):
    return {"q": tuple(qs), "k": tuple(ks)}


def test_distillation_loss_carries_each_layers_window():
    """Per-layer windows reach the attention term; stacked layers of different windows run apart."""
    B, H, L = 2, 2, 21
    mask = token_mask("padded", B, L)
    layers = [make_qk(B, H, H, L, 8, 8, torch.float32) for _ in range(3)]
    student = _outputs([x[0] for x in layers], [x[1] for x in layers])
    teacher = _outputs([x[2] for x in layers], [x[3] for x in layers])
    windows = [None, 4, 1]
    expected = sum(kdfast.flash_attention_transfer(q_s, k_s, q_t, k_t, mask, loss="kl", scale_s=1.0, scale_t=1.0,
                                                   window=w) for (q_s, k_s, q_t, k_t), w in zip(layers, windows))
    for stack in (False, True):
        crit = kdfast.DistillationLoss({1: 1, 2: 2, 3: 3}, {"attention": 1.0}, attention="kl",
                                       teacher_windows=windows, student_windows=windows, stack_layers=stack)
        total, _ = crit(student, teacher, mask)
        torch.testing.assert_close(total, expected)
    # a dict lists only the local layers
    crit = kdfast.DistillationLoss({1: 1, 2: 2, 3: 3}, {"attention": 1.0}, attention="kl",
                                   teacher_windows={1: 4, 2: 1}, student_windows={1: 4, 2: 1})
    torch.testing.assert_close(crit(student, teacher, mask)[0], expected)
    # an explicit band for a pair compares both sides on it, whatever their own windows
    crit = kdfast.DistillationLoss({1: 1, 2: 2, 3: 3}, {"attention": 1.0}, attention="kl",
                                   teacher_windows=windows, windows={2: 4, 3: 1})
    torch.testing.assert_close(crit(student, teacher, mask)[0], expected)


def test_distillation_loss_window_mismatch_and_bad_windows():
    with pytest.raises(ValueError, match=r"pair 2: 4 compares student attention layer 1 \(window None\) with "
                                         r"teacher attention layer 3 \(window 64\)"):
        kdfast.DistillationLoss({1: 2, 2: 4}, {"attention": 1.0}, teacher_windows=[None, None, None, 64])
    with pytest.raises(ValueError, match=r"teacher_windows\[1\] must be None"):
        kdfast.DistillationLoss({1: 2}, {"attention": 1.0}, teacher_windows=[None, -3])
    with pytest.raises(ValueError, match="teacher_windows has 2 entries but layer_map uses attention layer 3"):
        kdfast.DistillationLoss({1: 4}, {"attention": 1.0}, teacher_windows=[None, 64])
    with pytest.raises(ValueError, match=r"windows has key 5"):
        kdfast.DistillationLoss({1: 2}, {"attention": 1.0}, windows={5: 3})
    with pytest.raises(ValueError, match=r"windows\[1\] must be None"):
        kdfast.DistillationLoss({1: 2}, {"attention": 1.0}, windows={1: 1.5})
    crit = kdfast.DistillationLoss({1: 2, 2: 4}, {"attention": 1.0}, teacher_windows=[None, None, None, 64],
                                   windows={2: 64})
    assert crit.pair_windows == {1: None, 2: 64}
