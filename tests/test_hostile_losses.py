"""Hostile and extreme-but-valid inputs to the losses (numerics, masks and the
host-sync policy): every refusal is a ValueError naming the argument, every accepted input gives
a finite result within the documented tolerance of a float64 reference computed here."""

from __future__ import annotations

import math
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import kdfast
from kdfast.losses._autograd import scale_stored_grad
from kdfast.losses._checks import TEMPERATURE_RANGE, set_value_checks
from kdfast.losses.sparse_kd import TOPK_MAX_TEMPERATURE
from tests import reference as R

BACKENDS = [name for name in ("torch", "cpu", "triton") if kdfast.backends()[name].available]
V = 37  # odd, not a multiple of any vector width


def kl_rows_fp64(s: torch.Tensor, t: torch.Tensor, T: float, kind: str = "kl") -> torch.Tensor:
    """Float64 KL (or soft CE) rows, T^2-scaled, with 0 log 0 = 0 where the teacher is -inf."""
    log_q = F.log_softmax(s.double() / T, -1)
    log_p = F.log_softmax(t.double() / T, -1)
    p = log_p.exp()
    inner = torch.where(p > 0, p * ((log_p if kind == "kl" else 0) - log_q), torch.zeros((), dtype=torch.float64))
    return T * T * inner.sum(-1)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


