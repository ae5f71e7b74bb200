"""Hidden-state transfer losses against the float64 references in tests/reference.py."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import kdfast
import kdfast.losses.hidden as hidden_mod
from tests.helpers import assert_close, backends_of, make_mask
from tests.reference import cosine_reference, feature_map_reference, hidden_mse_reference

# every registered backend of the family's ops that runs here (both ops have the same backends)
HIDDEN_BACKENDS = backends_of("hidden_mse_epilogue")
assert HIDDEN_BACKENDS == backends_of("cosine_rows")
# bf16 runs on the C++ kernels only (the Triton interpreter gets bf16 arithmetic wrong); a backend
# registered later is tested in fp32, fp16 and fp64 until it says otherwise here
DTYPES = {"triton": (torch.float32, torch.float16),
          "cpu": (torch.float32, torch.float16, torch.float64, torch.bfloat16)}
ALL_DTYPES = (torch.float32, torch.float16, torch.float64)


def make_states(B, L, ds, dt, dtype):
    """Teacher states and a student whose projection is correlated with them."""
    hs = torch.randn(B, L, ds, dtype=torch.float64)
    W = torch.randn(dt, ds, dtype=torch.float64) / ds**0.5
    b = 0.1 * torch.randn(dt, dtype=torch.float64)
    ht = hs @ W.T + b + 0.5 * torch.randn(B, L, dt, dtype=torch.float64)
    W = W + 0.2 * torch.randn_like(W) / ds**0.5
    return hs.to(dtype), ht.to(dtype), W.to(dtype), b.to(dtype)


def run_grads(fn, tensors, *args, grad_scale=1.0, **kw):
    """Loss and the gradients of every tensor in ``tensors`` (None entries passed through)."""
    leaves = [x.detach().clone().requires_grad_() if x is not None else None for x in tensors]
    loss = fn(*leaves, *args, **kw)
    (loss * grad_scale).backward()
    return loss.detach(), [x.grad if x is not None else None for x in leaves]


def ref_grads(fn, tensors, *args, grad_scale=1.0):
    return run_grads(fn, [x.double() if x is not None else None for x in tensors], *args, grad_scale=grad_scale)


# --- the row ops themselves (kdfast.ops.hidden_rows), every registered implementation -------------

def _row_inputs(C, D):
    """fp32 rows (the accumulation dtype every backend takes) and weights with a padded row of NaN."""
    a, b = torch.randn(C, D), torch.randn(C, D)
    w = torch.rand(C) + 0.1
    w[2] = 0.0
    a[2], b[2] = float("nan"), float("nan")
    return a, b, w


@pytest.mark.parametrize("backend", HIDDEN_BACKENDS)
def test_mse_epilogue_op_follows_its_contract(backend):
    from kdfast.ops import registry

    y, t, w = _row_inputs(13, 37)
    on = w != 0
    diff = torch.where(on[:, None], y.double() - t.double(), 0.0)
    ref_rows, ref_dy = w.double() * (diff * diff).sum(-1), 2 * w.double()[:, None] * diff
    rows = registry.impls("hidden_mse_epilogue")[backend].fn(y, t, w)   # y becomes dY in place
    assert_close(rows, ref_rows, torch.float32, "rows")
    assert_close(y, ref_dy, torch.float32, "dY")


@pytest.mark.parametrize("backend", HIDDEN_BACKENDS)
@pytest.mark.parametrize("need_grad", [True, False])
def test_cosine_rows_op_follows_its_contract(backend, need_grad):
    from kdfast.ops import registry

    s, t, w = _row_inputs(13, 37)
    on = w != 0
    s64 = torch.where(on[:, None], s.double(), 0.0).requires_grad_()
    t64 = torch.where(on[:, None], t.double(), 0.0)
    cos = (s64 * t64).sum(-1) / (s64.norm(dim=-1).clamp_min(1e-8) * t64.norm(dim=-1).clamp_min(1e-8))
    ref_rows = torch.where(on, w.double() * (1 - cos), 0.0)
    (ref_grad,) = torch.autograd.grad(ref_rows.sum(), s64)
    rows, grad = registry.impls("cosine_rows")[backend].fn(s, t, w, 1e-8, need_grad)
    assert_close(rows, ref_rows.detach(), torch.float32, "rows")
    if need_grad:
        assert grad.dtype == s.dtype
        assert_close(grad, ref_grad, torch.float32, "grad")
    else:
        assert grad.numel() == 0


# --- TinyBERT hidden MSE -------------------------------------------------------------------------

HIDDEN_CASES = [(b, d, L, m, p) for b in HIDDEN_BACKENDS for d in DTYPES.get(b, ALL_DTYPES)
                for L in (37, 130) for m in (False, True) for p in ("proj", "bias", "none")
                if d == torch.float32 or (L, m) == (37, True)]


@pytest.mark.parametrize("backend,dtype,L,masked,proj", HIDDEN_CASES)
def test_hidden_mse_matches_reference(backend, dtype, L, masked, proj, monkeypatch):
    monkeypatch.setattr(hidden_mod, "CHUNK_ELEMS", 64 * 40)  # several chunks, a ragged last one
    B, ds, dt = 3, 24, 40
    if proj == "none":
        ds = dt
    hs, ht, W, b = make_states(B, L, ds, dt, dtype)
    W = W if proj != "none" else None
    b = b if proj == "bias" else None
    mask = make_mask(B, L, full_row=True) if masked else None

    def fn(x, w, bias):
        return kdfast.hidden_mse_loss(x, ht, w, bias, mask, backend=backend)

    def ref(x, w, bias):
        return hidden_mse_reference(x, ht, w, bias, mask)

    loss, grads = run_grads(fn, [hs, W, b], grad_scale=-1.5)
    ref_loss, ref_g = ref_grads(ref, [hs, W, b], grad_scale=-1.5)
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert_close(loss, ref_loss, dtype, "loss")
    for name, g, r, x in zip(("d student_hidden", "d proj_weight", "d proj_bias"), grads, ref_g, (hs, W, b)):
        if x is None:
            continue
        assert g.dtype == x.dtype, name
        assert_close(g, r, dtype, name)


def test_hidden_mse_definition_and_module():
    B, L, ds, dt = 2, 9, 6, 10
    mod = kdfast.HiddenMSELoss(ds, dt, backend="torch").double()
    assert isinstance(mod.proj, torch.nn.Linear)
    hs, ht, _, _ = make_states(B, L, ds, dt, torch.float64)
    mask = make_mask(B, L)
    y = mod.proj(hs)
    expected = torch.nn.functional.mse_loss(y[mask], ht[mask])
    torch.testing.assert_close(mod(hs, ht, mask), expected)
    same = kdfast.HiddenMSELoss(dt, dt)
    assert same.proj is None
    torch.testing.assert_close(same(ht.float(), 2 * ht.float()), (ht.float() ** 2).mean())
    assert kdfast.HiddenMSELoss(dt, dt, project=True).proj is not None
    # nothing counted: 0, no NaN
    zero = kdfast.hidden_mse_loss(hs, ht, mod.proj.weight, mod.proj.bias, torch.zeros(B, L), backend="torch")
    assert zero.item() == 0.0


@pytest.mark.parametrize("backend", HIDDEN_BACKENDS)
def test_hidden_mse_padding_may_hold_nan(backend):
    B, L, ds, dt = 3, 11, 6, 10
    hs, ht, W, b = make_states(B, L, ds, dt, torch.float32)
    mask = make_mask(B, L, full_row=True)
    pad = ~mask[..., None]
    args = [hs.masked_fill(pad, float("nan")), W, b]
    loss, grads = run_grads(lambda x, w, bias: kdfast.hidden_mse_loss(x, ht.masked_fill(pad, float("inf")), w, bias,
                                                                       mask, backend=backend), args)
    ref_loss, ref_g = ref_grads(lambda x, w, bias: hidden_mse_reference(x, ht, w, bias, mask), [hs, W, b])
    assert_close(loss, ref_loss, torch.float32, "loss")
    for g, r in zip(grads, ref_g):
        assert_close(g, r, torch.float32, "grad")
    assert (grads[0][~mask] == 0).all()


def test_hidden_mse_under_autocast_and_mixed_dtypes():
    """bf16 autocast does not push the projection GEMMs to bf16; fp32 weights with bf16 states work."""
    hs, ht, W, b = make_states(2, 9, 6, 10, torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, grads = run_grads(lambda x, w, bias: kdfast.hidden_mse_loss(x, ht, w, bias, backend="torch"), [hs, W, b])
    ref_loss, ref_g = ref_grads(lambda x, w, bias: hidden_mse_reference(x, ht, w, bias), [hs, W, b])
    assert_close(loss, ref_loss, torch.float32, "loss")
    for g, r in zip(grads, ref_g):
        assert_close(g, r, torch.float32, "grad")
    hb, tb = hs.bfloat16(), ht.bfloat16()
    loss, grads = run_grads(lambda x, w, bias: kdfast.hidden_mse_loss(x, tb, w, bias, backend="torch"), [hb, W, b])
    ref_loss, ref_g = ref_grads(lambda x, w, bias: hidden_mse_reference(x, tb, w, bias), [hb, W, b])
    assert grads[0].dtype == torch.bfloat16 and grads[1].dtype == torch.float32
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grads[1].double(), ref_g[1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grads[0].double(), ref_g[0], rtol=1e-2, atol=1e-3)


def test_hidden_mse_gradcheck():
    B, L, ds, dt = 2, 5, 3, 4
    hs, ht, W, b = make_states(B, L, ds, dt, torch.float64)
    mask = make_mask(B, L)
    for backend in HIDDEN_BACKENDS:
        fn = lambda x, w, bias: kdfast.hidden_mse_loss(x, ht, w, bias, mask, backend=backend)  # noqa: E731
        assert torch.autograd.gradcheck(fn, (hs.requires_grad_(), W.requires_grad_(), b.requires_grad_()),
                                        fast_mode=True)


class _AllocationLog(TorchDispatchMode):
    """Records the shape of every tensor that an op allocates (views of its inputs are not counted)."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {x.untyped_storage().data_ptr() for x in tree_leaves((args, kwargs)) if isinstance(x, torch.Tensor)}
        self.shapes += [tuple(x.shape) for x in tree_leaves(out)
                        if isinstance(x, torch.Tensor) and x.untyped_storage().data_ptr() not in inputs]
        return out


