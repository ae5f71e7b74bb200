"""kdfast.capture: hidden states, unscaled Q/K and pre-softmax scores read from a model running on
SDPA attention equal what the model's own eager path (output_hidden_states / output_attentions /
its pre-softmax scores) gives, for every supported model class; flash attention transfer on the
captured Q/K equals the loss on the materialised eager maps, loss and gradient; hooks never leak."""

import pytest
import torch
import torch.nn.functional as F
from transformers import (
    BertConfig,
    BertForMaskedLM,
    BertModel,
    DebertaV2Config,
    DebertaV2Model,
    DistilBertConfig,
    DistilBertForMaskedLM,
    ElectraConfig,
    ElectraForMaskedLM,
    ElectraModel,
    MobileBertForMaskedLM,
    RobertaConfig,
    RobertaForSequenceClassification,
    XLMRobertaConfig,
    XLMRobertaForMaskedLM,
)

import kdfast
from kdfast.integrations import transformers as kd_transformers
from kdfast.models import fused
from kdfast.models import mobilebert as mb
from kdfast.models.fused import fused_attention_inputs
from kdfast.models.mobilebert import KDMobileBert, KDMobileBertForMaskedLM, mobilebert_config

VOCAB = 61
# large init: attention far from uniform, so a wrong q, k, scale or mask shows up
COMMON = dict(vocab_size=VOCAB, max_position_embeddings=40, initializer_range=0.3,
              attention_probs_dropout_prob=0.0, hidden_dropout_prob=0.0)
MOBILE = dict(vocab_size=VOCAB, num_hidden_layers=2, hidden_size=32, embedding_size=16, intra_bottleneck_size=16,
              intermediate_size=20, num_attention_heads=4, max_position_embeddings=40, initializer_range=0.3,
              attention_probs_dropout_prob=0.0, hidden_dropout_prob=0.0)


def bert(layers=2, hidden=24, heads=4):
    return BertForMaskedLM(BertConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                                      intermediate_size=37, **COMMON))


BUILDERS = {
    "bert": bert,
    "bert-base-model": lambda: BertModel(BertConfig(hidden_size=20, num_hidden_layers=3, num_attention_heads=5,
                                                    intermediate_size=23, **COMMON)),
    "roberta": lambda: RobertaForSequenceClassification(RobertaConfig(
        hidden_size=24, num_hidden_layers=2, num_attention_heads=3, intermediate_size=29, pad_token_id=1,
        **COMMON)),
    "xlm-roberta": lambda: XLMRobertaForMaskedLM(XLMRobertaConfig(
        hidden_size=21, num_hidden_layers=2, num_attention_heads=3, intermediate_size=29, pad_token_id=1, **COMMON)),
    "electra-generator": lambda: ElectraForMaskedLM(ElectraConfig(
        embedding_size=10, hidden_size=24, num_hidden_layers=2, num_attention_heads=4, intermediate_size=29,
        **COMMON)),
    "electra-base-model": lambda: ElectraModel(ElectraConfig(
        embedding_size=24, hidden_size=24, num_hidden_layers=3, num_attention_heads=3, intermediate_size=17,
        **COMMON)),
    "distilbert": lambda: DistilBertForMaskedLM(DistilBertConfig(
        vocab_size=VOCAB, dim=24, n_layers=2, n_heads=4, hidden_dim=37, max_position_embeddings=40,
        initializer_range=0.3, dropout=0.0, attention_dropout=0.0)),
    "mobilebert": lambda: MobileBertForMaskedLM(mobilebert_config("mobilebert", **MOBILE)),
    "kdfast-distilbert-student": lambda: kdfast.models.distilbert_from_teacher(bert(layers=4), layers=(1, 3)),
    "kdfast-tinybert": lambda: kdfast.models.tinybert("tinybert-4", hidden_size=16, num_hidden_layers=3,
                                                      num_attention_heads=2, intermediate_size=21, **COMMON),
    "kdfast-mobilebert": lambda: KDMobileBertForMaskedLM(mobilebert_config("mobilebert-tiny", **MOBILE)),
    "kdfast-mobilebert-base": lambda: KDMobileBert(mobilebert_config("mobilebert", **MOBILE)),
}


