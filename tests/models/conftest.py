import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def randomize_(model, std=0.5):
    """Give every parameter random values (NoNorm/LayerNorm scales included) so that a missed term,
    swapped bias or wrong residual shows up in the outputs."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("LayerNorm.weight"):
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, std)
    return model


@pytest.fixture
def randomize():
    return randomize_


def padded_batch(vocab, batch=3, length=11, pad_from=(None, 7, 3), generator=None):
    """Random ids, an attention mask with padding (row i padded from pad_from[i]) and random token types."""
    ids = torch.randint(1, vocab, (batch, length), generator=generator)
    mask = torch.ones(batch, length, dtype=torch.long)
    for row, start in enumerate(pad_from[:batch]):
        if start is not None:
            mask[row, start:] = 0
            ids[row, start:] = 0
    token_types = torch.randint(0, 2, (batch, length), generator=generator)
    return ids, mask, token_types


@pytest.fixture
def batch():
    return padded_batch