@pytest.mark.parametrize("backend", HIDDEN_BACKENDS)
def test_hidden_mse_never_materialises_projection(backend, monkeypatch):
    """With chunks of 64 rows no op ever produces an [N, d_t]-sized tensor, and backward keeps
    only the gradients (dh_s, dW_p, db_p), none of them Y."""
    monkeypatch.setattr(hidden_mod, "CHUNK_ELEMS", 64 * 40)
    B, L, ds, dt = 3, 130, 24, 40
    N = B * L
    hs, ht, W, b = make_states(B, L, ds, dt, torch.float32)
    x, w, bias = (t.clone().requires_grad_() for t in (hs, W, b))
    log = _AllocationLog()
    with log:
        loss = kdfast.hidden_mse_loss(x, ht, w, bias, make_mask(B, L), backend=backend)
        loss.backward()
    biggest = max(torch.Size(s).numel() for s in log.shapes)
    assert biggest < N * dt, f"an op produced {biggest} elements (N * d_t = {N * dt})"
    assert max(torch.Size(s).numel() for s in log.shapes if len(s) >= 2 and s[-1] == dt) <= 64 * dt  # chunks
    # the saved tensors of the graph: the three gradients, no [N, d_t] buffer
    loss = kdfast.hidden_mse_loss(x, ht, w, bias, backend=backend)
    saved = [tuple(t.shape) for t in loss.grad_fn.saved_tensors]
    assert sorted(saved) == sorted([(N, ds), (dt, ds), (dt,)])


