"""One call per loss family: hidden MSE over n layers with stacked projections, and DistillationLoss
(hidden + attention per layer, or over all mapped layers at once with ``stack_layers``) against
sums of per-layer float64 references."""

from __future__ import annotations

import pytest
import torch

import kdfast
import kdfast.losses.attention as attention_mod
import kdfast.losses.hidden as hidden_mod
from tests.conftest import CPU_BACKENDS
from tests.helpers import assert_close, make_mask
from tests.reference import (
    attention_kl_reference,
    attention_mse_reference,
    attention_scores_reference,
    hidden_mse_reference,
    teacher_heads_reference,
)

HIDDEN_BACKENDS = [b for b in ("triton", "torch") if b in CPU_BACKENDS]
ATT_REFS = {"kl": attention_kl_reference, "mse": attention_mse_reference}


def leaf(x, dtype=None):
    return x.detach().clone().to(dtype or x.dtype).requires_grad_()


# --- hidden_mse_loss with a leading layer dimension ------------------------------------------------

LAYERED_CASES = [(b, d, m, bias) for b in HIDDEN_BACKENDS for d in (torch.float32, torch.float64)
                 for m in (False, True) for bias in (False, True) if not (b == "triton" and d == torch.float64)]


@pytest.mark.parametrize("backend,dtype,masked,bias", LAYERED_CASES)
def test_layered_hidden_mse_is_sum_of_layers(backend, dtype, masked, bias, monkeypatch):
    monkeypatch.setattr(hidden_mod, "CHUNK_ELEMS", 3 * 16 * 40)  # several chunks of 16 rows, a ragged last one
    n, B, L, ds, dt = 3, 3, 37, 24, 40
    hs = torch.randn(n, B, L, ds, dtype=dtype)
    W = torch.randn(n, dt, ds, dtype=dtype) / ds**0.5
    b = 0.1 * torch.randn(n, dt, dtype=dtype) if bias else None
    ht = torch.einsum("nbld,ned->nble", hs, W) + 0.5 * torch.randn(n, B, L, dt, dtype=dtype)
    mask = make_mask(B, L, full_row=True) if masked else None
    x, w = leaf(hs), leaf(W)
    bb = leaf(b) if bias else None
    loss = kdfast.hidden_mse_loss(x, ht, w, bb, mask, backend=backend)
    (loss * -1.5).backward()
    xd, wd = leaf(hs, torch.float64), leaf(W, torch.float64)
    bd = leaf(b, torch.float64) if bias else None
    ref = sum(hidden_mse_reference(xd[l], ht[l], wd[l], bd[l] if bias else None, mask) for l in range(n))
    (ref * -1.5).backward()
    assert_close(loss.detach(), ref.detach(), dtype, "loss")
    assert_close(x.grad, xd.grad, dtype, "dh_s")
    assert_close(w.grad, wd.grad, dtype, "dW_p")
    if bias:
        assert_close(bb.grad, bd.grad, dtype, "db_p")
    # the fused function keeps only the three gradients, in the inputs' shapes
    saved = sorted(tuple(t.shape) for t in kdfast.hidden_mse_loss(x, ht, w, bb, mask).grad_fn.saved_tensors)
    assert saved == sorted([(n, B * L, ds), (n, dt, ds)] + ([(n, dt)] if bias else []))


def test_layered_hidden_mse_bad_arguments():
    hs, ht, W = torch.randn(2, 3, 5, 4), torch.randn(2, 3, 5, 6), torch.randn(2, 6, 4)
    f = kdfast.hidden_mse_loss
    with pytest.raises(ValueError, match=r"student_hidden has shape \(3, 3, 5, 4\): with proj_weight \[n_layers=2"):
        f(hs[[0, 1, 1]], ht[[0, 1, 1]], W)
    with pytest.raises(ValueError, match=r"proj_weight has shape \(2, 6, 5\)"):
        f(hs, ht, torch.randn(2, 6, 5))
    with pytest.raises(ValueError, match=r"proj_bias has shape \(6,\), expected \[2, 6\]"):
        f(hs, ht, W, torch.randn(6))
    with pytest.raises(ValueError, match=r"mask has shape \(2, 3, 5\), expected .* \(3, 5\)"):
        f(hs, ht, W, None, torch.ones(2, 3, 5))


