"""GPU tests: every kernel family on real CUDA tensors against float64 references, and one
distillation step on the GPU with a live and with a cached teacher.

Families: logit KD (Triton, CUDA C++, torch), sparse KD, fused linear KD (16-bit heads through the
fp32-output GEMMs, no host synchronisation), attention transfer from Q/K (KL, MSE, grouped heads),
attention losses on score maps (KL, MSE), hidden-MSE epilogue, cosine, MobileBERT's NoNorm epilogue
and stacked FFN; fp32, fp16 and bf16 where the backend claims them.

On a CUDA machine (``make gpu-check``, ``make test-gpu``) they run at the shapes the kernels meet in
training (V = 30522, L = 333 with several tiles). Elsewhere they are skipped, except under
``KDFAST_GPU_TESTS_ON_CPU=1`` with ``TRITON_INTERPRET=1`` (``make gpu-check DRY_RUN=1``): then the same
tests run on CPU tensors, Triton through the interpreter, fp32 only (the interpreter's 16-bit
arithmetic is not a GPU's), at tiny shapes, so that this file cannot rot between GPU slots.
"""

from __future__ import annotations

import os

import pytest
import torch

import kdfast
from tests.helpers import assert_logits_close as assert_close
from tests.inputs import logit_inputs as make_inputs
from tests.inputs import reference_loss_and_grad
from tests.reference import (
    attention_kl_reference,
    attention_mse_reference,
    cosine_reference,
    hidden_mse_reference,
    sparse_kd_loss_reference,
)
from tests.tiny_teacher import save_tiny_bert_teacher

ON_GPU = torch.cuda.is_available()
ON_CPU = (not ON_GPU and os.environ.get("KDFAST_GPU_TESTS_ON_CPU") == "1"
          and os.environ.get("TRITON_INTERPRET") == "1")
pytestmark = pytest.mark.skipif(not (ON_GPU or ON_CPU), reason="needs a CUDA device (none here); "
                                "KDFAST_GPU_TESTS_ON_CPU=1 TRITON_INTERPRET=1 runs them on CPU tensors")
DEV = torch.device("cuda" if ON_GPU else "cpu")
F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
DTYPES = [F32, F16, BF16] if ON_GPU else [F32]
_STATUS = kdfast.backends()
# backends that run kernels on DEV (torch on the GPU too: its eager reference path must hold there)
LOGIT_BACKENDS = ([b for b in ("triton", "cuda") if _STATUS[b].available] + ["torch"]) if ON_GPU else ["triton"]
KERNEL_BACKENDS = ["triton"]  # the families whose only device kernels are Triton's
TOL = {F32: (2e-5, 2e-6), F16: (2e-3, 2e-3), BF16: (1e-2, 1e-2)}


def _close(actual, expected, dtype, what, tol=TOL):
    rtol, atol = tol[dtype]
    atol = atol * max(1.0, float(expected.detach().abs().max()))
    torch.testing.assert_close(actual.detach().cpu().double(), expected.detach().cpu().double(), rtol=rtol,
                               atol=atol, msg=lambda m: f"{what}: {m}")


def _dev(*xs):
    return [None if x is None else x.to(DEV) for x in xs]


def _leaves(*xs):
    return [None if x is None else x.detach().clone().to(DEV).requires_grad_() for x in xs]


def _ids(params):
    return [str(p).replace("torch.", "") for p in params]


@pytest.mark.skipif(not ON_GPU, reason="the CUDA C++ kernels run on a GPU only")
def test_cuda_kernels_are_built_where_nvcc_exists():
    """A GPU run without the CUDA C++ backend would silently test less: say why it is missing."""
    import shutil

    if shutil.which("nvcc") is None and not os.path.exists("/usr/local/cuda/bin/nvcc"):
        pytest.skip("no nvcc on this machine: kdfast._C cannot hold the CUDA kernels")
    assert _STATUS["cuda"].available, _STATUS["cuda"].reason


# --- logit KD ---------------------------------------------------------------------------------------

LOGIT_CASES = ([(V, kind, T) for V in (30522, 1000, 7) for kind in ("kl", "soft_ce") for T in (1.0, 2.0)]
               if ON_GPU else [(7, "kl", 2.0), (300, "soft_ce", 1.0)])