# --- temperature: accurate inside the documented range, refused outside ------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("T", [1e-2, 0.5, 1.0, 2.0, 1e2, 1e3, 1e4])
@pytest.mark.parametrize("kind", ["kl", "soft_ce"])
def test_kd_loss_within_1e4_relative_over_the_temperature_range(backend, T, kind):
    g = torch.Generator().manual_seed(int(T * 100) % 1000 + len(kind))
    s = torch.randn(2, 3, V, generator=g) * 4
    t = torch.randn(2, 3, V, generator=g) * 4
    mask = torch.tensor([[1, 1, 0], [1, 0, 1]])
    s_in = s.clone().requires_grad_()
    loss = kdfast.kd_loss(s_in, t, temperature=T, mask=mask, kind=kind, backend=backend)
    loss.backward()
    s64 = s.double().requires_grad_()
    rows = kl_rows_fp64(s64, t, T, kind)
    ref = (rows.reshape(-1) * mask.reshape(-1)).sum() / mask.sum()
    ref.backward()
    assert torch.isfinite(loss) and loss.dtype == torch.float32
    assert rel(loss, ref) < 1e-4, (float(loss), float(ref))
    # The gradient T (p_s - p_t) is a difference of nearly equal probabilities at large T: its
    # float32 error is ~eps T max p absolute, 1e-3 of its largest entry at T >= 1e3 (README).
    assert rel(s_in.grad, s64.grad) < (1e-4 if T <= 1e2 else 1e-3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_kd_loss_large_logits_and_peaked_rows(backend):
    # logits of +-1e4: at T = 1e-2 the scaled logits are 1e6
    g = torch.Generator().manual_seed(3)
    s = (torch.rand(4, V, generator=g) * 2 - 1) * 1e4
    t = (torch.rand(4, V, generator=g) * 2 - 1) * 1e4
    t[0] = s[0] + torch.randn(V, generator=g) * 1e-2  # nearly equal rows: a tiny KL
    for T in (1e-2, 1.0, 1e2, 1e4):
        loss = kdfast.kd_loss(s, t, temperature=T, backend=backend, reduction="none")
        ref = kl_rows_fp64(s, t, T)
        assert torch.isfinite(loss).all()
        for r in range(4):
            assert abs(float(loss[r]) - float(ref[r])) <= 1e-4 * abs(float(ref[r])) + 1e-6, (T, r)


@pytest.mark.parametrize("backend", BACKENDS)
def test_kd_loss_minus_inf_teacher_entries_are_probability_zero(backend):
    g = torch.Generator().manual_seed(4)
    s = torch.randn(3, V, generator=g)
    t = torch.randn(3, V, generator=g)
    t[:, 5:12] = float("-inf")          # masked vocabulary in the teacher only
    s[1, 20:] = float("-inf")           # ... and in both
    t[1, 20:] = float("-inf")
    t[2, :] = float("-inf")             # one-hot teacher row
    t[2, 3] = 0.0
    s_in = s.clone().requires_grad_()
    loss = kdfast.kd_loss(s_in, t, temperature=2.0, backend=backend)
    loss.backward()
    ref = kl_rows_fp64(s, t, 2.0).mean()
    assert torch.isfinite(loss) and rel(loss, ref) < 1e-4
    assert torch.isfinite(s_in.grad).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_kd_loss_refuses_rows_without_a_distribution(backend):
    s, t = torch.randn(2, V), torch.randn(2, V)
    t[1] = float("-inf")
    with pytest.raises(ValueError, match="teacher_logits"):
        kdfast.kd_loss(s, t, backend=backend)
    t = torch.randn(2, V)
    s[0, 4] = float("-inf")  # the teacher has mass there: infinite KL
    with pytest.raises(ValueError, match="student_logits"):
        kdfast.kd_loss(s, t, backend=backend)
    t[0, 2] = float("nan")
    with pytest.raises(ValueError, match="teacher_logits"):
        kdfast.kd_loss(torch.randn(2, V), t, backend=backend)


@pytest.mark.parametrize("T", [1e-3, 1e5, 1e-10, 1e20, 0.0, -1.0, float("nan"), float("inf"), "2", True, None,
                               [2.0]])
def test_temperature_outside_the_range_or_not_a_number_is_refused(T):
    s, t = torch.randn(2, V), torch.randn(2, V)
    ids, vals, lse = kdfast.sparsify_teacher_logits(t, 4)
    calls = [
        lambda: kdfast.kd_loss(s, t, temperature=T),
        lambda: kdfast.KDLoss(T),
        lambda: kdfast.sparse_kd_loss(s, ids, vals.float(), temperature=T),
        lambda: kdfast.SparseKDLoss(T),
        lambda: kdfast.sparsify_teacher_logits(t, 4, temperature=T),
        lambda: kdfast.DistillationLoss({1: 1}, {"logits": 1.0}, temperature=T),
    ]
    for call in calls:
        with pytest.raises(ValueError, match="temperature"):
            call()


def test_temperature_range_edges_are_accepted_and_topk_has_its_own():
    lo, hi = TEMPERATURE_RANGE
    s, t = torch.randn(2, V), torch.randn(2, V)
    for T in (lo, hi):
        assert torch.isfinite(kdfast.kd_loss(s, t, temperature=T))
    ids, vals, lse = kdfast.sparsify_teacher_logits(t, 4, temperature=TOPK_MAX_TEMPERATURE)
    assert torch.isfinite(kdfast.sparse_kd_loss(s, ids, vals.float(), teacher_logsumexp=lse,
                                                temperature=TOPK_MAX_TEMPERATURE))
    with pytest.raises(ValueError, match="temperature"):
        kdfast.sparse_kd_loss(s, ids, vals.float(), temperature=TOPK_MAX_TEMPERATURE * 1.5)
    sids, counts = kdfast.sparsify_teacher_logits(t, 4, mode="sampled", temperature=1e3,
                                                  generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(kdfast.sparse_kd_loss(s, sids, counts.float(), mode="sampled", temperature=1e3))


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "cpu"])
@pytest.mark.parametrize("T", [1e-2, 1.0, TOPK_MAX_TEMPERATURE])
def test_sparse_topk_within_1e4_relative_over_its_range(backend, T):
    g = torch.Generator().manual_seed(5)
    s, t = torch.randn(4, V, generator=g) * 3, torch.randn(4, V, generator=g) * 3
    ids, vals, lse = kdfast.sparsify_teacher_logits(t, 6, temperature=T)
    loss = kdfast.sparse_kd_loss(s, ids, vals.float(), teacher_logsumexp=lse, temperature=T, backend=backend)
    ref = R.sparse_kd_loss_reference(s.double(), ids, vals.double(), teacher_logsumexp=lse.double(), temperature=T)
    assert torch.isfinite(loss) and rel(loss, ref) < 1e-4


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf"), "1", None, True])
@pytest.mark.parametrize("name", ["alpha_kd", "alpha_mlm"])
def test_alphas_must_be_finite_numbers(name, value):
    s, t = torch.randn(2, V), torch.randn(2, V)
    labels = torch.tensor([1, 2])
    ids, vals, _ = kdfast.sparsify_teacher_logits(t, 4)
    for call in (lambda: kdfast.kd_loss(s, t, labels=labels, **{name: value}),
                 lambda: kdfast.KDLoss(2.0, **{name: value}),
                 lambda: kdfast.sparse_kd_loss(s, ids, vals.float(), labels=labels, **{name: value}),
                 lambda: kdfast.SparseKDLoss(2.0, **{name: value})):
        with pytest.raises(ValueError, match=name):
            call()


