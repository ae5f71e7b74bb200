"""DistillationTrainer on a tiny ModernBERT teacher (its own BPE tokenizer, local and global
layers): live, the logged terms equal the loss on kdfast.capture's outputs, attention compared on
each layer's band; from a cache of its rotated Q/K; the student (a ModernBERT whose layers take the
types of the teacher layers they map to) reloads with AutoModelForMaskedLM; two seeded runs match."""

import pytest
import torch
from datasets import Dataset
from transformers import AutoConfig, AutoModelForMaskedLM, AutoTokenizer, TrainingArguments

import kdfast
from kdfast.cache import build_cache
from kdfast.integrations.transformers import DistillationTrainer
from kdfast.models.modernbert import attention_windows
from kdfast.models.students import tinybert_student
from tests.tiny_teachers import save_tiny_teacher

pytest.importorskip("accelerate")

WORDS = sorted(set("the cat sat on a mat while dogs ran far away from home under blue skies and green trees "
                   "every morning birds sing songs of light wind rain".split()))
ROWS = 8


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    return save_tiny_teacher(tmp_path_factory.mktemp("modernbert"), "modernbert", WORDS, hidden=24, layers=4,
                             heads=3, initializer_range=0.3)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    g = torch.Generator().manual_seed(5)
    lines = [" ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (int(n),), generator=g))
             for n in torch.randint(8, 20, (ROWS,), generator=g)]
    path = tmp_path_factory.mktemp("data") / "corpus.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


def student_and_criterion(teacher_dir, weights):
    tconf = AutoConfig.from_pretrained(teacher_dir)
    torch.manual_seed(0)
    student = tinybert_student(tconf, hidden_size=12, num_attention_heads=3, intermediate_size=13,
                               num_hidden_layers=2, initializer_range=0.3)
    criterion = kdfast.DistillationLoss((4, 2), weights, student_hidden_size=12, teacher_hidden_size=24,
                                        qk_prescaled=False, temperature=2.0,
                                        teacher_windows=attention_windows(tconf),
                                        student_windows=attention_windows(student))
    return student, criterion


def arguments(out, **kw):
    base = dict(output_dir=str(out), max_steps=1, per_device_train_batch_size=4, learning_rate=0.1, optim="sgd",
                lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=0.0, logging_steps=1,
                save_strategy="no", report_to="none", disable_tqdm=True, use_cpu=True, seed=3)
    return TrainingArguments(**{**base, **kw})


def test_live_modernbert_teacher_logged_terms_equal_the_loss_on_the_capture(teacher_dir, corpus, tmp_path):
    teacher = AutoModelForMaskedLM.from_pretrained(teacher_dir).eval()
    tok = AutoTokenizer.from_pretrained(teacher_dir)
    enc = tok(corpus.read_text().splitlines()[:4], padding=True, max_length=64, truncation=True,
              return_tensors="pt")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    assert (mask == 0).any() and any(w is not None for w in attention_windows(teacher))
    student, criterion = student_and_criterion(teacher_dir, {"hidden": 1.0, "attention": 2.0})
    with torch.no_grad(), kdfast.capture(teacher, qk=True) as t:
        teacher(input_ids=ids, attention_mask=mask)
    with torch.no_grad(), kdfast.capture(student, qk=True) as s:
        student(input_ids=ids, attention_mask=mask)
    _, terms = criterion({"hidden_states": s.hidden_states, "q": s.q, "k": s.k},
                         {"hidden_states": t.hidden_states, "q": t.q, "k": t.k}, mask)
    trainer = DistillationTrainer(model=student, teacher=teacher, distillation_loss=criterion,
                                  train_dataset=Dataset.from_dict({"input_ids": ids.tolist(),
                                                                   "attention_mask": mask.tolist()}),
                                  args=arguments(tmp_path))
    trainer.train()
    log = next(e for e in trainer.state.log_history if "kd_hidden" in e)
    assert log["kd_hidden"] == pytest.approx(float(terms["hidden"]), rel=1e-5)
    assert log["kd_attention"] == pytest.approx(float(terms["attention"]), rel=1e-5)
    trainer.save_model(str(tmp_path / "student"))
    reloaded, info = AutoModelForMaskedLM.from_pretrained(tmp_path / "student", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert reloaded.config.layer_types == student.config.layer_types
    for name, value in student.state_dict().items():
        torch.testing.assert_close(reloaded.state_dict()[name], value)


def test_modernbert_cache_of_rotated_qk_trains_and_repeats_with_the_seed(teacher_dir, corpus, tmp_path):
    out = tmp_path / "cache"
    build_cache(str(teacher_dir), [str(corpus)], str(out), logits="topk:5", hidden="fp16", qk=True, max_length=24,
                batch_size=4, rows_per_shard=4, temperature=2.0, mlm_probability=0.3, progress=False)
    # the cache holds what kdfast.capture gives on the live teacher: Q / K after the rotary embedding
    from kdfast.cache import TeacherCache

    cache = TeacherCache(str(out))
    row = next(iter(kdfast.cache.CacheDataset(cache, 4)))
    teacher = AutoModelForMaskedLM.from_pretrained(teacher_dir).eval()
    with torch.no_grad(), kdfast.capture(teacher, qk=True) as t:
        teacher(input_ids=row["input_ids"], attention_mask=row["attention_mask"])
    def flat(x):  # [B, H, L, d_head] -> the stored [B, L, H * d_head]
        return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], -1)

    for i in range(4):
        torch.testing.assert_close(row[f"q_{i + 1}"].float(), flat(t.q[i]), rtol=2e-3, atol=2e-3)
        torch.testing.assert_close(row[f"k_{i + 1}"].float(), flat(t.k[i]), rtol=2e-3, atol=2e-3)
    finals = []
    for run in range(2):
        student, criterion = student_and_criterion(teacher_dir, {"hidden": 1.0, "attention": 2.0, "logits": 0.5})
        trainer = DistillationTrainer(model=student, teacher=str(out), distillation_loss=criterion,
                                      args=arguments(tmp_path / f"run{run}", max_steps=2))
        trainer.train()
        log = next(e for e in trainer.state.log_history if "kd_attention" in e)
        assert all(torch.isfinite(torch.tensor(log[k])) for k in ("kd_hidden", "kd_attention", "kd_logits"))
        finals.append({k: v.clone() for k, v in student.state_dict().items()})
    assert all(torch.equal(finals[0][k], finals[1][k]) for k in finals[0])
