"""kdfast.fused_linear_kd_loss against float64 references with materialised logits (autograd)."""

from __future__ import annotations

import pytest
import torch

import kdfast
from kdfast.losses.fused_linear_kd import default_chunk_size
from tests.helpers import backends_of
from tests.inputs import LEAD, V, dense_logits
from tests.inputs import lm_head_inputs as make_inputs
from tests.reference import kd_loss_reference, sparse_kd_loss_reference

# fp16 / bf16 hidden/weights only on cpu/torch (the interpreter's half arithmetic is not what a GPU does)
DTYPES = {"triton": [torch.float32], "cpu": [torch.float32, torch.float16, torch.bfloat16],
          "torch": [torch.float32, torch.float16, torch.bfloat16]}
# 16-bit: the gradients are rounded once to the input dtype (relative 2^-11 fp16, 2^-8 bf16 at most)
TOL = {torch.float32: (2e-5, 2e-6), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1e-2, 1e-2)}
CPU_BACKENDS = backends_of("kd_rows")  # the kernels it runs on its chunks: every registered backend here
SPARSE_BACKENDS = backends_of("sparse_kd_rows")



def leaves(*xs):
    return [None if x is None else x.detach().clone().requires_grad_() for x in xs]


def run_ours(h_s, w_s, b_s, grad_scale=1.0, **kw):
    h, w, b = leaves(h_s, w_s, b_s)
    loss = kdfast.fused_linear_kd_loss(h, w, student_bias=b, **kw)
    (loss * grad_scale).backward()
    return loss.detach(), h.grad, w.grad, None if b is None else b.grad


def run_reference(h_s, w_s, b_s, ref_fn, grad_scale=1.0):
    h, w, b = leaves(h_s.double(), w_s.double(), None if b_s is None else b_s.double())
    loss = ref_fn(dense_logits(h, w, b))
    (loss * grad_scale).backward()
    return loss.detach(), h.grad, w.grad, None if b is None else b.grad


def assert_all_close(ours, ref, dtype):
    rtol, atol = TOL[dtype]
    for what, a, e in zip(("loss", "grad h_s", "grad W_s", "grad b_s"), ours, ref):
        if e is None:
            assert a is None, what
            continue
        assert a is not None, what
        if what != "loss":
            assert a.dtype == dtype, what
        tol = atol * max(1.0, float(e.abs().max()))
        torch.testing.assert_close(a.double(), e, rtol=rtol, atol=tol, msg=lambda m: f"{what}: {m}")


DENSE_CASES = [(b, dt, bias) for b in CPU_BACKENDS for dt in DTYPES[b] for bias in (True, False)]
DENSE_IDS = [f"{b}-{str(dt).replace('torch.', '')}-{'bias' if bias else 'nobias'}" for b, dt, bias in DENSE_CASES]


@pytest.mark.parametrize("backend,dtype,bias", DENSE_CASES, ids=DENSE_IDS)
@pytest.mark.parametrize("kd_rows", ["all", "masked"])
def test_dense_teacher_matches_reference(backend, dtype, bias, kd_rows):
    """KD (on the unmasked or the labelled, unmasked rows) + MLM on labelled, unmasked rows, differing
    hidden sizes, chunks not dividing the rows."""
    h_s, w_s, b_s, h_t, w_t, b_t, labels, mask = make_inputs(dtype, bias=bias)
    kw = dict(temperature=2.0, alpha_kd=0.7, alpha_mlm=0.4, kd_rows=kd_rows)
    ours = run_ours(h_s, w_s, b_s, 1.7, teacher_hidden=h_t, teacher_weight=w_t, teacher_bias=b_t, labels=labels,
                    mask=mask, chunk_size=4, backend=backend, **kw)
    t = dense_logits(h_t, w_t, b_t)
    ref = run_reference(h_s, w_s, b_s, lambda s: kd_loss_reference(s, t, labels=labels, mask=mask, **kw), 1.7)
    assert_all_close(ours, ref, dtype)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("chunk", [1, 5, 64, None])
