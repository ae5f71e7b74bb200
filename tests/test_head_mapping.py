"""Teacher / student head counts that differ: the flash and materialised attention losses against
a float64 reference that averages (or repeats) the teacher's score maps head by head."""

from __future__ import annotations

import pytest
import torch

import kdfast
from kdfast.losses import map_teacher_heads
from tests.helpers import assert_close, backends_of, make_mask
from tests.inputs import REFS, additive, grouped_reference, make_qk
from tests.reference import (
    attention_kl_reference,
    attention_scores_reference,
    teacher_heads_reference,
)

MAP_FNS = {"kl": kdfast.attention_kl_loss, "mse": kdfast.attention_mse_loss}
FLASH_BACKENDS = backends_of("attention_transfer")
HEADS = [(12, 4), (4, 12), (12, 12)]


@pytest.mark.parametrize("H_t,H_s", HEADS)
@pytest.mark.parametrize("loss", ["kl", "mse"])
@pytest.mark.parametrize("backend", FLASH_BACKENDS)
def test_flash_head_mapping_matches_reference(H_t, H_s, loss, backend):
    B, L, ds, dt = 2, 19, 8, 16
    q_s, k_s, q_t, k_t = make_qk(B, H_s, H_t, L, ds, dt)
    mask = make_mask(B, L)
    ref = grouped_reference(q_s, k_s, q_t, k_t, mask, loss, ds**-0.5, dt**-0.5)
    q, k = q_s.clone().requires_grad_(), k_s.clone().requires_grad_()
    value = kdfast.flash_attention_transfer(q, k, q_t, k_t, mask, loss=loss, backend=backend)
    value.backward()
    for what, got, exp in zip(("loss", "dq_s", "dk_s"), (value.detach(), q.grad, k.grad), ref):
        assert_close(got, exp, torch.float32, f"{what} H_t={H_t} H_s={H_s}")


MAP_CASES = [(loss, b) for loss, op in (("kl", "attention_kl_maps"), ("mse", "score_mse_fwd")) for b in backends_of(op)]


@pytest.mark.parametrize("H_t,H_s", HEADS)
@pytest.mark.parametrize("loss,backend", MAP_CASES)
@pytest.mark.parametrize("token_mask", [True, False])
def test_materialised_head_mapping_matches_flash_and_reference(H_t, H_s, loss, backend, token_mask):
    """Maps that carry the additive mask (finfo.min), with or without the token mask: the group
    average must not overflow to -inf (the KL would see a non-finite teacher)."""
    B, L, ds, dt = 2, 19, 8, 16
    q_s, k_s, q_t, k_t = make_qk(B, H_s, H_t, L, ds, dt)
    mask = make_mask(B, L, full_row=False)
    s_map = additive(ds**-0.5 * q_s @ k_s.transpose(-1, -2), mask)
    t_map = additive(dt**-0.5 * q_t @ k_t.transpose(-1, -2), mask)
    m = mask if token_mask else None
    s = s_map.clone().requires_grad_()
    value = MAP_FNS[loss](s, t_map, m, backend=backend)
    value.backward()
    sd = s_map.double().requires_grad_()
    ref = REFS[loss](sd, teacher_heads_reference(t_map, H_s), m)
    ref.backward()
    assert torch.isfinite(value) and torch.isfinite(s.grad).all()
    assert_close(value.detach(), ref.detach(), torch.float32, "loss")
    assert_close(s.grad, sd.grad, torch.float32, "grad")
    if token_mask:  # without it the padded query rows count in the map losses, not in the flash form
        flash = kdfast.flash_attention_transfer(q_s, k_s, q_t, k_t, mask, loss=loss, backend="torch")
        assert_close(flash, ref.detach(), torch.float32, "flash vs materialised")


def test_no_mapping_raises_naming_teacher_and_counts():
    q_s, k_s, q_t, k_t = make_qk(2, 5, 5, 7, 8, 8)
    q12, k12 = torch.randn(2, 12, 7, 8), torch.randn(2, 12, 7, 8)
    with pytest.raises(ValueError, match=r"q_t head count mismatch: the teacher has 12 heads and the student 5.*"
                                         r"minilm_relation_loss"):
        kdfast.flash_attention_transfer(q_s, k_s, q12, k12)
    s = torch.randn(2, 5, 7, 7)
    for fn in MAP_FNS.values():
        with pytest.raises(ValueError, match=r"teacher_scores head count mismatch: the teacher has 12 heads "
                                             r"and the student 5"):
            fn(s, torch.randn(2, 12, 7, 7))
    with pytest.raises(ValueError, match="student_heads must be a positive int"):
        map_teacher_heads(s, 0)
    with pytest.raises(ValueError, match="kind must be one of"):
        map_teacher_heads(s, 5, kind="probs")


def test_mapping_is_a_view_where_the_layout_allows():
    """Q of a BERT projection ([B, L, H dh] viewed as heads): grouping is a view; a one-head
    teacher repeated to several student heads too."""
    B, L, H, d = 2, 7, 12, 8
    q = torch.randn(B, L, H * d).view(B, L, H, d).transpose(1, 2)
    grouped, g = map_teacher_heads(q, 4, kind="qk")
    assert g == 3 and grouped.shape == (B, 4, L, 3 * d)
    assert grouped.data_ptr() == q.data_ptr() and grouped._base is not None
    # group h is the concatenation of heads 3h, 3h+1, 3h+2 along dh
    torch.testing.assert_close(grouped[:, 1], torch.cat([q[:, 3], q[:, 4], q[:, 5]], dim=-1))
    one = torch.randn(B, 1, L, d)
    repeated, g = map_teacher_heads(one, 4, kind="qk")
    assert g == 1 and repeated.shape == (B, 4, L, d) and repeated.data_ptr() == one.data_ptr()
    assert repeated.stride(1) == 0


def test_relation_loss_unaffected_by_head_mapping():
    """minilm_relation_loss re-splits into R relation heads first: both sides then have R heads."""
    B, L, R = 2, 11, 4
    s = {x: torch.randn(B, L, 24) for x in "qkv"}
    t = {x: torch.randn(B, L, 48) for x in "qkv"}
    mask = make_mask(B, L)
    got = kdfast.minilm_relation_loss(s, t, R, mask, backend="torch")
    from kdfast.losses.attention import split_relation_heads

    expected = sum(attention_kl_reference(
        attention_scores_reference(split_relation_heads(s[x], R), split_relation_heads(s[x], R), 6**-0.5, mask),
        attention_scores_reference(split_relation_heads(t[x], R), split_relation_heads(t[x], R), 12**-0.5, mask),
        mask) for x in "qkv")
    assert_close(got, expected, torch.float32, "relation loss")
