"""DistillationTrainer with a kdfast cache as the teacher: the logged terms equal a live-teacher
step on the same batch with the teacher's activations rounded to the cache's fp16 (hidden, Q / K,
top-k logits through sparse_kd_loss); a run from the cache saves a student that reloads with
from_pretrained and its projections beside it, and repeats with the seed; a dataset given with the
cache must be the cache's rows; every refusal names its argument."""

import copy

import pytest
import torch
from datasets import Dataset
from transformers import BertForMaskedLM, TrainingArguments

import kdfast
from kdfast.cache import CacheDataset, TeacherCache, build_cache
from kdfast.integrations.transformers import PROJECTIONS_FILE, DistillationTrainer
from kdfast.models import tinybert
from tests.tiny_teacher import save_tiny_bert_teacher

pytest.importorskip("accelerate")

WORDS = sorted(set("the cat sat on a mat while dogs ran far away from home under blue skies and green trees "
                   "every morning birds sing songs of light wind rain".split()))
TEMPERATURE = 2.0
BUILD = dict(max_length=16, batch_size=4, rows_per_shard=8, temperature=TEMPERATURE, mlm_probability=0.3,
             progress=False)
ROWS = 11  # two shards: 8 + 3 rows


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    return save_tiny_bert_teacher(tmp_path_factory.mktemp("teacher"), WORDS, hidden=32, layers=2, heads=4)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    g = torch.Generator().manual_seed(5)
    lines = [" ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (int(n),), generator=g))
             for n in torch.randint(3, 13, (ROWS,), generator=g)]
    path = tmp_path_factory.mktemp("data") / "corpus.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def cache_dir(teacher_dir, corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("cache") / "full"
    build_cache(str(teacher_dir), [str(corpus)], str(out), logits="topk:5", hidden="fp16", qk=True, **BUILD)
    return out


@pytest.fixture(scope="module")
def lean_cache_dir(teacher_dir, corpus, tmp_path_factory):
    """Hidden states 0 and 2 only, no Q / K, no logits."""
    out = tmp_path_factory.mktemp("cache") / "lean"
    build_cache(str(teacher_dir), [str(corpus)], str(out), logits="none", hidden="fp16", layers=[0, 2], **BUILD)
    return out


