"""Tiny random-weight teachers of every accepted family, each with a tokenizer of its own kind
saved beside it: a byte-level BPE tokenizer with the family's special tokens for RoBERTa,
XLM-RoBERTa and ModernBERT (whose mask and separator are not ``[MASK]`` / ``[SEP]``), a word-level
WordPiece one for ELECTRA (and BERT, see tests/tiny_teacher.py)."""

from __future__ import annotations

from pathlib import Path

import torch

#: the special tokens of each BPE family: (cls, sep, pad, unk, mask)
BPE_SPECIALS = {"roberta": ("<s>", "</s>", "<pad>", "<unk>", "<mask>"),
                "xlm-roberta": ("<s>", "</s>", "<pad>", "<unk>", "<mask>"),
                "modernbert": ("<|cls|>", "<|sep|>", "<|pad|>", "<|unk|>", "<|mask|>")}


def bpe_tokenizer(words: list[str], specials: tuple[str, str, str, str, str]):
    """A byte-level BPE ``PreTrainedTokenizerFast`` whose vocabulary is the specials, the bytes and
    merges learned from ``words``; ``cls X sep`` around each text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    cls, sep, pad, unk, mask = specials
    tok = Tokenizer(models.BPE(unk_token=unk))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=len(words) + 300, special_tokens=[cls, pad, sep, unk, mask],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([" ".join(words)] * 3, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{cls} $A {sep}", pair=f"{cls} $A {sep} $B {sep}",
        special_tokens=[(cls, tok.token_to_id(cls)), (sep, tok.token_to_id(sep))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, cls_token=cls, sep_token=sep, pad_token=pad, unk_token=unk,
                                   mask_token=mask, bos_token=cls, eos_token=sep)


def save_tiny_teacher(directory: Path, family: str, words: list[str], *, hidden: int = 24, layers: int = 4,
                      heads: int = 3, seed: int = 0, **config) -> Path:
    """Save a seeded masked-LM teacher of ``family`` (``roberta``, ``xlm-roberta``, ``electra``,
    ``modernbert``) and its tokenizer into ``directory``."""
    import transformers

    directory = Path(directory)
    if family in BPE_SPECIALS:
        tok = bpe_tokenizer(words, BPE_SPECIALS[family])
    else:
        from transformers import BertTokenizer

        vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]
        tok = BertTokenizer(vocab={w: i for i, w in enumerate(vocab)})
    tok.save_pretrained(directory)
    ids = dict(pad_token_id=tok.pad_token_id, bos_token_id=tok.cls_token_id, eos_token_id=tok.sep_token_id)
    common = dict(vocab_size=len(tok), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                  intermediate_size=2 * hidden + 1, max_position_embeddings=80)
    if family == "modernbert":
        cfg = transformers.ModernBertConfig(**common, **ids, cls_token_id=tok.cls_token_id,
                                            sep_token_id=tok.sep_token_id, local_attention=8,
                                            global_attn_every_n_layers=2, **config)
        cls = transformers.ModernBertForMaskedLM
    elif family == "electra":
        cfg = transformers.ElectraConfig(**common, embedding_size=hidden // 2, **config)
        cls = transformers.ElectraForMaskedLM
    else:
        name = {"roberta": "Roberta", "xlm-roberta": "XLMRoberta"}[family]
        cfg = getattr(transformers, f"{name}Config")(**{**common, "max_position_embeddings": 84}, **ids, **config)
        cls = getattr(transformers, f"{name}ForMaskedLM")
    torch.manual_seed(seed)
    cls(cfg).eval().save_pretrained(directory)
    return directory
