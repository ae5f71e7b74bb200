"""The small padded batch and BERT teacher of the recipe step tests (odd sizes, padding in two
rows, MLM labels on about a third of the real tokens)."""

from __future__ import annotations

import torch

V, B, L = 61, 3, 13  # odd sizes
LENGTHS = (13, 9, 5)  # real tokens per row: padding in two rows
MASK_ID = 4


def bert_teacher(layers=4, hidden=24, heads=4, seed=0):
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=V, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                     intermediate_size=40, max_position_embeddings=32, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0)
    return BertForMaskedLM(cfg).eval()


def perturb(model, scale=0.05, seed=1):
    """Move a student away from its teacher-copied initialisation, so that every term is non-trivial."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model


def masked_batch(seed=2):
    """ids / attention mask with padding, and MLM labels on about a third of the real tokens
    (at least one per row; the first token, like [CLS], never)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, V, (B, L), generator=g)
    am = torch.zeros(B, L, dtype=torch.long)
    for r, n in enumerate(LENGTHS):
        am[r, :n] = 1
    ids = ids * am  # [PAD] = 0
    chosen = (torch.rand(B, L, generator=g) < 0.35) & am.bool()
    chosen[:, 0] = False
    chosen[torch.arange(B), torch.tensor(LENGTHS) - 1] = True
    labels = torch.where(chosen, ids, torch.full_like(ids, -100))
    masked_ids = torch.where(chosen, torch.full_like(ids, MASK_ID), ids)
    return masked_ids, am, labels
