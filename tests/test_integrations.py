"""kdfast.integrations.transformers.DistillationTrainer and the examples: one accumulated Trainer
step equals the same SGD step written by hand (student and projections), the logged terms are the
loss's terms, the student reloads with from_pretrained with no stray keys and the projections lie
beside it, a resumed run reads them back, every refusal names its argument."""

import runpy
import sys
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from safetensors.torch import load_file
from transformers import BertConfig, BertForMaskedLM, TrainerCallback, TrainingArguments

import kdfast
from kdfast.integrations.transformers import PROJECTIONS_FILE, DistillationTrainer, load_projections
from kdfast.models import tinybert

pytest.importorskip("accelerate")

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
VOCAB = 37
NO_DROPOUT = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def teacher_and_student():
    teacher = BertForMaskedLM(BertConfig(vocab_size=VOCAB, hidden_size=24, num_hidden_layers=4, num_attention_heads=4,
                                         intermediate_size=29, max_position_embeddings=32, initializer_range=0.3))
    student = tinybert("tinybert-4", vocab_size=VOCAB, hidden_size=12, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=17, max_position_embeddings=32,
                                     initializer_range=0.3, **NO_DROPOUT)
    return teacher.eval(), student


def criterion_for(teacher, student, **kw):
    return kdfast.DistillationLoss((4, 2), {"hidden": 1.0, "attention": 2.0}, student_hidden_size=12,
                                   teacher_hidden_size=24, qk_prescaled=False, **kw)


def token_data(rows=4, length=7, padded=True):
    ids = torch.randint(5, VOCAB, (rows, length))
    mask = torch.ones(rows, length, dtype=torch.long)
    if padded:
        mask[1, 4:] = 0
        mask[2, 2:] = 0
        ids[mask == 0] = 0
    return ids, mask


def dataset(ids, mask):
    return Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": mask.tolist()})


def arguments(out, **kw):
    base = dict(output_dir=str(out), max_steps=1, per_device_train_batch_size=4, learning_rate=0.5, optim="sgd",
                lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=0.0, logging_steps=1,
                save_strategy="no", report_to="none", disable_tqdm=True, use_cpu=True, seed=3)
    return TrainingArguments(**{**base, **kw})


def hand_loss(teacher, student, criterion, ids, mask):
    with torch.no_grad(), kdfast.capture(teacher, qk=True) as t:
        teacher(input_ids=ids, attention_mask=mask)
    with kdfast.capture(student, qk=True) as s:
        student(input_ids=ids, attention_mask=mask)
    return criterion({"hidden_states": s.hidden_states, "q": s.q, "k": s.k},
                     {"hidden_states": t.hidden_states, "q": t.q, "k": t.k}, mask)


@pytest.mark.parametrize("max_grad_norm", [0.0, 0.05])
def test_accumulated_trainer_steps_equal_the_hand_written_sgd_steps(max_grad_norm, tmp_path):
    """4 equal-length rows as 2 micro-batches of 2 (a per-batch mean the Trainer divides by the
    accumulation steps) against hand-written steps on all 4, twice (the projections' gradients
    must not leak into the next step), with and without clipping the student's and the
    projections' gradients together: same student, same projections."""
    # float64: the accumulated and the whole-batch gradients differ only by rounding
    teacher, student = (m.double() for m in teacher_and_student())
    criterion = criterion_for(teacher, student).double()
    ids, mask = token_data(padded=False)
    ref_student, ref_criterion = teacher_and_student()[1].double(), criterion_for(teacher, student).double()
    ref_student.load_state_dict(student.state_dict())
    ref_criterion.load_state_dict(criterion.state_dict())
    initial = {k: v.clone() for k, v in criterion.state_dict().items()}

    params = [*ref_student.parameters(), *ref_criterion.parameters()]
    for step in range(2):
        loss, terms = hand_loss(teacher, ref_student, ref_criterion, ids, mask)
        loss.backward()
        if max_grad_norm:
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        with torch.no_grad():
            for p in params:
                if p.grad is not None:
                    p -= 0.5 * p.grad
                    p.grad = None
        if step == 0:
            loss_1, terms_1 = loss.detach(), terms

    trainer = DistillationTrainer(model=student, teacher=teacher, distillation_loss=criterion,
                                  train_dataset=dataset(ids, mask),
                                  args=arguments(tmp_path, per_device_train_batch_size=2, max_steps=2,
                                                 gradient_accumulation_steps=2, max_grad_norm=max_grad_norm))
    trainer.train()
    for (name, p), ref in zip([*student.named_parameters(), *criterion.named_parameters()], params):
        torch.testing.assert_close(p, ref, rtol=1e-10, atol=1e-12, msg=lambda m, name=name: f"{name}: {m}")
    for name, p in criterion.named_parameters():
        assert not torch.equal(p, initial[name]), name  # the projections were trained
    log = next(e for e in trainer.state.log_history if "kd_hidden" in e)
    # logs are float32, as the Trainer's own loss log
    assert log["kd_hidden"] == pytest.approx(float(terms_1["hidden"]), rel=1e-6)
    assert log["kd_attention"] == pytest.approx(float(terms_1["attention"]), rel=1e-6)
    assert log["loss"] == pytest.approx(float(loss_1), rel=1e-6)


