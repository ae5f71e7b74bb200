"""Lamb against a float64 step-by-step reference written here from the paper's formulas; exact
resume through state_dict; the Distiller's optimizer choice."""

import io
import math

import pytest
import torch
from torch import nn

from kdfast.train import Distiller, TokenBatches, TrainConfig
from kdfast.train.optim import Lamb


def reference_lamb(weights, grads_per_step, *, lr, betas, eps, decay, bias_correction=True, bounds=None):
    """Plain per-tensor LAMB in float64. ``grads_per_step[s][i]`` is None when tensor i has no
    gradient at step s (its moments and its step count then stay as they are)."""
    b1, b2 = betas
    w = [x.double().clone() for x in weights]
    m = [torch.zeros_like(x) for x in w]
    v = [torch.zeros_like(x) for x in w]
    t = [0] * len(w)
    for grads in grads_per_step:
        for i, g in enumerate(grads):
            if g is None:
                continue
            g = g.double()
            t[i] += 1
            m[i] = b1 * m[i] + (1 - b1) * g
            v[i] = b2 * v[i] + (1 - b2) * g * g
            m_hat = m[i] / (1 - b1 ** t[i]) if bias_correction else m[i]
            v_hat = v[i] / (1 - b2 ** t[i]) if bias_correction else v[i]
            u = m_hat / (v_hat.sqrt() + eps) + decay[i] * w[i]
            wn, un = math.sqrt(float((w[i] ** 2).sum())), math.sqrt(float((u ** 2).sum()))
            phi = wn if bounds is None else min(max(wn, bounds[0]), bounds[1])
            ratio = phi / un if wn > 0 and un > 0 else 1.0
            w[i] = w[i] - lr * ratio * u
    return w


def make_problem(dtype, steps=5):
    """A decayed matrix, a decayed all-zero matrix (trust ratio 1 at its first step), a bias
    excluded from decay, and a decayed vector that gets no gradient on every other step (so one
    group holds tensors at different step counts)."""
    weights = [torch.randn(7, 5), torch.zeros(4, 3), torch.randn(5) * 0.1, torch.randn(6)]
    decay = [0.1, 0.1, 0.0, 0.1]
    grads = [[torch.randn_like(w) * (1 + s) for w in weights] for s in range(steps)]
    for s in range(0, steps, 2):
        grads[s][3] = None
    params = [nn.Parameter(w.to(dtype, copy=True)) for w in weights]  # the reference starts from these
    return weights, params, grads, decay


def decay_groups(params, decay):
    """The Distiller's grouping: one group per weight-decay value."""
    return [{"params": [p for p, d in zip(params, decay) if d == wd], "weight_decay": wd}
            for wd in sorted(set(decay), reverse=True)]


def run_lamb(params, grads_per_step, decay, **kw):
    opt = Lamb(decay_groups(params, decay), **kw)
    for grads in grads_per_step:
        for p, g in zip(params, grads):
            p.grad = None if g is None else g.to(p.dtype)
        opt.step()
    return opt


CONFIGS = [
    dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-6),
    dict(lr=3e-2, betas=(0.8, 0.95), eps=1e-4, bias_correction=False),
    dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-6, weight_norm_bounds=(0.5, 2.0)),
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=["default", "no-bias-correction", "norm-bounds"])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-6)], ids=["f64", "f32"])
def test_lamb_matches_float64_reference(cfg, dtype, tol):
    weights, params, grads, decay = make_problem(dtype)
    run_lamb(params, grads, decay, **cfg)
    ref = reference_lamb(weights, grads, decay=decay, bounds=cfg.get("weight_norm_bounds"),
                         **{k: v for k, v in cfg.items() if k != "weight_norm_bounds"})
    for p, r in zip(params, ref):
        torch.testing.assert_close(p.detach().double(), r, rtol=tol, atol=tol)
    # the all-zero matrix did move (ratio 1, not 0/||u||)
    assert params[1].detach().abs().sum() > 0


def test_lamb_is_not_adamw():
    """The trust ratio matters: with weights of norm far from the update's, LAMB and AdamW differ."""
    weights, params, grads, decay = make_problem(torch.float64, steps=2)
    run_lamb(params, grads, decay, lr=1e-2)
    adam = [nn.Parameter(w.double()) for w in weights]
    opt = torch.optim.AdamW(decay_groups(adam, decay), lr=1e-2, eps=1e-6)
    for gs in grads:
        for p, g in zip(adam, gs):
            p.grad = None if g is None else g.double()
        opt.step()
    assert not torch.allclose(params[0], adam[0])


