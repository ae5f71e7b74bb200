"""The recipes' fast path: LM-head terms through kdfast.fused_linear_kd_loss (no N x V logits),
every term on kdfast's losses, and the backends each term ran on in report.json.

Each fused step is compared, loss and every parameter's gradient, with the same step computed the
old way (full logits: kd_loss / sparse_kd_loss + cross_entropy) in float32, and with a float64
reference written out by hand, live and from the cache, KD on all real tokens and on masked ones.
"""

import json

import pytest
import torch
import torch.nn.functional as F

import kdfast
from kdfast.models import distilbert_from_teacher
from kdfast.train.recipes import common, distilbert, mobilebert, recipe_config
from tests.train.recipe_batches import B, L, bert_teacher, masked_batch, perturb


def grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def run_step(step_loss, model, batch):
    model.zero_grad(set_to_none=True)
    loss, terms = step_loss(batch)
    loss.backward()
    return loss.detach(), terms, grads(model)


def assert_same_step(a, b, rtol, atol):
    (loss_a, _, grad_a), (loss_b, grad_b) = a, b
    torch.testing.assert_close(loss_a.to(loss_b.dtype), loss_b, rtol=rtol, atol=atol)
    assert grad_a.keys() == grad_b.keys() and len(grad_a) > 10
    for name in grad_a:
        torch.testing.assert_close(grad_a[name], grad_b[name], rtol=rtol, atol=atol, msg=name)


def kl_rows_fp64(s_logits, t_logits, temperature):
    """T^2 KL(softmax(t/T) || softmax(s/T)) per row, written out."""
    log_p = torch.log_softmax(t_logits / temperature, -1)
    log_q = torch.log_softmax(s_logits / temperature, -1)
    return temperature ** 2 * (log_p.exp() * (log_p - log_q)).sum(-1)


def cosine_rows_fp64(hs, ht):
    return 1 - (hs * ht).sum(-1) / (hs.norm(dim=-1) * ht.norm(dim=-1))


def sparse_of(t_logits, rows, temperature):
    """The cache's sparse teacher at ``rows``, keeping all V ids (top-k with K = V is the dense
    teacher exactly, so the float64 reference is the dense KL), in the logits' own dtype."""
    t = t_logits[rows]
    values, ids = torch.sort(t, -1, descending=True)
    return ids.to(torch.int32), values, torch.logsumexp(t / temperature, -1)


# --- DistilBERT ----------------------------------------------------------------------------------

def distilbert_setup(dtype, source, kd_rows):
    teacher = bert_teacher().to(dtype)
    student = perturb(distilbert_from_teacher(teacher, layers=[0, 3]).eval()).to(dtype)
    cfg = recipe_config("distilbert", None, [f"teacher.source={source}", f"kd_rows={kd_rows}"])
    ids, am, labels = masked_batch()
    return cfg, teacher, student, ids, am, labels


def distilbert_batch(cfg, teacher, ids, am, labels, *, topk=None):
    """(batch, masker) as the recipe sees them live (the masker returns the fixed masking) or
    from the cache (masked inputs, labels, the teacher's sparse logits and last hidden state)."""
    if cfg.teacher.source == "live":
        return {"input_ids": ids, "attention_mask": am}, (lambda i, m: (ids, labels))
    with torch.no_grad():
        out = teacher(input_ids=ids, attention_mask=am, output_hidden_states=True)
    rows = labels != -100
    if topk is None:
        tid, tval, tlse = sparse_of(out.logits, rows, cfg.temperature)
    else:
        tid, tval, tlse = kdfast.sparsify_teacher_logits(out.logits[rows].float(), topk, "topk", cfg.temperature)
    n_t = teacher.config.num_hidden_layers
    return {"input_ids": ids, "attention_mask": am, "labels": labels, "topk_ids": tid, "topk_values": tval,
            "topk_lse": tlse, f"hidden_{n_t}": out.hidden_states[-1]}, None


