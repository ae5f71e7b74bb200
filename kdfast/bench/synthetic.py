"""Synthetic teachers and corpora that need no download: a tiny random-weight BERT with an MLM head
and its word-level tokenizer, and Parquet corpora of any size over the same words (for measuring
the cache builder at scale, and for tests)."""

from __future__ import annotations

import random
from pathlib import Path

import torch

SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
WORDS = ("the cat sat on a mat while dogs ran far away from home under blue skies and green trees every "
         "morning birds sing songs of light wind rain sun moon stars river stone").split()


def save_tiny_bert_teacher(directory: str | Path, words: list[str], *, hidden: int = 32, layers: int = 2,
                           heads: int = 4, intermediate: int = 64, positions: int = 64, seed: int = 0) -> Path:
    """Save a tokenizer (the special tokens, then ``words``) and a ``BertForMaskedLM`` seeded with
    ``seed`` into ``directory``, as ``save_pretrained`` saves a real one. (In transformers 5,
    ``BertTokenizer(vocab_file=...)`` ignores the file, so the vocabulary is passed as a dict.)"""
    from transformers import BertConfig, BertForMaskedLM, BertTokenizer

    vocab = [*SPECIAL, *words]
    BertTokenizer(vocab={w: i for i, w in enumerate(vocab)}).save_pretrained(directory)
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=len(vocab), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                     intermediate_size=intermediate, max_position_embeddings=positions)
    BertForMaskedLM(cfg).eval().save_pretrained(directory)
    return Path(directory)


def write_parquet_corpus(directory: str | Path, total_bytes: int, *, text_bytes: int = 1000, files: int = 4,
                         row_group_size: int = 5000, seed: int = 0) -> int:
    """Write ``files`` Parquet files (``part-0.parquet``, ...; column ``text``, no compression and no
    dictionary, so the bytes on disk are the text's) of texts of about ``text_bytes`` bytes of
    :data:`WORDS` until ``total_bytes`` bytes of text, in row groups of ``row_group_size`` texts;
    each text starts with its number, so no two are equal. A pool of random texts is rotated so that
    generating gigabytes stays cheap. Returns the number of texts."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if total_bytes < 1 or text_bytes < 1 or files < 1 or row_group_size < 1:
        raise ValueError("total_bytes, text_bytes, files and row_group_size must be >= 1")
    directory = Path(directory)
    rng = random.Random(seed)
    words_per_text = max(1, round(text_bytes / (1 + sum(map(len, WORDS)) / len(WORDS))))
    pool = [" ".join(rng.choices(WORDS, k=words_per_text)) for _ in range(min(20_000, row_group_size * 4))]
    per_file = -(-total_bytes // files)
    written = n = 0
    for part in range(files):
        with pq.ParquetWriter(str(directory / f"part-{part}.parquet"), pa.schema([("text", pa.string())]),
                              compression="none", use_dictionary=False) as w:
            in_file = 0
            while in_file < per_file and written < total_bytes:
                texts = [f"{n + i} {pool[(n + i) % len(pool)]}" for i in range(row_group_size)]
                w.write_table(pa.table({"text": texts}), row_group_size=row_group_size)
                size = sum(len(t) for t in texts)
                in_file += size
                written += size
                n += len(texts)
    return n