def build(name):
    return BUILDERS[name]().double().eval()


def pad_id(model):
    return getattr(model.config, "pad_token_id", None) or 0


def padded_batch(model, batch=3, length=9, pad_from=(None, 6, 3)):
    """Random ids (never the pad id) with a padding mask: row i padded from pad_from[i]."""
    pad = pad_id(model)
    ids = torch.randint(2, VOCAB, (batch, length))
    ids[ids == pad] = 2 if pad != 2 else 3
    mask = torch.ones(batch, length, dtype=torch.long)
    for row, start in enumerate(pad_from[:batch]):
        if start is not None:
            mask[row, start:] = 0
            ids[row, start:] = pad
    return ids, mask


def is_kdfast_mobilebert(model):
    return isinstance(model, (KDMobileBert, KDMobileBertForMaskedLM))


def n_heads(model):
    return getattr(model.config, "num_attention_heads", None) or model.config.n_heads


def eager_reference(model, ids, mask, monkeypatch):
    """(hidden states, attention probabilities, pre-softmax scores) from the model's own explicit
    attention path: transformers' eager attention (its softmax input recorded), or kdfast
    MobileBERT's capture=('hidden', 'scores', 'attentions')."""
    if is_kdfast_mobilebert(model):
        out = model(ids, attention_mask=mask, capture=("hidden", "scores", "attentions"))
        return out.hidden_states, out.attentions, out.scores
    pre_softmax = []
    softmax = F.softmax

    def recording_softmax(x, *args, **kwargs):
        pre_softmax.append(x)
        return softmax(x, *args, **kwargs)

    model.set_attn_implementation("eager")
    try:
        with monkeypatch.context() as m:
            m.setattr(torch.nn.functional, "softmax", recording_softmax)
            out = model(ids, attention_mask=mask, output_hidden_states=True, output_attentions=True)
    finally:
        model.set_attn_implementation("sdpa")
    assert len(pre_softmax) == len(out.attentions)
    return out.hidden_states, out.attentions, tuple(pre_softmax)


def count_sdpa_calls(monkeypatch):
    calls = []
    sdpa = F.scaled_dot_product_attention

    def counting(*args, **kwargs):
        calls.append(1)
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counting)
    return calls


def close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name", list(BUILDERS))
def test_capture_under_sdpa_equals_the_models_own_eager_forward(name, monkeypatch):
    model = build(name)
    ids, mask = padded_batch(model)
    with monkeypatch.context() as m:
        sdpa_calls = count_sdpa_calls(m)
        with kdfast.capture(model, qk=True, scores=True) as cap:
            model(ids, attention_mask=mask)
    n_layers = cap.num_layers
    assert len(sdpa_calls) == n_layers  # the fast path ran, not output_attentions
    hidden, probs, pre_softmax = eager_reference(model, ids, mask, monkeypatch)

    assert len(cap.hidden_states) == len(hidden) == n_layers + 1
    for mine, ref in zip(cap.hidden_states, hidden):
        close(mine, ref)
    heads = n_heads(model)
    valid_key = mask.bool()[:, None, None, :]
    for i in range(n_layers):
        q, k = cap.q[i], cap.k[i]
        b, h, length, d_head = q.shape
        assert (b, h, length) == (ids.shape[0], heads, ids.shape[1]) and k.shape == q.shape
        # the documented convention: scores = q k^T / sqrt(d_head) + mask; its softmax is the attention
        from_qk = (q @ k.transpose(-1, -2)) / d_head ** 0.5
        close(torch.softmax(from_qk.masked_fill(~valid_key, float("-inf")), -1), probs[i])
        close(cap.scores[i], pre_softmax[i].expand_as(cap.scores[i]))
        close(cap.scores[i][valid_key.expand_as(cap.scores[i])], from_qk[valid_key.expand_as(from_qk)])
        assert (cap.scores[i][~valid_key.expand_as(cap.scores[i])] == torch.finfo(torch.float64).min).all()

    # a loss on the captured scores trains the model as the same loss on the eager scores does
    weights = [torch.randn_like(s).masked_fill(~valid_key, 0.0) for s in cap.scores]
    params = list(model.parameters())

    def grads(scores):
        loss = sum((w * s.masked_fill(~valid_key, 0.0)).sum() for w, s in zip(weights, scores))
        return torch.autograd.grad(loss, params, allow_unused=True)

    trained = 0
    for g, r, p in zip(grads(cap.scores), grads(pre_softmax), params):
        assert (g is None) == (r is None)
        if g is not None:
            close(g, r)
            trained += bool(g.abs().max() > 0)
    assert trained >= 4 * n_layers  # at least the query and key weights and biases of every layer