def test_cuda_row_math_small_kl_form_on_the_host(tmp_path):
    """The CUDA kernel's row algorithm (csrc/tests/kd_row_host.cpp replays it with kd_math.h):
    large T, near-equal rows and -inf teacher entries, against float64."""
    from tests.test_cuda_row_math_host import replay

    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    exe = tmp_path / "kd_row_host"
    root = Path(__file__).resolve().parents[1]
    subprocess.run([cxx, "-O2", "-std=c++17", str(root / "csrc/tests/kd_row_host.cpp"), "-o", str(exe)], check=True)
    g = torch.Generator().manual_seed(13)
    s, t = torch.randn(3, 300, generator=g) * 4, torch.randn(3, 300, generator=g) * 4
    t[1, 40:90] = float("-inf")
    t[2] = s[2] + torch.randn(300, generator=g) * 1e-2
    for T in (1e-2, 1.0, 1e2, 1e4):
        rows, _ = replay(exe, s, t, torch.zeros(3), torch.ones(3), T, 1.0, 0.0, False)
        ref = kl_rows_fp64(s, t, T)
        for r in range(3):
            assert abs(float(rows[r]) - float(ref[r])) <= 1e-4 * float(ref[r]) + 1e-7, (T, r)


# --- float64: float64 math on every backend, or a clear error ---------------------------------

