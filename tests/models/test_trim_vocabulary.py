"""trim_vocabulary: a student that knows only the tokens its corpus uses computes what the untrimmed
one computes on that text, with a standard tokenizer, and saves / reloads with the standard classes."""

import pytest
import torch
from transformers import AutoModel, AutoModelForMaskedLM, AutoTokenizer, BertForMaskedLM, BertModel

from kdfast.models import count, trim_vocabulary
from tests.tiny_teacher import save_tiny_bert_teacher

WORDS = ["alpha", "beta", "gamma", "delta", "eps", "zeta", "eta", "theta", "iota", "kappa", "lam", "mu", "nu"]


@pytest.fixture
def tiny(tmp_path, randomize):
    directory = save_tiny_bert_teacher(tmp_path / "teacher", WORDS, hidden=24, layers=3, heads=4, intermediate=40,
                                       positions=32, seed=3)
    model = randomize(BertForMaskedLM.from_pretrained(directory), std=0.3).eval()
    return model, AutoTokenizer.from_pretrained(directory)


def _texts(words, n=5, length=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [" ".join(words[int(i)] for i in torch.randint(0, len(words), (int(length) - r,), generator=g))
            for r in range(n)]


@pytest.mark.parametrize("base", [True, False])
def test_kept_text_gives_the_untrimmed_outputs(tiny, tmp_path, base):
    model, tok = tiny
    model = model.bert if base else model
    kept_words = WORDS[1:12:2]  # 6 of the 13 words, odd positions
    keep = [tok.convert_tokens_to_ids(w) for w in kept_words]
    trimmed, new_tok, id_map = trim_vocabulary(model, tok, keep)
    n_kept = len(set(keep) | set(tok.all_special_ids))
    assert trimmed.config.vocab_size == len(new_tok) == n_kept and id_map.shape == (len(tok),)
    assert model.config.vocab_size == len(tok)  # the original is left as it was
    texts = _texts(kept_words)
    old = tok(texts, padding=True, return_tensors="pt")
    new = new_tok(texts, padding=True, return_tensors="pt")
    assert torch.equal(id_map[old["input_ids"]], new["input_ids"])  # the same pieces, renumbered
    assert torch.equal(old["attention_mask"], new["attention_mask"]) and old["attention_mask"].min() == 0
    with torch.no_grad():
        a = model(input_ids=old["input_ids"], attention_mask=old["attention_mask"])
        b = trimmed(input_ids=new["input_ids"], attention_mask=new["attention_mask"])
    kept_ids = torch.tensor(sorted(set(keep) | set(tok.all_special_ids)))
    if base:
        torch.testing.assert_close(b.last_hidden_state, a.last_hidden_state, rtol=0, atol=0)
    else:  # the head's rows are the kept tokens' and stay tied to the embedding
        torch.testing.assert_close(b.logits, a.logits[..., kept_ids], rtol=1e-6, atol=1e-6)
        assert trimmed.get_output_embeddings().weight is trimmed.get_input_embeddings().weight
    d = model.config.hidden_size
    assert count(model)["params_embeddings"] - count(trimmed)["params_embeddings"] == (len(tok) - n_kept) * d
    assert count(model)["params_non_embedding"] == count(trimmed)["params_non_embedding"]

    # a dropped word is [UNK]; the tokenizer and model reload with the standard classes
    dropped = WORDS[0]
    assert new_tok.convert_ids_to_tokens(new_tok(f"{kept_words[0]} {dropped}")["input_ids"]) == \
        ["[CLS]", kept_words[0], "[UNK]", "[SEP]"]
    trimmed.save_pretrained(tmp_path / "trimmed")
    new_tok.save_pretrained(tmp_path / "trimmed")
    loaded = (AutoModel if base else AutoModelForMaskedLM).from_pretrained(tmp_path / "trimmed").eval()
    loaded_tok = AutoTokenizer.from_pretrained(tmp_path / "trimmed")
    assert isinstance(loaded, BertModel if base else BertForMaskedLM)
    assert torch.equal(loaded_tok(texts, padding=True, return_tensors="pt")["input_ids"], new["input_ids"])
    with torch.no_grad():
        c = loaded(input_ids=new["input_ids"], attention_mask=new["attention_mask"])
    torch.testing.assert_close(c.last_hidden_state if base else c.logits,
                               b.last_hidden_state if base else b.logits, rtol=0, atol=0)


def test_bad_arguments_are_named(tiny):
    from transformers import PreTrainedTokenizerFast

    model, tok = tiny
    with pytest.raises(ValueError, match="keep must hold token ids"):
        trim_vocabulary(model, tok, [len(tok)])
    with pytest.raises(ValueError, match="keep must hold token ids"):
        trim_vocabulary(model, tok, [True])
    with pytest.raises(ValueError, match="tokenizer must be a BERT WordPiece"):
        trim_vocabulary(model, PreTrainedTokenizerFast(tokenizer_object=tok.backend_tokenizer), [5])
    model.resize_token_embeddings(len(tok) + 3)
    with pytest.raises(ValueError, match="model: its input embedding has"):
        trim_vocabulary(model, tok, [5])