def test_hidden_mse_no_grad_and_frozen_projection():
    hs, ht, W, b = make_states(2, 7, 4, 6, torch.float32)
    with torch.no_grad():
        v = kdfast.hidden_mse_loss(hs, ht, W, b, backend="torch")
    torch.testing.assert_close(v.double(), hidden_mse_reference(hs, ht, W, b), rtol=1e-5, atol=1e-6)
    x = hs.clone().requires_grad_()
    loss = kdfast.hidden_mse_loss(x, ht, W, b, backend="torch")   # projection frozen
    assert [tuple(t.shape) for t in loss.grad_fn.saved_tensors] == [tuple(hs.reshape(-1, 4).shape)]
    loss.backward()
    assert x.grad is not None
    # frozen states, trained projection (e.g. a detached input): dW_p and db_p only
    w, bias = W.clone().requires_grad_(), b.clone().requires_grad_()
    loss = kdfast.hidden_mse_loss(hs, ht, w, bias, backend="torch")
    assert sorted(tuple(t.shape) for t in loss.grad_fn.saved_tensors) == [(6,), (6, 4)]
    loss.backward()
    wd, bd = W.double().requires_grad_(), b.double().requires_grad_()
    hidden_mse_reference(hs, ht, wd, bd).backward()
    torch.testing.assert_close(w.grad.double(), wd.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(bias.grad.double(), bd.grad, rtol=1e-5, atol=1e-6)


def test_hidden_mse_bad_arguments():
    hs, ht, W, b = make_states(2, 5, 3, 4, torch.float32)
    f = kdfast.hidden_mse_loss
    with pytest.raises(ValueError, match="student_hidden must be a torch.Tensor"):
        f(hs.tolist(), ht, W)
    with pytest.raises(ValueError, match="teacher_hidden shape mismatch"):
        f(hs, ht[:, :4], W)
    with pytest.raises(ValueError, match="proj_weight is required"):
        f(hs, ht)
    with pytest.raises(ValueError, match="proj_weight has shape"):
        f(hs, ht, W.T)
    with pytest.raises(ValueError, match="proj_bias has shape"):
        f(hs, ht, W, b[:3])
    with pytest.raises(ValueError, match="proj_bias needs proj_weight"):
        f(ht, ht, None, b)
    with pytest.raises(ValueError, match="teacher_hidden has dtype"):
        f(hs, ht.double(), W)
    with pytest.raises(ValueError, match="teacher_hidden is on meta"):
        f(hs, ht.to("meta"), W)
    with pytest.raises(ValueError, match="proj_weight is on meta"):
        f(hs, ht, W.to("meta"))
    with pytest.raises(ValueError, match="student_hidden must be float"):
        f(hs.long(), ht.long(), W)
    with pytest.raises(ValueError, match="proj_weight must be float"):
        f(hs, ht, W.long())
    with pytest.raises(ValueError, match="mask has shape"):
        f(hs, ht, W, b, torch.ones(2, 4))
    with pytest.raises(ValueError, match="mask is on meta"):
        f(hs, ht, W, b, torch.ones(2, 5, device="meta"))
    with pytest.raises(ValueError, match="backend='cuda' has no hidden_mse_loss kernel"):
        f(hs, ht, W, backend="cuda")
    with pytest.raises(ValueError, match="backend must be one of"):
        f(hs, ht, W, backend="metal")
    with pytest.raises(ValueError, match="project=False needs d_s == d_t"):
        kdfast.HiddenMSELoss(3, 4, project=False)
    with pytest.raises(ValueError, match="d_s must be a positive int"):
        kdfast.HiddenMSELoss(0, 4)


@pytest.mark.skipif("cpu" not in HIDDEN_BACKENDS, reason="kdfast._C is not built")
def test_hidden_cpu_kernels_bad_arguments_name_the_argument():
    hs, ht, W, b = make_states(2, 5, 3, 4, torch.float32)
    with pytest.raises(ValueError, match="teacher_hidden shape mismatch"):
        kdfast.hidden_mse_loss(hs, ht[:, :4], W, backend="cpu")
    with pytest.raises(ValueError, match="teacher_hidden width mismatch"):
        kdfast.cosine_loss(hs, ht, backend="cpu")
    # the ops themselves check too (ValueError from C++), for callers that bypass the Python checks
    y, t, w = torch.randn(6, 4), torch.randn(6, 4), torch.rand(6)
    epilogue, cosine = torch.ops.kdfast.hidden_mse_epilogue, torch.ops.kdfast.cosine_fwd_bwd
    for args, match in [((y, t[:, :3], w), "t has shape"), ((y, t, w[:5]), r"w must have shape \[6\]"),
                        ((y, t, w.double()), "w must have dtype"), ((y.half(), t, w), "y must be float32 or float64"),
                        ((y, t.long(), w), "t must be float32")]:
        with pytest.raises(ValueError, match=match):
            epilogue(*args)
    for args, match in [((y, t[:5], w, 1e-8, True), "t has shape"), ((y, t.double(), w, 1e-8, True), "t has dtype"),
                        ((y, t, w[:2], 1e-8, True), "w must have shape"), ((y, t, w, 0.0, True), "eps must be > 0"),
                        ((y[0], t, w, 1e-8, True), r"s must be 2-D")]:
        with pytest.raises(ValueError, match=match):
            cosine(*args)


# --- DistilBERT cosine ---------------------------------------------------------------------------

COS_CASES = [(b, d, L, m) for b in HIDDEN_BACKENDS
             for d in DTYPES.get(b, ALL_DTYPES) + ((torch.float64,) if b == "triton" else ())
             for L in (37, 130) for m in (False, True)
             if d == torch.float32 or (L, m) == (37, True)]


@pytest.mark.parametrize("backend,dtype,L,masked", COS_CASES)
def test_cosine_matches_reference(backend, dtype, L, masked):
    B, d = 3, 40
    hs, ht, _, _ = make_states(B, L, d, d, dtype)
    mask = make_mask(B, L, full_row=True) if masked else None
    loss, (g,) = run_grads(lambda x: kdfast.cosine_loss(x, ht, mask, backend=backend), [hs], grad_scale=2.5)
    ref_loss, (rg,) = ref_grads(lambda x: cosine_reference(x, ht, mask), [hs], grad_scale=2.5)
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert g.dtype == dtype
    assert_close(loss, ref_loss, dtype, "loss")
    assert_close(g, rg, dtype, "grad")


def test_cosine_definition_gradcheck_and_padding():
    B, L, d = 2, 7, 5
    hs, ht, _, _ = make_states(B, L, d, d, torch.float64)
    mask = make_mask(B, L)
    target = torch.ones(int(mask.sum()), dtype=torch.float64)
    expected = torch.nn.functional.cosine_embedding_loss(hs[mask], ht[mask], target)
    torch.testing.assert_close(kdfast.cosine_loss(hs, ht, mask), expected)
    for backend in HIDDEN_BACKENDS:
        fn = lambda x: kdfast.cosine_loss(x, ht, mask, backend=backend)  # noqa: E731
        assert torch.autograd.gradcheck(fn, (hs.clone().requires_grad_(),), fast_mode=True)
    # padded rows may hold anything, even NaN, and get zero gradient
    hs_nan = hs.float().masked_fill(~mask[..., None], float("nan"))
    for backend in HIDDEN_BACKENDS:
        loss, (g,) = run_grads(lambda x: kdfast.cosine_loss(x, ht.float(), mask, backend=backend), [hs_nan])
        assert torch.isfinite(loss) and torch.isfinite(g).all() and (g[~mask] == 0).all()
        torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)