def _fp64_cases():
    g = torch.Generator().manual_seed(6)
    B, H, L, d = 2, 2, 5, 4

    def r(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    m = torch.ones(B, L)
    m[1, 3:] = 0
    s, t = r(3, V), r(3, V)
    a, b = r(B, H, L, L), r(B, H, L, L)
    q = [r(B, H, L, d) for _ in range(4)]
    hs, ht, W = r(2, 5, 6), r(2, 5, 6), r(6, 6)
    ids = torch.stack([torch.randperm(V, generator=g)[:5] for _ in range(3)])
    vals = r(3, 5)
    flash_ref = R.attention_kl_reference(R.attention_scores_reference(q[0], q[1], 0.5, m),
                                         R.attention_scores_reference(q[2], q[3], 0.5, m), m)
    return {
        "kd_loss": (lambda be: kdfast.kd_loss(s, t, temperature=2.0, backend=be),
                    R.kd_loss_reference(s, t, temperature=2.0), True),
        "sparse_kd_loss": (lambda be: kdfast.sparse_kd_loss(s, ids, vals, temperature=2.0, backend=be),
                           R.sparse_kd_loss_reference(s, ids, vals, temperature=2.0), True),
        "attention_kl_loss": (lambda be: kdfast.attention_kl_loss(a, b, m, backend=be),
                              R.attention_kl_reference(a, b, m), True),
        "attention_mse_loss": (lambda be: kdfast.attention_mse_loss(a, b, m, backend=be),
                               R.attention_mse_reference(a, b, m), True),
        "flash_attention_transfer": (lambda be: kdfast.flash_attention_transfer(*q, m, backend=be), flash_ref, False),
        "hidden_mse_loss": (lambda be: kdfast.hidden_mse_loss(hs, ht, W, backend=be),
                            R.hidden_mse_reference(hs, ht, W), False),
        "cosine_loss": (lambda be: kdfast.cosine_loss(hs, ht, backend=be), R.cosine_reference(hs, ht), False),
    }


@pytest.mark.parametrize("what", list(_fp64_cases()))
def test_float64_inputs_get_float64_results_or_a_clear_error(what):
    fn, ref, triton_refuses = _fp64_cases()[what]
    for be in ["auto", *BACKENDS]:
        if be == "triton" and triton_refuses:
            with pytest.raises(ValueError, match="float64"):
                fn(be)
            continue
        if be == "cpu" and what == "sparse_kd_loss":
            continue  # no C++ kernel: refused for every dtype (tests/test_sparse_kd.py)
        out = fn(be)
        assert out.dtype == torch.float64, (what, be)
        assert abs(float(out) - float(ref)) <= 1e-10 * abs(float(ref)), (what, be, float(out), float(ref))


def test_minilm_relations_float64():
    g = torch.Generator().manual_seed(7)
    xs = [torch.randn(2, 5, 8, generator=g, dtype=torch.float64) for _ in range(3)]
    xt = [torch.randn(2, 5, 12, generator=g, dtype=torch.float64) for _ in range(3)]
    ref = sum(R.attention_kl_reference(
        R.attention_scores_reference(kdfast.losses.split_relation_heads(a, 2), kdfast.losses.split_relation_heads(a, 2),
                                     1 / math.sqrt(4)),
        R.attention_scores_reference(kdfast.losses.split_relation_heads(b, 2), kdfast.losses.split_relation_heads(b, 2),
                                     1 / math.sqrt(6))) for a, b in zip(xs, xt))
    for be in ["auto", *(b for b in BACKENDS if b != "triton")]:
        out = kdfast.minilm_relation_loss(xs, xt, 2, backend=be)
        assert out.dtype == torch.float64 and abs(float(out) - float(ref)) <= 1e-10 * float(ref)


# --- attention: one-hot and peaked rows -----------------------------------------------------------

def attention_kl_fp64(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    B, H, L, _ = s.shape
    return kl_rows_fp64(s.reshape(-1, L), t.reshape(-1, L), 1.0).mean()


@pytest.mark.parametrize("backend", BACKENDS)
def test_attention_kl_one_hot_and_peaked_rows_stay_finite(backend):
    g = torch.Generator().manual_seed(8)
    B, H, L = 2, 2, 5
    s = torch.randn(B, H, L, L, generator=g)
    one_hot = torch.full((B, H, L, L), float("-inf"))
    one_hot[..., 0] = 0.0                     # log of one-hot attention probabilities
    peaked = torch.randn(B, H, L, L, generator=g) * 1e4
    for t in (one_hot, peaked, torch.finfo(torch.float32).min * (torch.rand(B, H, L, L, generator=g) > 0.5)):
        s_in = s.clone().requires_grad_()
        loss = kdfast.attention_kl_loss(s_in, t, backend=backend)
        loss.backward()
        ref = attention_kl_fp64(s, t)
        assert torch.isfinite(loss) and rel(loss, ref) < 1e-4
        assert torch.isfinite(s_in.grad).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_flash_attention_transfer_peaked_scores_stay_finite(backend):
    g = torch.Generator().manual_seed(9)
    q = [torch.randn(2, 2, 5, 4, generator=g) * 30 for _ in range(4)]  # scores ~ 1e3
    m = torch.ones(2, 5)
    m[0, 4] = 0
    q_s = q[0].clone().requires_grad_()
    loss = kdfast.flash_attention_transfer(q_s, q[1], q[2], q[3], m, backend=backend)
    loss.backward()
    ref = R.attention_kl_reference(R.attention_scores_reference(q[0], q[1], 0.5, m),
                                   R.attention_scores_reference(q[2], q[3], 0.5, m), m)
    assert torch.isfinite(loss) and rel(loss, ref) < 1e-4
    assert torch.isfinite(q_s.grad).all()


# --- sparsify: rows with no distribution to draw from -----------------------------------------

@pytest.mark.parametrize("bad", ["nan", "-inf row", "+inf"])
def test_sparsify_sampled_refuses_rows_without_a_distribution(bad):
    t = torch.randn(3, V)
    if bad == "nan":
        t[1, 3] = float("nan")
    elif bad == "+inf":
        t[0, 0] = float("inf")
    else:
        t[2] = float("-inf")
    with pytest.raises(ValueError, match="teacher_logits"):
        kdfast.sparsify_teacher_logits(t, 4, mode="sampled")


# --- DistillationLoss masks and missing attention maps ----------------------------------------

def test_distillation_logit_mask_of_the_wrong_shape_is_refused():
    crit = kdfast.DistillationLoss({1: 1}, {"logits": 1.0}, temperature=2.0)
    s, t = torch.randn(2, 5, V), torch.randn(2, 5, V)
    with pytest.raises(ValueError, match="attention_mask"):
        crit({"logits": s}, {"logits": t}, torch.ones(2, 6))
    with pytest.raises(ValueError, match="attention_mask"):
        crit({"logits": s.reshape(-1, V)[:7]}, {"logits": t.reshape(-1, V)[:7]}, torch.ones(2, 5))


def test_distillation_flattened_logits_use_the_mask():
    crit = kdfast.DistillationLoss({1: 1}, {"logits": 1.0}, temperature=2.0)
    s, t = torch.randn(2, 5, V), torch.randn(2, 5, V)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 0]])
    full, _ = crit({"logits": s}, {"logits": t}, mask)
    flat, _ = crit({"logits": s.reshape(-1, V)}, {"logits": t.reshape(-1, V)}, mask)
    rows = kl_rows_fp64(s.reshape(-1, V), t.reshape(-1, V), 2.0)
    ref = (rows * mask.reshape(-1)).sum() / mask.sum()
    assert rel(full, ref) < 1e-5 and rel(flat, ref) < 1e-5


@pytest.mark.parametrize("attentions", [(), (None, None)])
def test_distillation_sdpa_attentions_say_what_to_do(attentions):
    crit = kdfast.DistillationLoss({1: 1}, {"attention": 1.0}, attention="kl", attention_source="attentions")
    out = {"attentions": attentions}
    with pytest.raises(ValueError, match='attn_implementation="eager"'):
        crit(out, out)