def test_trained_student_reloads_without_stray_keys_and_projections_lie_beside_it(tmp_path):
    teacher, student = teacher_and_student()
    criterion = criterion_for(teacher, student)
    ids, mask = token_data()
    seen = []

    class Record(TrainerCallback):  # what any report_to integration receives
        def on_log(self, args, state, control, logs=None, **kwargs):
            seen.append(dict(logs))

    trainer = DistillationTrainer(model=student, teacher=teacher, distillation_loss=criterion,
                                  train_dataset=dataset(ids, mask), callbacks=[Record()],
                                  args=arguments(tmp_path, max_steps=3, per_device_train_batch_size=2,
                                                 gradient_accumulation_steps=2, optim="adamw_torch",
                                                 learning_rate=1e-2))
    trainer.train()
    trainer.save_model(str(tmp_path / "student"))
    assert sum("kd_hidden" in e and "kd_attention" in e for e in seen) == 3
    reloaded, info = BertForMaskedLM.from_pretrained(tmp_path / "student", output_loading_info=True)
    assert not info["unexpected_keys"] and not info["missing_keys"] and not info["mismatched_keys"]
    for name, value in student.state_dict().items():
        torch.testing.assert_close(reloaded.state_dict()[name], value)
    saved = load_file(tmp_path / "student" / PROJECTIONS_FILE)
    assert set(saved) == set(criterion.state_dict()) and len(saved) == 6  # weight, bias of states 0, 1, 2
    for name, value in criterion.state_dict().items():
        torch.testing.assert_close(saved[name], value)
    fresh = criterion_for(teacher, student)
    load_projections(fresh, tmp_path / "student")
    for name, value in criterion.state_dict().items():
        torch.testing.assert_close(fresh.state_dict()[name], value)