# --- DistillationLoss against float64 per-layer references ---------------------------------------

N_T, N_S = 4, 2
LAYER_MAP = {0: 0, 1: 2, 2: 4}


def make_outputs(B, L, d_s, d_t, H_s, H_t, dh_s, dh_t):
    """Dict outputs of a 2-layer student and a 4-layer teacher: hidden states, pre-scaled Q / K,
    and the score maps they give (with the additive mask)."""
    mask = make_mask(B, L)
    t = {"hidden_states": [torch.randn(B, L, d_t) for _ in range(N_T + 1)],
         "q": [torch.randn(B, H_t, L, dh_t) * dh_t**-0.5 for _ in range(N_T)],
         "k": [torch.randn(B, H_t, L, dh_t) for _ in range(N_T)]}
    s = {"hidden_states": [torch.randn(B, L, d_s, requires_grad=True) for _ in range(N_S + 1)],
         "q": [torch.randn(B, H_s, L, dh_s, requires_grad=True) for _ in range(N_S)],
         "k": [torch.randn(B, H_s, L, dh_s, requires_grad=True) for _ in range(N_S)]}
    for o in (s, t):
        o["scores"] = [attention_scores_reference(q, k, 1.0).float().masked_fill(~mask[:, None, None, :], -1e4)
                       for q, k in zip(o["q"], o["k"])]
    return s, t, mask


def reference_terms(dl, s, t, mask, attention):
    """Float64 per-layer references summed over the mapped layers, with float64 leaves for the
    student tensors and the projections (gradients come back on them)."""
    leaves = {key: [leaf(x, torch.float64) for x in s[key]] for key in ("hidden_states", "q", "k")}
    proj = {m: (leaf(p.weight, torch.float64), leaf(p.bias, torch.float64)) for m, p in
            ((int(k), v) for k, v in dl.projections.items())}
    hidden = sum(hidden_mse_reference(leaves["hidden_states"][m], t["hidden_states"][g], *proj[m], mask)
                 for m, g in LAYER_MAP.items())
    att = 0
    for m, g in LAYER_MAP.items():
        if m == 0:
            continue
        sc = attention_scores_reference(leaves["q"][m - 1], leaves["k"][m - 1], 1.0, mask)
        tc = attention_scores_reference(t["q"][g - 1], t["k"][g - 1], 1.0)
        tc = teacher_heads_reference(tc, sc.shape[1]).masked_fill(~mask[:, None, None, :], -float("inf"))
        att = att + ATT_REFS[attention](sc, tc, mask)
    return {"hidden": hidden, "attention": att}, leaves, proj


@pytest.mark.parametrize("stack_layers", [True, False])
@pytest.mark.parametrize("attention", ["kl", "mse"])
@pytest.mark.parametrize("heads", [(2, 4), (4, 2), (2, 2)])
def test_distillation_loss_equals_per_layer_references(attention, heads, stack_layers, monkeypatch):
    """Hidden (projected 24 -> 40) and flash attention (teacher and student head counts differing
    both ways): one call per family with ``stack_layers``, one per layer without; either way totals
    and gradients (student hidden states, Q, K and the projections) equal the sums of per-layer
    float64 references."""
    H_s, H_t = heads
    s, t, mask = make_outputs(B=3, L=19, d_s=24, d_t=40, H_s=H_s, H_t=H_t, dh_s=8, dh_t=12)
    calls = {"hidden": 0, "attention": 0}
    for mod, fn, key in ((hidden_mod, "hidden_mse_loss", "hidden"),
                         (attention_mod, "flash_attention_transfer", "attention")):
        real = getattr(mod, fn)

        def counted(*a, _real=real, _key=key, **kw):
            calls[_key] += 1
            return _real(*a, **kw)
        monkeypatch.setattr(mod, fn, counted)
    weights = {"hidden": 1.5, "attention": 2.0}
    dl = kdfast.DistillationLoss(LAYER_MAP, weights, student_hidden_size=24, teacher_hidden_size=40,
                                 attention=attention, attention_source="qk", stack_layers=stack_layers, backend="torch")
    total, terms = dl(s, t, mask)
    assert calls == ({"hidden": 1, "attention": 1} if stack_layers else {"hidden": 3, "attention": 2})
    total.backward()
    ref, leaves, proj = reference_terms(dl, s, t, mask, attention)
    ref_total = sum(weights[k] * v for k, v in ref.items())
    ref_total.backward()
    for k in ref:
        assert_close(terms[k], ref[k].detach(), torch.float32, k)
    assert_close(total.detach(), ref_total.detach(), torch.float32, "total")
    for key in ("hidden_states", "q", "k"):
        for i, (got, exp) in enumerate(zip(s[key], leaves[key])):
            assert_close(got.grad, exp.grad, torch.float32, f"d {key}[{i}]")
    for m, (w, b) in proj.items():
        assert_close(dl.projections[str(m)].weight.grad, w.grad, torch.float32, f"d W[{m}]")
        assert_close(dl.projections[str(m)].bias.grad, b.grad, torch.float32, f"d b[{m}]")