def test_cosine_bad_arguments():
    hs, ht, _, _ = make_states(2, 5, 4, 4, torch.float32)
    with pytest.raises(ValueError, match="teacher_hidden width mismatch"):
        kdfast.cosine_loss(hs, torch.randn(2, 5, 6))
    with pytest.raises(ValueError, match="teacher_hidden shape mismatch"):
        kdfast.cosine_loss(hs, ht[:1])
    with pytest.raises(ValueError, match="teacher_hidden has dtype"):
        kdfast.cosine_loss(hs, ht.half())
    with pytest.raises(ValueError, match="mask has shape"):
        kdfast.cosine_loss(hs, ht, torch.ones(5, 2))
    with pytest.raises(ValueError, match="eps must be > 0"):
        kdfast.cosine_loss(hs, ht, eps=0)
    with pytest.raises(ValueError, match="backend='cuda' has no cosine_loss kernel"):
        kdfast.cosine_loss(hs, ht, backend="cuda")


# --- MobileBERT feature maps ---------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
@pytest.mark.parametrize("L,masked", [(37, True), (130, False)])
def test_feature_map_matches_reference(dtype, L, masked):
    B, d = 3, 40
    hs, ht, _, _ = make_states(B, L, d, d, dtype)
    mask = make_mask(B, L, full_row=True) if masked else None
    loss, (g,) = run_grads(lambda x: kdfast.feature_map_loss(x, ht, mask), [hs], grad_scale=0.5)
    ref_loss, (rg,) = ref_grads(lambda x: feature_map_reference(x, ht, mask), [hs], grad_scale=0.5)
    assert g.dtype == dtype
    assert_close(loss, ref_loss, dtype, "loss")
    assert_close(g, rg, dtype, "grad")