def test_chunk_size_does_not_change_the_result(backend, chunk):
    h_s, w_s, b_s, h_t, w_t, b_t, labels, _ = make_inputs(torch.float32)
    kw = dict(teacher_hidden=h_t, teacher_weight=w_t, teacher_bias=b_t, labels=labels, temperature=1.5)
    ours = run_ours(h_s, w_s, b_s, chunk_size=chunk, backend=backend, **kw)
    t = dense_logits(h_t, w_t, b_t)
    ref = run_reference(h_s, w_s, b_s, lambda s: kd_loss_reference(s, t, labels=labels, temperature=1.5))
    assert_all_close(ours, ref, torch.float32)


def test_all_rows_and_soft_ce_without_labels():
    """No labels: every row counts; soft_ce has the KL's gradient."""
    h_s, w_s, b_s, h_t, w_t, b_t, _, _ = make_inputs(torch.float32, lead=(13,))
    t = dense_logits(h_t, w_t, b_t)
    for kind in ("kl", "soft_ce"):
        ours = run_ours(h_s, w_s, b_s, teacher_hidden=h_t, teacher_weight=w_t, teacher_bias=b_t, temperature=3.0,
                        kind=kind, chunk_size=6, backend="torch")
        ref = run_reference(h_s, w_s, b_s, lambda s: kd_loss_reference(s, t, temperature=3.0, kind=kind))
        assert_all_close(ours, ref, torch.float32)


def test_restrict_to_masked_false_uses_every_unmasked_row():
    h_s, w_s, b_s, h_t, w_t, b_t, labels, mask = make_inputs(torch.float32)
    ours = run_ours(h_s, w_s, b_s, teacher_hidden=h_t, teacher_weight=w_t, teacher_bias=b_t, labels=labels,
                    mask=mask, kd_rows="all", temperature=2.0, chunk_size=8)
    t = dense_logits(h_t, w_t, b_t)
    ref = run_reference(h_s, w_s, b_s, lambda s: kd_loss_reference(s, t, mask=mask.reshape(-1), temperature=2.0))
    assert_all_close(ours, ref, torch.float32)


# --- KD over every counted row, MLM over the labelled ones (kd_rows="all", alpha_mlm != 0) ----------

def kd_all_mlm_labelled_reference(s, kd_ref_fn, labels, mask, alpha_mlm):
    """alpha_kd T^2 KL averaged over the rows with mask != 0 (``kd_ref_fn``, alpha_mlm 0 there)
    + alpha_mlm * cross-entropy averaged over those of them with a label (0 when there are none)."""
    labels = labels.reshape(-1)
    mlm_rows = labels != -100
    if mask is not None:
        mlm_rows &= mask.reshape(-1).bool()
    loss = kd_ref_fn(s)
    if bool(mlm_rows.any()):
        loss = loss + alpha_mlm * torch.nn.functional.cross_entropy(s.reshape(-1, V)[mlm_rows], labels[mlm_rows])
    return loss


@pytest.mark.parametrize("backend,dtype,bias", DENSE_CASES, ids=DENSE_IDS)
def test_kd_on_every_row_mlm_on_labelled_rows_matches_reference(backend, dtype, bias):
    """One call: KD batchmean over the unmasked rows, MLM mean over the labelled ones; chunks of 4
    over 21 tokens, so the labelled prefix ends inside a chunk."""
    h_s, w_s, b_s, h_t, w_t, b_t, labels, mask = make_inputs(dtype, bias=bias)
    kw = dict(temperature=2.0, alpha_kd=0.7)
    ours = run_ours(h_s, w_s, b_s, 1.7, teacher_hidden=h_t, teacher_weight=w_t, teacher_bias=b_t, labels=labels,
                    mask=mask, alpha_mlm=0.4, kd_rows="all", chunk_size=4, backend=backend, **kw)
    t = dense_logits(h_t, w_t, b_t)
    ref = run_reference(h_s, w_s, b_s, lambda s: kd_all_mlm_labelled_reference(
        s, lambda s: kd_loss_reference(s, t, mask=mask, **kw), labels, mask, 0.4), 1.7)
    assert_all_close(ours, ref, dtype)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("chunk", [1, 3, 64, None])