# --- host-sync policy -------------------------------------------------------------------------

@pytest.fixture
def checks_off():
    set_value_checks(False)
    yield
    set_value_checks(None)


@pytest.mark.parametrize("backend", BACKENDS)
def test_unchecked_out_of_range_labels_are_ignored_rows(backend, checks_off):
    g = torch.Generator().manual_seed(10)
    s, t = torch.randn(4, V, generator=g), torch.randn(4, V, generator=g)
    labels = torch.tensor([1, V + 5, -7, 3])
    out = kdfast.kd_loss(s, t, labels=labels, alpha_mlm=0.5, temperature=2.0, backend=backend)
    ignored = torch.tensor([1, -100, -100, 3])
    ref = R.kd_loss_reference(s, t, labels=ignored, alpha_mlm=0.5, temperature=2.0)
    assert torch.isfinite(out) and rel(out, ref) < 1e-5


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "cpu"])
def test_unchecked_out_of_range_sparse_ids_drop_their_row(backend, checks_off):
    g = torch.Generator().manual_seed(11)
    s, t = torch.randn(3, V, generator=g), torch.randn(3, V, generator=g)
    ids, vals, lse = kdfast.sparsify_teacher_logits(t, 4)
    bad = ids.clone()
    bad[1, 2] = V + 100
    out = kdfast.sparse_kd_loss(s, bad, vals.float(), teacher_logsumexp=lse, backend=backend)
    ref = R.sparse_kd_loss_reference(s, ids, vals.double(), teacher_logsumexp=lse,
                                     mask=torch.tensor([1, 0, 1]))
    assert torch.isfinite(out) and rel(out, ref) < 1e-4


def test_checked_out_of_range_labels_raise():
    set_value_checks(True)
    try:
        with pytest.raises(ValueError, match="labels"):
            kdfast.kd_loss(torch.randn(2, V), torch.randn(2, V), labels=torch.tensor([0, V]), alpha_mlm=1.0)
    finally:
        set_value_checks(None)
    assert kdfast.set_value_checks is set_value_checks
    with pytest.raises(ValueError, match="enabled"):
        set_value_checks("yes")


