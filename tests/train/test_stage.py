"""The one runner: every driver (demo, the three recipes, fine-tuning and task distillation) builds
a plan of stages and trains it through kdfast.train.stage.run_plan, reporting the entries
run_stage returns; task distillation's teacher Q/K are kdfast.capture's."""

import pytest
import torch

import kdfast
from kdfast.train import stage
from tests.train.glue_data import save_tiny_bert, write_sst2


class _Calls(list):
    """(name, steps, entry) per trained stage; ``plans``: the stage names of each plan run."""

    plans: list


@pytest.fixture
def stages(monkeypatch):
    """Every stage trained, as (name, steps, returned entry), the real runner doing the work; each
    must come from a plan that run_plan runs (``plans`` holds them)."""
    calls, plans = _Calls(), []
    real_plan, real_stage = stage.run_plan, stage.run_stage

    def spy_plan(plan, **kwargs):
        assert isinstance(plan, stage.Plan) and all(isinstance(st, stage.Stage) for st in plan)
        assert all(isinstance(st.loss, torch.nn.Module) for st in plan)
        plans.append([st.name for st in plan])
        return real_plan(plan, **kwargs)

    def spy_stage(st, **kwargs):
        assert plans and st.name in plans[-1], "a stage trained outside run_plan"
        entry = real_stage(st, **kwargs)
        calls.append((st.name, st.config.steps, entry))
        return entry

    monkeypatch.setattr(stage, "run_plan", spy_plan)
    monkeypatch.setattr(stage, "run_stage", spy_stage)
    calls.plans = plans
    return calls


def test_run_stage_reports_the_run_and_evaluates_held_out(tmp_path):
    from kdfast.train import TokenBatches, TrainConfig

    torch.manual_seed(0)
    model = torch.nn.Linear(5, 1)
    ids = torch.randint(0, 9, (12, 5))
    data = TokenBatches(ids, torch.ones_like(ids), 4, seed=1, rank=0, world_size=1)
    target = torch.randn(5)

    def step_loss(batch):
        err = model(batch["input_ids"].float()).squeeze(-1) - batch["input_ids"].float() @ target
        return err.square().mean(), {"abs": float(err.detach().abs().mean())}

    held = TokenBatches(ids[:4], torch.ones_like(ids[:4]), 4, shuffle=False, rank=0, world_size=1)
    config = TrainConfig(steps=6, lr=1e-2, warmup=0.0, log_every=2, eval_every=3, out_dir=str(tmp_path / "s"),
                         progress=False)
    entry = stage.run_stage(stage.Stage("fit", model, stage.StageLoss(step_loss), data, config,
                                        held_out=lambda: held.batches(0)))
    assert entry["name"] == "fit" and entry["steps"] == 6 and entry["out_dir"] == str(tmp_path / "s")
    assert [h["step"] for h in entry["history"]] == [1, 2, 4, 6]  # step 1, then every log_every
    assert entry["first"] is entry["history"][0] and entry["last"] is entry["history"][-1]
    assert entry["eval_first"]["step"] == 3 and entry["eval"]["step"] == 6
    with torch.no_grad():  # the last evaluation is the step loss on the held-out batch after training
        loss, terms = step_loss(next(held.batches(0)))
    assert entry["eval"]["eval/loss"] == pytest.approx(float(loss), rel=1e-6)
    assert entry["eval"]["eval/abs"] == pytest.approx(terms["abs"], rel=1e-6)
    assert entry["tokens_per_s"] > 0 and entry["seconds"] >= 0


SMALL = {"distilbert": ["data.max_texts=12"],
         "tinybert": ["data.max_texts=12", "student.hidden_size=16", "student.intermediate_size=32",
                      "student.num_attention_heads=4", "student.num_hidden_layers=2"],
         "mobilebert": ["data.max_texts=12", "student.embedding_size=16", "student.intermediate_size=16",
                        "student.num_feedforward_networks=2", "student.num_attention_heads=2"]}
STAGES = {"distilbert": ["distil"], "tinybert": ["general"],
          "mobilebert": ["pkt layer 1", "pkt layer 2", "pkt layer 3", "pkt layer 4", "pretrain distill"]}