def test_state_dict_round_trip_resumes_exactly():
    weights, params, grads, decay = make_problem(torch.float32, steps=6)
    full = run_lamb(params, grads, decay, lr=1e-2)
    assert full.state_dict()["state"][0]["step"] == 6

    part_params = [nn.Parameter(w.clone()) for w in weights]
    part = run_lamb(part_params, grads[:3], decay, lr=1e-2)
    buf = io.BytesIO()
    torch.save({"opt": part.state_dict(), "w": [p.detach() for p in part_params]}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)  # as the Distiller's checkpoints are read
    resumed_params = [nn.Parameter(w.clone()) for w in saved["w"]]
    resumed = Lamb(decay_groups(resumed_params, decay), lr=1e-2)
    resumed.load_state_dict(saved["opt"])
    for gs in grads[3:]:
        for p, g in zip(resumed_params, gs):
            p.grad = g
        resumed.step()
    for a, b in zip(params, resumed_params):
        assert torch.equal(a, b)


@pytest.mark.parametrize("kw,name", [(dict(lr=0.0), "lr"), (dict(betas=(0.9, 1.0)), "betas"), (dict(eps=0.0), "eps"),
                                     (dict(weight_decay=-1.0), "weight_decay"),
                                     (dict(weight_norm_bounds=(2.0, 1.0)), "weight_norm_bounds")])
def test_lamb_bad_arguments(kw, name):
    with pytest.raises(ValueError, match=name):
        Lamb([nn.Parameter(torch.randn(3))], **kw)


def test_lamb_refuses_sparse_gradients():
    emb = nn.Embedding(10, 4, sparse=True)
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(ValueError, match="sparse"):
        Lamb(emb.parameters()).step()


def _distiller(tmp_path, name, optimizer, steps=4, checkpoint_every=0):
    torch.manual_seed(11)
    student = nn.Sequential(nn.Embedding(40, 12), nn.LayerNorm(12), nn.Linear(12, 12))
    target = nn.Embedding(40, 12).requires_grad_(False)
    ids = torch.randint(0, 40, (24, 5), generator=torch.Generator().manual_seed(2))
    data = TokenBatches(ids, torch.ones_like(ids), batch_size=6, seed=4)

    def step_loss(batch):
        loss = (student(batch["input_ids"]) - target(batch["input_ids"])).pow(2).mean()
        return loss, {}

    cfg = TrainConfig(steps=steps, lr=1e-2, weight_decay=0.05, warmup=1, log_every=1, optimizer=optimizer,
                      checkpoint_every=checkpoint_every, out_dir=str(tmp_path / name), progress=False)
    return Distiller(student, step_loss, data, cfg), student


def test_distiller_builds_lamb_with_decay_groups(tmp_path):
    d, student = _distiller(tmp_path, "lamb", "lamb")
    assert isinstance(d.opt, Lamb)
    decay = {id(p) for p in d.opt.param_groups[0]["params"]}
    assert d.opt.param_groups[0]["weight_decay"] == 0.05 and d.opt.param_groups[1]["weight_decay"] == 0.0
    assert decay == {id(student[0].weight), id(student[2].weight)}  # matrices decay; LayerNorm, biases don't
    assert isinstance(_distiller(tmp_path, "adamw", "adamw")[0].opt, torch.optim.AdamW)


def test_distiller_with_lamb_resumes_exactly(tmp_path):
    full, s_full = _distiller(tmp_path, "full", "lamb", steps=5)
    full.train()
    part, _ = _distiller(tmp_path, "resumed", "lamb", steps=5, checkpoint_every=2)
    part.cfg.steps = 3
    part.train()
    (tmp_path / "resumed" / "checkpoints" / "latest").write_text("step-0000002")
    resumed, s_res = _distiller(tmp_path, "resumed", "lamb", steps=5, checkpoint_every=2)
    resumed.train(resume=True)
    for a, b in zip(s_full.parameters(), s_res.parameters()):
        assert torch.equal(a, b)


def test_unknown_optimizer_is_refused():
    with pytest.raises(ValueError, match="optimizer"):
        TrainConfig(optimizer="sgd")
