"""Fused MobileBERT kernels against the eager functions they replace, and end to end against transformers."""

import pytest
import torch
from transformers import MobileBertModel

from kdfast.models import mobilebert as mb
from kdfast.models.fused import (
    disable_fused_kernels,
    enable_fused_kernels,
    fused_bias_residual_nonorm,
    fused_stacked_ffn,
)
from kdfast.models.mobilebert import FFNParams, KDMobileBert, mobilebert_config
from tests.helpers import backends_of

# every registered backend of the family that runs here (the three ops have the same backends)
BACKENDS = backends_of("nonorm_fwd")
assert BACKENDS == backends_of("nonorm_bwd") == backends_of("relu_bwd_colsum")
VOCAB = 97


def _tol(dtype):
    return dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-10)


def _epilogue_inputs(shape, dtype, has_bias, has_residual):
    d = shape[-1]
    x = torch.randn(shape, dtype=dtype, requires_grad=True)
    b = torch.randn(d, dtype=dtype, requires_grad=True) if has_bias else None
    r = torch.randn(shape, dtype=dtype, requires_grad=True) if has_residual else None
    g = torch.randn(d, dtype=dtype, requires_grad=True)
    beta = torch.randn(d, dtype=dtype, requires_grad=True)
    return x, b, r, g, beta


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(3, 37, 13), (129, 128), (1, 5)])  # odd row counts, widths off the vector size
@pytest.mark.parametrize("has_bias,has_residual", [(True, True), (False, True), (True, False)])
def test_epilogue_forward_and_gradients_match_eager(backend, dtype, shape, has_bias, has_residual):
    if backend == "triton" and dtype == torch.float64:
        pytest.skip("the Triton kernels accumulate in fp32")
    inputs = _epilogue_inputs(shape, dtype, has_bias, has_residual)
    ref_inputs = [None if t is None else t.detach().clone().requires_grad_() for t in inputs]
    y = fused_bias_residual_nonorm(*inputs, backend=backend)
    ref = mb.bias_residual_nonorm(*ref_inputs) if has_residual else \
        (ref_inputs[0] + ref_inputs[1]) * ref_inputs[3] + ref_inputs[4]
    torch.testing.assert_close(y, ref, **_tol(dtype))
    dy = torch.randn_like(y)
    (y * dy).sum().backward()
    (ref * dy).sum().backward()
    for name, a, b in zip(("x", "bias", "residual", "gamma", "beta"), inputs, ref_inputs):
        if a is not None:
            torch.testing.assert_close(a.grad, b.grad, **_tol(dtype), msg=lambda m, n=name: f"d{n}: {m}")


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "triton"])
def test_epilogue_gradcheck_double(backend):
    inputs = _epilogue_inputs((7, 5), torch.float64, True, True)
    assert torch.autograd.gradcheck(lambda *t: fused_bias_residual_nonorm(*t, backend=backend), inputs)


def test_epilogue_non_contiguous_input_and_bad_arguments():
    x = torch.randn(6, 20)[:, :10]  # row stride 20
    r, b, g, beta = torch.randn(6, 10), torch.randn(10), torch.randn(10), torch.randn(10)
    ref = ((x.float() + b.float() + r.float()) * g.float() + beta.float())
    torch.testing.assert_close(fused_bias_residual_nonorm(x, b, r, g, beta).float(), ref, rtol=2e-2, atol=2e-2)
    with pytest.raises(ValueError, match="gamma"):
        fused_bias_residual_nonorm(x, b, r, torch.randn(9), beta)
    with pytest.raises(ValueError, match="residual"):
        fused_bias_residual_nonorm(x, b, torch.randn(6, 11), g, beta)
    with pytest.raises(ValueError, match="bias"):
        fused_bias_residual_nonorm(x, b.double(), r, g, beta)
    with pytest.raises(ValueError, match="backend"):
        fused_bias_residual_nonorm(x, b, r, g, beta, backend="tpu")
    with pytest.raises(ValueError, match="x"):
        fused_bias_residual_nonorm("x", b, r, g, beta)