@pytest.mark.parametrize("backend", LOGIT_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=_ids(DTYPES))
@pytest.mark.parametrize("V,kind,T", LOGIT_CASES)
def test_logit_kd_matches_reference(backend, dtype, V, kind, T):
    s, t, labels, mask = make_inputs(301 if ON_GPU else 23, V, dtype)
    kw = dict(temperature=T, labels=labels, mask=mask, alpha_mlm=0.5, kind=kind)
    x = s.detach().to(DEV).requires_grad_()
    loss = kdfast.kd_loss(x, t.to(DEV), temperature=T, labels=labels.to(DEV), mask=mask.to(DEV), alpha_mlm=0.5,
                          kind=kind, backend=backend)
    loss.sum().backward()
    ref_loss, ref_grad = reference_loss_and_grad(s, t, **kw)
    assert x.grad.dtype == dtype and x.grad.device.type == DEV.type
    assert_close(loss.detach().cpu(), ref_loss, dtype, "loss")
    assert_close(x.grad.cpu(), ref_grad, dtype, "grad")


@pytest.mark.parametrize("backend", LOGIT_BACKENDS)
def test_logit_kd_inplace_and_all_masked(backend):
    dtype = BF16 if ON_GPU else F32
    N, V = (64, 30522) if ON_GPU else (12, 50)
    s, t, labels, mask = make_inputs(N, V, dtype)
    _, ref_grad = reference_loss_and_grad(s, t, temperature=2.0, labels=labels, mask=mask)
    y = s.to(DEV).clone()
    loss = kdfast.kd_loss(y, t.to(DEV), temperature=2.0, labels=labels.to(DEV), mask=mask.to(DEV), backend=backend,
                          inplace=True)
    assert torch.isfinite(loss)
    assert_close(y.cpu(), ref_grad, dtype, "in-place gradient")
    zero = kdfast.kd_loss(s.to(DEV), t.to(DEV), temperature=2.0, mask=torch.zeros(N, dtype=torch.bool, device=DEV),
                          backend=backend)
    assert zero.item() == 0.0


