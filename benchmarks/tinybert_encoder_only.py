"""TinyBERT general distillation: the student step through the whole BertForMaskedLM (its unused MLM
head included) against the encoder alone, as the recipe now runs it; same process, alternated.
Usage: python benchmarks/tinybert_encoder_only.py"""
import statistics
import time

import torch
from transformers import BertConfig, BertForMaskedLM

from kdfast.train.teacher import capture_outputs

torch.manual_seed(0)
cfg = BertConfig(vocab_size=30522, hidden_size=312, num_hidden_layers=4, num_attention_heads=12, intermediate_size=1200)
student = BertForMaskedLM(cfg).eval()  # dropout off: both forms give the same loss
ids = torch.randint(5, 30522, (8, 128))
am = torch.ones_like(ids)


def step(m):
    out = capture_outputs(m, {"input_ids": ids, "attention_mask": am}, qk=True)
    loss = sum(h.pow(2).mean() for h in out.hidden_states) + sum(q.pow(2).mean() for q in out.q)
    loss.backward()
    return float(loss.detach())


assert abs(step(student) - step(student.bert)) < 1e-5
t = {"with head": [], "encoder only": []}
for _ in range(6):
    for name, m in (("with head", student), ("encoder only", student.bert)):
        s = time.perf_counter()
        step(m)
        t[name].append(time.perf_counter() - s)
for k, v in t.items():
    print(f"{k:13s} best {min(v)*1e3:7.1f} ms  median {statistics.median(v)*1e3:7.1f} ms")
best = min(t["with head"]) / min(t["encoder only"])
median = statistics.median(t["with head"]) / statistics.median(t["encoder only"])
print(f"speed-up best {best:.2f}x median {median:.2f}x")
