"""A tiny BERT teacher with an MLM head and its tokenizer, saved to a local directory, plus text."""

import pytest
import torch

WORDS = ("the cat sat on a mat while dogs ran far away from home under blue skies and green trees "
         "every morning birds sing songs of light wind rain sun moon stars river stone").split()


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory):
    from transformers import BertConfig, BertForMaskedLM, BertTokenizer

    d = tmp_path_factory.mktemp("teacher")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *sorted(set(WORDS))]
    BertTokenizer(vocab={w: i for i, w in enumerate(vocab)}).save_pretrained(d)
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=64)
    BertForMaskedLM(cfg).eval().save_pretrained(d)
    return d


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
def tiny_encoder_teacher(tmp_path_factory, tiny_teacher):
    """The tiny teacher's encoder saved as a ``BertModel``: no ``cls.predictions`` weights (like all-MiniLM-L6-v2)."""
    from transformers import BertForMaskedLM, BertTokenizer

    d = tmp_path_factory.mktemp("encoder-teacher")
    BertTokenizer.from_pretrained(tiny_teacher).save_pretrained(d)
    BertForMaskedLM.from_pretrained(tiny_teacher).bert.save_pretrained(d)
    return d