def test_scaling_the_stored_gradient_never_reads_a_device_scalar():
    # meta tensors have no values: reading one back (.item(), as a host sync would) raises
    grad = torch.empty(3, 4, device="meta")
    out = scale_stored_grad(grad, torch.empty((), device="meta"))
    assert out.shape == grad.shape
    cpu = torch.randn(3, 4)
    assert scale_stored_grad(cpu, torch.tensor(1.0)) is cpu
    assert torch.equal(scale_stored_grad(cpu, torch.tensor(2.5)), cpu * 2.5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_upstream_gradient_scales_every_stored_gradient(backend):
    g = torch.Generator().manual_seed(12)
    q = [torch.randn(1, 2, 5, 4, generator=g) for _ in range(4)]
    losses = [
        lambda x: kdfast.flash_attention_transfer(x, q[1], q[2], q[3], backend=backend),
        lambda x: kdfast.cosine_loss(x.reshape(2, 5, 4), q[2].reshape(2, 5, 4), backend=backend),
        lambda x: kdfast.hidden_mse_loss(x.reshape(2, 5, 4), q[2].reshape(2, 5, 4), backend=backend),
    ]
    for fn in losses:
        a = q[0].clone().requires_grad_()
        fn(a).backward()
        b = q[0].clone().requires_grad_()
        (fn(b) * -3.0).backward()
        assert torch.allclose(b.grad, -3.0 * a.grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_attention_kl_value_errors_name_the_score_arguments(backend):
    s, t = torch.randn(1, 2, 4, 4), torch.randn(1, 2, 4, 4)
    t[0, 1, 2, 3] = float("nan")
    with pytest.raises(ValueError, match="teacher_scores"):
        kdfast.attention_kl_loss(s, t, backend=backend)
    t = torch.randn(1, 2, 4, 4)
    t[0, 0, 1] = float("-inf")
    with pytest.raises(ValueError, match="teacher_scores"):
        kdfast.attention_kl_loss(s, t, backend=backend)


@pytest.mark.skipif("triton" not in BACKENDS, reason="needs Triton (TRITON_INTERPRET=1 on CPU)")
def test_triton_chunked_rows_match_the_single_block_numerics():
    """Rows longer than one block fold chunk by chunk (the GPU path for BERT's 30522 vocabulary):
    the centred statistics and the small-KL pass must survive the merge."""
    from kdfast.ops.logit_kd.triton import kd_fwd_bwd_triton

    g = torch.Generator().manual_seed(14)
    s, t = torch.randn(4, V, generator=g) * 4, torch.randn(4, V, generator=g) * 4
    t[1, 3:30] = float("-inf")
    t[2] = torch.finfo(torch.float32).min * (torch.rand(V, generator=g) > 0.3)
    t[2, 20] = torch.finfo(torch.float32).min  # the max of the first chunks is finfo.min
    t[3] = s[3] + torch.randn(V, generator=g) * 1e-2
    s[3] = s[3] * 1e3
    t[3] = t[3] * 1e3
    w = torch.ones(4)
    for T in (1e-2, 1.0, 1e2, 1e4):
        rows = kd_fwd_bwd_triton(s, t, torch.zeros(4, dtype=torch.long), w, torch.empty_like(s), T, 1.0, 0.0, False,
                                 block_v=8)
        ref = kl_rows_fp64(s, t, T)
        for r in range(4):
            assert abs(float(rows[r]) - float(ref[r])) <= 1e-4 * abs(float(ref[r])) + 1e-7, (T, r)


def test_distillation_attention_kl_on_dropped_student_probabilities_says_why():
    g = torch.Generator().manual_seed(15)
    probs = [torch.softmax(torch.randn(2, 2, 5, 5, generator=g), -1) for _ in range(2)]
    student = probs[0].clone()
    student[0, 1, 2, 3] = 0.0  # what attention dropout leaves in transformers' returned maps
    crit = kdfast.DistillationLoss({1: 1}, {"attention": 1.0}, attention="kl", attention_source="attentions")
    with pytest.raises(ValueError, match="attention dropout"):
        crit({"attentions": (student,)}, {"attentions": (probs[1],)})
    total, _ = crit({"attentions": (probs[0],)}, {"attentions": (probs[1],)})
    assert torch.isfinite(total)


@pytest.mark.parametrize("backend", BACKENDS)
def test_mse_and_cosine_families_with_large_values(backend):
    """Values of +-1e4 (squares of 1e8) and a peaked score map: finite, within 1e-4 of float64."""
    g = torch.Generator().manual_seed(16)
    hs, ht = torch.randn(2, 5, 6, generator=g) * 1e4, torch.randn(2, 5, 6, generator=g) * 1e4
    W = torch.randn(6, 6, generator=g)
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 0, 0, 0]])
    a, b = torch.randn(2, 2, 5, 5, generator=g) * 1e4, torch.randn(2, 2, 5, 5, generator=g) * 1e4
    cases = [
        (kdfast.hidden_mse_loss(hs, ht, W, mask=mask, backend=backend), R.hidden_mse_reference(hs, ht, W, mask=mask)),
        (kdfast.cosine_loss(hs, ht, mask, backend=backend), R.cosine_reference(hs, ht, mask)),
        (kdfast.attention_mse_loss(a, b, mask, threshold=-1e5, backend=backend),
         R.attention_mse_reference(a, b, mask, threshold=-1e5)),
    ]
    for out, ref in cases:
        assert torch.isfinite(out) and rel(out, ref) < 1e-4, (float(out), float(ref))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("T", [TEMPERATURE_RANGE[0], 1e2, TEMPERATURE_RANGE[1]])
def test_half_precision_logits_at_the_range_edges(backend, dtype, T):
    """fp16 / bf16 logits are widened to fp32: the loss of the rounded inputs keeps 1e-4 of float64."""
    g = torch.Generator().manual_seed(17)
    s = (torch.randn(3, V, generator=g) * 4).to(dtype)
    t = (s.float() + torch.randn(3, V, generator=g)).to(dtype)
    loss = kdfast.kd_loss(s, t, temperature=T, backend=backend)
    ref = kl_rows_fp64(s, t, T).mean()
    # at T = 1e-2 rows whose argmaxes agree have a KL of ~1e-92: float32 holds 0 there
    assert torch.isfinite(loss) and loss.dtype == torch.float32
    assert abs(float(loss) - float(ref)) <= 1e-4 * float(ref) + torch.finfo(torch.float32).tiny