def test_feature_map_definition_and_gradcheck():
    B, L, d = 2, 6, 8
    hs, ht, _, _ = make_states(B, L, d, d, torch.float64)
    mask = make_mask(B, L)
    ln = torch.nn.functional.layer_norm
    # beta = 0: the MSE of the parameter-free layer-normalised maps
    expected = torch.nn.functional.mse_loss(ln(hs, (d,))[mask], ln(ht, (d,))[mask])
    torch.testing.assert_close(kdfast.feature_map_loss(hs, ht, mask, beta_mean=0, beta_var=0), expected)
    stats = ((hs.mean(-1) - ht.mean(-1))[mask] ** 2).mean() + \
        (hs.var(-1, unbiased=False) - ht.var(-1, unbiased=False))[mask].abs().mean()
    torch.testing.assert_close(kdfast.feature_map_loss(hs, ht, mask), expected + stats)
    fn = lambda x: kdfast.feature_map_loss(x, ht, mask)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (hs.clone().requires_grad_(),), fast_mode=True)
    with pytest.raises(ValueError, match="teacher_hidden width mismatch"):
        kdfast.feature_map_loss(hs, ht[..., :4])
    with pytest.raises(ValueError, match="eps must be > 0"):
        kdfast.feature_map_loss(hs, ht, eps=-1)
    with pytest.raises(ValueError, match="beta_var must be >= 0"):
        kdfast.feature_map_loss(hs, ht, beta_var=-1)
    with pytest.raises(ValueError, match="backend='triton' has no feature_map_loss kernel"):
        kdfast.feature_map_loss(hs, ht, backend="triton")


