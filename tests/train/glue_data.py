"""Tiny GLUE-format files and a tiny BERT with its tokenizer, written to local directories for the task tests."""

from __future__ import annotations

import random
from pathlib import Path

POSITIVE = ("good", "great", "fine", "nice", "lovely")
NEGATIVE = ("bad", "awful", "poor", "dull", "terrible")
FILLER = ("the movie was a film and it is this really quite story plot actors so very with some "
          "cat dog sat ran on mat far home sky blue green tree bird sun moon").split()
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *sorted(set(POSITIVE + NEGATIVE + tuple(FILLER)))]
NLI_LABELS = ("entailment", "neutral", "contradiction")


def save_tiny_bert(path: Path, *, hidden: int = 32, layers: int = 2, heads: int = 4, seed: int = 0) -> Path:
    """A randomly initialised BERT (base model, no head) and a word-level tokenizer over VOCAB."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizer

    path.mkdir(parents=True, exist_ok=True)
    BertTokenizer(vocab={w: i for i, w in enumerate(VOCAB)}).save_pretrained(path)
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=len(VOCAB), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                     intermediate_size=2 * hidden, max_position_embeddings=64)
    BertModel(cfg).save_pretrained(path)
    return path


def sentiment_sentence(rng: random.Random, positive: bool) -> str:
    words = [rng.choice(FILLER) for _ in range(rng.randint(3, 7))]
    words.insert(rng.randint(0, len(words)), rng.choice(POSITIVE if positive else NEGATIVE))
    return " ".join(words)


def write_sst2(d: Path, n_train: int = 160, n_dev: int = 80, seed: int = 0) -> Path:
    """SST-2 as GLUE ships it: ``sentence<TAB>label`` with a header; the label says whether the
    sentence holds a positive or a negative word (learnable)."""
    rng = random.Random(seed)
    d.mkdir(parents=True, exist_ok=True)
    for name, n in (("train", n_train), ("dev", n_dev)):
        rows = ["sentence\tlabel"]
        for _ in range(n):
            y = rng.random() < 0.5
            rows.append(f"{sentiment_sentence(rng, y)}\t{int(y)}")
        (d / f"{name}.tsv").write_text("\n".join(rows) + "\n")
    return d


MNLI_HEADER = ("index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\tsentence2_binary_parse\tsentence1_parse\t"
               "sentence2_parse\tsentence1\tsentence2")


def mnli_rows(rng: random.Random, n: int, dev: bool) -> list[str]:
    """MNLI rows in GLUE's TSV layout (parse columns, string labels; dev files carry label1..label5)."""
    header = MNLI_HEADER + ("\tlabel1\tlabel2\tlabel3\tlabel4\tlabel5\tgold_label" if dev else "\tlabel1\tgold_label")
    rows = [header]
    for i in range(n):
        premise = sentiment_sentence(rng, rng.random() < 0.5)
        hypothesis = sentiment_sentence(rng, rng.random() < 0.5)
        gold = rng.choice(NLI_LABELS)
        votes = [gold] * (5 if dev else 1)
        rows.append("\t".join([str(i), str(1000 + i), f"{1000 + i}e", "fiction", f"( {premise} )",
                               f"( {hypothesis} )", f"(ROOT {premise})", f"(ROOT {hypothesis})", premise, hypothesis,
                               *votes, gold]))
    return rows


def write_mnli(d: Path, seed: int = 0) -> Path:
    rng = random.Random(seed)
    d.mkdir(parents=True, exist_ok=True)
    for name, n, dev in (("train", 48, False), ("dev_matched", 21, True), ("dev_mismatched", 19, True)):
        (d / f"{name}.tsv").write_text("\n".join(mnli_rows(rng, n, dev)) + "\n")
    return d