def test_kdfast_mobilebert_capture_through_its_fused_attention_inputs_kernel(monkeypatch):
    """The fused kernel computes q / k in one grouped GEMM without calling the query / key modules;
    the capture still sees them, unscaled, and a loss on them trains the model like on the model's
    own (pre-scaled) capture."""
    model = KDMobileBertForMaskedLM(mobilebert_config("mobilebert", **MOBILE)).double()
    ids, mask = padded_batch(model)
    calls = []
    monkeypatch.setattr(fused, "fused_attention_inputs",
                        lambda layer, h, backend: calls.append(backend) or fused_attention_inputs(layer, h, backend=backend))
    previous = mb.set_kernel_backend("torch")  # the blocks run kdfast.models.fused's kernels
    try:
        with kdfast.capture(model, qk=True, hidden_states=False) as cap:
            model(ids, attention_mask=mask)
        weights = [torch.randn_like(q) for q in cap.q] + [torch.randn_like(k) for k in cap.k]
        loss = sum((w * t).sum() for w, t in zip(weights, cap.q + cap.k))
        grads = torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)
    finally:
        mb.set_kernel_backend(previous)
    assert calls == ["torch"] * len(model.mobilebert.encoder.layer)
    own = model(ids, attention_mask=mask, capture=("qk",))
    scale = model.mobilebert.encoder.layer[0].attention.self.scale
    unscaled = tuple(q / scale for q in own.queries)
    for mine, ref in zip(cap.q + cap.k, unscaled + own.keys):
        close(mine, ref)
    ref_loss = sum((w * t).sum() for w, t in zip(weights, unscaled + own.keys))
    ref_grads = torch.autograd.grad(ref_loss, list(model.parameters()), allow_unused=True)
    # the fused kernel's autograd Function returns zeros where eager autograd returns None (value)
    assert sum(g is not None and bool(g.abs().max() > 0) for g in grads) > 10
    for g, r, p in zip(grads, ref_grads, model.parameters()):
        close(torch.zeros_like(p) if g is None else g, torch.zeros_like(p) if r is None else r)


def kl_on_maps(a_s, a_t, mask):
    """float64 reference: KL(A_t || A_s) over real query rows and real keys, / (H * real rows)."""
    keep = mask.bool()
    key = keep[:, None, None, :]
    log_s = torch.log(a_s.masked_fill(~key, 1.0))
    log_t = torch.log(a_t.masked_fill(~key, 1.0))
    per_row = (a_t * (log_t - log_s)).masked_fill(~key, 0.0).sum(-1)  # [B, H, L]
    return per_row.masked_fill(~keep[:, None, :], 0.0).sum() / (a_s.shape[1] * keep.sum())


def mse_on_maps(s, t, mask):
    """float64 reference: mean squared score difference over real (query, key) pairs."""
    keep = mask.bool()
    pair = keep[:, None, :, None] & keep[:, None, None, :]
    sq = ((s - t) ** 2).masked_fill(~pair, 0.0)
    return sq.sum() / (s.shape[1] * (keep.sum(-1) ** 2).sum())