def test_distillation_dropped_probability_check_with_grouped_teacher_heads():
    g = torch.Generator().manual_seed(18)
    teacher = torch.softmax(torch.randn(2, 4, 5, 5, generator=g), -1)  # 4 teacher heads for 2 student heads
    student = torch.softmax(torch.randn(2, 2, 5, 5, generator=g), -1)
    crit = kdfast.DistillationLoss({1: 1}, {"attention": 1.0}, attention="kl", attention_source="attentions")
    total, _ = crit({"attentions": (student,)}, {"attentions": (teacher,)})
    assert torch.isfinite(total)
    dropped = student.clone()
    dropped[1, 0, 4, 1] = 0.0
    with pytest.raises(ValueError, match="attention dropout"):
        crit({"attentions": (dropped,)}, {"attentions": (teacher,)})


# --- one input contract for every public loss ---------------------------------------------------
# Every public loss refuses the same careless inputs the same way: a ValueError naming the argument.
# Each entry: the loss, its valid keyword arguments (fresh random values, odd sizes), the float
# tensors whose NaN / Inf it must name (value checks on: the default for CPU tensors), the weights
# that must be >= 0, and the (student, teacher) pairs that must share a dtype.

def _contract_cases() -> dict:
    g = torch.Generator().manual_seed(23)

    def r(*shape):
        return torch.randn(*shape, generator=g)

    B, H, L, d, Vc = 2, 2, 5, 6, 11
    t = r(3, Vc) * 3
    ids, vals, lse = kdfast.sparsify_teacher_logits(t, 4, temperature=2.0)
    return {
        "kd_loss": (kdfast.kd_loss, lambda: dict(student_logits=r(3, Vc), teacher_logits=r(3, Vc), temperature=2.0,
                                                 labels=torch.tensor([1, -100, 4]), alpha_mlm=0.5),
                    ["teacher_logits", "student_logits"], ["alpha_kd", "alpha_mlm"],
                    [("student_logits", "teacher_logits")]),
        "sparse_kd_loss": (kdfast.sparse_kd_loss,
                           lambda: dict(student_logits=r(3, Vc), teacher_ids=ids.clone(), teacher_values=vals.float(),
                                        teacher_logsumexp=lse.clone(), temperature=2.0,
                                        labels=torch.tensor([1, -100, 4]), alpha_mlm=0.5),
                           ["teacher_values", "teacher_logsumexp", "student_logits"], ["alpha_kd", "alpha_mlm"], []),
        "fused_linear_kd_loss": (kdfast.fused_linear_kd_loss,
                                 lambda: dict(student_hidden=r(3, d), student_weight=r(Vc, d), teacher_hidden=r(3, d + 1),
                                              teacher_weight=r(Vc, d + 1), student_bias=r(Vc), teacher_bias=r(Vc),
                                              temperature=2.0, labels=torch.tensor([1, -100, 4]), alpha_mlm=0.5),
                                 ["teacher_hidden", "teacher_weight", "teacher_bias", "student_hidden",
                                  "student_weight", "student_bias"], ["alpha_kd", "alpha_mlm"], []),
        "attention_kl_loss": (kdfast.attention_kl_loss,
                              lambda: dict(student_scores=r(B, H, L, L), teacher_scores=r(B, H, L, L)),
                              ["teacher_scores", "student_scores"], [], [("student_scores", "teacher_scores")]),
        "attention_mse_loss": (kdfast.attention_mse_loss,
                               lambda: dict(student_scores=r(B, H, L, L), teacher_scores=r(B, H, L, L)),
                               ["teacher_scores", "student_scores"], [], [("student_scores", "teacher_scores")]),
        "flash_attention_transfer": (kdfast.flash_attention_transfer,
                                     lambda: dict(q_s=r(B, H, L, 4), k_s=r(B, H, L, 4), q_t=r(B, H, L, 3),
                                                  k_t=r(B, H, L, 3)),
                                     ["q_t", "k_t", "q_s", "k_s"], [], [("q_s", "q_t"), ("q_s", "k_s")]),
        "hidden_mse_loss": (kdfast.hidden_mse_loss,
                            lambda: dict(student_hidden=r(B, L, d), teacher_hidden=r(B, L, d + 1),
                                         proj_weight=r(d + 1, d), proj_bias=r(d + 1)),
                            ["teacher_hidden", "student_hidden", "proj_weight", "proj_bias"], [],
                            [("student_hidden", "teacher_hidden")]),
        "cosine_loss": (kdfast.cosine_loss, lambda: dict(student_hidden=r(B, L, d), teacher_hidden=r(B, L, d)),
                        ["teacher_hidden", "student_hidden"], [], [("student_hidden", "teacher_hidden")]),
        "feature_map_loss": (kdfast.feature_map_loss,
                             lambda: dict(student_hidden=r(B, L, d), teacher_hidden=r(B, L, d)),
                             ["teacher_hidden", "student_hidden"], ["beta_mean", "beta_var"],
                             [("student_hidden", "teacher_hidden")]),
    }