@pytest.mark.parametrize("with_mask", [True, False])
def test_kd_on_every_row_mlm_chunking_and_no_mask(backend, chunk, with_mask):
    """Chunk sizes that put the labelled/unlabelled boundary on, inside and beyond a chunk; without a
    mask every row is a KD row (the rows are still reordered, labelled first)."""
    h_s, w_s, b_s, h_t, w_t, b_t, labels, mask = make_inputs(torch.float32, lead=(5, 9), mask_frac=0.6)
    mask = mask if with_mask else None
    kw = dict(temperature=1.5, alpha_kd=1.3, kind="soft_ce" if chunk == 3 else "kl")
    ours = run_ours(h_s, w_s, b_s, teacher_hidden=h_t, teacher_weight=w_t, teacher_bias=b_t, labels=labels,
                    mask=mask, alpha_mlm=0.8, kd_rows="all", chunk_size=chunk, backend=backend, **kw)
    t = dense_logits(h_t, w_t, b_t)
    ref = run_reference(h_s, w_s, b_s, lambda s: kd_all_mlm_labelled_reference(
        s, lambda s: kd_loss_reference(s, t, mask=mask, **kw), labels, mask, 0.8))
    assert_all_close(ours, ref, torch.float32)


@pytest.mark.parametrize("backend", SPARSE_BACKENDS)
def test_kd_on_every_row_mlm_sparse_teacher(backend):
    h_s, w_s, b_s, h_t, w_t, b_t, labels, mask = make_inputs(torch.float32)
    T = 2.0
    ids, vals, lse = kdfast.sparsify_teacher_logits(dense_logits(h_t, w_t, b_t).float(), 8, temperature=T)
    ours = run_ours(h_s, w_s, b_s, 0.6, teacher_sparse=(ids.reshape(*LEAD, 8), vals.reshape(*LEAD, 8),
                                                        lse.reshape(LEAD)),
                    labels=labels, mask=mask, temperature=T, alpha_mlm=0.3, kd_rows="all", chunk_size=5,
                    backend=backend)
    ref = run_reference(h_s, w_s, b_s, lambda s: kd_all_mlm_labelled_reference(
        s, lambda s: sparse_kd_loss_reference(s, ids, vals, teacher_logsumexp=lse, mask=mask.reshape(-1),
                                              temperature=T), labels, mask, 0.3), 0.6)
    assert_all_close(ours, ref, torch.float32)


def test_kd_on_every_row_mlm_edge_row_sets():
    """No labelled row: the KD term alone. Every counted row labelled: the restricted call's result.
    A label out of range is refused in an MLM row, never read in a masked-out row."""
    h_s, w_s, b_s, h_t, w_t, b_t, labels, mask = make_inputs(torch.float32)
    f = kdfast.fused_linear_kd_loss
    kw = dict(student_bias=b_s, teacher_bias=b_t, mask=mask, temperature=2.0, backend="torch")
    kd_only = f(h_s, w_s, h_t, w_t, **kw)
    none = torch.full_like(labels, -100)
    torch.testing.assert_close(f(h_s, w_s, h_t, w_t, labels=none, alpha_mlm=0.5, kd_rows="all", **kw),
                               kd_only)
    every = torch.randint(0, V, labels.shape)
    torch.testing.assert_close(f(h_s, w_s, h_t, w_t, labels=every, alpha_mlm=0.5, kd_rows="all", **kw),
                               f(h_s, w_s, h_t, w_t, labels=every, alpha_mlm=0.5, kd_rows="masked", **kw))
    bad = labels.clone()
    bad[~mask] = V + 5  # masked-out rows: not KD rows, not MLM rows
    torch.testing.assert_close(f(h_s, w_s, h_t, w_t, labels=bad, alpha_mlm=0.5, kd_rows="all", **kw),
                               f(h_s, w_s, h_t, w_t, labels=labels, alpha_mlm=0.5, kd_rows="all", **kw))
    bad[mask & (labels != -100)] = V
    with pytest.raises(ValueError, match="labels must lie"):
        f(h_s, w_s, h_t, w_t, labels=bad, alpha_mlm=0.5, kd_rows="all", **kw)
    mod = kdfast.FusedLinearKDLoss(2.0, alpha_mlm=0.5, kd_rows="all", chunk_size=3, backend="torch")
    with torch.no_grad():  # the module form, loss only
        torch.testing.assert_close(mod(h_s, w_s, h_t, w_t, student_bias=b_s, teacher_bias=b_t, labels=labels,
                                       mask=mask),
                                   f(h_s, w_s, h_t, w_t, labels=labels, alpha_mlm=0.5, kd_rows="all", **kw))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_all_rows_masked_gives_zero_not_nan(backend):
    h_s, w_s, b_s, h_t, w_t, b_t, labels, _ = make_inputs(torch.float32)
    labels = torch.full_like(labels, -100)
    loss, gh, gw, gb = run_ours(h_s, w_s, b_s, teacher_hidden=h_t, teacher_weight=w_t, teacher_bias=b_t,
                                labels=labels, kd_rows="masked", backend=backend)
    assert loss.item() == 0.0
    for g in (gh, gw, gb):
        assert g is not None and bool((g == 0).all())