@pytest.mark.parametrize("source, kd_rows", [("live", "all"), ("live", "masked"), ("cache", "masked")])
def test_distilbert_fused_step_equals_full_logits_step(source, kd_rows):
    """float32: the fused step against the recipe's old step on full logits (kd_loss or, from the
    cache, sparse_kd_loss on top-k 7 of 61, plus cross_entropy and the cosine)."""
    cfg, teacher, student, ids, am, labels = distilbert_setup(torch.float32, source, kd_rows)
    batch, masker = distilbert_batch(cfg, teacher, ids, am, labels, topk=7)
    step = distilbert.make_step_loss(cfg, student, None if source == "cache" else teacher, masker=masker,
                                     n_teacher_layers=4)
    fused = run_step(step, student, batch)
    assert set(fused[1]) == {"kd_mlm", "cos"}

    student.zero_grad(set_to_none=True)
    s = student(input_ids=ids, attention_mask=am, output_hidden_states=True)
    rows = labels != -100
    if source == "cache":
        kd = kdfast.sparse_kd_loss(s.logits[rows], batch["topk_ids"], batch["topk_values"],
                                   teacher_logsumexp=batch["topk_lse"], temperature=cfg.temperature)
        h_t = batch["hidden_4"]
    else:
        with torch.no_grad():
            t = teacher(input_ids=ids, attention_mask=am, output_hidden_states=True)
        kd = kdfast.kd_loss(s.logits, t.logits, temperature=cfg.temperature,
                            mask=am if kd_rows == "all" else rows)
        h_t = t.hidden_states[-1]
    mlm = F.cross_entropy(s.logits.flatten(0, -2), labels.flatten(), ignore_index=-100)
    cos = kdfast.cosine_loss(s.hidden_states[-1], h_t, am)
    loss = cfg.alpha_kd * kd + cfg.alpha_mlm * mlm + cfg.alpha_cos * cos
    loss.backward()
    assert_same_step(fused, (loss.detach(), grads(student)), rtol=2e-4, atol=2e-6)
    assert fused[1]["kd_mlm"] == pytest.approx(float((cfg.alpha_kd * kd + cfg.alpha_mlm * mlm).detach()), rel=1e-4)
    assert fused[1]["cos"] == pytest.approx(float(cos.detach()), rel=1e-4)


@pytest.mark.parametrize("source, kd_rows", [("live", "all"), ("live", "masked"), ("cache", "masked")])
def test_distilbert_fused_step_equals_float64_reference(source, kd_rows):
    """float64 models: the fused step against the objective written out by hand on full logits
    (KL at T, cross-entropy, 1 - cos; means over the KD rows, the masked rows, the real rows)."""
    cfg, teacher, student, ids, am, labels = distilbert_setup(torch.float64, source, kd_rows)
    batch, masker = distilbert_batch(cfg, teacher, ids, am, labels)
    step = distilbert.make_step_loss(cfg, student, None if source == "cache" else teacher, masker=masker,
                                     n_teacher_layers=4)
    fused = run_step(step, student, batch)
    assert fused[0].dtype == torch.float64

    student.zero_grad(set_to_none=True)
    s = student(input_ids=ids, attention_mask=am, output_hidden_states=True)
    with torch.no_grad():
        t = teacher(input_ids=ids, attention_mask=am, output_hidden_states=True)
    rows, real = labels != -100, am.bool()
    kd_rows_mask = real if kd_rows == "all" else rows
    T = cfg.temperature
    kd = kl_rows_fp64(s.logits, t.logits, T)[kd_rows_mask].mean()
    mlm = -torch.log_softmax(s.logits[rows], -1).gather(1, labels[rows][:, None]).mean()
    cos = cosine_rows_fp64(s.hidden_states[-1], t.hidden_states[-1])[real].mean()
    loss = cfg.alpha_kd * kd + cfg.alpha_mlm * mlm + cfg.alpha_cos * cos
    loss.backward()
    assert_same_step(fused, (loss.detach(), grads(student)), rtol=1e-9, atol=1e-12)


def test_kd_rows_all_and_masked_differ_and_cache_refuses_all():
    """The setting changes the objective (not a no-op), and `all` from the cache is refused by name."""
    values = {}
    for kd_rows in ("all", "masked"):
        cfg, teacher, student, ids, am, labels = distilbert_setup(torch.float32, "live", kd_rows)
        cfg.alpha_mlm = cfg.alpha_cos = 0.0  # the KD term alone
        step = distilbert.make_step_loss(cfg, student, teacher, masker=lambda i, m: (ids, labels), n_teacher_layers=4)
        values[kd_rows] = float(step({"input_ids": ids, "attention_mask": am})[0].detach())
    assert abs(values["all"] - values["masked"]) > 1e-3 * abs(values["all"]) > 0  # far above fp32 rounding
    with pytest.raises(ValueError, match="kd_rows=all needs teacher.source=live"):
        recipe_config("distilbert", None, ["teacher.source=cache", "kd_rows=all"])
    with pytest.raises(ValueError, match="kd_rows must be one of"):
        recipe_config("distilbert", None, ["kd_rows=some"])
    with pytest.raises(ValueError, match="pretrain.kd_rows=all needs teacher.source=live"):
        recipe_config("mobilebert", None, ["teacher.source=cache", "pretrain.kd_rows=all"])