def make_student(vocab, width=12):
    return tinybert("tinybert-4", vocab_size=vocab, hidden_size=width, num_hidden_layers=2, num_attention_heads=2,
                    intermediate_size=17, max_position_embeddings=64, initializer_range=0.3,
                    hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def make_criterion(weights=None, **kw):
    weights = weights or {"hidden": 1.0, "attention": 2.0, "logits": 0.5}
    return kdfast.DistillationLoss((2, 2), weights, temperature=TEMPERATURE, student_hidden_size=12,
                                   teacher_hidden_size=32, qk_prescaled=False, **kw)


def arguments(out, **kw):
    base = dict(output_dir=str(out), max_steps=1, per_device_train_batch_size=ROWS, learning_rate=0.5, optim="sgd",
                lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=0.0, logging_steps=1,
                save_strategy="no", report_to="none", disable_tqdm=True, use_cpu=True, seed=3)
    return TrainingArguments(**{**base, **kw})


def all_cache_rows(cache_dir):
    """Every row of the cache as one batch, in cache order (what one batch of all rows reads)."""
    batches = list(CacheDataset(TeacherCache(str(cache_dir)), ROWS))
    assert len(batches) == 1
    return batches[0]


def live_terms(teacher, student, criterion, batch, *, round_to=None):
    """The terms of one step against the live teacher on ``batch``; ``round_to``: the teacher's
    activations rounded to that dtype first (as the cache stores them). The logits term is
    sparse_kd_loss of the masked rows against the live teacher's top-5 logits."""
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    with torch.no_grad(), kdfast.capture(teacher, qk=True) as t:
        logits_t = teacher(input_ids=ids, attention_mask=mask).logits
    with torch.no_grad(), kdfast.capture(student, qk=True) as s:
        logits_s = student(input_ids=ids, attention_mask=mask).logits

    def rounded(xs):
        return tuple(x.to(round_to).float() for x in xs) if round_to is not None else tuple(xs)

    dense = copy.copy(criterion)
    dense.weights = {k: v for k, v in criterion.weights.items() if k != "logits"}
    with torch.no_grad():
        _, terms = dense({"hidden_states": s.hidden_states, "q": s.q, "k": s.k},
                         {"hidden_states": rounded(t.hidden_states), "q": rounded(t.q), "k": rounded(t.k)}, mask)
        masked = labels != -100
        top_ids, top_values, lse = kdfast.sparsify_teacher_logits(logits_t[masked], 5, "topk", TEMPERATURE)
        if round_to is None:
            top_values = logits_t[masked].gather(-1, top_ids.long())  # the exact logits, not sparsify's fp16
        terms["logits"] = kdfast.sparse_kd_loss(logits_s[masked], top_ids, top_values, teacher_logsumexp=lse,
                                                mode="topk", temperature=TEMPERATURE)
    return {k: float(v) for k, v in terms.items()}


def test_cache_step_terms_equal_the_live_teacher_step_at_the_caches_rounding(cache_dir, teacher_dir, tmp_path):
    """One batch of all 11 rows (two shards): the logged terms against the cache equal the terms
    against the live teacher whose hidden states, Q / K and top-k logits are rounded to fp16,
    and differ from the unrounded teacher's by no more than that rounding."""
    teacher = BertForMaskedLM.from_pretrained(teacher_dir).eval()
    student = make_student(teacher.config.vocab_size)
    criterion = make_criterion()
    before_student, before_criterion = copy.deepcopy(student), copy.deepcopy(criterion)
    batch = all_cache_rows(cache_dir)
    assert int((batch["labels"] != -100).sum()) > 5  # the logits term has rows to count

    trainer = DistillationTrainer(model=student, teacher=str(cache_dir), distillation_loss=criterion,
                                  args=arguments(tmp_path))
    trainer.train()
    log = next(e for e in trainer.state.log_history if "kd_hidden" in e)

    at_fp16 = live_terms(teacher, before_student, before_criterion, batch, round_to=torch.float16)
    exact = live_terms(teacher, before_student, before_criterion, batch)
    for term in ("hidden", "attention", "logits"):
        assert log[f"kd_{term}"] == pytest.approx(at_fp16[term], rel=1e-5), term  # logs are float32
        assert log[f"kd_{term}"] == pytest.approx(exact[term], rel=1e-2), term   # fp16 storage: ~1e-3
    total = at_fp16["hidden"] + 2.0 * at_fp16["attention"] + 0.5 * at_fp16["logits"]
    assert log["loss"] == pytest.approx(total, rel=1e-5)
    for name, p in student.named_parameters():  # the step trained the student
        if name.startswith("bert.encoder"):
            assert not torch.equal(p, before_student.state_dict()[name]), name


def test_sampled_cache_logits_feed_the_sampled_sparse_loss(teacher_dir, corpus, tmp_path):
    """A cache of sampled teacher ids: the logits term is sparse_kd_loss(mode="sampled") of the
    masked rows against the ids and counts the cache stored."""
    out = tmp_path / "sampled"
    build_cache(str(teacher_dir), [str(corpus)], str(out), logits="sampled:6", hidden="none", **BUILD)
    batch = all_cache_rows(out)
    student = make_student(TeacherCache(str(out)).settings["teacher"]["vocab_size"])
    with torch.no_grad():
        logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        masked = batch["labels"] != -100
        expected = kdfast.sparse_kd_loss(logits[masked], batch["sampled_ids"], batch["sampled_counts"],
                                         mode="sampled", temperature=TEMPERATURE)
    trainer = DistillationTrainer(model=student, teacher=out, args=arguments(tmp_path),
                                  distillation_loss=kdfast.DistillationLoss((2, 2), {"logits": 1.0},
                                                                            temperature=TEMPERATURE))
    trainer.train()
    log = next(e for e in trainer.state.log_history if "kd_logits" in e)
    assert log["kd_logits"] == pytest.approx(float(expected), rel=1e-5)
    assert log["loss"] == pytest.approx(float(expected), rel=1e-5)  # the only term, weight 1


def test_a_run_from_the_cache_saves_a_reloadable_student_and_repeats_with_the_seed(cache_dir, tmp_path):
    cache = TeacherCache(str(cache_dir))  # an open cache works as well as its directory
    vocab = cache.settings["teacher"]["vocab_size"]
    runs = []
    for run in range(2):
        torch.manual_seed(run)  # different initial weights are then loaded from the same state
        student, criterion = make_student(vocab), make_criterion()
        if runs:
            student.load_state_dict(runs[0]["init_student"])
            criterion.load_state_dict(runs[0]["init_criterion"])
        init = {"init_student": copy.deepcopy(student.state_dict()),
                "init_criterion": copy.deepcopy(criterion.state_dict())}
        trainer = DistillationTrainer(model=student, teacher=cache, distillation_loss=criterion, student_loss_weight=0.3,
                                      args=arguments(tmp_path / f"run{run}", max_steps=3, per_device_train_batch_size=2,
                                                     gradient_accumulation_steps=2, optim="adamw_torch",
                                                     learning_rate=1e-2))
        trainer.train()
        trainer.save_model(str(tmp_path / f"run{run}" / "student"))
        runs.append({**init, "student": student.state_dict(), "criterion": criterion.state_dict(),
                     "logs": [e for e in trainer.state.log_history if "kd_hidden" in e]})

    logs = runs[0]["logs"]
    assert len(logs) == 3
    assert all(k in e for e in logs for k in ("kd_hidden", "kd_attention", "kd_logits", "student_loss"))
    for name, value in runs[0]["student"].items():  # two runs with one seed: the same student
        torch.testing.assert_close(runs[1]["student"][name], value, rtol=0, atol=0, msg=name)
    for name, value in runs[0]["criterion"].items():
        torch.testing.assert_close(runs[1]["criterion"][name], value, rtol=0, atol=0, msg=name)

    saved = tmp_path / "run0" / "student"
    reloaded, info = BertForMaskedLM.from_pretrained(saved, output_loading_info=True)
    assert not info["unexpected_keys"] and not info["missing_keys"] and not info["mismatched_keys"]
    for name, value in runs[0]["student"].items():
        torch.testing.assert_close(reloaded.state_dict()[name], value)
    from safetensors.torch import load_file

    projections = load_file(saved / PROJECTIONS_FILE)
    assert set(projections) == set(runs[0]["criterion"]) and len(projections) == 6
    for name, value in runs[0]["criterion"].items():
        torch.testing.assert_close(projections[name], value)
        assert not torch.equal(value, runs[0]["init_criterion"][name]), name  # trained with the student


def test_a_dataset_given_with_the_cache_must_be_its_rows(cache_dir, tmp_path):
    batch = all_cache_rows(cache_dir)
    vocab = TeacherCache(str(cache_dir)).settings["teacher"]["vocab_size"]
    lengths = batch["attention_mask"].sum(-1).tolist()
    rows = {"input_ids": [r[:n] for r, n in zip(batch["input_ids"].tolist(), lengths)]}

    def trainer(data):
        return DistillationTrainer(model=make_student(vocab), teacher=cache_dir, distillation_loss=make_criterion(),
                                   train_dataset=data, args=arguments(tmp_path))

    trainer(Dataset.from_dict(rows)).train()  # unpadded, without attention_mask: the same real tokens
    altered = copy.deepcopy(rows)
    altered["input_ids"][9][1] = (altered["input_ids"][9][1] + 1) % vocab
    with pytest.raises(ValueError, match=r"train_dataset row 9 does not match the cache's row 9"):
        trainer(Dataset.from_dict(altered))
    with pytest.raises(ValueError, match=rf"train_dataset has {ROWS - 1} rows, the cache .* {ROWS}"):
        trainer(Dataset.from_dict({"input_ids": rows["input_ids"][:-1]}))


def test_refusals_with_a_cache_name_the_argument(cache_dir, lean_cache_dir, teacher_dir, tmp_path):
    vocab = TeacherCache(str(cache_dir)).settings["teacher"]["vocab_size"]
    good = dict(model=make_student(vocab), teacher=cache_dir, distillation_loss=make_criterion(),
                args=arguments(tmp_path))

    def make(**kw):
        return DistillationTrainer(**{**good, **kw})

    with pytest.raises(ValueError, match=r"teacher: .* is not a kdfast cache directory \(no manifest.json\)"):
        make(teacher=teacher_dir)
    with pytest.raises(ValueError, match="teacher must be a torch.nn.Module, a kdfast cache directory or a "
                                         "TeacherCache, got int"):
        make(teacher=3)
    with pytest.raises(ValueError, match=r"distillation_loss: its layer_map needs the teacher's hidden states \[1\]"):
        make(teacher=lean_cache_dir, distillation_loss=make_criterion({"hidden": 1.0}))
    with pytest.raises(ValueError, match=r"distillation_loss: its attention term needs the teacher's Q / K of "
                                         r"layers \[2\], which the cache .* does not hold \(build it with --qk\)"):
        make(teacher=lean_cache_dir, distillation_loss=kdfast.DistillationLoss({0: 0, 2: 2}, {"attention": 1.0},
                                                                                qk_prescaled=False))
    with pytest.raises(ValueError, match="distillation_loss: its logits term needs the teacher's logits.*--logits none"):
        make(teacher=lean_cache_dir, distillation_loss=kdfast.DistillationLoss({0: 0}, {"logits": 1.0}))
    with pytest.raises(ValueError, match="distillation_loss: temperature 1.0 differs from the 2.0 .* topk logits"):
        make(distillation_loss=kdfast.DistillationLoss((2, 2), {"logits": 1.0}, temperature=1.0))
    with pytest.raises(ValueError, match="distillation_loss: its projection of student state 0 maps to width 24, "
                                         "but the teacher of the cache .* has hidden size 32"):
        make(distillation_loss=kdfast.DistillationLoss((2, 2), {"hidden": 1.0}, student_hidden_size=12,
                                                       teacher_hidden_size=24))
    with pytest.raises(ValueError, match="distillation_loss: attention_source='scores' needs a live teacher"):
        make(distillation_loss=kdfast.DistillationLoss((2, 2), {"attention": 1.0}, attention_source="scores"))
    with pytest.raises(ValueError, match="model: its hidden size 12 differs from the cache's teacher's 32 and "
                                         "distillation_loss has no projections"):
        make(distillation_loss=kdfast.DistillationLoss((2, 2), {"cosine": 1.0}))
    with pytest.raises(ValueError, match=f"model: its vocabulary of {vocab + 3} differs from the cache's teacher's "
                                         f"{vocab}"):
        make(model=make_student(vocab + 3))
    with pytest.raises(ValueError, match="data_collator: with a cache as the teacher"):
        make(data_collator=lambda rows: rows)
    with pytest.raises(ValueError, match="eval_dataset: evaluation against a cache teacher is not supported"):
        make(eval_dataset=Dataset.from_dict({"input_ids": [[1, 2]]}))
    with pytest.raises(ValueError, match="inputs: a batch without the cache's teacher targets"):
        trainer = make()
        trainer.compute_loss(trainer.model, {"input_ids": torch.tensor([[5, 6]]),
                                             "attention_mask": torch.ones(1, 2, dtype=torch.long)})