# --- DistillationLoss ----------------------------------------------------------------------------

def _tiny_berts():
    from transformers import BertConfig, BertForMaskedLM

    # no attention dropout: a dropped (zero) student probability where the teacher's is positive
    # makes the attention KL infinite (DistillationLoss refuses it, tests/test_hostile_losses.py)
    common = dict(vocab_size=50, num_attention_heads=2, max_position_embeddings=64, attn_implementation="eager",
                  attention_probs_dropout_prob=0.0)
    teacher = BertForMaskedLM(BertConfig(hidden_size=40, num_hidden_layers=4, intermediate_size=64, **common)).eval()
    student = BertForMaskedLM(BertConfig(hidden_size=24, num_hidden_layers=2, intermediate_size=48, **common))
    ids = torch.randint(0, 50, (3, 37))
    mask = torch.ones(3, 37, dtype=torch.long)
    mask[1, 20:] = 0
    mask[2, 5:] = 0
    with torch.no_grad():
        t_out = teacher(input_ids=ids, attention_mask=mask, output_hidden_states=True, output_attentions=True)
    s_out = student(input_ids=ids, attention_mask=mask, output_hidden_states=True, output_attentions=True)
    return s_out, t_out, mask


@pytest.mark.parametrize("attention", ["mse", "kl"])
def test_distillation_loss_equals_sum_of_terms(attention):
    s_out, t_out, mask = _tiny_berts()
    weights = {"hidden": 1.0, "attention": 2.0, "logits": 0.5}
    dl = kdfast.DistillationLoss((4, 2), weights, temperature=2.0, student_hidden_size=24, teacher_hidden_size=40,
                                 attention=attention)
    assert dl.layer_map == {0: 0, 1: 2, 2: 4} and sorted(dl.projections.keys()) == ["0", "1", "2"]
    total, terms = dl(s_out, t_out, mask)
    # the same terms, one call each
    hidden = sum(kdfast.hidden_mse_loss(s_out.hidden_states[m], t_out.hidden_states[g],
                                        dl.projections[str(m)].weight, dl.projections[str(m)].bias, mask)
                 for m, g in dl.layer_map.items())
    if attention == "mse":
        att = sum(kdfast.attention_mse_loss(s_out.attentions[m - 1], t_out.attentions[g - 1], mask)
                  for m, g in ((1, 2), (2, 4)))
    else:
        att = sum(kdfast.attention_kl_loss(s_out.attentions[m - 1].log(), t_out.attentions[g - 1].log(), mask)
                  for m, g in ((1, 2), (2, 4)))
    logits = kdfast.kd_loss(s_out.logits, t_out.logits, temperature=2.0, mask=mask)
    expected = {"hidden": hidden, "attention": att, "logits": logits}
    assert terms.keys() == expected.keys()
    for k, v in expected.items():
        assert not terms[k].requires_grad
        torch.testing.assert_close(terms[k], v.detach(), rtol=1e-5, atol=1e-7, msg=k)
    torch.testing.assert_close(total, sum(weights[k] * v for k, v in expected.items()), rtol=1e-5, atol=1e-7)
    total.backward()
    for name, p in dl.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_distillation_loss_dicts_qk_cosine_feature_maps():
    """Dict outputs with q / k: flash transfer per layer; cosine and feature maps over all mapped layers."""
    B, H, L, d, dh = 2, 2, 13, 16, 8
    mask = make_mask(B, L)
    t = {"hidden_states": [torch.randn(B, L, d) for _ in range(5)], "q": [torch.randn(B, H, L, dh) for _ in range(4)],
         "k": [torch.randn(B, H, L, dh) for _ in range(4)]}
    s = {"hidden_states": [torch.randn(B, L, d, requires_grad=True) for _ in range(3)],
         "queries": [torch.randn(B, H, L, dh) for _ in range(2)], "keys": [torch.randn(B, H, L, dh) for _ in range(2)]}
    weights = {"cosine": 1.0, "feature_map": 0.5, "attention": 3.0, "hidden": 2.0}
    dl = kdfast.DistillationLoss({0: 0, 1: 2, 2: 4}, weights, attention="kl")
    assert len(dl.projections) == 0
    total, terms = dl(s, t, mask)
    pairs = [(0, 0), (1, 2), (2, 4)]
    hs, ht = s["hidden_states"], t["hidden_states"]
    expected = {
        "cosine": sum(kdfast.cosine_loss(hs[m], ht[g], mask) for m, g in pairs),
        "feature_map": sum(kdfast.feature_map_loss(hs[m], ht[g], mask) for m, g in pairs),
        "hidden": sum(kdfast.hidden_mse_loss(hs[m], ht[g], mask=mask) for m, g in pairs),
        "attention": sum(kdfast.flash_attention_transfer(s["queries"][m - 1], s["keys"][m - 1], t["q"][g - 1],
                                                         t["k"][g - 1], mask, loss="kl", scale_s=1.0, scale_t=1.0)
                         for m, g in pairs[1:]),
    }
    for k, v in expected.items():
        torch.testing.assert_close(terms[k], v.detach(), rtol=1e-5, atol=1e-6, msg=k)
    torch.testing.assert_close(total, sum(weights[k] * v for k, v in expected.items()), rtol=1e-5, atol=1e-6)
    total.backward()
    assert all(h.grad is not None for h in hs)


