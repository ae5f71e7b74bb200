"""What both examples share: a teacher (yours from a directory, or a tiny random BERT with a
word-level tokenizer when none is given), a TinyBERT-shaped student for it, and some text."""

from __future__ import annotations

import torch

TEXT = ("the cat sat on a mat while dogs ran far away from home",
        "every morning birds sing songs of light under blue skies",
        "wind and rain came over the green trees by the river",
        "the sun and the moon and the stars shine on a stone",
        "dogs and cats sleep at home when the rain comes",
        "a river runs far under the trees and the stone bridge")


def load_teacher(directory: str | None):
    """(teacher, tokenizer): ``AutoModelForMaskedLM`` / ``AutoTokenizer`` from ``directory``, or a
    2-layer random BERT and a tokenizer over the words of TEXT."""
    from transformers import AutoModelForMaskedLM, AutoTokenizer, BertConfig, BertForMaskedLM, BertTokenizer

    if directory:
        return AutoModelForMaskedLM.from_pretrained(directory).eval(), AutoTokenizer.from_pretrained(directory)
    words = sorted({w for line in TEXT for w in line.split()})
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]
    tokenizer = BertTokenizer(vocab={w: i for i, w in enumerate(vocab)})
    torch.manual_seed(0)
    teacher = BertForMaskedLM(BertConfig(vocab_size=len(vocab), hidden_size=48, num_hidden_layers=4,
                                         num_attention_heads=4, intermediate_size=96, max_position_embeddings=64))
    return teacher.eval(), tokenizer


def make_student(teacher, *, layers: int = 2):
    """A TinyBERT-shaped student: ``layers`` layers, a third of the teacher's width (a multiple
    of its head count), the teacher's vocabulary and head count."""
    from kdfast.models import tinybert

    cfg = teacher.config
    heads = cfg.num_attention_heads
    width = max(heads, cfg.hidden_size // 3 // heads * heads)
    return tinybert("tinybert-4", vocab_size=cfg.vocab_size, hidden_size=width, num_hidden_layers=layers,
                    num_attention_heads=heads, intermediate_size=4 * width,
                    max_position_embeddings=cfg.max_position_embeddings)
