"""Text data: loading local files with ``datasets``, tokenising, MLM masking."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from torch import Tensor

# file extension -> the ``datasets`` builder that reads it (shared with kdfast.train.glue)
DATASET_BUILDERS = {".txt": "text", ".text": "text", ".json": "json", ".jsonl": "json", ".csv": "csv",
                    ".tsv": "csv", ".parquet": "parquet"}


def load_texts(files: list[str], text_column: str = "text") -> list[str]:
    """Non-empty texts from local files via ``datasets.load_dataset`` (txt: one text per line;
    json/jsonl/csv/tsv/parquet: the ``text_column`` field). No download: paths must exist."""
    import datasets

    if not files:
        raise ValueError("data files: at least one file is required")
    paths = [Path(f) for f in files]
    for p in paths:
        if not p.is_file():
            raise ValueError(f"data file {p} does not exist")
    exts = {p.suffix.lower() for p in paths}
    if len(exts) != 1 or next(iter(exts)) not in DATASET_BUILDERS:
        raise ValueError(f"data files must share one extension among {sorted(DATASET_BUILDERS)}, got {sorted(exts)}")
    ext = next(iter(exts))
    kwargs = {"delimiter": "\t"} if ext == ".tsv" else {}
    ds = datasets.load_dataset(DATASET_BUILDERS[ext], data_files=[str(p) for p in paths], split="train", **kwargs)
    if text_column not in ds.column_names:
        raise ValueError(f"text_column {text_column!r} not in the data's columns {ds.column_names}")
    return [t for t in ds[text_column] if isinstance(t, str) and t.strip()]


def files_sha256(files: list[str]) -> str:
    h = hashlib.sha256()
    for f in files:
        h.update(Path(f).read_bytes())
    return h.hexdigest()


def count_tokens(input_ids: Tensor, attention_mask: Tensor, vocab_size: int) -> Tensor:
    """Occurrences of each token id over the real (``attention_mask != 0``) positions: [vocab_size] int64."""
    if input_ids.shape != attention_mask.shape:
        raise ValueError(f"attention_mask {tuple(attention_mask.shape)} must have input_ids' shape "
                         f"{tuple(input_ids.shape)}")
    ids = input_ids[attention_mask.bool()].long()
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
        raise ValueError(f"input_ids must lie in [0, vocab_size={vocab_size})")
    return torch.bincount(ids, minlength=vocab_size)


def token_mask_weights(counts: Tensor, smoothing: float = 0.7, special_ids: list[int] = ()) -> Tensor:
    """DistilBERT's frequency smoothing of MLM masking: w_j = max(count_j, 1)^(-smoothing), 0 for special ids.

    Used as ``mask_tokens(..., token_weights=w)``: a position holding token j is chosen with
    probability proportional to w_j, so frequent tokens are masked less often (``smoothing=0``:
    uniform, BERT's masking)."""
    if counts.dim() != 1 or counts.numel() == 0:
        raise ValueError(f"counts must be a non-empty [vocab_size] tensor, got shape {tuple(counts.shape)}")
    if not smoothing >= 0:
        raise ValueError(f"smoothing must be >= 0, got {smoothing}")
    weights = counts.double().clamp_min(1.0).pow(-float(smoothing))
    if len(special_ids):
        weights[torch.as_tensor(list(special_ids), dtype=torch.long)] = 0.0
    return weights


def mask_tokens(
    input_ids: Tensor,
    attention_mask: Tensor,
    *,
    special_ids: list[int],
    mask_id: int,
    vocab_size: int,
    probability: float = 0.15,
    generator: torch.Generator | None = None,
    token_weights: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """BERT's MLM corruption: choose each real, non-special token with ``probability``; of the
    chosen, 80% become ``mask_id``, 10% a random token, 10% stay. Returns (corrupted ids, labels)
    with labels = original id at chosen positions and -100 elsewhere.

    ``token_weights`` ([vocab_size], e.g. :func:`token_mask_weights`): DistilBERT's smoothed
    masking instead. Of the n candidate positions of the batch, n * ``probability`` are chosen
    (the fraction stochastically rounded, so the expected count is exactly that) without
    replacement, position i with probability proportional to token_weights[input_ids[i]].
    """
    if not 0.0 < probability < 1.0:
        raise ValueError(f"probability must be in (0, 1), got {probability}")
    candidates = attention_mask.bool() & ~torch.isin(input_ids, torch.tensor(special_ids, dtype=input_ids.dtype))
    if token_weights is None:
        chosen = (torch.rand(input_ids.shape, generator=generator) < probability) & candidates
    else:
        chosen = _weighted_choice(input_ids, candidates, token_weights, vocab_size, probability, generator)
    labels = torch.where(chosen, input_ids, torch.full_like(input_ids, -100))
    r = torch.rand(input_ids.shape, generator=generator)
    random_ids = torch.randint(0, vocab_size, input_ids.shape, generator=generator, dtype=input_ids.dtype)
    out = torch.where(chosen & (r < 0.8), torch.full_like(input_ids, mask_id), input_ids)
    out = torch.where(chosen & (r >= 0.8) & (r < 0.9), random_ids, out)
    return out, labels


def _weighted_choice(input_ids: Tensor, candidates: Tensor, token_weights: Tensor, vocab_size: int,
                     probability: float, generator: torch.Generator | None) -> Tensor:
    if token_weights.dim() != 1 or token_weights.shape[0] != vocab_size:
        raise ValueError(f"token_weights must have shape [vocab_size={vocab_size}], got {tuple(token_weights.shape)}")
    if not bool((token_weights >= 0).all()) or not bool(torch.isfinite(token_weights).all()):
        raise ValueError("token_weights must be finite and >= 0")
    flat = candidates.reshape(-1)
    w = torch.where(flat, token_weights.double()[input_ids.reshape(-1).long().clamp(0, vocab_size - 1)], 0.0)
    n_candidates = int(flat.sum())
    exact = probability * n_candidates
    # stochastic rounding: E[n] = probability * n_candidates even for short batches
    n = int(exact) + int(torch.rand((), generator=generator).item() < exact - int(exact))
    n = min(n, int((w > 0).sum()))
    chosen = torch.zeros_like(flat)
    if n > 0:
        chosen[torch.multinomial(w, n, replacement=False, generator=generator)] = True
    return chosen.reshape(input_ids.shape)