@pytest.mark.skipif("cpu" not in BACKENDS, reason="kdfast._C not built")
def test_cpu_epilogue_rejects_half_explicitly_and_auto_falls_back():
    x, b, r, g, beta = (t.bfloat16() for t in (torch.randn(4, 8), torch.randn(8), torch.randn(4, 8),
                                                torch.randn(8), torch.randn(8)))
    with pytest.raises(ValueError, match="backend"):
        fused_bias_residual_nonorm(x, b, r, g, beta, backend="cpu")
    ref = ((x.float() + b.float() + r.float()) * g.float() + beta.float())
    torch.testing.assert_close(fused_bias_residual_nonorm(x, b, r, g, beta).float(), ref, rtol=2e-2, atol=2e-2)


@pytest.mark.skipif("cpu" not in BACKENDS, reason="kdfast._C not built")
def test_cpu_ops_name_the_bad_argument_with_a_value_error():
    """The C++ ops check their arguments too (ValueError from C++), for callers that bypass the Python checks."""
    x, r, v = torch.randn(5, 6), torch.randn(5, 6), torch.randn(6)
    k = torch.ops.kdfast
    for call, match in [(lambda: k.nonorm_fwd(x, v, r, v[:5], v), "gamma must be contiguous"),
                        (lambda: k.nonorm_fwd(x, v, r[:4], v, v), "residual must have shape"),
                        (lambda: k.nonorm_fwd(x.half(), None, None, v.half(), v.half()), "float32 or float64"),
                        (lambda: k.nonorm_bwd(x[:, :5], x, v, r, v), "dy must have shape"),
                        (lambda: k.nonorm_bwd(x, x, v.double(), r, v), "bias must have dtype"),
                        (lambda: k.relu_bwd_colsum(x, r[:, :5]), "h must have shape"),
                        (lambda: k.relu_bwd_colsum(x.t(), r), "dh must be contiguous")]:
        with pytest.raises(ValueError, match=match):
            call()


def _ffns(n, d, inner, dtype):
    return [FFNParams((torch.randn(inner, d, dtype=dtype) / d ** 0.5).requires_grad_(),
                      torch.randn(inner, dtype=dtype).requires_grad_(),
                      (torch.randn(d, inner, dtype=dtype) / inner ** 0.5).requires_grad_(),
                      torch.randn(d, dtype=dtype).requires_grad_(),
                      (torch.rand(d, dtype=dtype) + 0.5).requires_grad_(),
                      torch.randn(d, dtype=dtype).requires_grad_(), 0.0) for _ in range(n)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_stacked_ffn_matches_eager_chain(backend, dtype):
    if backend == "triton" and dtype == torch.float64:
        pytest.skip("the Triton kernels accumulate in fp32")
    ffns = _ffns(3, 12, 20, dtype)
    ref_ffns = [FFNParams(*(t.detach().clone().requires_grad_() for t in p[:6]), 0.0) for p in ffns]
    x = torch.randn(2, 9, 12, dtype=dtype, requires_grad=True)
    xr = x.detach().clone().requires_grad_()
    y = fused_stacked_ffn(x, ffns, torch.nn.ReLU(), "no_norm", backend=backend)
    ref = mb.stacked_ffn(xr, ref_ffns, torch.nn.ReLU(), "no_norm")
    torch.testing.assert_close(y, ref, **_tol(dtype))
    dy = torch.randn_like(y)
    (y * dy).sum().backward()
    (ref * dy).sum().backward()
    torch.testing.assert_close(x.grad, xr.grad, **_tol(dtype))
    for p, q in zip(ffns, ref_ffns):
        for a, b in zip(p[:6], q[:6]):
            torch.testing.assert_close(a.grad, b.grad, **_tol(dtype))


def test_stacked_ffn_gradcheck_double():
    ffns = _ffns(2, 5, 7, torch.float64)
    x = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)

    def f(x, *flat):
        ps = [FFNParams(*flat[6 * i:6 * i + 6], 0.0) for i in range(2)]
        return fused_stacked_ffn(x, ps, torch.relu, "no_norm")

    assert torch.autograd.gradcheck(f, (x, *[t for p in ffns for t in p[:6]]))