def test_no_masked_token_gives_zero_lm_terms_and_zero_gradients():
    """A batch whose masking chose nothing: the fused terms are 0 (not NaN, not an error)."""
    cfg, teacher, student, ids, am, labels = distilbert_setup(torch.float32, "live", "masked")
    none = torch.full_like(labels, -100)
    h = student.bert(input_ids=ids, attention_mask=am).last_hidden_state
    loss = common.lm_distillation_loss(h, common.lm_head(student), none, am, kd_rows="masked", temperature=2.0,
                                       alpha_kd=5.0, alpha_mlm=2.0, teacher_hidden=h.detach(),
                                       teacher_head=common.lm_head(teacher))
    loss.backward()
    assert float(loss.detach()) == 0.0
    assert all(float(p.grad.abs().max()) == 0.0 for p in student.parameters() if p.grad is not None)


# --- MobileBERT stage 2 --------------------------------------------------------------------------

def mobilebert_setup(dtype, source, kd_rows):
    from kdfast.models import KDMobileBertForMaskedLM

    teacher = bert_teacher(hidden=32).to(dtype)
    cfg = recipe_config("mobilebert", None, [f"teacher.source={source}", f"pretrain.kd_rows={kd_rows}",
                                             "pretrain.temperature=1.5"])
    torch.manual_seed(3)
    scfg = mobilebert.student_config(mobilebert.MobileBertStudent(embedding_size=16, intermediate_size=16,
                                                                  num_feedforward_networks=2,
                                                                  num_attention_heads=2), teacher.config)
    student = KDMobileBertForMaskedLM(scfg).eval().to(dtype)
    return cfg, teacher, student


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("source, kd_rows", [("live", "masked"), ("live", "all"), ("cache", "masked")])
def test_mobilebert_pretrain_fused_step_equals_reference(dtype, source, kd_rows):
    """Stage 2 (0.5 KD + 0.5 MLM at T): the fused step through the concatenated output embedding
    against full logits, float32 against the old step (kd_loss, or sparse_kd_loss on top-k 5),
    float64 against the written-out formula."""
    cfg, teacher, student = mobilebert_setup(dtype, source, kd_rows)
    ids, am, labels = masked_batch(seed=5)
    rows, real = labels != -100, am.bool()
    pre = cfg.pretrain
    with torch.no_grad():
        t_logits = teacher(input_ids=ids, attention_mask=am).logits
    if source == "cache":
        if dtype == torch.float32:
            sparse = kdfast.sparsify_teacher_logits(t_logits[rows], 5, "topk", pre.temperature)
        else:
            sparse = sparse_of(t_logits, rows, pre.temperature)
        batch = {"input_ids": ids, "attention_mask": am, "labels": labels, "topk_ids": sparse[0],
                 "topk_values": sparse[1], "topk_lse": sparse[2]}
        step = mobilebert.make_pretrain_step_loss(pre, student)
    else:
        batch = {"input_ids": ids, "attention_mask": am}
        step = mobilebert.make_pretrain_step_loss(pre, student, teacher, masker=lambda i, m: (ids, labels))
    fused = run_step(step, student, batch)
    assert set(fused[1]) == {"kd_mlm"}

    student.zero_grad(set_to_none=True)
    s_logits = student(input_ids=ids, attention_mask=am).logits
    kd_mask = real if kd_rows == "all" else rows
    if dtype == torch.float32:
        if source == "cache":
            loss = kdfast.sparse_kd_loss(s_logits[rows], *sparse[:2], teacher_logsumexp=sparse[2], labels=labels[rows],
                                         temperature=pre.temperature, alpha_kd=pre.alpha_kd, alpha_mlm=pre.alpha_mlm)
        else:
            loss = (pre.alpha_kd * kdfast.kd_loss(s_logits, t_logits, temperature=pre.temperature, mask=kd_mask)
                    + pre.alpha_mlm * F.cross_entropy(s_logits[rows], labels[rows]))
        tol = dict(rtol=2e-4, atol=2e-6)
    else:
        kd = kl_rows_fp64(s_logits, t_logits, pre.temperature)[kd_mask].mean()
        mlm = -torch.log_softmax(s_logits[rows], -1).gather(1, labels[rows][:, None]).mean()
        loss = pre.alpha_kd * kd + pre.alpha_mlm * mlm
        tol = dict(rtol=1e-9, atol=1e-12)
    loss.backward()
    assert_same_step(fused, (loss.detach(), grads(student)), **tol)