SPARSE_CASES = [(b, m) for b in SPARSE_BACKENDS for m in ("topk_lse", "topk", "sampled")]


@pytest.mark.parametrize("backend,form", SPARSE_CASES)
def test_sparse_teacher_matches_reference(backend, form):
    h_s, w_s, b_s, h_t, w_t, b_t, labels, mask = make_inputs(torch.float32)
    T = 2.0
    t = dense_logits(h_t, w_t, b_t).float()
    if form == "sampled":
        ids, vals = kdfast.sparsify_teacher_logits(t, 16, mode="sampled", temperature=T)
        teacher_sparse, mode, lse = (ids, vals), "sampled", None
    else:
        ids, vals, lse = kdfast.sparsify_teacher_logits(t, 8, mode="topk", temperature=T)
        if form == "topk":
            lse = None
        teacher_sparse = (ids, vals, lse) if lse is not None else (ids, vals)
        mode = "topk"
    kw = dict(temperature=T, alpha_mlm=0.3)
    ours = run_ours(h_s, w_s, b_s, 1.3, teacher_sparse=teacher_sparse,
                    sparse_mode="topk" if form == "topk" else None, labels=labels, mask=mask, chunk_size=5,
                    backend=backend, **kw)
    ref = run_reference(h_s, w_s, b_s, lambda s: sparse_kd_loss_reference(
        s, ids, vals, mode=mode, teacher_logsumexp=lse, labels=labels.reshape(-1), mask=mask.reshape(-1), **kw), 1.3)
    assert_all_close(ours, ref, torch.float32)


def test_sparse_teacher_fp16_hidden_torch():
    h_s, w_s, b_s, h_t, w_t, b_t, labels, _ = make_inputs(torch.float16)
    t = dense_logits(h_t, w_t, b_t).float()
    ids, vals, lse = kdfast.sparsify_teacher_logits(t, 8, temperature=1.0)
    ours = run_ours(h_s, w_s, b_s, teacher_sparse=(ids.reshape(*LEAD, 8), vals.reshape(*LEAD, 8), lse.reshape(LEAD)),
                    labels=labels, chunk_size=3, backend="torch")
    ref = run_reference(h_s, w_s, b_s, lambda s: sparse_kd_loss_reference(
        s, ids, vals, teacher_logsumexp=lse, labels=labels.reshape(-1)))
    assert_all_close(ours, ref, torch.float16)


def test_module_form_and_frozen_weight():
    h_s, w_s, b_s, h_t, w_t, b_t, labels, _ = make_inputs(torch.float32)
    mod = kdfast.FusedLinearKDLoss(2.0, alpha_mlm=0.5, chunk_size=7, backend="torch")
    h = h_s.clone().requires_grad_()
    loss = mod(h, w_s, h_t, w_t, student_bias=b_s, teacher_bias=b_t, labels=labels)  # weight frozen: no grad_W
    loss.backward()
    ref = kdfast.fused_linear_kd_loss(h_s, w_s, h_t, w_t, student_bias=b_s, teacher_bias=b_t, labels=labels,
                                      temperature=2.0, alpha_mlm=0.5, backend="torch")
    torch.testing.assert_close(loss.detach(), ref)
    assert h.grad is not None and w_s.grad is None


def test_no_grad_gives_the_same_loss():
    h_s, w_s, b_s, h_t, w_t, b_t, labels, _ = make_inputs(torch.float32)
    h = h_s.clone().requires_grad_()
    kw = dict(student_bias=b_s, teacher_bias=b_t, labels=labels, temperature=2.0, backend="torch")
    with torch.no_grad():
        loss = kdfast.fused_linear_kd_loss(h, w_s, h_t, w_t, **kw)
    assert not loss.requires_grad
    torch.testing.assert_close(loss, kdfast.fused_linear_kd_loss(h, w_s, h_t, w_t, **kw).detach())


