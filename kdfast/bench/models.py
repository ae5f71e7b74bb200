"""Student models: inference latency (batch 1, seq 128) of BERT-base, the DistilBERT and
TinyBERT-4 students and MobileBERT (kdfast's implementation and transformers' own), as
speed-ups over BERT-base next to the papers' claims; and MobileBERT forward + backward at
batch 8, seq 128, kdfast against transformers, with the outputs compared."""

from __future__ import annotations

import torch
from transformers import BertConfig, BertModel, MobileBertModel

from kdfast.benchmarking import Entry, Result, measure_all
from kdfast.models import KDMobileBert, distilbert_from_teacher, mobilebert_config, tinybert_config

SUITE = "models"
# Seed slides: speed-up over BERT-base at inference.
CLAIMS = {"DistilBERT": "1.6x", "TinyBERT-4": "9.4x", "MobileBERT (transformers)": "5.5x",
          "MobileBERT (kdfast)": "5.5x"}


def _inputs(batch: int, seq: int, vocab: int, device: torch.device):
    ids = torch.randint(0, vocab, (batch, seq), device=device)
    mask = torch.ones(batch, seq, dtype=torch.long, device=device)
    mask[batch // 2:, seq - seq // 4:] = 0  # padding in half the batch
    return ids, mask


def run(device: torch.device, *, repeat: int = 5, seq: int = 128) -> list[Result]:
    torch.manual_seed(0)
    bert = BertModel(BertConfig(), add_pooling_layer=False).to(device).eval()
    models = {
        "BERT-base": bert,
        "DistilBERT": getattr(student := distilbert_from_teacher(bert), "bert", student).to(device).eval(),
        "TinyBERT-4": BertModel(tinybert_config("tinybert-4"), add_pooling_layer=False).to(device).eval(),
    }
    mb_hf = MobileBertModel(mobilebert_config("mobilebert"), add_pooling_layer=False).to(device).eval()
    mb_kd = KDMobileBert(mobilebert_config("mobilebert"), add_pooling_layer=False).to(device).eval()
    mb_kd.load_state_dict(mb_hf.state_dict())
    models["MobileBERT (transformers)"] = mb_hf
    models["MobileBERT (kdfast)"] = mb_kd

    ids, mask = _inputs(1, seq, 30522, device)
    case = f"latency b=1 L={seq}"

    def infer(m):
        def step():
            with torch.inference_mode():
                out = m(input_ids=ids, attention_mask=mask)
            return out[0] if isinstance(out, tuple) else out.last_hidden_state
        return step

    entries = [Entry(SUITE, case, name, infer(m)) for name, m in models.items()]
    results = measure_all(entries, device, repeat=repeat)
    base = results[0].ms
    for r in results:
        if r.ms and r.impl in CLAIMS:
            r.extra = {"vs_BERT-base": f"{base / r.ms:.1f}x", "paper": CLAIMS[r.impl]}

    # Training step of the MobileBERT student: same weights, same inputs, outputs compared.
    ids8, mask8 = _inputs(8, seq, 30522, device)
    mb_hf.train(False)
    mb_kd.train(False)  # dropout off so the two are comparable
    with torch.no_grad():
        a = mb_hf(input_ids=ids8, attention_mask=mask8).last_hidden_state
        b = mb_kd(input_ids=ids8, attention_mask=mask8).last_hidden_state
    max_diff = (a - b).abs().max().item()

    def train_step(m):
        def step():
            m.zero_grad(set_to_none=True)
            out = m(input_ids=ids8, attention_mask=mask8)
            hidden = out[0] if isinstance(out, tuple) else out.last_hidden_state
            hidden.float().pow(2).mean().backward()
            return hidden
        return step

    case8 = f"fwd+bwd b=8 L={seq}"
    train = measure_all([Entry(SUITE, case8, "MobileBERT (transformers)", train_step(mb_hf)),
                         Entry(SUITE, case8, "MobileBERT (kdfast)", train_step(mb_kd))], device, repeat=repeat)
    train[1].extra = {"max_abs_diff_vs_transformers": f"{max_diff:.1e}"}
    return results + train
