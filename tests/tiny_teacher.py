"""A tiny random-weight BertForMaskedLM teacher and its word-level tokenizer, saved like a real one.

In transformers 5, ``BertTokenizer(vocab_file=...)`` ignores the file, so the vocabulary is passed
as a dict."""

from __future__ import annotations

from pathlib import Path

import torch

SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def save_tiny_bert_teacher(directory: Path, words: list[str], *, hidden: int = 32, layers: int = 2,
                           heads: int = 4, intermediate: int = 64, positions: int = 64, seed: int = 0) -> Path:
    """Save tokenizer (special tokens, then ``words``) and a seeded BertForMaskedLM into ``directory``."""
    from transformers import BertConfig, BertForMaskedLM, BertTokenizer

    vocab = [*SPECIAL, *words]
    BertTokenizer(vocab={w: i for i, w in enumerate(vocab)}).save_pretrained(directory)
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=len(vocab), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                     intermediate_size=intermediate, max_position_embeddings=positions)
    BertForMaskedLM(cfg).eval().save_pretrained(directory)
    return Path(directory)
