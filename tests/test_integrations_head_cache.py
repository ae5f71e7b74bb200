"""DistillationTrainer with an exact-logits cache (``logits="head"``): the logits term is the live
teacher's, over every real token, with the teacher's head input rounded to the cache's fp16."""

import pytest
import torch
from transformers import BertForMaskedLM, TrainingArguments

import kdfast
from kdfast.cache import CacheDataset, TeacherCache, build_cache
from kdfast.integrations.transformers import DistillationTrainer
from kdfast.models import tinybert
from tests.tiny_teacher import save_tiny_bert_teacher

pytest.importorskip("accelerate")

WORDS = sorted(set("the cat sat on a mat while dogs ran far away from home under blue skies and green trees "
                   "every morning birds sing songs of light wind rain".split()))
TEMPERATURE = 2.0
ROWS = 11


def make_student(vocab, width=12):
    return tinybert("tinybert-4", vocab_size=vocab, hidden_size=width, num_hidden_layers=2, num_attention_heads=2,
                    intermediate_size=17, max_position_embeddings=64, initializer_range=0.3,
                    hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def arguments(out):
    return TrainingArguments(output_dir=str(out), max_steps=1, per_device_train_batch_size=ROWS, learning_rate=0.5,
                             optim="sgd", lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=0.0,
                             logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True, use_cpu=True,
                             seed=3)


def test_head_cache_logits_term_is_the_live_teachers_at_fp16_head_input(tmp_path):
    teacher_dir = save_tiny_bert_teacher(tmp_path / "teacher", WORDS, hidden=32, layers=2, heads=4)
    g = torch.Generator().manual_seed(5)
    lines = [" ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (int(n),), generator=g))
             for n in torch.randint(3, 13, (ROWS,), generator=g)]
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(lines) + "\n")
    out = tmp_path / "head"
    build_cache(str(teacher_dir), [str(corpus)], str(out), logits="head", hidden="none", max_length=16, batch_size=4,
                rows_per_shard=8, temperature=TEMPERATURE, mlm_probability=0.3, progress=False)
    (batch,) = list(CacheDataset(TeacherCache(str(out)), ROWS))
    teacher = BertForMaskedLM.from_pretrained(teacher_dir).eval()
    student = make_student(teacher.config.vocab_size)
    ids, am = batch["input_ids"], batch["attention_mask"]
    with torch.no_grad():
        logits_s = student(input_ids=ids, attention_mask=am).logits
        pred = teacher.cls.predictions
        h = pred.transform(teacher.bert(input_ids=ids, attention_mask=am)[0])
        logits_t = pred.decoder(h.half().float())
        loss = kdfast.DistillationLoss((2, 2), {"logits": 1.0}, temperature=TEMPERATURE)
        expected = loss({"logits": logits_s}, {"logits": logits_t}, am)[1]["logits"]
        unrounded = loss({"logits": logits_s}, {"logits": pred.decoder(h)}, am)[1]["logits"]
    trainer = DistillationTrainer(model=student, teacher=out, args=arguments(tmp_path),
                                  distillation_loss=kdfast.DistillationLoss((2, 2), {"logits": 1.0},
                                                                            temperature=TEMPERATURE))
    trainer.train()
    log = next(e for e in trainer.state.log_history if "kd_logits" in e)
    assert log["kd_logits"] == pytest.approx(float(expected), rel=1e-4)
    assert log["kd_logits"] == pytest.approx(float(unrounded), rel=1e-2)