def test_resuming_reads_the_checkpoints_projections_and_refuses_a_checkpoint_without_them(tmp_path):
    teacher, student = teacher_and_student()
    ids, mask = token_data()
    args = arguments(tmp_path, max_steps=2, save_strategy="steps", save_steps=1, optim="adamw_torch",
                     learning_rate=1e-2)
    first = DistillationTrainer(model=student, teacher=teacher, distillation_loss=criterion_for(teacher, student),
                                train_dataset=dataset(ids, mask), args=args)
    first.train()
    at_1 = load_file(tmp_path / "checkpoint-1" / PROJECTIONS_FILE)

    seen_at_start = {}

    class Peek(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            seen_at_start.update({k: v.clone() for k, v in criterion.state_dict().items()})

    student2 = teacher_and_student()[1]
    criterion = criterion_for(teacher, student2)
    resumed = DistillationTrainer(model=student2, teacher=teacher, distillation_loss=criterion,
                                  train_dataset=dataset(ids, mask), args=args, callbacks=[Peek()])
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-1"))
    for name, value in at_1.items():
        torch.testing.assert_close(seen_at_start[name], value)
    # the resumed run ends where the uninterrupted one did
    for (name, a), b in zip(first.distillation_loss.state_dict().items(), criterion.state_dict().values()):
        torch.testing.assert_close(a, b, msg=name)

    (tmp_path / "checkpoint-1" / PROJECTIONS_FILE).unlink()
    again = DistillationTrainer(model=teacher_and_student()[1], teacher=teacher,
                                distillation_loss=criterion_for(teacher, student), train_dataset=dataset(ids, mask),
                                args=args)
    with pytest.raises(ValueError, match=r"directory: .*checkpoint-1.*kd_projections.safetensors does not exist"):
        again.train(resume_from_checkpoint=str(tmp_path / "checkpoint-1"))


def test_refusals_name_the_argument(tmp_path):
    teacher, student = teacher_and_student()
    ids, mask = token_data()
    data = dataset(ids, mask)
    good = dict(model=student, teacher=teacher, train_dataset=data, args=arguments(tmp_path))

    def make(**kw):
        return DistillationTrainer(**{**good, "distillation_loss": criterion_for(teacher, student), **kw})

    with pytest.raises(ValueError, match="teacher: kdfast.capture does not support Linear"):
        make(teacher=torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="model: kdfast.capture does not support Sequential"):
        make(model=torch.nn.Sequential(torch.nn.Linear(2, 2)))
    with pytest.raises(ValueError, match="distillation_loss: build it with qk_prescaled=False"):
        make(distillation_loss=kdfast.DistillationLoss((4, 2), {"attention": 1.0}))
    with pytest.raises(ValueError, match="distillation_loss: attention_source='attentions'"):
        make(distillation_loss=kdfast.DistillationLoss((4, 2), {"attention": 1.0}, attention_source="attentions"))
    with pytest.raises(ValueError, match="distillation_loss must be a kdfast.DistillationLoss, got MSELoss"):
        make(distillation_loss=torch.nn.MSELoss())
    with pytest.raises(ValueError, match="student_loss_weight must be >= 0 and finite, got -1"):
        make(student_loss_weight=-1)
    with pytest.raises(ValueError, match="compute_loss_func: DistillationTrainer computes its loss"):
        make(compute_loss_func=lambda *a, **k: 0)
    with pytest.raises(ValueError, match=r"optimizers: .* lacks the distillation_loss parameters \['projections"):
        make(optimizers=(torch.optim.SGD(student.parameters(), lr=0.1), None)).train()
    with pytest.raises(ValueError, match="student_loss_weight: the student returned no loss"):
        make(student_loss_weight=0.5).train()


def test_the_students_own_loss_joins_with_its_weight_and_is_logged(tmp_path):
    teacher, student = teacher_and_student()
    criterion = kdfast.DistillationLoss((4, 2), {"logits": 1.0}, temperature=2.0)
    ids, mask = token_data()
    labels = torch.where(torch.rand(ids.shape) < 0.5, ids, torch.full_like(ids, -100)).masked_fill(mask == 0, -100)
    labels[:, 0] = ids[:, 0]
    data = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": mask.tolist(), "labels": labels.tolist()})
    trainer = DistillationTrainer(model=student, teacher=teacher, distillation_loss=criterion, train_dataset=data,
                                  student_loss_weight=0.25, args=arguments(tmp_path))
    with torch.no_grad():
        out_t = teacher(input_ids=ids, attention_mask=mask)
        out_s = student(input_ids=ids, attention_mask=mask, labels=labels)
        kd = kdfast.kd_loss(out_s.logits, out_t.logits, temperature=2.0, mask=mask)
    trainer.train()
    log = next(e for e in trainer.state.log_history if "kd_logits" in e)
    assert log["kd_logits"] == pytest.approx(float(kd), rel=1e-5)
    assert log["student_loss"] == pytest.approx(float(out_s.loss), rel=1e-5)
    assert log["loss"] == pytest.approx(float(kd + 0.25 * out_s.loss), rel=1e-4)


def test_attention_from_captured_scores_equals_attention_from_captured_qk(tmp_path):
    """attention_source='scores' makes the trainer capture [B, H, L, L] maps instead of Q/K: the
    logged KL equals the flash KL from Q/K computed by hand on the same batch."""
    teacher, student = teacher_and_student()
    by_qk = kdfast.DistillationLoss((4, 2), {"attention": 1.0}, attention="kl", qk_prescaled=False)
    by_scores = kdfast.DistillationLoss((4, 2), {"attention": 1.0}, attention="kl", attention_source="scores")
    ids, mask = token_data()
    with torch.no_grad():
        _, terms = hand_loss(teacher, student, by_qk, ids, mask)
    trainer = DistillationTrainer(model=student, teacher=teacher, distillation_loss=by_scores,
                                  train_dataset=dataset(ids, mask), args=arguments(tmp_path))
    trainer.train()
    log = next(e for e in trainer.state.log_history if "kd_attention" in e)
    assert log["kd_attention"] == pytest.approx(float(terms["attention"]), rel=1e-5)


def test_bf16_autocast_step_logs_the_float32_terms_to_bf16_rounding(tmp_path):
    teacher, student = teacher_and_student()
    criterion = criterion_for(teacher, student)
    ids, mask = token_data()
    with torch.no_grad():
        _, terms = hand_loss(teacher, student, criterion, ids, mask)
    trainer = DistillationTrainer(model=student, teacher=teacher, distillation_loss=criterion,
                                  train_dataset=dataset(ids, mask), args=arguments(tmp_path, bf16=True))
    trainer.train()
    log = next(e for e in trainer.state.log_history if "kd_hidden" in e)
    for term in ("hidden", "attention"):
        assert log[f"kd_{term}"] == pytest.approx(float(terms[term]), rel=1e-2)  # measured 1e-4 .. 1.2e-3
        assert log[f"kd_{term}"] != float(terms[term])  # it did run in bf16
    assert all(p.dtype == torch.float32 for p in [*student.parameters(), *criterion.parameters()])


@pytest.mark.parametrize("script, flags", [("plain_loop.py", []), ("trainer.py", []), ("trainer.py", ["--from-cache"])])
def test_examples_run_and_the_student_learns(script, flags, tmp_path, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(EXAMPLES))
    monkeypatch.setattr(sys, "argv", [script, "--steps", "6", "--out", str(tmp_path), *flags])
    runpy.run_path(str(EXAMPLES / script), run_name="__main__")
    last = capsys.readouterr().out.strip().splitlines()[-1]
    first_loss, last_loss = (float(x) for x in last.split("loss ")[1].split(" (")[0].split(";")[0].split(" -> "))
    assert last_loss < first_loss
    student_dir = tmp_path if script == "plain_loop.py" else tmp_path / "student"
    _, info = BertForMaskedLM.from_pretrained(student_dir, output_loading_info=True)
    assert not info["unexpected_keys"] and not info["missing_keys"]
    assert (student_dir / PROJECTIONS_FILE).is_file()
    assert (tmp_path / "teacher-cache" / "manifest.json").is_file() == ("--from-cache" in flags)


def _ddp_worker(out: str, world: int) -> None:
    """Two SGD steps on 4 equal-length rows, 4 // world rows per process; saves rank 0's student
    and projections (run under torchrun for world > 1)."""
    torch.manual_seed(0)
    teacher, student = (m.double() for m in teacher_and_student())  # float64: the sums differ by rounding only
    criterion = criterion_for(teacher, student).double()
    ids, mask = token_data(padded=False)
    trainer = DistillationTrainer(model=student, teacher=teacher, distillation_loss=criterion,
                                  train_dataset=dataset(ids, mask),
                                  args=arguments(out, max_steps=2, per_device_train_batch_size=4 // world,
                                                 max_grad_norm=0.05, dataloader_drop_last=True))
    trainer.train()
    rank = trainer.args.process_index
    torch.save({"student": student.state_dict(), "projections": criterion.state_dict()},
               f"{out}/w{world}-rank{rank}.pt")
    if torch.distributed.is_initialized():  # a process group left up can abort at interpreter exit
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def test_two_torchrun_ranks_train_student_and_projections_like_one_process(tmp_path):
    import os
    import socket
    import subprocess

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(EXAMPLES.parent), "OMP_NUM_THREADS": "1"}
    me = str(Path(__file__).resolve())
    _ddp_worker(str(tmp_path), 1)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
                        f"--master_port={port}", me, str(tmp_path), "2"],
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    single = torch.load(tmp_path / "w1-rank0.pt", weights_only=True)
    ranks = [torch.load(tmp_path / f"w2-rank{r}.pt", weights_only=True) for r in range(2)]
    for part in ("student", "projections"):
        for name, value in single[part].items():
            assert torch.equal(ranks[0][part][name], ranks[1][part][name]), name  # replicas stay identical
            torch.testing.assert_close(ranks[0][part][name], value, rtol=1e-10, atol=1e-12,
                                       msg=lambda m, name=name: f"{name}: {m}")


if __name__ == "__main__":
    _ddp_worker(sys.argv[1], int(sys.argv[2]))