def test_distillation_loss_bad_arguments():
    s_out, t_out, mask = _tiny_berts()
    with pytest.raises(ValueError, match="weights has an unknown term"):
        kdfast.DistillationLoss((4, 2), {"hiden": 1.0})
    with pytest.raises(ValueError, match=r"weights\['logits'\] must be >= 0"):
        kdfast.DistillationLoss((4, 2), {"logits": -1.0})
    with pytest.raises(ValueError, match="temperature must be > 0"):
        kdfast.DistillationLoss((4, 2), {"logits": 1.0}, temperature=0)
    with pytest.raises(ValueError, match="n_teacher .* divisible"):
        kdfast.DistillationLoss((4, 3), {"logits": 1.0})
    with pytest.raises(ValueError, match="layer_map must be"):
        kdfast.DistillationLoss([1, 2], {"logits": 1.0})
    with pytest.raises(ValueError, match="attention must be one of"):
        kdfast.DistillationLoss((4, 2), {"attention": 1.0}, attention="l2")
    with pytest.raises(ValueError, match="student_hidden_size / teacher_hidden_size must be given"):
        kdfast.DistillationLoss((4, 2), {"hidden": 1.0})(s_out, t_out, mask)
    with pytest.raises(ValueError, match="layer_map refers to hidden_states\\[8\\]"):
        kdfast.DistillationLoss({1: 8}, {"hidden": 1.0}, student_hidden_size=24, teacher_hidden_size=40)(
            s_out, t_out, mask)
    with pytest.raises(ValueError, match="has no 'hidden_states'"):
        kdfast.DistillationLoss((4, 2), {"cosine": 1.0})({"logits": s_out.logits}, t_out, mask)


# --- torch.compile -------------------------------------------------------------------------------