def test_default_chunk_size_rule():
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert default_chunk_size(30, 30522, cpu) == 30                 # fits: one chunk
    c = default_chunk_size(614, 30522, cpu)                          # BERT batch's masked rows on a CPU
    assert c % 64 == 0 and 2 * c * 30522 * 4 <= 64 << 20 and c >= 128
    g = default_chunk_size(4096, 30522, gpu)
    assert g % 128 == 0 and 2 * g * 30522 * 4 <= 256 << 20 and g == 1024
    assert default_chunk_size(4096, 30522, gpu, buffers=1) == 2048   # sparse teacher: one buffer
    assert default_chunk_size(1100, 30522, gpu) == 640               # 2 even chunks, not 1024 + 76


def test_validation_errors_name_the_argument():
    h_s, w_s, b_s, h_t, w_t, b_t, labels, _ = make_inputs(torch.float32)
    f = kdfast.fused_linear_kd_loss
    with pytest.raises(ValueError, match="neither"):
        f(h_s, w_s)
    ids, vals, lse = kdfast.sparsify_teacher_logits(dense_logits(h_t, w_t, b_t).float(), 4)
    with pytest.raises(ValueError, match="not both"):
        f(h_s, w_s, h_t, w_t, teacher_sparse=(ids, vals, lse))
    with pytest.raises(ValueError, match="student_weight has width"):
        f(h_s, w_t, h_t, w_t)
    with pytest.raises(ValueError, match="teacher_weight has width"):
        f(h_s, w_s, h_t, w_s)
    with pytest.raises(ValueError, match="vocabulary mismatch"):
        f(h_s, w_s, h_t, w_t[:-1])
    with pytest.raises(ValueError, match="student_bias"):
        f(h_s, w_s, h_t, w_t, student_bias=b_s[:-1])
    with pytest.raises(ValueError, match="teacher_hidden has leading shape"):
        f(h_s, w_s, h_t[:2], w_t)
    with pytest.raises(ValueError, match="student_weight has dtype"):
        f(h_s, w_s.double(), h_t, w_t)
    with pytest.raises(ValueError, match="student_weight is on meta"):
        f(h_s, w_s.to("meta"), h_t, w_t)
    with pytest.raises(ValueError, match="teacher_hidden is on meta"):
        f(h_s, w_s, h_t.to("meta"), w_t.to("meta"))
    for bad_t in (0.0, 1e-3, 2e4, float("nan"), "2", True):
        with pytest.raises(ValueError, match="temperature"):
            f(h_s, w_s, h_t, w_t, temperature=bad_t)
    for name in ("alpha_kd", "alpha_mlm"):
        for bad in (float("nan"), float("inf"), "1"):
            with pytest.raises(ValueError, match=name):
                f(h_s, w_s, h_t, w_t, **{name: bad})
    with pytest.raises(ValueError, match="temperature"):
        kdfast.FusedLinearKDLoss(temperature=50.0, sparse_mode="topk")
    with pytest.raises(ValueError, match="teacher_weight is required"):
        f(h_s, w_s, h_t)
    with pytest.raises(ValueError, match="labels"):
        f(h_s, w_s, h_t, w_t, alpha_mlm=1.0)
    with pytest.raises(ValueError, match="chunk_size"):
        f(h_s, w_s, h_t, w_t, chunk_size=0)
    lead_ids = ids.reshape(*LEAD, 4)
    bad = lead_ids.clone()
    bad[0, 0, 0] = V + 3
    with pytest.raises(ValueError, match="teacher_ids must lie"):
        f(h_s, w_s, teacher_sparse=(bad, vals.reshape(*LEAD, 4), lse.reshape(LEAD)))
    with pytest.raises(ValueError, match="teacher_sparse ids has shape"):
        f(h_s, w_s, teacher_sparse=(ids.reshape(21, 4), vals.reshape(21, 4), lse))
    with pytest.raises(ValueError, match="sparse_mode"):
        f(h_s, w_s, teacher_sparse=(lead_ids, vals.reshape(*LEAD, 4)), sparse_mode="nope")
    with pytest.raises(ValueError, match="soft_ce"):
        f(h_s, w_s, teacher_sparse=(lead_ids, vals.reshape(*LEAD, 4), lse.reshape(LEAD)), kind="soft_ce")
    with pytest.raises(ValueError, match="backend"):
        f(h_s, w_s, h_t, w_t, backend="nope")


