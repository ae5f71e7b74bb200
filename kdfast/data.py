"""Text data: loading local files with ``datasets``, tokenising, MLM masking."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from torch import Tensor

_BUILDERS = {".txt": "text", ".text": "text", ".json": "json", ".jsonl": "json", ".csv": "csv", ".tsv": "csv",
             ".parquet": "parquet"}


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
    if len(exts) != 1 or next(iter(exts)) not in _BUILDERS:
        raise ValueError(f"data files must share one extension among {sorted(_BUILDERS)}, got {sorted(exts)}")
    ext = next(iter(exts))
    kwargs = {"delimiter": "\t"} if ext == ".tsv" else {}
    ds = datasets.load_dataset(_BUILDERS[ext], data_files=[str(p) for p in paths], split="train", **kwargs)
    if text_column not in ds.column_names:
        raise ValueError(f"text_column {text_column!r} not in the data's columns {ds.column_names}")
    return [t for t in ds[text_column] if isinstance(t, str) and t.strip()]


def files_sha256(files: list[str]) -> str:
    h = hashlib.sha256()
    for f in files:
        h.update(Path(f).read_bytes())
    return h.hexdigest()


def mask_tokens(
    input_ids: Tensor,
    attention_mask: Tensor,
    *,
    special_ids: list[int],
    mask_id: int,
    vocab_size: int,
    probability: float = 0.15,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """BERT's MLM corruption: choose each real, non-special token with ``probability``; of the
    chosen, 80% become ``mask_id``, 10% a random token, 10% stay. Returns (corrupted ids, labels)
    with labels = original id at chosen positions and -100 elsewhere."""
    if not 0.0 < probability < 1.0:
        raise ValueError(f"probability must be in (0, 1), got {probability}")
    candidates = attention_mask.bool() & ~torch.isin(input_ids, torch.tensor(special_ids, dtype=input_ids.dtype))
    chosen = (torch.rand(input_ids.shape, generator=generator) < probability) & candidates
    labels = torch.where(chosen, input_ids, torch.full_like(input_ids, -100))
    r = torch.rand(input_ids.shape, generator=generator)
    random_ids = torch.randint(0, vocab_size, input_ids.shape, generator=generator, dtype=input_ids.dtype)
    out = torch.where(chosen & (r < 0.8), torch.full_like(input_ids, mask_id), input_ids)
    out = torch.where(chosen & (r >= 0.8) & (r < 0.9), random_ids, out)
    return out, labels