# --- sparse KD --------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=_ids(DTYPES))
@pytest.mark.parametrize("form", ["topk_lse", "topk", "sampled"])
def test_sparse_kd_matches_reference(dtype, form):
    from tests.inputs import sparse_teacher_inputs as sparse_inputs

    N, V, K = (301, 30522, 64) if ON_GPU else (19, 97, 8)
    s, ids, vals, labels, mask, extra = sparse_inputs(N, V, K, form, 2.0, dtype)
    kw = dict(temperature=2.0, labels=labels, mask=mask, alpha_mlm=0.5, **extra)
    x = s.detach().to(DEV).requires_grad_()
    dev_kw = {k: (v.to(DEV) if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    loss = kdfast.sparse_kd_loss(x, ids.to(DEV), vals.to(DEV), backend="triton", **dev_kw)
    loss.sum().backward()
    sd = s.detach().double().requires_grad_()
    ref = sparse_kd_loss_reference(sd, ids, vals, **kw)
    ref.sum().backward()
    assert x.grad.dtype == dtype
    assert_close(loss.detach().cpu(), ref.detach(), dtype, f"{form} loss")
    assert_close(x.grad.cpu(), sd.grad, dtype, f"{form} grad")


# --- fused linear KD --------------------------------------------------------------------------------

def _flkd_inputs(dtype, lead, d_s=48, d_t=64, V=30522 if ON_GPU else 97):
    from tests.inputs import lm_head_inputs as flkd_inputs

    h_s, w_s, b_s, h_t, w_t, b_t, labels, mask = flkd_inputs(dtype, lead=lead, d_s=d_s, d_t=d_t, vocab=V)
    return h_s, w_s, b_s, h_t.to(dtype), w_t.to(dtype), b_t.to(dtype), labels, mask, V


def _flkd_reference(h_s, w_s, b_s, fn):
    from tests.inputs import dense_logits

    h, w, b = (x.detach().double().requires_grad_() for x in (h_s, w_s, b_s))
    loss = fn(dense_logits(h, w, b))
    loss.backward()
    return loss.detach(), h.grad, w.grad, b.grad


FLKD_BACKENDS = [b for b in ("triton", "cuda") if _STATUS[b].available] if ON_GPU else ["triton"]


@pytest.mark.parametrize("backend", FLKD_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=_ids(DTYPES))
def test_fused_linear_kd_dense_teacher(backend, dtype):
    """16-bit heads on a GPU take the fp32-output GEMM path (no fp32 copy of the weight); the loss is
    fp32-accurate and the gradients within one rounding to the head's dtype."""
    from kdfast.losses.fused_linear_kd import low_precision_gemm_path
    from tests.inputs import dense_logits
    from tests.reference import kd_loss_reference

    assert low_precision_gemm_path(DEV, dtype) == (ON_GPU and dtype in (F16, BF16))
    h_s, w_s, b_s, h_t, w_t, b_t, labels, mask, V = _flkd_inputs(dtype, (5, 67) if ON_GPU else (3, 7))
    kw = dict(temperature=2.0, alpha_kd=0.8, alpha_mlm=0.3)
    h, w, b = _leaves(h_s, w_s, b_s)
    loss = kdfast.fused_linear_kd_loss(h, w, *_dev(h_t, w_t), student_bias=b, teacher_bias=b_t.to(DEV),
                                       labels=labels.to(DEV), mask=mask.to(DEV), chunk_size=64 if ON_GPU else 4,
                                       backend=backend, **kw)
    (loss * 1.3).backward()
    t = dense_logits(h_t, w_t, b_t)
    ref = _flkd_reference(h_s, w_s, b_s, lambda s: kd_loss_reference(s, t, labels=labels, mask=mask, **kw) * 1.3)
    _close(loss * 1.3, ref[0], F32, "loss", tol={F32: (1e-5, 1e-6)})
    for what, a, e in zip(("grad h_s", "grad W_s", "grad b_s"), (h.grad, w.grad, b.grad), ref[1:]):
        assert a.dtype == dtype, what
        _close(a, e, dtype, what)


@pytest.mark.parametrize("dtype", DTYPES, ids=_ids(DTYPES))
def test_fused_linear_kd_sparse_teacher(dtype):
    from tests.inputs import dense_logits

    h_s, w_s, b_s, h_t, w_t, b_t, labels, mask, V = _flkd_inputs(dtype, (5, 67) if ON_GPU else (3, 7))
    t = dense_logits(h_t, w_t, b_t).float()
    ids, vals, lse = kdfast.sparsify_teacher_logits(t, 16, temperature=2.0)
    lead = labels.shape
    h, w, b = _leaves(h_s, w_s, b_s)
    loss = kdfast.fused_linear_kd_loss(h, w, student_bias=b, labels=labels.to(DEV), mask=mask.to(DEV),
                                       teacher_sparse=tuple(_dev(ids.reshape(*lead, 16), vals.reshape(*lead, 16),
                                                                 lse.reshape(lead))),
                                       temperature=2.0, alpha_mlm=0.3, backend="triton")
    loss.backward()
    ref = _flkd_reference(h_s, w_s, b_s, lambda s: sparse_kd_loss_reference(
        s, ids, vals, teacher_logsumexp=lse, labels=labels.reshape(-1), mask=mask.reshape(-1), temperature=2.0,
        alpha_mlm=0.3))
    _close(loss, ref[0], F32, "loss", tol={F32: (1e-5, 1e-6)})
    for what, a, e in zip(("grad h_s", "grad W_s", "grad b_s"), (h.grad, w.grad, b.grad), ref[1:]):
        _close(a, e, dtype, what)


def test_fused_linear_kd_under_autocast_keeps_fp32_logits():
    """The Distiller runs steps under bf16 autocast on a GPU: the fused loss's fp32 GEMMs must not be
    rounded to bf16 there (a bf16 logit GEMM would miss the fp32 tolerance by orders of magnitude)."""
    h_s, w_s, b_s, h_t, w_t, b_t, labels, mask, V = _flkd_inputs(F32, (5, 67) if ON_GPU else (3, 7))
    args = _dev(h_s, w_s, h_t, w_t)
    kw = dict(student_bias=b_s.to(DEV), teacher_bias=b_t.to(DEV), labels=labels.to(DEV), mask=mask.to(DEV),
              temperature=2.0)
    ref = kdfast.fused_linear_kd_loss(*args, **kw)
    with torch.autocast(DEV.type, dtype=BF16):
        got = kdfast.fused_linear_kd_loss(*args, **kw)
    assert got.dtype == F32
    _close(got, ref, F32, "loss under autocast", tol={F32: (1e-6, 1e-7)})


@pytest.mark.skipif(not ON_GPU, reason="host synchronisation is a CUDA notion")
@pytest.mark.parametrize("dtype", [F32, BF16], ids=_ids([F32, BF16]))
def test_fused_linear_kd_step_does_not_synchronise(dtype):
    """Every row counts (no gather) and the value checks are off by default on CUDA: forward and
    backward must not read anything back to the host."""
    h_s, w_s, b_s, h_t, w_t, b_t, _, _, V = _flkd_inputs(dtype, (4, 64))
    h, w, b = _leaves(h_s, w_s, b_s)
    ht, wt, bt = _dev(h_t, w_t, b_t)
    kdfast.fused_linear_kd_loss(h, w, ht, wt, student_bias=b, teacher_bias=bt, temperature=2.0).backward()  # warm-up
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss = kdfast.fused_linear_kd_loss(h, w, ht, wt, student_bias=b, teacher_bias=bt, temperature=2.0)
        loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(loss).item()


# --- attention transfer -----------------------------------------------------------------------------

ATT_TOL = {F32: (1e-4, 1e-6), F16: (1e-2, 1e-4), BF16: (3e-2, 1e-3)}


@pytest.mark.parametrize("dtype", DTYPES, ids=_ids(DTYPES))
@pytest.mark.parametrize("loss", ["kl", "mse"])
@pytest.mark.parametrize("H_t,H_s", [(4, 4), (4, 2), (2, 4)])
def test_flash_attention_transfer_from_qk(dtype, loss, H_t, H_s):
    from tests.helpers import make_mask
    from tests.inputs import grouped_reference, make_qk

    B, L, ds, dt = (2, 333, 32, 64) if ON_GPU else (2, 19, 8, 16)
    q_s, k_s, q_t, k_t = (x.to(dtype) for x in make_qk(B, H_s, H_t, L, ds, dt))
    mask = make_mask(B, L)
    ref = grouped_reference(q_s, k_s, q_t, k_t, mask, loss, ds**-0.5, dt**-0.5)
    q, k = _leaves(q_s, k_s)
    value = kdfast.flash_attention_transfer(q, k, *_dev(q_t, k_t), key_mask=mask.to(DEV), loss=loss,
                                            backend="triton")
    value.backward()
    for what, a, e in zip(("loss", "dq_s", "dk_s"), (value, q.grad, k.grad), ref):
        if what != "loss":
            assert a.dtype == dtype, what
        _close(a, e, dtype, what, tol=ATT_TOL)


# the KL on maps runs the logit-KD row kernels on the GPU (kdfast.ops.attention_transfer), the MSE its own
MAP_BACKENDS = {"kl": LOGIT_BACKENDS, "mse": ["triton", "torch"] if ON_GPU else ["triton"]}
MAP_CASES = [(loss, b) for loss, names in MAP_BACKENDS.items() for b in names]


@pytest.mark.parametrize("dtype", DTYPES, ids=_ids(DTYPES))
@pytest.mark.parametrize("loss,backend", MAP_CASES)
def test_attention_losses_on_score_maps(dtype, loss, backend):
    from tests.helpers import make_mask
    from tests.inputs import make_scores

    B, H, L = (2, 4, 200) if ON_GPU else (2, 2, 13)
    mask = make_mask(B, L)
    s, t = make_scores(B, H, L, dtype, mask)
    fn, ref_fn = {"kl": (kdfast.attention_kl_loss, attention_kl_reference),
                  "mse": (kdfast.attention_mse_loss, attention_mse_reference)}[loss]
    x = s.detach().to(DEV).requires_grad_()
    value = fn(x, t.to(DEV), mask.to(DEV), backend=backend)
    value.backward()
    sd = s.detach().double().requires_grad_()
    ref = ref_fn(sd, t.double(), mask)
    ref.backward()
    assert x.grad.dtype == dtype
    _close(value, ref.detach(), dtype, "loss", tol=ATT_TOL)
    _close(x.grad, sd.grad, dtype, "grad", tol=ATT_TOL)


# --- hidden states ----------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=_ids(DTYPES))
def test_hidden_mse_epilogue(dtype):
    from tests.helpers import make_mask

    B, L, d_s, d_t = (4, 129, 312, 768) if ON_GPU else (2, 7, 12, 20)
    h_s = torch.randn(B, L, d_s, dtype=torch.float64).to(dtype)
    h_t = torch.randn(B, L, d_t, dtype=torch.float64).to(dtype)
    w = (torch.randn(d_t, d_s, dtype=torch.float64) / d_s**0.5).to(dtype)
    bias = torch.randn(d_t, dtype=torch.float64).to(dtype)
    mask = make_mask(B, L)
    x, wl, bl = _leaves(h_s, w, bias)
    value = kdfast.hidden_mse_loss(x, h_t.to(DEV), wl, bl, mask.to(DEV), backend="triton")
    value.backward()
    xr, wr, br = (v.detach().double().requires_grad_() for v in (h_s, w, bias))
    ref = hidden_mse_reference(xr, h_t, wr, br, mask)
    ref.backward()
    _close(value, ref.detach(), dtype, "loss")
    for what, a, e in zip(("grad h_s", "grad W", "grad b"), (x.grad, wl.grad, bl.grad), (xr.grad, wr.grad, br.grad)):
        assert a.dtype == dtype, what
        _close(a, e, dtype, what)


@pytest.mark.parametrize("dtype", DTYPES, ids=_ids(DTYPES))
def test_cosine(dtype):
    from tests.helpers import make_mask

    B, L, d = (4, 129, 768) if ON_GPU else (2, 7, 20)
    h_s = torch.randn(B, L, d, dtype=torch.float64).to(dtype)
    h_t = (0.5 * h_s.double() + torch.randn(B, L, d, dtype=torch.float64)).to(dtype)
    mask = make_mask(B, L)
    (x,) = _leaves(h_s)
    value = kdfast.cosine_loss(x, h_t.to(DEV), mask.to(DEV), backend="triton")
    value.backward()
    xr = h_s.detach().double().requires_grad_()
    ref = cosine_reference(xr, h_t, mask)
    ref.backward()
    assert x.grad.dtype == dtype
    _close(value, ref.detach(), dtype, "loss")
    _close(x.grad, xr.grad, dtype, "grad")


# --- MobileBERT blocks ------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=_ids(DTYPES))
def test_nonorm_epilogue(dtype):
    from kdfast.models import mobilebert as mb
    from kdfast.models.fused import fused_bias_residual_nonorm

    shape = (8, 129, 512) if ON_GPU else (3, 37, 13)
    d = shape[-1]
    ins = [torch.randn(shape, dtype=torch.float64), torch.randn(d, dtype=torch.float64),
           torch.randn(shape, dtype=torch.float64), torch.rand(d, dtype=torch.float64) + 0.5,
           torch.randn(d, dtype=torch.float64)]
    ins = [x.to(dtype) for x in ins]
    ours = _leaves(*ins)
    y = fused_bias_residual_nonorm(*ours, backend="triton")
    ref_in = [x.detach().double().requires_grad_() for x in ins]
    ref = mb.bias_residual_nonorm(*ref_in)
    dy = torch.randn(shape, dtype=torch.float64)
    (y.double() * dy.to(DEV)).sum().backward()
    (ref * dy).sum().backward()
    assert y.dtype == dtype
    _close(y, ref, dtype, "y")
    for name, a, e in zip(("x", "bias", "residual", "gamma", "beta"), ours, ref_in):
        _close(a.grad, e.grad, dtype, f"d{name}")


@pytest.mark.parametrize("dtype", DTYPES, ids=_ids(DTYPES))
def test_stacked_ffn(dtype):
    from kdfast.models import mobilebert as mb
    from kdfast.models.fused import fused_stacked_ffn
    from kdfast.models.mobilebert import FFNParams

    n, d, inner, rows = (3, 128, 512, 8 * 129) if ON_GPU else (2, 12, 20, 2 * 9)
    raw = [[torch.randn(inner, d, dtype=torch.float64) / d**0.5, torch.randn(inner, dtype=torch.float64),
            torch.randn(d, inner, dtype=torch.float64) / inner**0.5, torch.randn(d, dtype=torch.float64),
            torch.rand(d, dtype=torch.float64) + 0.5, torch.randn(d, dtype=torch.float64)] for _ in range(n)]
    ffns = [FFNParams(*_leaves(*(t.to(dtype) for t in p)), 0.0) for p in raw]
    ref_ffns = [FFNParams(*(t.to(dtype).double().requires_grad_() for t in p), 0.0) for p in raw]
    x0 = torch.randn(rows, d, dtype=torch.float64).to(dtype)
    (x,) = _leaves(x0)
    xr = x0.double().requires_grad_()
    y = fused_stacked_ffn(x, ffns, torch.nn.ReLU(), "no_norm", backend="triton")
    ref = mb.stacked_ffn(xr, ref_ffns, torch.nn.ReLU(), "no_norm")
    dy = torch.randn(rows, d, dtype=torch.float64)
    (y.double() * dy.to(DEV)).sum().backward()
    (ref * dy).sum().backward()
    # 16-bit: every FFN's output is rounded to the dtype before the next one reads it
    tol = {F32: (1e-4, 1e-5), F16: (1e-2, 1e-2), BF16: (5e-2, 5e-2)}
    _close(y, ref, dtype, "y", tol=tol)
    _close(x.grad, xr.grad, dtype, "dx", tol=tol)
    for i, (p, q) in enumerate(zip(ffns, ref_ffns)):
        for j, (a, e) in enumerate(zip(p[:6], q[:6])):
            _close(a.grad, e.grad, dtype, f"ffn {i} param {j}", tol=tol)


def test_fused_mobilebert_matches_transformers():
    """A whole MobileBERT (attention inputs, NoNorm epilogues, stacked FFNs through the Triton
    kernels) on DEV against transformers' own model with the same weights: outputs and every
    parameter's gradient (fp32: the comparison is against another fp32 implementation)."""
    from transformers import MobileBertModel

    from kdfast.models import KDMobileBert, mobilebert_config
    from kdfast.models.fused import disable_fused_kernels, enable_fused_kernels
    from tests.models.conftest import padded_batch, randomize_

    vocab = 97
    cfg = mobilebert_config("mobilebert", vocab_size=vocab, num_hidden_layers=2, hidden_size=64, embedding_size=32,
                            intra_bottleneck_size=32, intermediate_size=80, max_position_embeddings=48,
                            attention_probs_dropout_prob=0.0, hidden_dropout_prob=0.0)
    torch.manual_seed(0)
    hf = randomize_(MobileBertModel(cfg), std=0.1)
    hf.set_attn_implementation("eager")
    hf = hf.to(DEV).eval()
    mine = KDMobileBert.from_transformers(hf).to(DEV).eval()
    ids, mask, tt = (x.to(DEV) for x in padded_batch(vocab, batch=3, length=29, pad_from=(None, 17, 5)))
    ref = hf(ids, attention_mask=mask, token_type_ids=tt).last_hidden_state
    enable_fused_kernels("triton")
    try:
        out = mine(ids, attention_mask=mask, token_type_ids=tt).last_hidden_state
        w = torch.randn_like(ref)
        (out * w).sum().backward()
    finally:
        disable_fused_kernels()
    (ref * w).sum().backward()
    scale = max(1.0, float(ref.detach().abs().max()))
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5 * scale)
    theirs = dict(hf.named_parameters())
    for name, p in mine.named_parameters():
        q = theirs[name]
        if q.grad is None:
            assert p.grad is None or float(p.grad.abs().max()) == 0, name
            continue
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5 * max(1.0, float(q.grad.abs().max())),
                                   msg=lambda m, n=name: f"{n}: {m}")


