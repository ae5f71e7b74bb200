"""kdfast.capture on ModernBERT: rotated, unscaled Q/K from the fused Wqkv, each layer's geometry
(global, or the half-width w of its sliding window), hidden states as output_hidden_states, and
pre-softmax scores whose softmax is eager output_attentions, on configurations drawn afresh each
run (odd head counts, odd GeGLU widths, windows, global-every-n); replay one with
KDFAST_TEST_SEED=<seed printed in the failure>."""

import os
import random

import pytest
import torch
import torch.nn.functional as F
from transformers import ModernBertConfig, ModernBertForMaskedLM, ModernBertForSequenceClassification, ModernBertModel

import kdfast
from kdfast.models import modernbert

SEED = int(os.environ.get("KDFAST_TEST_SEED", random.SystemRandom().randrange(2 ** 31)))
VOCAB = 61
HEADS = {"ModernBertModel": ModernBertModel, "ModernBertForMaskedLM": ModernBertForMaskedLM,
         "ModernBertForSequenceClassification": ModernBertForSequenceClassification}


def drawn_config(rng: random.Random) -> dict:
    """A small ModernBERT configuration nobody chose: odd head count, even head width (rotary
    rotates halves), odd GeGLU width, a window narrower than the rows, any global period."""
    heads = rng.choice([1, 3, 5, 7])
    return dict(vocab_size=VOCAB, hidden_size=heads * rng.choice([2, 4, 6, 8]), num_attention_heads=heads,
                intermediate_size=rng.choice([5, 9, 13, 17]), num_hidden_layers=rng.randint(2, 5),
                global_attn_every_n_layers=rng.randint(1, 3), local_attention=rng.randint(2, 11),
                max_position_embeddings=64, initializer_range=0.3, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                cls_token_id=1, sep_token_id=2, global_rope_theta=rng.choice([10.0, 160_000.0]),
                local_rope_theta=rng.choice([10.0, 10_000.0]))


def build(kwargs: dict, head: str, attn: str = "sdpa"):
    torch.manual_seed(SEED)
    model = HEADS[head](ModernBertConfig(**kwargs)).float().eval()
    model.set_attn_implementation(attn)
    return model


