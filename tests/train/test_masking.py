"""MLM masking with DistilBERT's token-frequency smoothing (kdfast.data)."""

import pytest
import torch

from kdfast.data import count_tokens, mask_tokens, token_mask_weights

V, SPECIAL, MASK = 40, [0, 1, 2], 2


def zipf_batch(seed, rows=64, length=48):
    """Ids drawn from a Zipf-like law (token 3 most frequent), rows padded at random lengths."""
    g = torch.Generator().manual_seed(seed)
    probs = 1.0 / torch.arange(1, V - 2, dtype=torch.double)
    ids = 3 + torch.multinomial(probs, rows * length, replacement=True, generator=g).reshape(rows, length)
    lengths = torch.randint(length // 2, length + 1, (rows,), generator=g)
    am = (torch.arange(length)[None] < lengths[:, None]).long()
    ids = torch.where(am.bool(), ids, torch.zeros_like(ids))
    ids[:, 0] = 1  # a special token at every row start: never masked
    return ids, am


def test_weights_follow_counts():
    counts = torch.randint(0, 1000, (V,), generator=torch.Generator().manual_seed(0))
    w = token_mask_weights(counts, 0.7, SPECIAL)
    assert torch.all(w[SPECIAL] == 0)
    rest = [j for j in range(V) if j not in SPECIAL]
    torch.testing.assert_close(w[rest], counts[rest].double().clamp_min(1) ** -0.7)
    with pytest.raises(ValueError, match="smoothing"):
        token_mask_weights(counts, -1.0)
    with pytest.raises(ValueError, match="counts"):
        token_mask_weights(torch.zeros(0))


def test_frequent_tokens_masked_less_budget_and_80_10_10():
    ids, am = zipf_batch(1)
    counts = count_tokens(ids, am, V)
    assert int(counts.sum()) == int(am.sum())
    w = token_mask_weights(counts, 0.7, SPECIAL)
    candidates = am.bool() & (ids > 2)
    chosen_per_token = torch.zeros(V, dtype=torch.double)
    n_chosen, n_candidates, n_mask, n_keep = 0, 0, 0, 0
    for seed in range(200):
        g = torch.Generator().manual_seed(1000 + seed)
        out, labels = mask_tokens(ids, am, special_ids=SPECIAL, mask_id=MASK, vocab_size=V, token_weights=w,
                                  generator=g)
        chosen = labels != -100
        assert not bool((chosen & ~candidates).any())  # never padding or special tokens
        assert torch.equal(labels[chosen], ids[chosen])
        chosen_per_token += torch.bincount(ids[chosen], minlength=V).double()
        n_chosen += int(chosen.sum())
        n_candidates += int(candidates.sum())
        n_mask += int((out[chosen] == MASK).sum())
        n_keep += int((out[chosen] == ids[chosen]).sum())
        assert torch.equal(out[~chosen], ids[~chosen])
    assert abs(n_chosen / n_candidates - 0.15) < 0.002  # the budget: 15% of the candidate tokens
    # 80/10/10 (a random replacement may hit the original id: 1/V of the 10%)
    assert abs(n_mask / n_chosen - 0.8) < 0.02
    assert abs(n_keep / n_chosen - (0.1 + 0.1 / V)) < 0.02
    rate = chosen_per_token / (200 * counts.double()).clamp_min(1)
    frequent, rare = 3, int(torch.nonzero(counts[3:] >= 5).max()) + 3
    assert counts[frequent] > 10 * counts[rare]
    assert rate[frequent] < rate[rare] / 2  # the most frequent token is masked far less often per occurrence
    # the same batch under plain BERT masking: no preference by frequency
    plain = []
    for seed in range(200):
        _, labels = mask_tokens(ids, am, special_ids=SPECIAL, mask_id=MASK, vocab_size=V,
                                generator=torch.Generator().manual_seed(seed))
        plain.append(torch.bincount(ids[labels != -100], minlength=V).double())
    plain_rate = torch.stack(plain).sum(0) / (200 * counts.double()).clamp_min(1)
    assert abs(plain_rate[frequent] / plain_rate[rare] - 1) < 0.5  # uniform masking: no such preference


def test_bad_token_weights():
    ids, am = zipf_batch(2, rows=4, length=8)
    kw = dict(special_ids=SPECIAL, mask_id=MASK, vocab_size=V)
    with pytest.raises(ValueError, match="token_weights"):
        mask_tokens(ids, am, token_weights=torch.ones(V - 1), **kw)
    with pytest.raises(ValueError, match="token_weights"):
        mask_tokens(ids, am, token_weights=-torch.ones(V), **kw)
    with pytest.raises(ValueError, match="attention_mask"):
        count_tokens(ids, am[:, :3], V)
