"""Text data: loading local files with ``datasets`` (whole, or streamed for corpora larger than
memory), tokenising, packing, MLM masking, and the checks every command shares (data files that are
not text, ``max_length`` beyond the model's positions)."""

from __future__ import annotations

import codecs
import hashlib
import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

# file extension -> the ``datasets`` builder that reads it (shared with kdfast.train.glue)
DATASET_BUILDERS = {".txt": "text", ".text": "text", ".json": "json", ".jsonl": "json", ".csv": "csv",
                    ".tsv": "csv", ".parquet": "parquet", ".arrow": "arrow"}
BINARY_BUILDERS = ("parquet", "arrow")  # not checked as UTF-8 text


@contextmanager
def quiet_datasets() -> Iterator[None]:
    """No progress bars or parse-error log lines from ``datasets``: a failure surfaces as one ValueError."""
    import datasets

    logger = logging.getLogger("datasets")
    level, bars_off = logger.level, datasets.is_progress_bar_enabled() is False
    logger.setLevel(logging.CRITICAL)
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        logger.setLevel(level)
        if not bars_off:
            datasets.enable_progress_bars()


def root_cause_line(e: BaseException) -> str:
    """'Type: first line' of the innermost exception ``datasets`` wrapped (pandas / pyarrow / json
    each have their own parse errors)."""
    root = e
    while root.__cause__ is not None or root.__context__ is not None:
        root = root.__cause__ or root.__context__
    return f"{type(root).__name__}: {(str(root).splitlines() or [''])[0][:300]}"