def test_bench_suite_runs_on_a_small_shape():
    from kdfast.bench import fused_linear_kd as bench
    from kdfast.bench.timing import format_table

    res = bench.run(torch.device("cpu"), (2, 16), student_hiddens=(32,), repeat=1, warmup=0, vocab=300)
    assert {r.impl.split(" liger")[0] for r in res} >= {"eager", "eager gathered"}
    assert all(r.ms is not None and not r.note for r in res), [r.note for r in res]
    assert "eager gathered" in format_table(res)


# --- 16-bit heads without an fp32 weight copy; value checks -----------------------------------------

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("chunk", [4, None])
def test_low_precision_gemm_path_matches_reference(monkeypatch, dtype, chunk):
    """The GPU path for 16-bit heads (fp32-output GEMMs on the 16-bit weight, the logit gradient rounded
    once for the gradient GEMMs), run here with the GEMM emulated exactly: fp32 products of the 16-bit
    values (exact) accumulated in fp32. The loss must be fp32-accurate: logits rounded to 16 bits would
    miss the tight loss tolerance by orders of magnitude."""
    import kdfast.losses.fused_linear_kd as flkd

    calls = []

    def emulated(a, b, out):
        assert a.dtype == b.dtype == dtype and out.dtype == torch.float32
        calls.append(a.shape)
        return torch.mm(a.float(), b.float(), out=out)

    monkeypatch.setattr(flkd, "low_precision_gemm_path", lambda device, dt: dt == dtype)
    monkeypatch.setattr(flkd, "_mm_fp32_out", emulated)
    h_s, w_s, b_s, h_t, w_t, b_t, labels, mask = make_inputs(dtype)
    w_t, b_t, h_t = w_t.to(dtype), b_t.to(dtype), h_t.to(dtype)  # a 16-bit teacher head too
    kw = dict(temperature=2.0, alpha_kd=0.8, alpha_mlm=0.3, kd_rows="masked")  # the labelled rows: chunks below
    ours = run_ours(h_s, w_s, b_s, 1.3, teacher_hidden=h_t, teacher_weight=w_t, teacher_bias=b_t, labels=labels,
                    mask=mask, chunk_size=chunk, backend="torch", **kw)
    assert calls, "the fp32-output GEMM path was not taken"
    n_chunks = 1 if chunk is None else -(-int(((labels != -100) & mask).sum()) // chunk)
    assert len(calls) == 3 * n_chunks  # student + teacher logits, grad_W (grad_h is a plain 16-bit GEMM)
    t = dense_logits(h_t, w_t, b_t)
    ref = run_reference(h_s, w_s, b_s, lambda s: kd_loss_reference(s, t, labels=labels, mask=mask, **kw), 1.3)
    torch.testing.assert_close(ours[0].double(), ref[0], rtol=1e-5, atol=1e-6)
    assert_all_close(ours, ref, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_low_precision_gemm_path_is_off_on_cpu(dtype):
    from kdfast.losses.fused_linear_kd import low_precision_gemm_path

    assert low_precision_gemm_path(torch.device("cpu"), dtype) is False  # no aten::mm.dtype on CPU


@pytest.mark.parametrize("arg", ["teacher_hidden", "teacher_weight", "teacher_bias"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_teacher_raises_naming_it(arg, bad):
    h_s, w_s, b_s, h_t, w_t, b_t, labels, mask = make_inputs(torch.float32)
    counted = ((labels != -100) & mask).nonzero()[0].tolist()
    x = {"teacher_hidden": h_t, "teacher_weight": w_t, "teacher_bias": b_t}[arg]
    x[tuple(counted) if arg == "teacher_hidden" else 5] = bad
    with pytest.raises(ValueError, match=f"{arg} contains NaN or Inf"):
        kdfast.fused_linear_kd_loss(h_s, w_s, h_t, w_t, student_bias=b_s, teacher_bias=b_t, labels=labels,
                                    mask=mask, temperature=2.0)


def test_non_finite_teacher_in_an_uncounted_row_is_ignored():
    h_s, w_s, b_s, h_t, w_t, b_t, labels, mask = make_inputs(torch.float32)
    uncounted = (~((labels != -100) & mask)).nonzero()[0].tolist()
    h_t[tuple(uncounted)] = float("nan")
    loss = kdfast.fused_linear_kd_loss(h_s, w_s, h_t, w_t, student_bias=b_s, teacher_bias=b_t, labels=labels,
                                       mask=mask, kd_rows="masked")
    assert torch.isfinite(loss)


@pytest.fixture
def value_checks_off():
    from kdfast.losses._checks import set_value_checks

    set_value_checks(False)
    yield
    set_value_checks(None)


def test_value_checks_off_out_of_range_labels_and_ids_stay_in_bounds(value_checks_off):
    """What a GPU does by default: no host-synchronising check; a bad label / id is clamped into
    [0, V) (a wrong number for a wrong input), never read out of bounds."""
    h_s, w_s, b_s, h_t, w_t, b_t, labels, mask = make_inputs(torch.float32)
    counted = ((labels != -100) & mask).nonzero()
    bad = labels.clone()
    bad[tuple(counted[0].tolist())] = V + 5
    bad[tuple(counted[1].tolist())] = -7
    kw = dict(student_bias=b_s, teacher_bias=b_t, mask=mask, alpha_mlm=0.5, temperature=2.0, backend="torch")
    clamped = bad.clamp(0, V - 1).masked_fill(labels == -100, -100)
    got = kdfast.fused_linear_kd_loss(h_s, w_s, h_t, w_t, labels=bad, **kw)
    torch.testing.assert_close(got, kdfast.fused_linear_kd_loss(h_s, w_s, h_t, w_t, labels=clamped, **kw))
    ids, vals, lse = kdfast.sparsify_teacher_logits(dense_logits(h_t, w_t, b_t).float(), 4)
    ids = ids.reshape(*LEAD, 4).clone()
    ids[tuple(counted[0].tolist())][0] = V + 1000
    loss = kdfast.fused_linear_kd_loss(h_s, w_s, teacher_sparse=(ids, vals.reshape(*LEAD, 4), lse.reshape(LEAD)),
                                       labels=labels, student_bias=b_s)
    assert torch.isfinite(loss)
    h_t[tuple(counted[0].tolist())] = float("nan")  # no check: the loss says it
    assert not torch.isfinite(kdfast.fused_linear_kd_loss(h_s, w_s, h_t, w_t, labels=labels, mask=mask))


def test_value_checks_on_refuse_bad_labels_and_ids():
    h_s, w_s, b_s, h_t, w_t, b_t, labels, mask = make_inputs(torch.float32)
    counted = ((labels != -100) & mask).nonzero()[0].tolist()
    bad = labels.clone()
    bad[tuple(counted)] = V
    with pytest.raises(ValueError, match="labels must lie in"):
        kdfast.fused_linear_kd_loss(h_s, w_s, h_t, w_t, labels=bad, mask=mask, alpha_mlm=0.5)


def test_every_row_counts_without_a_gather():
    """No mask and no row restriction: the rows are used in place (no index_select, no row-count read)."""
    h_s, w_s, b_s, h_t, w_t, b_t, _, _ = make_inputs(torch.float32, lead=(2, 5, 3))
    t = dense_logits(h_t, w_t, b_t)
    ours = run_ours(h_s, w_s, b_s, 0.6, teacher_hidden=h_t, teacher_weight=w_t, teacher_bias=b_t, temperature=1.5,
                    chunk_size=4, backend="torch")
    ref = run_reference(h_s, w_s, b_s, lambda s: kd_loss_reference(s, t.reshape(-1, V), temperature=1.5), 0.6)
    assert ours[1].shape == h_s.shape
    assert_all_close(ours, ref, torch.float32)


def test_ambient_autocast_changes_nothing():
    """Inside the Distiller's autocast the GEMMs keep their own precision (fp32 logits)."""
    h_s, w_s, b_s, h_t, w_t, b_t, labels, mask = make_inputs(torch.float32)
    kw = dict(teacher_hidden=h_t, teacher_weight=w_t, teacher_bias=b_t, labels=labels, mask=mask, temperature=2.0,
              chunk_size=4)
    ref = run_ours(h_s, w_s, b_s, **kw)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = run_ours(h_s, w_s, b_s, **kw)
    for a, e in zip(got, ref):
        torch.testing.assert_close(a, e)
