"""MiniLMv2 relation transfer (Q-Q, K-K, V-V) with differing head counts and widths, against a
float64 materialised reference."""

import math

import pytest
import torch
import torch.nn.functional as F

import kdfast
from kdfast.losses.attention import split_relation_heads
from tests.helpers import backends_of


def relation_reference(s, t, R, key_mask):
    """sum over relations of mean over (b, r, real rows) of KL(softmax(Xt Xt^T/sqrt(dt)) || same for Xs)."""
    total = 0.0
    for x in ("q", "k", "v"):
        xs = split_relation_heads(s[x].double(), R)
        xt = split_relation_heads(t[x].double(), R)
        ss = xs @ xs.transpose(-1, -2) / math.sqrt(xs.shape[-1])
        st = xt @ xt.transpose(-1, -2) / math.sqrt(xt.shape[-1])
        km = key_mask[:, None, None, :]
        log_s = F.log_softmax(ss.masked_fill(~km, -float("inf")), -1)
        log_t = F.log_softmax(st.masked_fill(~km, -float("inf")), -1)
        rows = torch.where(km, log_t.exp() * (log_t - log_s), torch.zeros_like(ss)).sum(-1)  # [B, R, L]
        rowmask = key_mask[:, None, :].expand_as(rows)
        total = total + rows[rowmask].mean()
    return total


@pytest.mark.parametrize("backend", backends_of("attention_transfer"))
def test_relations_match_reference_with_different_heads_and_widths(backend):
    B, L, d_s, d_t, R = 2, 37, 24, 48, 4  # student 24 wide (e.g. 2 heads), teacher 48 (e.g. 12 heads)
    s = {x: torch.randn(B, L, d_s, requires_grad=True) for x in "qkv"}
    t = {x: torch.randn(B, L, d_t) for x in "qkv"}
    key_mask = torch.ones(B, L, dtype=torch.bool)
    key_mask[1, 30:] = False
    loss = kdfast.minilm_relation_loss(s, t, R, key_mask, backend=backend)
    loss.backward()
    sd = {x: v.detach().double().requires_grad_() for x, v in s.items()}
    ref = relation_reference(sd, t, R, key_mask)
    ref.backward()
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-5, atol=1e-6)
    for x in "qkv":
        torch.testing.assert_close(s[x].grad.double(), sd[x].grad, rtol=1e-4, atol=1e-6)


def test_relation_heads_must_divide_widths():
    s = {x: torch.randn(1, 5, 24) for x in "qkv"}
    t = {x: torch.randn(1, 5, 40) for x in "qkv"}
    with pytest.raises(ValueError, match="relation_heads=16 must divide the width of student q"):
        kdfast.minilm_relation_loss(s, t, 16)
    with pytest.raises(ValueError, match="relations must be among"):
        kdfast.minilm_relation_loss(s, t, 8, relations=("qk",))
    # head-split input [B, H, L, dh] is accepted and equals the concatenated form
    q4 = torch.randn(1, 3, 5, 8)
    flat = q4.transpose(1, 2).reshape(1, 5, 24)
    assert torch.equal(split_relation_heads(q4, 4), split_relation_heads(flat, 4))