@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize("loss", ["kl", "mse"])
def test_flash_attention_transfer_on_captured_qk_equals_the_loss_on_eager_maps(backend, loss, monkeypatch):
    if backend == "cpu" and not kdfast.backends()["cpu"].available:
        pytest.skip("kdfast._C is not built")
    teacher = build("bert")
    student = kdfast.models.tinybert("tinybert-4", hidden_size=16, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=21, **COMMON).double().train()
    ids, mask = padded_batch(teacher, batch=4, length=11, pad_from=(None, 8, 2, 10))

    with torch.no_grad(), kdfast.capture(teacher, qk=True, hidden_states=False) as cap_t:
        teacher(ids, attention_mask=mask)
    with kdfast.capture(student, qk=True, hidden_states=False) as cap_s:
        student(ids, attention_mask=mask)
    assert all(q.requires_grad for q in cap_s.q + cap_s.k)
    flash = sum(kdfast.flash_attention_transfer(qs, ks, qt, kt, key_mask=mask, loss=loss, backend=backend)
                for qs, ks, qt, kt in zip(cap_s.q, cap_s.k, cap_t.q, cap_t.k))
    params = [p for p in student.parameters() if p.requires_grad]
    grads = torch.autograd.grad(flash, params, allow_unused=True)

    with torch.no_grad():
        _, probs_t, scores_t = eager_reference(teacher, ids, mask, monkeypatch)
    _, probs_s, scores_s = eager_reference(student, ids, mask, monkeypatch)
    if loss == "kl":
        ref = sum(kl_on_maps(a_s, a_t, mask) for a_s, a_t in zip(probs_s, probs_t))
    else:
        ref = sum(mse_on_maps(s, t, mask) for s, t in zip(scores_s, scores_t))
    ref_grads = torch.autograd.grad(ref, params, allow_unused=True)

    assert ref.item() > 1e-3
    close(flash, ref)
    n_trained = 0
    for g, r in zip(grads, ref_grads):
        assert (g is None) == (r is None)
        if g is not None:
            close(g, r)
            n_trained += bool(g.abs().max() > 0)
    assert n_trained >= 8  # embeddings, query / key weights and biases of every layer, ...


def test_each_forward_replaces_the_previous_and_the_integration_reexports_capture():
    assert kd_transformers.capture is kdfast.capture and kd_transformers.Captured is kdfast.Captured
    model = build("bert")
    with kd_transformers.capture(model, qk=True) as cap:
        model(*padded_batch(model, batch=2, length=7))
        first = cap.q[0]
        ids, mask = padded_batch(model, batch=3, length=5)
        out = model(ids, attention_mask=mask, output_hidden_states=True)
    assert first.shape[:3] == (2, 4, 7) and cap.q[0].shape[:3] == (3, 4, 5)
    for mine, ref in zip(cap.hidden_states, out.hidden_states):
        close(mine, ref)
    model(*padded_batch(model, batch=1, length=4))  # after the block: nothing is recorded
    assert cap.q[0].shape[:3] == (3, 4, 5)


def hook_census(model):
    return [(name, len(m._forward_hooks), len(m._forward_pre_hooks), "attend" in m.__dict__)
            for name, m in model.named_modules()]


@pytest.mark.parametrize("name", ["bert", "distilbert", "kdfast-mobilebert"])
def test_hooks_are_removed_after_the_block_and_on_an_exception(name):
    model = build(name)
    user_hook = model.get_submodule(next(n for n, _ in model.named_modules() if n.endswith("layer.0"))) \
        .register_forward_hook(lambda *a: None)
    before = hook_census(model)
    ids, mask = padded_batch(model)
    with kdfast.capture(model, qk=True, scores=True):
        assert hook_census(model) != before
        model(ids, attention_mask=mask)
    assert hook_census(model) == before
    with pytest.raises(KeyError, match="boom"):
        with kdfast.capture(model, qk=True, scores=True):
            raise KeyError("boom")
    assert hook_census(model) == before
    user_hook.remove()