# --- the demo ------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_demo_loss_equals_the_old_formula(dtype):
    """hidden_distillation_loss on kdfast's losses equals the demo's former F.mse_loss /
    F.cosine_similarity objective, loss and gradient, with padding, on cached fp16 teacher states."""
    from kdfast.train.demo import hidden_distillation_loss

    g = torch.Generator().manual_seed(7)
    layer_map = {0: 0, 1: 2, 2: 4, 3: 6}
    hs = [torch.randn(B, L, 20, generator=g, dtype=dtype).requires_grad_() for _ in range(4)]
    ht = {t: torch.randn(B, L, 20, generator=g).half() for t in layer_map.values()}
    _, am, _ = masked_batch()
    loss, terms = hidden_distillation_loss(hs, ht, am, layer_map, alpha_cos=0.7)
    got = torch.autograd.grad(loss, hs)

    m = am.bool()
    mse = sum(F.mse_loss(hs[s][m].double(), ht[t][m].double()) for s, t in layer_map.items())
    cos = (1 - F.cosine_similarity(hs[3][m].double(), ht[6][m].double(), dim=-1)).mean()
    old = mse + 0.7 * cos
    want = torch.autograd.grad(old, hs)
    tol = dict(rtol=1e-5, atol=1e-7) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(loss.double(), old, **tol)
    assert terms["hidden_mse"] == pytest.approx(float(mse.detach()), rel=1e-5)
    assert terms["cos"] == pytest.approx(float(cos.detach()), rel=1e-5)
    for a, b in zip(got, want):
        assert float(b.abs().max()) > 0
        torch.testing.assert_close(a.double(), b.double(), **tol)


# --- reports -------------------------------------------------------------------------------------

def test_term_backends_resolve_as_the_losses_do():
    from kdfast.ops import registry
    from kdfast.train import stage

    cpu = torch.device("cpu")
    got = stage.term_backends({"kd_mlm": "fused_linear_kd_loss", "kd": "fused_linear_kd_loss[sparse]",
                                "cos": "cosine_loss", "feature_map": "feature_map_loss"}, cpu)
    assert got["kd_mlm"] == {"loss": "fused_linear_kd_loss", "backend": registry.resolve("kd_rows", "auto", cpu)}
    assert got["kd"]["backend"] == "torch"  # no compiled sparse kernel: auto on CPU is torch
    assert got["cos"]["backend"] == registry.resolve("cosine_rows", "auto", cpu)
    assert got["feature_map"]["backend"] == "torch"
    assert stage.term_backends({"cos": "cosine_loss"}, cpu, "torch")["cos"]["backend"] == "torch"
    with pytest.raises(ValueError, match="not one of kdfast's losses"):
        stage.loss_backend("mse", cpu)


def run_cli(tiny, recipe, out, *extra):
    from kdfast.cli import main

    return main(["distill", "--recipe", recipe, "--teacher", str(tiny / "teacher"), "--data", str(tiny / "train.txt"),
                 "--out", str(out), "--no-progress", "--steps", "2", "--set", "data.max_length=16",
                 "--set", "train.batch_size=4", "--set", "train.eval_every=0", "--set", "train.log_every=1", *extra])


def test_distilbert_report_lists_the_backend_of_each_term(tiny, tmp_path, capsys):
    from kdfast.ops import registry

    assert run_cli(tiny, "distilbert", tmp_path / "d", "--set", "kd_rows=masked") == 0
    printed = capsys.readouterr().out
    report = json.loads((tmp_path / "d" / "report.json").read_text())
    cpu = torch.device("cpu")
    assert report["kd_rows"] == "masked"
    assert report["stages"][0]["backends"] == {
        "kd_mlm": {"loss": "fused_linear_kd_loss", "backend": registry.resolve("kd_rows", "auto", cpu)},
        "cos": {"loss": "cosine_loss", "backend": registry.resolve("cosine_rows", "auto", cpu)}}
    assert "terms ran on: kd_mlm fused_linear_kd_loss" in printed