# the custom ops: Triton and C++ (compiling is slow on CPU)
@pytest.mark.parametrize("backend", [b for b in ("triton", "cpu") if b in HIDDEN_BACKENDS])
def test_hidden_losses_torch_compile_fullgraph(backend):
    """The Triton epilogue / cosine kernels are custom ops with fake implementations: no graph break."""
    B, L, ds, dt = 2, 19, 8, 12
    hs, ht, W, b = make_states(B, L, ds, dt, torch.float32)
    h2 = torch.randn(B, L, dt)
    mask = make_mask(B, L)

    def step(x, w, bias, y):
        return (2.0 * kdfast.hidden_mse_loss(x, ht, w, bias, mask, backend=backend)
                + kdfast.cosine_loss(y, ht, mask, backend=backend))

    compiled = torch.compile(step, fullgraph=True)
    for _ in range(2):  # the second call reuses the compiled graph
        got = run_grads(compiled, [hs, W, b, h2])
        ref = run_grads(step, [hs, W, b, h2])
        torch.testing.assert_close(got[0], ref[0])
        for g, r in zip(got[1], ref[1]):
            torch.testing.assert_close(g, r)


def test_distillation_loss_mobilebert_progressive_transfer():
    """kdfast.models MobileBERT outputs (pre-scaled queries): the flash form from q / k equals the
    KL on the captured score maps, and feature maps equal the per-layer losses summed."""
    from kdfast.models import KDMobileBert, mobilebert_config

    common = dict(vocab_size=100, hidden_size=64, embedding_size=32, num_attention_heads=4, max_position_embeddings=64)
    teacher = KDMobileBert(mobilebert_config("ib-bert", num_hidden_layers=4, intra_bottleneck_size=128,
                                             intermediate_size=128, **common)).eval()
    student = KDMobileBert(mobilebert_config("mobilebert", num_hidden_layers=2, intra_bottleneck_size=32,
                                             intermediate_size=64, true_hidden_size=32, **common))
    ids = torch.randint(0, 100, (2, 21))
    mask = torch.ones(2, 21, dtype=torch.long)
    mask[1, 13:] = 0
    with torch.no_grad():
        t_out = teacher(ids, mask, capture=("hidden", "qk", "scores"))
    s_out = student(ids, mask, capture=("hidden", "qk", "scores"))
    weights = {"feature_map": 1.0, "attention": 1.0}
    _, from_qk = kdfast.DistillationLoss((4, 2), weights, attention="kl")(s_out, t_out, mask)
    _, from_maps = kdfast.DistillationLoss((4, 2), weights, attention="kl", attention_source="scores")(
        s_out, t_out, mask)
    torch.testing.assert_close(from_qk["attention"], from_maps["attention"], rtol=1e-4, atol=1e-7)
    expected = sum(kdfast.attention_kl_loss(s_out.scores[m], t_out.scores[g], mask) for m, g in ((0, 1), (1, 3)))
    torch.testing.assert_close(from_maps["attention"], expected.detach())
    fm = sum(kdfast.feature_map_loss(s_out.hidden_states[m], t_out.hidden_states[2 * m], mask) for m in range(3))
    torch.testing.assert_close(from_qk["feature_map"], fm.detach(), rtol=1e-5, atol=1e-6)


def test_distillation_loss_casts_teacher_to_student_dtype():
    B, L = 2, 9
    mask = make_mask(B, L)
    s = {"hidden_states": [torch.randn(B, L, 8, dtype=torch.bfloat16, requires_grad=True) for _ in range(2)],
         "logits": torch.randn(B, L, 11, dtype=torch.bfloat16, requires_grad=True)}
    t = {"hidden_states": [torch.randn(B, L, 12) for _ in range(3)], "logits": torch.randn(B, L, 11)}
    dl = kdfast.DistillationLoss({0: 0, 1: 2}, {"hidden": 1.0, "logits": 1.0}, student_hidden_size=8,
                                 teacher_hidden_size=12)
    total, terms = dl(s, t, mask)
    hidden = sum(kdfast.hidden_mse_loss(s["hidden_states"][m], t["hidden_states"][g].bfloat16(),
                                        dl.projections[str(m)].weight, dl.projections[str(m)].bias, mask)
                 for m, g in ((0, 0), (1, 2)))
    torch.testing.assert_close(terms["hidden"], hidden.detach())
    total.backward()
    assert s["logits"].grad.dtype == torch.bfloat16 and torch.isfinite(s["hidden_states"][1].grad.float()).all()
