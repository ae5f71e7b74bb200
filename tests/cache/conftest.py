"""A tiny BERT teacher with an MLM head and its tokenizer, saved to a local directory, plus text."""

import pytest
import torch

from kdfast.bench.synthetic import WORDS, save_tiny_bert_teacher


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory):
    return save_tiny_bert_teacher(tmp_path_factory.mktemp("teacher"), sorted(set(WORDS)))


@pytest.fixture(scope="session")
def text_file(tmp_path_factory):
    g = torch.Generator().manual_seed(1)
    lines = []
    for _ in range(37):
        n = int(torch.randint(3, 14, (1,), generator=g))
        lines.append(" ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (n,), generator=g)))
    p = tmp_path_factory.mktemp("data") / "corpus.txt"
    p.write_text("\n".join(lines) + "\n\n")
    return p


@pytest.fixture(scope="session")
def parquet_file(text_file, tmp_path_factory):
    """The texts of ``text_file`` in one Parquet file of row groups of 8 texts: 5 corpus blocks (8, 8, 8, 8, 5)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from kdfast.data import load_texts

    p = tmp_path_factory.mktemp("data") / "corpus.parquet"
    pq.write_table(pa.table({"text": load_texts([str(text_file)])}), str(p), row_group_size=8)
    return p


@pytest.fixture(scope="session")
def tiny_encoder_teacher(tmp_path_factory, tiny_teacher):
    """The tiny teacher's encoder saved as a ``BertModel``: no ``cls.predictions`` weights (like all-MiniLM-L6-v2)."""
    from transformers import BertForMaskedLM, BertTokenizer

    d = tmp_path_factory.mktemp("encoder-teacher")
    BertTokenizer.from_pretrained(tiny_teacher).save_pretrained(d)
    BertForMaskedLM.from_pretrained(tiny_teacher).bert.save_pretrained(d)
    return d