def test_tinybert_student_with_fewer_heads_than_the_teacher(tiny, tmp_path):
    """2 student heads against the teacher's 4: each student head learns the mean scores of a
    pair of teacher heads; the run trains and its report names the attention loss's backend."""
    out = tmp_path / "t"
    assert run_cli(tiny, "tinybert", out, "--set", "student.hidden_size=16", "--set", "student.intermediate_size=32",
                   "--set", "student.num_attention_heads=2", "--set", "student.num_hidden_layers=2") == 0
    report = json.loads((out / "report.json").read_text())
    stage = report["stages"][0]
    assert report["student"]["hidden_size"] == 16
    assert stage["first"]["attention"] > 0 and torch.isfinite(torch.tensor(stage["last"]["attention"]))
    assert set(stage["backends"]) == {"hidden", "attention"}
    assert stage["backends"]["attention"]["loss"] == "flash_attention_transfer"
    from transformers import AutoConfig

    assert AutoConfig.from_pretrained(out / "student").num_attention_heads == 2
    with pytest.raises(ValueError, match="must divide one another"):
        from kdfast.train.recipes import run_recipe

        cfg = recipe_config("tinybert", None, ["student.hidden_size=15", "student.num_attention_heads=3",
                                               f"teacher.dir={tiny / 'teacher'}", f"out_dir={tmp_path / 'bad'}",
                                               f"data.files=[{tiny / 'train.txt'}]", "data.max_length=16",
                                               "teacher.allow_larger_student=true"])  # the size check comes first
        run_recipe("tinybert", cfg)


def test_fused_step_under_bf16_autocast_follows_the_float32_step(monkeypatch):
    """Under the Distiller's autocast the head runs in bf16 (as the decoder Linear would): the
    loss and gradients stay those of the float32 step up to bf16 rounding."""
    from kdfast.losses import fused_linear_kd as flkd

    seen = []
    real = flkd.fused_linear_kd_loss

    def spy(h, w, *args, **kwargs):
        seen.append((h.dtype, w.dtype))
        return real(h, w, *args, **kwargs)

    monkeypatch.setattr(flkd, "fused_linear_kd_loss", spy)
    cfg, teacher, student, ids, am, labels = distilbert_setup(torch.float32, "live", "all")
    step = distilbert.make_step_loss(cfg, student, teacher, masker=lambda i, m: (ids, labels), n_teacher_layers=4)
    batch = {"input_ids": ids, "attention_mask": am}
    loss32, _, grad32 = run_step(step, student, batch)
    student.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss16, _ = step(batch)
    loss16.backward()
    calls = len(seen) // 2  # per step (one fused call for kd_rows="all" since the MLM-subset form)
    assert calls >= 1 and len(seen) == 2 * calls
    assert seen[:calls] == [(torch.float32, torch.float32)] * calls
    assert seen[calls:] == [(torch.bfloat16, torch.bfloat16)] * calls
    assert loss16.dtype == torch.float32
    assert float(loss16.detach()) == pytest.approx(float(loss32), rel=2e-2)
    flat32 = torch.cat([g.flatten() for g in grad32.values()])
    flat16 = torch.cat([grads(student)[n].float().flatten() for n in grad32])
    assert float(F.cosine_similarity(flat16, flat32, dim=0)) > 0.99


def test_task_distillation_reports_the_backend_of_each_term(tmp_path):
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizer

    from kdfast.ops import registry
    from kdfast.train.task import task_distill
    from tests.train.glue_data import VOCAB, save_tiny_bert, write_sst2

    teacher_dir = tmp_path / "teacher"
    BertTokenizer(vocab={w: i for i, w in enumerate(VOCAB)}).save_pretrained(teacher_dir)
    torch.manual_seed(0)
    BertForSequenceClassification(BertConfig(vocab_size=len(VOCAB), hidden_size=32, num_hidden_layers=2,
                                             num_attention_heads=4, intermediate_size=64, max_position_embeddings=64,
                                             num_labels=2)).save_pretrained(teacher_dir)
    student_dir = save_tiny_bert(tmp_path / "student", hidden=16, layers=1, heads=2, seed=1)
    data = write_sst2(tmp_path / "sst2", n_train=16, n_dev=8)
    r = task_distill(str(teacher_dir), str(student_dir), "sst2", str(data), str(tmp_path / "run"),
                     intermediate_epochs=1, prediction_epochs=1, batch_size=8, progress=False)
    cpu = torch.device("cpu")
    assert r["backends"] == {
        "intermediate": {"hidden": {"loss": "hidden_mse_loss", "backend": registry.resolve("hidden_mse_epilogue", "auto", cpu)},
                         "attention": {"loss": "flash_attention_transfer",
                                       "backend": registry.resolve("attention_transfer", "auto", cpu)}},
        "prediction": {"prediction": {"loss": "kd_loss", "backend": registry.resolve("kd_rows", "auto", cpu)}}}
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["backends"] == r["backends"]