CONTRACT = _contract_cases()


def _contract_backends(loss: str) -> list[str]:
    if loss == "feature_map_loss":
        return ["torch"]
    return [b for b in BACKENDS if not (b == "cpu" and loss == "sparse_kd_loss")]


@pytest.mark.parametrize("loss", list(CONTRACT))
def test_contract_valid_inputs_give_a_finite_loss(loss):
    fn, make, *_ = CONTRACT[loss]
    for be in _contract_backends(loss):
        assert torch.isfinite(fn(**make(), backend=be)), (loss, be)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("loss", list(CONTRACT))
def test_contract_non_finite_inputs_are_named(loss, bad):
    """A NaN / Inf in a counted element of any float input: ValueError naming that input, never a NaN loss."""
    fn, make, finite, _, _ = CONTRACT[loss]
    for be in _contract_backends(loss):
        for arg in finite:
            kw = make()
            kw[arg].view(-1)[1] = bad
            with pytest.raises(ValueError, match=rf"^{arg} "):
                fn(**kw, backend=be)


@pytest.mark.parametrize("loss", list(CONTRACT))
def test_contract_negative_weights_and_non_tensors_are_refused(loss):
    fn, make, finite, weights, _ = CONTRACT[loss]
    for w in weights:
        for bad in (-1.0, float("nan"), "1"):
            with pytest.raises(ValueError, match=w):
                fn(**{**make(), w: bad})
    for arg in finite:
        kw = make()
        kw[arg] = kw[arg].tolist()
        with pytest.raises(ValueError, match=arg):
            fn(**kw)
        kw = make()
        kw[arg] = kw[arg].to(torch.int32)
        with pytest.raises(ValueError, match=arg):
            fn(**kw)


@pytest.mark.parametrize("loss", [name for name in CONTRACT if CONTRACT[name][4]])
def test_contract_dtype_and_shape_mismatches_are_named(loss):
    fn, make, _, _, pairs = CONTRACT[loss]
    for student, teacher in pairs:
        kw = make()
        kw[teacher] = kw[teacher].double()
        with pytest.raises(ValueError, match=teacher):
            fn(**kw)
        kw = make()
        kw[teacher] = kw[teacher][..., :-1, :] if kw[teacher].dim() > 2 else kw[teacher][:-1]
        with pytest.raises(ValueError, match=f"{teacher}|{student}"):
            fn(**kw)


@pytest.mark.parametrize("module, kwargs", [
    (kdfast.KDLoss, dict(alpha_kd=-1.0)), (kdfast.KDLoss, dict(alpha_mlm=-0.5)),
    (kdfast.SparseKDLoss, dict(alpha_kd=-1.0)), (kdfast.FusedLinearKDLoss, dict(alpha_mlm=-1.0)),
])
def test_contract_loss_modules_refuse_negative_alphas(module, kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        module(**kwargs)
    with pytest.raises(ValueError, match=r"weights\['logits'\]"):
        kdfast.DistillationLoss({1: 1}, {"logits": -1.0})


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "cpu"])
@pytest.mark.parametrize("stored, used", [(0.454, 0.248), (0.248, 0.454), (1.0, 2.0), (2.0, 1.0)])
def test_sparse_teacher_at_another_temperature_than_its_lse_is_refused(backend, stored, used):
    """The cache stores logsumexp(t / T) at its own T: using it at another T is a silent wrong loss
    unless refused. Both the sparse loss and the fused linear loss with a sparse teacher refuse it."""
    g = torch.Generator().manual_seed(int(stored * 1000))
    t = torch.randn(6, 50, generator=g) * 3
    s = torch.randn(6, 50, generator=g)
    ids, vals, lse = kdfast.sparsify_teacher_logits(t, 8, temperature=stored)
    assert torch.isfinite(kdfast.sparse_kd_loss(s, ids, vals, teacher_logsumexp=lse, temperature=stored,
                                                backend=backend))
    with pytest.raises(ValueError, match="teacher_logsumexp.*temperature"):
        kdfast.sparse_kd_loss(s, ids, vals, teacher_logsumexp=lse, temperature=used, backend=backend)
    h, w = torch.randn(6, 7, generator=g), torch.randn(50, 7, generator=g)
    with pytest.raises(ValueError, match="teacher_logsumexp.*temperature"):
        kdfast.fused_linear_kd_loss(h, w, teacher_sparse=(ids, vals, lse), temperature=used, backend=backend)