def padded_batch(rng: random.Random, length: int):
    ids = torch.tensor([[rng.randrange(3, VOCAB) for _ in range(length)] for _ in range(3)])
    mask = torch.ones(3, length, dtype=torch.long)
    for row, start in ((1, rng.randint(length // 2, length - 1)), (2, rng.randint(2, length // 2))):
        mask[row, start:] = 0
        ids[row, start:] = 0
    return ids, mask


def eager_reference(model, ids, mask, monkeypatch, **kwargs):
    """(hidden states, attentions, pre-softmax scores) of transformers' own eager path."""
    pre_softmax = []
    softmax = F.softmax

    def recording_softmax(x, *args, **kw):
        pre_softmax.append(x)
        return softmax(x, *args, **kw)

    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        with monkeypatch.context() as m:
            m.setattr(torch.nn.functional, "softmax", recording_softmax)
            out = model(ids, attention_mask=mask, output_hidden_states=True, output_attentions=True, **kwargs)
    finally:
        model.set_attn_implementation(previous)
    hidden = out.hidden_states if out.hidden_states is not None else None
    return hidden, out.attentions, tuple(pre_softmax)


def close(a, b, msg=""):
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=lambda m: f"{msg} (KDFAST_TEST_SEED={SEED}): {m}")


def band(length: int, window: int | None) -> torch.Tensor:
    i = torch.arange(length)
    if window is None:
        return torch.ones(length, length, dtype=torch.bool)
    return (i[:, None] - i[None, :]).abs() <= window


@pytest.mark.parametrize("draw", range(3))
@pytest.mark.parametrize("head", list(HEADS))
def test_capture_equals_eager_attention_on_drawn_configs(draw, head, monkeypatch):
    rng = random.Random(SEED * 7 + draw)
    kwargs = drawn_config(rng)
    model = build(kwargs, head)
    length = rng.randint(kwargs["local_attention"] + 4, 23)
    ids, mask = padded_batch(rng, length)
    what = f"{head} {kwargs}, L={length}"

    windows = modernbert.attention_windows(model.config)
    every = kwargs["global_attn_every_n_layers"]
    assert windows == tuple(None if i % every == 0 else kwargs["local_attention"] // 2
                            for i in range(kwargs["num_hidden_layers"])), what

    sdpa_calls = []
    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda *a, **k: sdpa_calls.append(1) or sdpa(*a, **k))
    with kdfast.capture(model, qk=True, scores=True) as cap:
        model(ids, attention_mask=mask)
    monkeypatch.undo()
    assert len(sdpa_calls) == kwargs["num_hidden_layers"], "the capture forced the eager path"
    assert cap.windows == windows

    hidden, probs, pre_softmax = eager_reference(model, ids, mask, monkeypatch)
    real = mask.bool()
    key = real[:, None, None, :]
    assert len(cap.hidden_states) == len(hidden) == kwargs["num_hidden_layers"] + 1
    for i, (mine, ref) in enumerate(zip(cap.hidden_states, hidden)):
        # SDPA and eager treat a fully masked (padding) query row of a local layer differently:
        # compare real tokens, whose rows never see padding
        close(mine[real], ref[real], f"hidden state {i} of {what}")
    for i, w in enumerate(windows):
        q, k = cap.q[i], cap.k[i]
        b, h, n, d_head = q.shape
        assert (b, h, n, d_head) == (3, kwargs["num_attention_heads"], length,
                                     kwargs["hidden_size"] // kwargs["num_attention_heads"]) and k.shape == q.shape
        allowed = key & band(length, w)
        # the eager mask allows exactly the band |i - j| <= w on real keys
        assert torch.equal(pre_softmax[i][:, :1] > torch.finfo(torch.float32).min / 2, allowed.expand(3, 1, -1, -1)), \
            f"layer {i} window {w}: eager mask is not the band (KDFAST_TEST_SEED={SEED})"
        rows = real[:, None, :, None].expand_as(cap.scores[i])
        close(torch.softmax(cap.scores[i], -1)[rows], probs[i][rows], f"layer {i} attentions of {what}")
        from_qk = (q @ k.transpose(-1, -2)) / d_head ** 0.5
        m = torch.where(allowed, 0.0, torch.finfo(torch.float32).min)
        close(cap.scores[i], from_qk + m, f"layer {i}: scores against q k^T / sqrt(d_head) + mask")
        # scores are not normalised: fp32 drift between the SDPA and eager forwards grows with their size
        torch.testing.assert_close(cap.scores[i][rows], pre_softmax[i].expand_as(cap.scores[i])[rows], rtol=1e-4,
                                   atol=1e-4, msg=lambda m: f"layer {i} scores of {what} (KDFAST_TEST_SEED={SEED}): {m}")


@pytest.mark.parametrize("draw", range(2))
def test_capture_under_eager_equals_output_attentions_on_every_row(draw, monkeypatch):
    """Under eager attention the fully masked padding rows agree too; and a loss on the captured
    scores trains the model as the same loss on eager's own scores."""
    rng = random.Random(SEED * 11 + draw)
    kwargs = drawn_config(rng)
    model = build(kwargs, "ModernBertForMaskedLM", attn="eager")
    length = rng.randint(kwargs["local_attention"] + 4, 21)
    ids, mask = padded_batch(rng, length)
    with kdfast.capture(model, qk=True, scores=True) as cap:
        model(ids, attention_mask=mask)
    hidden, probs, pre_softmax = eager_reference(model, ids, mask, monkeypatch)
    for mine, ref in zip(cap.hidden_states, hidden):
        close(mine, ref, "hidden state")
    for i in range(cap.num_layers):
        close(torch.softmax(cap.scores[i], -1), probs[i], f"layer {i} attentions, {kwargs}")

    real = mask.bool()
    pair = real[:, None, :, None] & real[:, None, None, :]
    weights = [torch.randn_like(s).masked_fill(~pair, 0.0) for s in cap.scores]
    params = list(model.parameters())

    def grads(scores):
        loss = sum((w * s.masked_fill(~pair, 0.0)).sum() for w, s in zip(weights, scores))
        return torch.autograd.grad(loss, params, allow_unused=True)

    trained = 0
    for g, r in zip(grads(cap.scores), grads(pre_softmax)):
        assert (g is None) == (r is None)
        if g is not None:
            # fp32 sums over every score: the absolute error scales with the gradient's size
            torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-4 * max(1.0, float(r.abs().max())),
                                       msg=lambda m: f"gradient (KDFAST_TEST_SEED={SEED}): {m}")
            trained += bool(g.abs().max() > 0)
    assert trained >= cap.num_layers  # every layer's Wqkv at least


def test_position_ids_restarting_in_a_row_rotate_each_sequence_from_zero(monkeypatch):
    """Rows holding several sequences with position_ids restarting at 0: the captured q / k carry
    the model's rotary positions (the layer's own position embeddings), and the scores' softmax
    still equals eager's. ModernBERT builds no block-diagonal mask from position_ids: its layers
    attend across the sequences within the band, as kdfast's packed rows (documents separated by
    the separator token) do."""
    rng = random.Random(SEED * 13)
    kwargs = dict(drawn_config(rng), local_attention=6)
    model = build(kwargs, "ModernBertForMaskedLM")
    cuts = [7, 12]
    length = 19
    ids = torch.tensor([[rng.randrange(3, VOCAB) for _ in range(length)] for _ in range(2)])
    position_ids = torch.cat([torch.arange(cuts[0]), torch.arange(cuts[1] - cuts[0]),
                              torch.arange(length - cuts[1])])[None].expand(2, -1)
    with kdfast.capture(model, qk=True, scores=True) as cap:
        model(ids, position_ids=position_ids)
    _, probs, _ = eager_reference(model, ids, None, monkeypatch, position_ids=position_ids)
    for i, w in enumerate(cap.windows):
        close(torch.softmax(cap.scores[i], -1), probs[i], f"layer {i} of a packed row, {kwargs}")
        assert torch.equal(cap.scores[i][0, 0] > torch.finfo(torch.float32).min / 2, band(length, w))
    # the first layer's query of a token depends on its position only: the same token at the start
    # of the second sequence has the first sequence's first query
    ids2 = ids.clone()
    ids2[:, cuts[0]] = ids[:, 0]
    with kdfast.capture(model, qk=True, hidden_states=False) as cap2:
        model(ids2, position_ids=position_ids)
    close(cap2.q[0][:, :, cuts[0]], cap2.q[0][:, :, 0], "first layer's query at a sequence start")
    with kdfast.capture(model, qk=True, hidden_states=False) as cap3:
        model(ids2)
    assert not torch.allclose(cap3.q[0][:, :, cuts[0]], cap3.q[0][:, :, 0], atol=1e-3)


def test_older_transformers_layout_is_refused_in_one_line():
    model = build(drawn_config(random.Random(SEED)), "ModernBertModel")
    del model.layers[0].attn.Wqkv  # the pre-5.1 attention read a packed qkv from its layer
    with pytest.raises(modernbert.UnsupportedModernBert, match=r"model: .*transformers >= 5\.1"):
        with kdfast.capture(model, qk=True):
            pass


def test_scores_refuse_attention_kernels_whose_window_is_not_in_the_mask():
    model = build(drawn_config(random.Random(SEED)), "ModernBertModel")
    model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match="scores: ModernBertModel runs attn_implementation='flash_attention_2'"):
        with kdfast.capture(model, scores=True):
            pass
    with kdfast.capture(model, qk=True) as cap:  # hidden states and q / k need no mask
        assert cap.windows == modernbert.attention_windows(model)


def test_other_models_report_every_layer_global():
    from transformers import BertConfig, BertModel

    bert = BertModel(BertConfig(vocab_size=VOCAB, hidden_size=8, num_hidden_layers=3, num_attention_heads=2,
                                intermediate_size=9))
    with kdfast.capture(bert) as cap:
        assert cap.windows == (None, None, None)