def test_an_interrupted_forward_is_reported_not_returned_half_filled():
    model = build("bert")
    ids, mask = padded_batch(model)
    with kdfast.capture(model, qk=True) as cap:
        model(ids, attention_mask=mask)
        failing = model.bert.encoder.layer[1].register_forward_pre_hook(lambda *a: (_ for _ in ()).throw(OSError("x")))
        with pytest.raises(OSError):
            model(ids, attention_mask=mask)
        failing.remove()
    for field in ("hidden_states", "q", "k"):
        with pytest.raises(RuntimeError, match="did not complete"):
            getattr(cap, field)


def test_errors_name_the_argument():
    model = build("bert")
    deberta = DebertaV2Model(DebertaV2Config(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1,
                                             num_attention_heads=2, intermediate_size=9))
    with pytest.raises(ValueError, match=r"model: kdfast.capture does not support DebertaV2Model; it supports .*"
                                         r"ELECTRA.*ModernBERT"):
        with kdfast.capture(deberta):
            pass
    with pytest.raises(ValueError, match="does not support Linear"):
        with kdfast.capture(torch.nn.Linear(2, 2)):
            pass
    with pytest.raises(ValueError, match="model must be a torch.nn.Module, got str"):
        with kdfast.capture("bert-base-uncased"):
            pass
    with pytest.raises(ValueError, match="qk must be True or False, got 'yes'"):
        with kdfast.capture(model, qk="yes"):
            pass
    with pytest.raises(ValueError, match="nothing to capture"):
        with kdfast.capture(model, hidden_states=False):
            pass
    decoder = BertModel(BertConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=9,
                                   is_decoder=True, **COMMON))
    with pytest.raises(ValueError, match="scores: BertModel is configured as a causal decoder"):
        with kdfast.capture(decoder, scores=True):
            pass
    with kdfast.capture(model) as cap:
        with pytest.raises(RuntimeError, match="no forward pass of BertForMaskedLM has run"):
            cap.hidden_states
        model(*padded_batch(model))
    with pytest.raises(ValueError, match="q was not captured: pass qk=True"):
        cap.q
    with pytest.raises(ValueError, match="scores was not captured: pass scores=True"):
        cap.scores


def test_a_ddp_wrapped_model_is_captured_through_its_module(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        model = build("bert")
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        ids, mask = padded_batch(model)
        with kdfast.capture(ddp, qk=True) as cap:
            ddp(ids, attention_mask=mask)
        out = model(ids, attention_mask=mask, output_hidden_states=True)
        for mine, ref in zip(cap.hidden_states, out.hidden_states):
            close(mine, ref)
        assert len(cap.q) == 2
    finally:
        dist.destroy_process_group()


def test_num_layers_captures_a_forward_that_stops_early():
    """MobileBERT's progressive transfer runs layers 1..l only: num_layers=l reads those layers,
    equal to the same layers of a full pass; a number outside [1, layers] is refused by name."""
    from kdfast.train.recipes.mobilebert import forward_to_layer

    model = build("kdfast-mobilebert")
    ids, mask = padded_batch(model)
    with kdfast.capture(model, qk=True) as full:
        model(ids, attention_mask=mask)
    upto = forward_to_layer(model.mobilebert, ids, mask, 1)
    assert len(upto.hidden_states) == 2 and len(upto.q) == len(upto.k) == 1
    for mine, ref in zip(upto.hidden_states, full.hidden_states[:2]):
        close(mine, ref)
    close(upto.q[0], full.q[0])
    close(upto.k[0], full.k[0])
    with kdfast.capture(model, qk=True, num_layers=1) as first:
        model(ids, attention_mask=mask)  # a full pass: the first layer's fields, nothing beyond
    assert len(first.q) == 1 and len(first.hidden_states) == 2
    close(first.q[0], full.q[0])
    for bad in (0, 3, True, 1.0):
        with pytest.raises(ValueError, match=rf"num_layers must be an int in \[1, 2\] .*got {bad!r}"):
            with kdfast.capture(model, num_layers=bad):
                pass