# --- one distillation step on the device, live and cached ----------------------------------------

@pytest.fixture(scope="module")
def tiny_mlm_teacher(tmp_path_factory):

    words = [f"w{i}" for i in range(40)]
    root = tmp_path_factory.mktemp("gpu-teacher")
    save_tiny_bert_teacher(root / "teacher", words)
    g = torch.Generator().manual_seed(3)
    lines = [" ".join(words[int(i)] for i in torch.randint(0, 40, (int(torch.randint(4, 15, (1,), generator=g)),),
                                                              generator=g)) for _ in range(24)]
    (root / "corpus.txt").write_text("\n".join(lines) + "\n")
    return root


@pytest.mark.parametrize("source", ["live", "cache"])
def test_distillation_step_on_the_device(tiny_mlm_teacher, tmp_path, source):
    """The Distiller on DEV (bf16 autocast on a GPU): logit KD on the masked tokens (dense teacher
    live, its cached top-k otherwise) + cosine on the last hidden state; the loss is finite and
    every student parameter moves."""
    from transformers import AutoTokenizer, BertConfig, BertForMaskedLM

    from kdfast.cache import TeacherCache, build_cache
    from kdfast.data import mask_tokens
    from kdfast.train import Distiller, TokenBatches, TrainConfig
    from kdfast.train.data import CachedBatches

    tdir = tiny_mlm_teacher / "teacher"
    teacher = BertForMaskedLM.from_pretrained(tdir).to(DEV).eval()
    torch.manual_seed(1)
    student = BertForMaskedLM(BertConfig(**{**teacher.config.to_dict(), "num_hidden_layers": 1})).to(DEV)
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    tok = AutoTokenizer.from_pretrained(tdir)
    if source == "cache":
        cache_dir = tmp_path / "cache"
        build_cache(str(tdir), [str(tiny_mlm_teacher / "corpus.txt")], str(cache_dir), layers=[2], logits="topk:8",
                    hidden="fp16", max_length=16, batch_size=8, progress=False)
        data = CachedBatches(TeacherCache(str(cache_dir)), 4, seed=0)
        first = next(iter(data.batches(0)))
        # read ahead into pinned memory on a GPU: the Distiller's non_blocking copies are then asynchronous
        assert all(t.is_pinned() == ON_GPU for t in first.values())
    else:
        enc = tok((tiny_mlm_teacher / "corpus.txt").read_text().split("\n")[:24], padding="max_length",
                  truncation=True, max_length=16, return_tensors="pt")
        data = TokenBatches(enc["input_ids"], enc["attention_mask"], 4, seed=0, rank=0, world_size=1)
    special = list(tok.all_special_ids)

    def step_loss(batch):
        am = batch["attention_mask"]
        if "labels" in batch:
            ids, labels = batch["input_ids"].long(), batch["labels"].long()
        else:
            ids, labels = mask_tokens(batch["input_ids"], am, special_ids=special, mask_id=tok.mask_token_id,
                                      vocab_size=len(tok))
        out = student(input_ids=ids, attention_mask=am, output_hidden_states=True)
        rows = labels != -100
        if source == "cache":
            kd = kdfast.sparse_kd_loss(out.logits[rows].float(), batch["topk_ids"].long(), batch["topk_values"],
                                       teacher_logsumexp=batch["topk_lse"], temperature=1.0)
            t_last = batch["hidden_2"].to(out.hidden_states[-1].dtype)
        else:
            with torch.no_grad():
                t = teacher(input_ids=ids, attention_mask=am, output_hidden_states=True)
            kd = kdfast.kd_loss(out.logits[rows].float(), t.logits[rows].float(), temperature=1.0)
            t_last = t.hidden_states[-1]
        cos = kdfast.cosine_loss(out.hidden_states[-1].float(), t_last.float(), am)
        return kd + cos, {"kd": kd.detach(), "cos": cos.detach()}

    cfg = TrainConfig(steps=2, lr=1e-3, warmup=0, log_every=1, out_dir=str(tmp_path / "run"), progress=False)
    history = Distiller(student, step_loss, data, cfg).train()
    assert len(history) == 2 and all(torch.isfinite(torch.tensor(h["loss"])) for h in history)
    moved = [n for n, p in student.named_parameters() if not torch.equal(p.detach(), before[n])]
    assert "bert.encoder.layer.0.attention.self.query.weight" in moved and len(moved) > len(before) // 2