def check_text_file(path: Path, chunk: int = 1 << 20) -> None:
    """ValueError unless ``path`` is UTF-8 text without NUL bytes (a binary file, or one in
    Latin-1 or another legacy encoding, would otherwise be read as garbage or fail deep inside
    ``datasets``). Read in chunks: memory stays bounded for any file size."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    with open(path, "rb") as f:
        while block := f.read(chunk):
            nul = block.find(b"\0")
            if nul >= 0:
                raise ValueError(f"data file {path} is binary, not text (NUL byte at offset {offset + nul})")
            try:
                decoder.decode(block)
            except UnicodeDecodeError as e:
                raise ValueError(f"data file {path} is not UTF-8 text (byte 0x{block[e.start]:02x} at offset "
                                 f"{offset + e.start}); convert it, e.g. with iconv -f latin1 -t utf-8") from None
            offset += len(block)
    try:
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        raise ValueError(f"data file {path} is not UTF-8 text (it ends inside a multi-byte character)") from None


def load_texts(files: list[str], text_column: str = "text") -> list[str]:
    """Non-empty texts from local files via ``datasets.load_dataset`` (txt: one text per line;
    json/jsonl/csv/tsv/parquet: the ``text_column`` field). No download: paths must exist.

    Raises ValueError (one line, naming the file) for a missing path, a directory, a binary or
    non-UTF-8 file, a file ``datasets`` cannot parse, or files without any non-blank text."""
    import datasets

    if not files:
        raise ValueError("data files: at least one file is required")
    paths = check_data_files(files)
    exts = {p.suffix.lower() for p in paths}
    if len(exts) != 1 or next(iter(exts)) not in DATASET_BUILDERS:
        raise ValueError(f"data files must share one extension among {sorted(DATASET_BUILDERS)}, got {sorted(exts)}")
    ext = next(iter(exts))
    if DATASET_BUILDERS[ext] not in BINARY_BUILDERS:
        for p in paths:
            check_text_file(p)
    names = ", ".join(str(p) for p in paths[:3]) + (", ..." if len(paths) > 3 else "")
    if all(p.stat().st_size == 0 for p in paths):
        raise ValueError(f"data files {names} are empty")
    kwargs = {"delimiter": "\t"} if ext == ".tsv" else {}
    with quiet_datasets():
        try:
            ds = datasets.load_dataset(DATASET_BUILDERS[ext], data_files=[str(p) for p in paths if p.stat().st_size],
                                       split="train", **kwargs)
        except Exception as e:  # datasets wraps each parser's own error type
            raise ValueError(f"data files {names} could not be read as {ext}: {root_cause_line(e)}") from None
    if text_column not in ds.column_names:
        raise ValueError(f"text_column {text_column!r} not in the data's columns {ds.column_names}")
    texts = [t for t in ds[text_column] if isinstance(t, str) and t.strip()]
    if not texts:
        raise ValueError(f"data files {names} hold no non-blank text")
    return texts


def model_positions(model_dir: str | Path) -> int | None:
    """``max_position_embeddings`` of the model in ``model_dir`` (None when its config has none);
    ValueError when ``config.json`` is missing or unreadable."""
    config = Path(model_dir) / "config.json"
    try:
        raw = json.loads(config.read_bytes())
    except (OSError, ValueError) as e:
        raise ValueError(f"{config} is not a readable model configuration ({' '.join(str(e).split())[:200]})") from None
    positions = raw.get("max_position_embeddings") if isinstance(raw, dict) else None
    return positions if isinstance(positions, int) and not isinstance(positions, bool) and positions > 0 else None


def check_max_length(max_length: int, model_dir: str | Path, name: str = "max_length", minimum: int = 2) -> int:
    """``max_length`` if it is an int in [``minimum``, the ``max_position_embeddings`` of the model
    in ``model_dir``], else ValueError naming ``name``: checked before any work, so a run never
    fails on its first batch (or in a cache build) with an index error in the position embeddings."""
    if isinstance(max_length, bool) or not isinstance(max_length, int):
        raise ValueError(f"{name} must be an int, got {type(max_length).__name__} {max_length!r}")
    if max_length < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {max_length}")
    positions = model_positions(model_dir)
    if positions is not None and max_length > positions:
        raise ValueError(f"{name} {max_length} exceeds the {positions} positions of the model in {model_dir} "
                         f"(max_position_embeddings)")
    return max_length


def check_data_files(files: list[str]) -> list[Path]:
    """The paths of ``files``; ValueError naming the first that is missing or a directory."""
    paths = [Path(f) for f in files]
    for p in paths:
        if p.is_dir():
            raise ValueError(f"data file {p} is a directory, not a file")
        if not p.is_file():
            raise ValueError(f"data file {p} does not exist")
    return paths


def files_sha256(files: list[str]) -> str:
    """One sha256 over the contents of ``files`` in order (read in chunks)."""
    h = hashlib.sha256()
    for p in check_data_files(files):
        with open(p, "rb") as f:
            while block := f.read(1 << 22):
                h.update(block)
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


def pack_texts(tokenizer, texts: list[str], max_length: int) -> tuple[Tensor, Tensor]:
    """Documents packed into full rows (RoBERTa's FULL-SENTENCES, the BERT / DistilBERT pretraining
    data): (input_ids, attention_mask), both int64 [R, ``max_length``], as ``tokenizer(texts,
    padding="max_length", truncation=True)`` gives for padded rows, but without truncation or padding.

    Each text is tokenised without special tokens and the stream S = d_1 [SEP] d_2 [SEP] ... [SEP] d_n
    is cut into bodies of B = ``max_length`` - 2 tokens; row r is [CLS] S[r*B : (r+1)*B] [SEP]. A long
    document continues into the next row; every token of every text appears exactly once, in order,
    and only the last row can be shorter (padded with ``pad_token_id``, attention_mask 0 there).
    Texts with no tokens are skipped. Rows attend across documents, as in those recipes.

    ValueError for ``max_length`` < 3, a tokenizer without [CLS], [SEP] or [PAD], or no tokens at all."""
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 3:
        raise ValueError(f"max_length must be an int >= 3 to pack rows ([CLS] + tokens + [SEP]), got {max_length!r}")
    cls_id, sep_id, pad_id = tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id
    if cls_id is None or sep_id is None or pad_id is None:
        raise ValueError("tokenizer must have [CLS], [SEP] and [PAD] tokens to pack rows")
    # verbose=False: no "longer than the model's maximum" warning, rows are cut below
    docs = [d for d in tokenizer(list(texts), add_special_tokens=False, truncation=False,
                                 verbose=False)["input_ids"] if d] if texts else []
    if not docs:
        raise ValueError("texts: nothing to pack (no text gives any token)")
    stream: list[int] = list(docs[0])
    for doc in docs[1:]:
        stream.append(sep_id)
        stream.extend(doc)
    body = max_length - 2
    n_rows = -(-len(stream) // body)
    input_ids = torch.full((n_rows, max_length), pad_id, dtype=torch.int64)
    attention_mask = torch.zeros((n_rows, max_length), dtype=torch.int64)
    flat = torch.tensor(stream, dtype=torch.int64)
    full = (n_rows - 1) * body  # every row but the last is full
    input_ids[:-1, 1:-1] = flat[:full].view(n_rows - 1, body)
    input_ids[:, 0] = cls_id
    input_ids[:-1, -1] = sep_id
    attention_mask[:-1] = 1
    rest = len(stream) - full
    input_ids[-1, 1:1 + rest] = flat[full:]
    input_ids[-1, 1 + rest] = sep_id
    attention_mask[-1, :2 + rest] = 1
    return input_ids, attention_mask


# --- streamed corpora ----------------------------------------------------------------------------

def expand_data_paths(paths: list[str]) -> list[Path]:
    """Files named by ``paths``, a directory standing for the files under it (recursively, sorted by
    path) whose extension ``datasets`` reads (:data:`DATASET_BUILDERS`; hidden files skipped).
    ValueError naming the path: missing, a directory with no such file, or files of several kinds."""
    out: list[Path] = []
    for raw in paths:
        p = Path(raw)
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in DATASET_BUILDERS
                           and not any(part.startswith(".") for part in f.relative_to(p).parts))
            if not found:
                raise ValueError(f"data directory {p} holds no data file ({', '.join(sorted(DATASET_BUILDERS))})")
            out += found
        elif p.is_file():
            out.append(p)
        else:
            raise ValueError(f"data file {p} does not exist")
    builders = {DATASET_BUILDERS.get(f.suffix.lower()) for f in out}
    if None in builders or len(builders) != 1:
        raise ValueError(f"data files must be of one kind among {sorted(DATASET_BUILDERS)}, got "
                         f"{sorted({f.suffix.lower() or '(none)' for f in out})}")
    return out


TEXT_BLOCK_BYTES = 32 << 20  # default size of the byte blocks of text and JSON-lines files
SPLIT_BY_BYTES = (".txt", ".text", ".jsonl")  # one record per line: a block starts at any line


@dataclass(frozen=True)
class CorpusBlock:
    """One part of a corpus that is read without reading any other part: row group ``part`` of a
    Parquet file; the lines of a text or JSON-lines file that start in bytes [``start``, ``stop``)
    (block ``part`` of ``block_bytes``); or a whole file of another kind (Arrow, CSV, JSON)."""

    file: Path
    part: int
    start: int = 0
    stop: int = 0


def corpus_blocks(files: list[Path], block_bytes: int = TEXT_BLOCK_BYTES) -> list[CorpusBlock]:
    """The blocks of ``files`` (:func:`expand_data_paths`' output) in corpus order, from file sizes
    and Parquet footers alone (no text is read): a deterministic function of the corpus and
    ``block_bytes``, whatever reads it. Empty files have no block. ValueError for a Parquet file
    whose footer cannot be read."""
    if isinstance(block_bytes, bool) or not isinstance(block_bytes, int) or block_bytes < 1:
        raise ValueError(f"block_bytes must be an int >= 1, got {block_bytes!r}")
    blocks: list[CorpusBlock] = []
    for f in files:
        size = f.stat().st_size
        ext = f.suffix.lower()
        if not size:
            continue
        if ext == ".parquet":
            import pyarrow.parquet as pq

            with _read_errors(f, ".parquet"):
                groups = pq.read_metadata(f).num_row_groups
            blocks += [CorpusBlock(f, i) for i in range(groups)]
        elif ext in SPLIT_BY_BYTES:
            blocks += [CorpusBlock(f, i, i * block_bytes, min(size, (i + 1) * block_bytes))
                       for i in range(-(-size // block_bytes))]
        else:
            blocks.append(CorpusBlock(f, 0, 0, size))
    return blocks


def iter_block_texts(block: CorpusBlock, text_column: str = "text") -> Iterator[str]:
    """The non-blank texts of one :class:`CorpusBlock`, in order, reading only that block (and, for
    a byte block, the end of the line its range cuts). Parquet and line blocks are read directly
    (a row group through pyarrow; lines as ``datasets``' text and JSON loaders split them); other
    kinds stream through ``datasets.load_dataset(..., streaming=True)``. ValueError (one line,
    naming the file) for data that cannot be parsed, or a ``text_column`` the data lacks."""
    ext = block.file.suffix.lower()
    if ext == ".parquet":
        yield from _parquet_texts(block, text_column)
    elif ext in SPLIT_BY_BYTES:
        yield from _line_texts(block, text_column, json_lines=ext == ".jsonl")
    else:
        yield from _datasets_texts(block.file, text_column)


def iter_texts(files: list[Path], text_column: str = "text", block_bytes: int = TEXT_BLOCK_BYTES) -> Iterator[str]:
    """The non-blank texts of ``files`` (:func:`expand_data_paths`' output) in order, block by block
    (:func:`corpus_blocks`, :func:`iter_block_texts`): memory does not grow with the corpus. Same
    texts, same order as :func:`load_texts`."""
    if DATASET_BUILDERS[files[0].suffix.lower()] not in BINARY_BUILDERS:
        for p in files:
            check_text_file(p)
    for block in corpus_blocks(files, block_bytes):
        yield from iter_block_texts(block, text_column)


class _MissingColumn(ValueError):
    pass


def _missing_column(text_column: str, columns) -> ValueError:
    return _MissingColumn(f"text_column {text_column!r} not in the data's columns {sorted(columns)}")


@contextmanager
def _read_errors(file: Path, kind: str) -> Iterator[None]:
    """Any parser's error (pyarrow's, pandas', ``datasets``' wrappers) as one ValueError naming ``file``."""
    try:
        yield
    except _MissingColumn:
        raise
    except Exception as e:
        raise ValueError(f"data file {file} could not be read as {kind}: {root_cause_line(e)}") from None


def _parquet_texts(block: CorpusBlock, text_column: str) -> Iterator[str]:
    import pyarrow.parquet as pq

    with _read_errors(block.file, ".parquet"):
        pf = pq.ParquetFile(block.file)
        names = pf.schema_arrow.names
        if text_column not in names:
            raise _missing_column(text_column, names)
        batches = pf.iter_batches(batch_size=1024, row_groups=[block.part], columns=[text_column], use_threads=False)
        for batch in batches:
            yield from (t for t in batch.column(0).to_pylist() if isinstance(t, str) and t.strip())


def _line_texts(block: CorpusBlock, text_column: str, json_lines: bool) -> Iterator[str]:
    """The texts of the lines starting in [start, stop): a text line split at universal newlines as
    ``datasets``' text loader does, or one JSON object per line."""
    first = True
    with open(block.file, "rb") as f:
        pos = block.start
        if pos:  # the line that the previous block's range cut belongs to that block
            f.seek(pos - 1)
            pos += len(f.readline()) - 1
        while pos < block.stop:
            line = f.readline()
            if not line:
                break
            offset, pos = pos, pos + len(line)
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"data file {block.file} is not UTF-8 text (byte 0x{line[e.start]:02x} at offset "
                                 f"{offset + e.start})") from None
            if not json_lines:
                yield from (t for t in text.replace("\r\n", "\n").replace("\r", "\n").split("\n") if t.strip())
                continue
            if not text.strip():
                continue
            try:
                record = json.loads(text)
            except ValueError as e:
                raise ValueError(f"data file {block.file} could not be read as .jsonl: the line at byte {offset}: "
                                 f"{str(e)[:200]}") from None
            if not isinstance(record, dict):
                raise ValueError(f"data file {block.file} could not be read as .jsonl: the line at byte {offset} "
                                 f"is not a JSON object")
            if first and text_column not in record:
                raise _missing_column(text_column, record)
            first = False
            t = record.get(text_column)
            if t is not None and not isinstance(t, str):
                raise ValueError(f"data file {block.file} could not be read as .jsonl: the line at byte {offset} "
                                 f"holds {type(t).__name__} in text_column {text_column!r}, not text")
            if t is not None and t.strip():
                yield t


def _datasets_texts(file: Path, text_column: str) -> Iterator[str]:
    """The non-blank texts of one file streamed through ``datasets`` (kinds whose records cannot
    be located without reading the file from its start)."""
    import datasets

    kwargs = {"delimiter": "\t"} if file.suffix.lower() == ".tsv" else {}
    with quiet_datasets(), _read_errors(file, file.suffix):
        ds = datasets.load_dataset(DATASET_BUILDERS[file.suffix.lower()], data_files=[str(file)], split="train",
                                   streaming=True, **kwargs)
        first = True
        for example in ds:
            if first:
                if text_column not in example:
                    raise _missing_column(text_column, example)
                first = False
            t = example[text_column]
            if isinstance(t, str) and t.strip():
                yield t


def iter_padded_rows(tokenizer, texts: Iterator[str], max_length: int, *, want=None,
                     chunk: int = 256) -> Iterator[tuple[int, Tensor | None, Tensor | None]]:
    """(row index, input_ids [L], attention_mask [L]) for each text, as ``tokenizer(texts,
    padding="max_length", truncation=True)`` gives them, tokenised ``chunk`` texts at a time.
    ``want(row) -> bool``: rows it refuses are yielded as (row, None, None), never tokenised."""
    buf: list[tuple[int, str]] = []

    def flush():
        enc = tokenizer([t for _, t in buf], padding="max_length", truncation=True, max_length=max_length,
                        return_tensors="pt")
        for j, (r, _) in enumerate(buf):
            yield r, enc["input_ids"][j], enc["attention_mask"][j]
        buf.clear()

    for row, text in enumerate(texts):
        if want is not None and not want(row):
            yield from flush() if buf else ()
            yield row, None, None
            continue
        buf.append((row, text))
        if len(buf) >= chunk:
            yield from flush()
    if buf:
        yield from flush()


def iter_packed_rows(tokenizer, texts: Iterator[str], max_length: int, *, chunk: int = 256,
                     allow_empty: bool = False) -> Iterator[tuple[int, Tensor, Tensor]]:
    """The rows of :func:`pack_texts` (same ids, same order), from a stream of texts: only the current
    row's tokens and ``chunk`` texts are held. ValueError when no text gives any token, unless
    ``allow_empty`` (then no row)."""
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 3:
        raise ValueError(f"max_length must be an int >= 3 to pack rows ([CLS] + tokens + [SEP]), got {max_length!r}")
    cls_id, sep_id, pad_id = tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id
    if cls_id is None or sep_id is None or pad_id is None:
        raise ValueError("tokenizer must have [CLS], [SEP] and [PAD] tokens to pack rows")
    body = max_length - 2
    stream: list[int] = []
    started, row = False, 0

    def full_rows():
        nonlocal stream, row
        while len(stream) > body:  # a row is emitted once more tokens follow it: only the last may be short
            ids = torch.tensor([cls_id, *stream[:body], sep_id], dtype=torch.int64)
            stream = stream[body:]
            yield row, ids, torch.ones(max_length, dtype=torch.int64)
            row += 1

    def docs(batch):
        return [d for d in tokenizer(batch, add_special_tokens=False, truncation=False, verbose=False)["input_ids"]
                if d]

    batch: list[str] = []
    for text in texts:
        batch.append(text)
        if len(batch) < chunk:
            continue
        for doc in docs(batch):
            if started:
                stream.append(sep_id)
            stream.extend(doc)
            started = True
        batch.clear()
        yield from full_rows()
    for doc in docs(batch) if batch else ():
        if started:
            stream.append(sep_id)
        stream.extend(doc)
        started = True
    yield from full_rows()
    if not started and allow_empty:
        return
    if not started:
        raise ValueError("texts: nothing to pack (no text gives any token)")
    ids = torch.full((max_length,), pad_id, dtype=torch.int64)
    am = torch.zeros(max_length, dtype=torch.int64)
    ids[0] = cls_id
    ids[1:1 + len(stream)] = torch.tensor(stream, dtype=torch.int64)
    ids[1 + len(stream)] = sep_id
    am[:2 + len(stream)] = 1
    yield row, ids, am