@pytest.mark.parametrize("recipe", sorted(STAGES))
def test_recipes_run_every_stage_through_the_runner(tiny, tmp_path, stages, recipe):
    from kdfast.train.recipes import recipe_config, run_recipe

    cfg = recipe_config(recipe, None, ["data.max_length=16", "train.batch_size=4", "train.eval_every=1",
                                       "progress=false", *SMALL[recipe]],
                        {"teacher.dir": str(tiny / "teacher"), "data.files": [str(tiny / "train.txt")], "steps": 1,
                         "out_dir": str(tmp_path / "run")})
    report = run_recipe(recipe, cfg)
    assert stages.plans == [STAGES[recipe]]
    assert [name for name, _, _ in stages] == STAGES[recipe] and all(steps == 1 for _, steps, _ in stages)
    assert len(report["stages"]) == len(stages)
    for reported, (_, _, entry) in zip(report["stages"], stages):
        assert reported is entry and entry["eval"]["step"] == 1 and entry["backends"]


def test_demo_runs_through_the_runner(tmp_path, stages, monkeypatch):
    from kdfast.train import demo

    # the training is what is checked here
    monkeypatch.setattr(demo, "latency_ms", lambda runs: {name: {"best": 1.0, "median": 1.0} for name in runs})
    monkeypatch.setattr(demo, "retrieval_accuracy", lambda model, tokenizer, paragraphs: 0.5)
    monkeypatch.setattr(demo, "mean_pooled", lambda model, tokenizer, texts: torch.ones(len(texts), 4) / 2)
    report = demo.run_demo(str(tmp_path / "demo"), steps=2, batch_size=4, max_length=16, max_paragraphs=15,
                           progress=False)
    assert [(name, steps) for name, steps, _ in stages] == [("distil", 2), ("compress", 2)]
    assert stages.plans == [["distil", "compress"]]
    for name, _, entry in stages:
        assert report["loss"][name] == {"first": entry["first"], "last": entry["last"]} and entry["last"]["step"] == 2
        assert {"hidden_mse", "cos"} <= set(entry["last"])


def test_finetuning_and_task_distillation_run_through_the_runner_on_captured_teacher_qk(tmp_path, stages,
                                                                                      monkeypatch):
    from transformers import AutoModelForSequenceClassification

    from kdfast.train import teacher as teacher_mod
    from kdfast.train.task import finetune_and_eval, task_distill

    data = write_sst2(tmp_path / "sst2", n_train=32, n_dev=16)
    opts = dict(batch_size=16, seed=0, progress=False, max_train_examples=32)
    tuned = finetune_and_eval(str(save_tiny_bert(tmp_path / "bert")), "sst2", str(data), str(tmp_path / "ft"),
                              epochs=1, lr=1e-3, **opts)
    assert [(name, steps) for name, steps, _ in stages] == [("finetune", 2)] and stages.plans == [["finetune"]]
    assert tuned["train"]["history"] is stages[0][2]["history"] and tuned["train"]["epochs"] == 1

    given = []
    real_call = teacher_mod.LiveTeacher.__call__

    def spy(self, batch, inputs=None):
        out = real_call(self, batch, inputs)
        given.append((dict(inputs), out))
        return out

    monkeypatch.setattr(teacher_mod.LiveTeacher, "__call__", spy)
    student = save_tiny_bert(tmp_path / "student", hidden=16, layers=1, heads=2, seed=1)
    r = task_distill(tuned["model_dir"], str(student), "sst2", str(data), str(tmp_path / "td"),
                     intermediate_epochs=1, prediction_epochs=1, **opts)
    assert [(name, steps) for name, steps, _ in stages[1:]] == [("intermediate", 2), ("prediction", 2)]
    assert stages.plans[1:] == [["intermediate", "prediction"]]
    assert r["train"]["intermediate"]["history"] is stages[1][2]["history"]
    assert r["train"]["prediction"]["history"] is stages[2][2]["history"]

    teacher = AutoModelForSequenceClassification.from_pretrained(tuned["model_dir"], local_files_only=True).eval()
    with_qk = [(inputs, out) for inputs, out in given if out.q is not None]
    assert len(with_qk) == 2 and len(given) == 4  # step A's two batches with Q/K, step B's two with logits
    assert any(bool((inputs["attention_mask"] == 0).any()) for inputs, _ in with_qk)  # padding: masks matter
    for inputs, out in with_qk:
        assert "token_type_ids" in inputs
        with torch.no_grad(), kdfast.capture(teacher, qk=True) as ref:
            teacher(**inputs)
        assert len(out.q) == 2
        for mine, want in zip(out.q + out.k + out.hidden_states, ref.q + ref.k + ref.hidden_states):
            torch.testing.assert_close(mine, want, rtol=1e-6, atol=1e-6)
    for inputs, out in given:
        if out.q is None:  # step B: the teacher's logits, as its own forward gives them
            with torch.no_grad():
                torch.testing.assert_close(out.logits, teacher(**inputs).logits, rtol=1e-6, atol=1e-6)