@pytest.mark.parametrize("attention,source", [("kl", "scores"), ("mse", "scores"), ("mse", "attentions"),
                                              ("kl", "attentions")])
@pytest.mark.parametrize("stack_layers", [True, False])
def test_distillation_loss_map_sources_equal_per_layer_sum(attention, source, stack_layers):
    """Materialised maps: concatenated in one call (kl; mse on probabilities), or per layer (mse on
    scores); either way the per-layer sum, with a teacher of twice the student's heads."""
    s, t, mask = make_outputs(B=2, L=13, d_s=16, d_t=16, H_s=2, H_t=4, dh_s=8, dh_t=8)
    if source == "attentions":
        for o in (s, t):
            o["attentions"] = [x.softmax(-1) for x in o.pop("scores")]
    else:  # a genuine score <= -1e2 in one layer only: the per-layer element counts differ
        t["scores"][1] = t["scores"][1].clone()
        t["scores"][1][0, :, 0, 0] = -500.0
    dl = kdfast.DistillationLoss(LAYER_MAP, {"attention": 1.0}, attention=attention, attention_source=source,
                                 stack_layers=stack_layers)
    _, terms = dl(s, t, mask)
    maps_s, maps_t = s[source], t[source]
    if source == "attentions" and attention == "kl":
        maps_s, maps_t = [x.log() for x in maps_s], [x.log() for x in maps_t]
    fn = kdfast.attention_kl_loss if attention == "kl" else kdfast.attention_mse_loss
    expected = sum(fn(maps_s[m - 1], maps_t[g - 1], mask, backend="torch") for m, g in ((1, 2), (2, 4)))
    assert_close(terms["attention"], expected.detach(), torch.float32, "attention")
    ref = sum(ATT_REFS[attention](maps_s[m - 1].double(), teacher_heads_reference(maps_t[g - 1], 2), mask)
              for m, g in ((1, 2), (2, 4)))
    assert_close(terms["attention"], ref.detach(), torch.float32, "attention vs float64")


def test_distillation_loss_unprojected_hidden_and_mixed_projections():
    """stack_layers with equal widths and no projection: the stacked mean times the layer count;
    with projections with and without bias mixed (not stackable): one call per layer, the same sum."""
    s, t, mask = make_outputs(B=2, L=11, d_s=16, d_t=16, H_s=2, H_t=2, dh_s=8, dh_t=8)
    dl = kdfast.DistillationLoss(LAYER_MAP, {"hidden": 1.0}, stack_layers=True)
    _, terms = dl(s, t, mask)
    ref = sum(hidden_mse_reference(s["hidden_states"][m], t["hidden_states"][g], mask=mask)
              for m, g in LAYER_MAP.items())
    assert_close(terms["hidden"], ref, torch.float32, "unprojected")
    dl = kdfast.DistillationLoss(LAYER_MAP, {"hidden": 1.0}, student_hidden_size=16, teacher_hidden_size=24,
                                 stack_layers=True)
    dl.projections["1"] = torch.nn.Linear(16, 24, bias=False)
    t["hidden_states"] = [torch.randn(2, 11, 24) for _ in range(N_T + 1)]
    _, terms = dl(s, t, mask)
    ref = sum(hidden_mse_reference(s["hidden_states"][m], t["hidden_states"][g], dl.projections[str(m)].weight,
                                   dl.projections[str(m)].bias, mask) for m, g in LAYER_MAP.items())
    assert_close(terms["hidden"], ref, torch.float32, "mixed projections")
