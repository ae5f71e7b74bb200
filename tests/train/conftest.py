"""Fixtures shared by the training tests."""

import random

import pytest
import torch

WORDS = [f"w{i}" for i in range(60)]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A 4-layer, 32-wide BertForMaskedLM teacher (random weights, with its MLM head), the same
    body saved without a head, and a corpus of Zipf-distributed words."""
    from transformers import BertConfig, BertForMaskedLM, BertModel, BertTokenizer

    root = tmp_path_factory.mktemp("tiny")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    tok = BertTokenizer(vocab={w: i for i, w in enumerate(vocab)})
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=64)
    teacher = BertForMaskedLM(cfg)
    teacher.save_pretrained(root / "teacher")
    tok.save_pretrained(root / "teacher")
    BertModel(cfg).save_pretrained(root / "headless")
    tok.save_pretrained(root / "headless")
    rng = random.Random(1)
    weights = [1 / (i + 1) for i in range(len(WORDS))]
    lines = [" ".join(rng.choices(WORDS, weights, k=rng.randint(5, 14))) for _ in range(50)]
    (root / "train.txt").write_text("\n".join(lines) + "\n")
    return root
