"""Distiller: an interrupted-and-resumed run equals an uninterrupted one; checkpoints are atomic."""

import json

import pytest
import torch
from torch import nn

from kdfast.train import Distiller, TokenBatches, TrainConfig


def make_setup(tmp_path, name, steps=6, checkpoint_every=0, eval_every=0):
    torch.manual_seed(123)
    student = nn.Sequential(nn.Embedding(50, 16), nn.Dropout(0.1), nn.Linear(16, 16))
    teacher = nn.Sequential(nn.Embedding(50, 16), nn.Linear(16, 16)).eval()
    proj = nn.ModuleDict({"p": nn.Linear(16, 16)})
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, 50, (40, 9), generator=g)
    data = TokenBatches(ids, torch.ones_like(ids), batch_size=8, seed=3)

    def step_loss(batch):
        with torch.no_grad():
            t = teacher(batch["input_ids"])
        s = proj["p"](student(batch["input_ids"]))  # dropout: the RNG state must be restored too
        mse = (s - t).pow(2).mean()
        return mse, {"mse": mse.item()}

    held_out = torch.randint(0, 50, (6, 9), generator=g)

    def eval_fn(model):
        assert not model.training and not torch.is_grad_enabled()
        torch.rand(100)  # eval may draw random numbers: training must not notice
        t = teacher(held_out)
        return {"mse": (proj["p"](model(held_out)) - t).pow(2).mean()}

    cfg = TrainConfig(steps=steps, lr=1e-2, warmup=2, log_every=1, checkpoint_every=checkpoint_every,
                      grad_accum=2, out_dir=str(tmp_path / name), progress=False, eval_every=eval_every)
    return Distiller(student, step_loss, data, cfg, extra=proj, eval_fn=eval_fn), student, proj


def test_resume_equals_uninterrupted_run(tmp_path):
    full, s_full, p_full = make_setup(tmp_path, "full", steps=7)
    hist_full = full.train()

    # "killed" after step 3 (a checkpoint every 3 steps), then resumed by a fresh process-like object
    part, _, _ = make_setup(tmp_path, "resumed", steps=7, checkpoint_every=3)
    part.cfg.steps = 4  # the run stops at step 4: only the step-3 checkpoint is a resume point...
    part.train()
    (tmp_path / "resumed" / "checkpoints" / "latest").write_text("step-0000003")  # ...as if killed before 4
    resumed, s_res, p_res = make_setup(tmp_path, "resumed", steps=7, checkpoint_every=3)
    hist_res = resumed.train(resume=True)
    assert resumed.step == 7
    for a, b in zip(list(s_full.parameters()) + list(p_full.parameters()),
                    list(s_res.parameters()) + list(p_res.parameters())):
        assert torch.equal(a, b)
    assert [h["loss"] for h in hist_full[3:]] == [h["loss"] for h in hist_res]
    lines = (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 7 and {"step", "loss", "mse", "lr", "tokens_per_s"} <= set(json.loads(lines[0]))


def test_resume_with_periodic_eval_equals_uninterrupted_run(tmp_path):
    full, s_full, _ = make_setup(tmp_path, "full", steps=7, eval_every=2)
    hist_full = full.train()
    plain, s_plain, _ = make_setup(tmp_path, "plain", steps=7)  # no eval at all
    plain.train()
    for a, b in zip(s_full.parameters(), s_plain.parameters()):
        assert torch.equal(a, b)  # evaluating did not change what training does

    part, _, _ = make_setup(tmp_path, "resumed", steps=7, checkpoint_every=3, eval_every=2)
    part.cfg.steps = 4
    part.train()
    (tmp_path / "resumed" / "checkpoints" / "latest").write_text("step-0000003")
    resumed, s_res, _ = make_setup(tmp_path, "resumed", steps=7, checkpoint_every=3, eval_every=2)
    hist_res = resumed.train(resume=True)
    for a, b in zip(s_full.parameters(), s_res.parameters()):
        assert torch.equal(a, b)
    assert [h["loss"] for h in hist_full[3:]] == [h["loss"] for h in hist_res]
    assert [e["step"] for e in full.eval_history] == [2, 4, 6, 7]
    assert full.eval_history[1:] == resumed.eval_history  # steps 4, 6 and 7 (resumed after 3)
    records = [json.loads(x) for x in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "eval/mse" in r]
    assert [r["step"] for r in evals] == [2, 4, 6, 7] and all(set(r) == {"step", "eval/mse"} for r in evals)
    assert evals[-1]["eval/mse"] < evals[0]["eval/mse"]  # the student learned the held-out mapping too


def test_torn_checkpoint_is_never_picked_up(tmp_path):
    d, _, _ = make_setup(tmp_path, "run", steps=2)
    d.train()
    root = tmp_path / "run" / "checkpoints"
    assert (root / "latest").read_text() == "step-0000002"
    # a save interrupted before its rename leaves only a hidden temporary directory
    (root / ".step-0000003.tmp-99").mkdir()
    d2, _, _ = make_setup(tmp_path, "run", steps=2)
    assert d2.load_checkpoint() and d2.step == 2
    (root / "step-0000002" / "trainer.pt").unlink()
    with pytest.raises(ValueError, match="incomplete"):
        make_setup(tmp_path, "run", steps=2)[0].load_checkpoint()


def test_bad_config_is_refused():
    with pytest.raises(ValueError, match="steps"):
        TrainConfig(steps=0)
    with pytest.raises(ValueError, match="grad_accum"):
        TrainConfig(grad_accum=0)
    with pytest.raises(ValueError, match="batch_size"):
        TokenBatches(torch.zeros(4, 3, dtype=torch.long), torch.ones(4, 3), batch_size=5)