def test_stacked_ffn_falls_back_where_it_does_not_apply_and_checks_shapes():
    ffns = _ffns(2, 6, 10, torch.float32)
    x = torch.randn(4, 6)
    gelu = torch.nn.GELU()
    torch.testing.assert_close(fused_stacked_ffn(x, ffns, gelu, "no_norm"), mb.stacked_ffn(x, ffns, gelu, "no_norm"))
    with pytest.raises(ValueError, match="ffns"):
        fused_stacked_ffn(x, [], torch.relu, "no_norm")
    with pytest.raises(ValueError, match=r"ffns\[0\]"):
        fused_stacked_ffn(torch.randn(4, 7), ffns, torch.relu, "no_norm")


@pytest.fixture(params=BACKENDS)
def fused(request):
    enable_fused_kernels(request.param)
    yield request.param
    disable_fused_kernels()


SMALL = dict(vocab_size=VOCAB, num_hidden_layers=2, hidden_size=32, embedding_size=16, intra_bottleneck_size=16,
             intermediate_size=40, max_position_embeddings=24, attention_probs_dropout_prob=0.0,
             hidden_dropout_prob=0.0)


@pytest.mark.parametrize("name", ["mobilebert", "mobilebert-tiny"])
def test_fused_model_matches_transformers_outputs_and_gradients(name, fused, randomize, batch):
    cfg = mobilebert_config(name, **SMALL)
    hf = randomize(MobileBertModel(cfg), std=0.1)
    hf.set_attn_implementation("eager")
    hf.eval()
    mine = KDMobileBert.from_transformers(hf).eval()
    assert mb.kernel_backend() == fused
    ids, mask, tt = batch(VOCAB)
    ref = hf(ids, attention_mask=mask, token_type_ids=tt)
    out = mine(ids, attention_mask=mask, token_type_ids=tt)
    scale = ref.last_hidden_state.abs().max().item()
    torch.testing.assert_close(out.last_hidden_state, ref.last_hidden_state, rtol=1e-4, atol=1e-5 * max(1, scale))
    torch.testing.assert_close(out.pooler_output, ref.pooler_output, rtol=1e-4, atol=1e-5)
    w = torch.randn_like(ref.last_hidden_state)
    ((ref.last_hidden_state * w).sum() + ref.pooler_output.sum()).backward()
    ((out.last_hidden_state * w).sum() + out.pooler_output.sum()).backward()
    theirs = dict(hf.named_parameters())
    for pname, p in mine.named_parameters():
        q = theirs[pname]
        if q.grad is None:
            assert p.grad is None or p.grad.abs().max() == 0, pname
            continue
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5 * max(1.0, q.grad.abs().max().item()),
                                   msg=lambda m, n=pname: f"{n}: {m}")


def test_enable_rejects_unknown_backend_and_disable_restores():
    with pytest.raises(ValueError, match="backend"):
        enable_fused_kernels("tpu")
    assert mb.kernel_backend() is None
    enable_fused_kernels("torch")
    assert mb.kernel_backend() == "torch"
    disable_fused_kernels()
    assert mb.kernel_backend() is None


@pytest.mark.parametrize("backend", BACKENDS)
def test_attention_inputs_match_eager_projections(backend, randomize):
    cfg = mobilebert_config("mobilebert", **SMALL)
    layer = randomize(KDMobileBert(cfg)).encoder.layer[0]
    from kdfast.models.fused import fused_attention_inputs

    hidden = torch.randn(2, 5, cfg.hidden_size, requires_grad=True)
    hidden_ref = hidden.detach().clone().requires_grad_()
    got = fused_attention_inputs(layer, hidden, backend=backend)
    ref = mb.attention_inputs(layer, hidden_ref)
    ws = [torch.randn_like(r) for r in ref]
    params = [p for p in layer.parameters()]
    g_got = torch.autograd.grad(sum((a * w).sum() for a, w in zip(got, ws)), [hidden, *params], allow_unused=True)
    g_ref = torch.autograd.grad(sum((a * w).sum() for a, w in zip(ref, ws)), [hidden_ref, *params], allow_unused=True)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    for a, b in zip(g_got, g_ref):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * max(1.0, b.abs().max().item()))
    with pytest.raises(ValueError, match="hidden"):
        fused_attention_inputs(layer, torch.randn(2, 5, cfg.hidden_size + 1))
