"""Writing a teacher cache: ``build_cache`` runs the teacher over local text once and stores what
distillation needs (format: :mod:`kdfast.cache.format`); an interrupted build resumes after the
last complete shard and ends identical to an uninterrupted one."""

from __future__ import annotations

import hashlib
import math
import os
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save as safetensors_bytes

from kdfast.cache.format import (
    HEAD_FILE,
    MANIFEST,
    PART_RE,
    SHARD_RE,
    CacheError,
    Manifest,
    ShardInfo,
    _is_int,
    _is_number,
    atomic_write_bytes,
    is_kdfast_leftover,
    part_name,
    read_records,
    sha256_file,
    teacher_weights_sha256,
    tokenizer_sha256,
    validate_settings,
    write_block_record,
    write_record,
)
from kdfast.cache.head import capture_head_input, head_projection
from kdfast.cache.ranks import current_ranks, finish, fold_records
from kdfast.capture import capture
from kdfast.data import (
    BINARY_BUILDERS,
    DATASET_BUILDERS,
    TEXT_BLOCK_BYTES,
    CorpusBlock,
    check_max_length,
    check_text_file,
    corpus_blocks,
    expand_data_paths,
    files_sha256,
    iter_block_texts,
    iter_packed_rows,
    iter_padded_rows,
    mask_tokens,
)
from kdfast.models.teachers import check_teacher_architecture

HIDDEN_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "int8": torch.int8}


def _stored_projection(x: torch.Tensor) -> torch.Tensor:
    """A captured ``[B, H, L, d_head]`` query or key as the cache stores it (format version 1): the
    projection's output ``[B, L, H * d_head]``, unscaled, fp16."""
    b, heads, length, d_head = x.shape
    return x.transpose(1, 2).reshape(b, length, heads * d_head).to(torch.float16)


def write_shard(cache_dir: Path, name: str, tensors: dict[str, torch.Tensor], block: int = 0) -> ShardInfo:
    """Write one shard (or part) atomically (temporary name, fsync, rename, fsync the directory)."""
    data = safetensors_bytes({k: v.contiguous() for k, v in tensors.items()})
    atomic_write_bytes(cache_dir / name, data)
    rows = int(tensors["input_ids"].shape[0])
    tokens = int(tensors["attention_mask"].sum())
    return ShardInfo(file=name, rows=rows, tokens=tokens, sha256=hashlib.sha256(data).hexdigest(), block=block)


def quantize_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row (per token) symmetric int8: q = round(x / s), s = max|x| / 127 over the last dim."""
    scale = x.float().abs().amax(-1).clamp_min(1e-12) / 127.0
    q = torch.round(x.float() / scale[..., None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (q.float() * scale.float()[..., None]).to(dtype)


def parse_logits_option(text: str) -> tuple[str, int, str | None]:
    """``topk:K`` | ``sampled:K`` | ``head`` | ``head:fp16|bf16|int8`` | ``none`` -> (mode, k, head storage dtype)."""
    usage = "logits must be 'topk:K', 'sampled:K' (K >= 1), 'head', 'head:fp16', 'head:bf16', 'head:int8' or 'none'"
    if text == "none":
        return "none", 0, None
    if text == "head" or (isinstance(text, str) and text.startswith("head:")):
        dtype = text.partition(":")[2] or "fp16"
        if dtype not in HIDDEN_DTYPES:
            raise ValueError(f"{usage}, got {text!r}")
        return "head", 0, dtype
    try:
        mode, k = text.split(":")
        k = int(k)
    except (ValueError, AttributeError):
        raise ValueError(f"{usage}, got {text!r}") from None
    if mode not in ("topk", "sampled") or k < 1:
        raise ValueError(f"{usage}, got {text!r}")
    return mode, k, None


def _clean_orphans(cache_dir: Path, manifest: Manifest) -> list[str]:
    """Delete what an interrupted build left behind (and nothing else: ``.git/``, ``.env``,
    ``shard-notes.md`` stay): temporaries, shards not listed, parts not recorded, records of listed
    parts and blocks, and records whose part does not hash to what they say (with that part)."""
    records = read_records(cache_dir, manifest)
    recorded = {info.file for info in records.parts.values() if sha256_file(cache_dir / info.file) == info.sha256}
    recorded |= records.names() - {info.file for info in records.parts.values()}
    listed = {s.file for s in manifest.shards}
    removed = []
    for p in sorted(cache_dir.iterdir()):
        if is_kdfast_leftover(p, listed, recorded):
            p.unlink()
            removed.append(p.name)
    return removed


def _existing_manifest(out: Path) -> Manifest | None:
    """The manifest of ``out`` if it is a kdfast cache, None if ``out`` is absent or holds nothing
    but kdfast's temporaries; CacheError if it is a file or a non-empty directory of something else."""
    if not out.exists():
        if out.is_symlink():
            raise CacheError(f"out {out} is a dangling symbolic link")
        return None
    if not out.is_dir():
        raise CacheError(f"out {out} exists and is not a directory")
    if (out / MANIFEST).exists() or (out / MANIFEST).is_symlink():
        return Manifest.load(out)
    # without a manifest (written before any shard) only temporaries can be kdfast's
    foreign = sorted(p.name for p in out.iterdir() if SHARD_RE.fullmatch(p.name) or PART_RE.fullmatch(p.name)
                     or not is_kdfast_leftover(p, set()))
    if foreign:
        shown = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
        raise CacheError(f"out {out} is neither empty nor a kdfast cache (no {MANIFEST}; it holds {shown}); "
                         "use a new or empty directory")
    return None


def _lock_dir(out: Path) -> int:
    """An exclusive lock on the cache directory, held until the returned descriptor is closed
    (the kernel drops it when a killed build dies, so a stale lock cannot block the next build)."""
    import fcntl

    fd = os.open(out, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise CacheError(f"out {out}: another kdfast cache build is writing to it") from None
    return fd


@contextmanager
def _library_progress_bars(enabled: bool) -> Iterator[None]:
    """Turn transformers' and datasets' own bars ("Loading weights", "Generating train split")
    off while loading when the build runs without progress: a refusal stays one line."""
    import datasets
    from datasets.utils import logging as ds_logging
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled(), ds_logging.is_progress_bar_enabled()
    if not enabled:
        hf_logging.disable_progress_bar()
        datasets.disable_progress_bars()
    try:
        yield
    finally:
        if was[0]:
            hf_logging.enable_progress_bar()
        if was[1]:
            datasets.enable_progress_bars()


def _load_teacher(teacher_path: Path, mode: str):
    """The frozen teacher; with stored logits it must have a trained MLM head (checked as the recipes check it)."""
    from kdfast.models.teachers import load_teacher

    remedy = "build with logits='none' (--logits none)"
    try:
        return load_teacher(teacher_path, mlm_head=mode != "none", remedy=remedy)
    except ValueError as e:
        msg = " ".join(str(e).split())
        if remedy in msg:
            raise CacheError(msg) from None
        model = "AutoModelForMaskedLM" if mode != "none" else "AutoModel"
        raise ValueError(f"teacher {teacher_path}: cannot load it as {model} ({msg[:300]}); "
                         "a teacher without an MLM head needs logits='none'") from None


def build_cache(
    teacher_dir: str,
    data_files: list[str],
    out_dir: str,
    *,
    layers: list[int] | None = None,
    logits: str = "topk:8",
    hidden: str = "fp16",
    qk: bool = False,
    max_length: int = 128,
    batch_size: int = 16,
    rows_per_shard: int = 256,
    temperature: float = 1.0,
    mlm_probability: float = 0.15,
    seed: int = 0,
    text_column: str = "text",
    progress: bool = True,
    packing: bool = False,
    block_bytes: int = TEXT_BLOCK_BYTES,
) -> Manifest:
    """Run the teacher in ``teacher_dir`` (a local ``save_pretrained`` directory) over the texts of
    ``data_files`` and write a cache to ``out_dir``; resume a partial cache built with the same settings.

    ``layers``: hidden-state indices to keep (0 = embeddings; default all); ``logits``: ``topk:K``,
    ``sampled:K`` (at ``temperature``) or ``none``; with logits, inputs are MLM-masked (BERT's
    80/10/10 at ``mlm_probability``, seeded per batch) and logits kept at masked positions only;
    ``hidden``: ``fp16`` | ``bf16`` | ``int8`` | ``none``; ``qk``: also keep each layer's query and key
    projections. ``rows_per_shard`` must be a multiple of ``batch_size`` so that a resumed run
    feeds the teacher exactly the batches an uninterrupted one does. ``packing``: the texts are
    joined with [SEP] into full ``max_length`` rows (:func:`kdfast.data.pack_texts`) instead of one
    padded, truncated row per text, so shards hold almost no padding; a resume with the other value
    is refused.

    The corpus is read block by block (:func:`kdfast.data.corpus_blocks`: Parquet row groups, byte
    ranges of ``block_bytes`` of text and JSON-lines files, other files whole); each block's rows are
    made from its own texts (packed rows do not cross blocks) and masked by a seed of the block and
    row, so under ``torchrun`` each process reads only its own blocks (block ``b`` goes to rank
    ``b mod world_size``) and the cache is the same file for file whatever the number of processes.

    ``out_dir`` must be absent, empty, or a kdfast cache; only files kdfast writes there (shards,
    their temporaries, the manifest) are ever replaced or deleted. Every argument and the teacher
    (an MLM head when logits are kept) are checked before the first write, so a refused build
    leaves nothing behind, and an interrupted one leaves a partial cache that the same call resumes.
    Bad arguments raise ValueError (CacheError for the directory or an existing cache) naming them.
    """
    from transformers import AutoTokenizer

    mode, k, head_dtype = parse_logits_option(logits)
    if hidden not in (*HIDDEN_DTYPES, "none"):
        raise ValueError(f"hidden must be one of {[*HIDDEN_DTYPES, 'none']}, got {hidden!r}")
    for name, value, least in (("batch_size", batch_size, 1), ("rows_per_shard", rows_per_shard, 1),
                               ("max_length", max_length, 2)):
        if not _is_int(value) or value < least:
            raise ValueError(f"{name} must be an integer >= {least}, got {value!r}")
    if rows_per_shard % batch_size:
        raise ValueError(f"rows_per_shard ({rows_per_shard}) must be a multiple of batch_size ({batch_size})")
    if not _is_number(temperature) or not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    if not _is_number(mlm_probability) or not 0 <= mlm_probability <= 1:
        raise ValueError(f"mlm_probability must be a number in [0, 1], got {mlm_probability!r}")
    if not isinstance(packing, bool):
        raise ValueError(f"packing must be True or False, got {packing!r}")
    if not _is_int(seed) or not 0 <= seed < 2**32:
        raise ValueError(f"seed must be an integer in [0, 2**32), got {seed!r}")
    if not isinstance(data_files, (list, tuple)) or not data_files or not all(
            isinstance(f, (str, os.PathLike)) for f in data_files):
        raise ValueError(f"data_files must be a non-empty list of paths, got {data_files!r}")
    if layers is not None and (not isinstance(layers, (list, tuple)) or not all(_is_int(l) for l in layers)):
        raise ValueError(f"layers must be a list of integers, got {layers!r}")
    paths = expand_data_paths([str(f) for f in data_files])  # hashed below, then streamed
    blocks = corpus_blocks(paths, block_bytes)  # from sizes and Parquet footers: no text read
    teacher_path = Path(teacher_dir)
    if not (teacher_path / "config.json").is_file():
        raise ValueError(f"teacher {teacher_dir} is not a local model directory (no config.json)")
    check_teacher_architecture(teacher_path, "teacher")  # from config.json, before any work
    check_max_length(max_length, teacher_path)  # else an IndexError inside the teacher's first batch

    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(teacher_path, local_files_only=True)
    ranks = current_ranks()
    n_layers = config.num_hidden_layers
    layers = list(range(n_layers + 1)) if layers is None else sorted(set(layers))
    if any(not 0 <= l <= n_layers for l in layers):
        raise ValueError(f"layers must lie in [0, {n_layers}] (0 = embeddings), got {layers}")
    settings = {
        "teacher": {"path": str(teacher_path.resolve()), "weights_sha256": teacher_weights_sha256(teacher_path),
                    "model_type": config.model_type, "num_hidden_layers": n_layers,
                    "hidden_size": config.hidden_size, "num_attention_heads": config.num_attention_heads,
                    "vocab_size": config.vocab_size},
        "tokenizer_sha256": tokenizer_sha256(teacher_path),
        "data": {"files": [str(p.resolve()) for p in paths], "sha256": ranks.share(lambda: _corpus_sha256(paths)),
                 "text_column": text_column, "block_bytes": block_bytes},
        "max_length": max_length, "packing": packing, "batch_size": batch_size, "rows_per_shard": rows_per_shard,
        "logits": {"mode": mode, "k": k, "temperature": temperature, **({"dtype": head_dtype} if mode == "head" else {})},
        "mlm": {"probability": mlm_probability, "seed": seed} if mode != "none" else None,
        "hidden": {"layers": layers, "dtype": hidden} if hidden != "none" else None,
        "qk": {"layers": list(range(1, n_layers + 1))} if qk else None,
    }
    try:  # what is written must read back: the reader's schema, applied before writing
        validate_settings(settings, "the settings")
    except CacheError as e:
        raise ValueError(f"teacher {teacher_dir} with these arguments gives settings a cache cannot hold: {e}") from None
    # Everything that can refuse the build runs before the first write, so a refused build leaves
    # nothing behind; a partial cache of the same settings resumes.
    out = Path(out_dir)
    manifest = existing = _existing_manifest(out)
    if manifest is not None and manifest.settings != settings:
        if manifest.shards or manifest.complete:
            diff = sorted(key for key in set(settings) | set(manifest.settings)
                          if settings.get(key) != manifest.settings.get(key))
            raise CacheError(f"{out_dir} holds a cache built with other settings (differing: {', '.join(diff)}); "
                             "use another output directory")
        manifest = None  # a build that stopped before its first shard: nothing to keep
    if manifest is not None and manifest.complete:
        _clean_orphans(out, manifest)
        return manifest
    for info in manifest.shards if manifest is not None and ranks.rank == 0 else ():  # resume over intact shards
        path = out / info.file
        if not path.is_file() or path.is_symlink() or sha256_file(path) != info.sha256:
            raise CacheError(f"{out_dir}: {info.file}, listed in the partial cache's manifest, is missing or "
                             "altered, so the build cannot resume over it; use another output directory")

    tokenizer = AutoTokenizer.from_pretrained(teacher_path, local_files_only=True)
    if len(tokenizer) > config.vocab_size:
        raise ValueError(f"teacher {teacher_dir}: its tokenizer has {len(tokenizer)} ids, beyond the model's "
                         f"vocab_size {config.vocab_size}")
    if mode != "none" and tokenizer.mask_token_id is None:
        raise ValueError(f"teacher {teacher_dir}: its tokenizer has no [MASK] token, so the inputs cannot be "
                         "MLM-masked for logits; build with logits='none'")
    with _library_progress_bars(progress):
        def any_text() -> None:  # rank 0 reads up to the first text only (in its own block 0)
            if next((t for b in blocks for t in iter_block_texts(b, text_column)), None) is None:
                raise ValueError(f"data {', '.join(map(str, data_files))}: no text to cache")

        if existing is None or not existing.shards:  # a cache with listed shards has text
            ranks.share(any_text)
        teacher = _load_teacher(teacher_path, mode)

    # Q/K through kdfast.capture, the head input through a hook, entered before the first write: a
    # teacher they do not support is refused with nothing written
    hooks = ExitStack()
    captured = hooks.enter_context(capture(teacher, hidden_states=False, qk=True)) if qk else None
    head_in = hooks.enter_context(capture_head_input(teacher)) if mode == "head" else None

    lock, bar = None, None
    try:
        if ranks.rank == 0:
            out.mkdir(parents=True, exist_ok=True)
            lock = _lock_dir(out)
            on_disk = Manifest.load(out) if (out / MANIFEST).exists() else None
            if (on_disk is None) != (existing is None) or (on_disk is not None
                                                           and on_disk.to_json() != existing.to_json()):
                raise CacheError(f"{out_dir} changed while this build started (another build?); run it again")
            if manifest is None:
                manifest = Manifest(settings=settings)
            if mode == "head" and manifest.head is None:
                manifest.head = _write_head(out, teacher)
            manifest.save(out)
            _clean_orphans(out, manifest)
            fold_records(out, manifest)
        ranks.barrier()  # rank 0 has cleaned: every rank now sees the same finished shards
        if ranks.rank != 0:
            manifest = Manifest.load(out)
        records = read_records(out, manifest)
        special = list(tokenizer.all_special_ids)
        if progress:
            from tqdm import tqdm

            bar = tqdm(unit="ex", desc=f"teacher cache (rank {ranks.rank} of {ranks.world_size})"
                       if ranks.world_size > 1 else "teacher cache", dynamic_ncols=True)
        ctx = _BuildContext(teacher=teacher, tokenizer=tokenizer, config=config, mode=mode, k=k, hidden=hidden,
                            layers=layers, temperature=temperature, mlm_probability=mlm_probability, seed=seed,
                            special=special, captured=captured, head_in=head_in, head_dtype=head_dtype)
        t0, tokens_done = time.perf_counter(), 0
        with torch.no_grad():
            for b, block in enumerate(blocks):
                if not ranks.owns(b) or b < manifest.blocks_done:
                    continue
                done = set(range(manifest.listed_parts(b))) | {j for (bb, j) in records.parts if bb == b}
                if b in records.blocks and done >= set(range(records.blocks[b])):
                    continue  # every part written and recorded: nothing of this block is read
                for tokens in _build_block(out, b, block, done, ctx, text_column=text_column, max_length=max_length,
                                           packing=packing, rows_per_shard=rows_per_shard, batch_size=batch_size):
                    tokens_done += tokens
                    if ranks.rank == 0:
                        fold_records(out, manifest)
                    if bar is not None:
                        bar.update(rows_per_shard)
                        bar.set_postfix(tok_s=f"{tokens_done / (time.perf_counter() - t0):.0f}")
                if ranks.rank == 0:
                    fold_records(out, manifest)
        ranks.barrier()  # every rank has recorded its shards
        if ranks.rank == 0:
            finish(out, manifest, len(blocks))
        ranks.barrier()  # no rank returns before the cache is complete
        if ranks.rank != 0:
            manifest = Manifest.load(out)
    finally:
        hooks.close()
        if bar is not None:
            bar.close()
        if lock is not None:
            os.close(lock)  # releases the lock
    return manifest


@dataclass
class _BuildContext:
    """What building one shard needs, fixed for the whole build."""

    teacher: torch.nn.Module
    tokenizer: object
    config: object
    mode: str
    k: int
    hidden: str
    layers: list[int]
    temperature: float
    mlm_probability: float
    seed: int
    special: list[int]
    captured: object
    head_in: object
    head_dtype: str | None


def _stored(batch: dict, name: str, x: torch.Tensor, dtype: str) -> None:
    """``x`` as the cache stores it under ``name``: fp16 / bf16, or int8 with ``name``_scale."""
    if dtype == "int8":
        batch[name], batch[f"{name}_scale"] = quantize_int8(x)
    else:
        batch[name] = x.to(HIDDEN_DTYPES[dtype])


def _corpus_sha256(paths: list[Path]) -> str:
    """The corpus's identity (one sha256 over its files), after checking that text files are UTF-8."""
    if DATASET_BUILDERS[paths[0].suffix.lower()] not in BINARY_BUILDERS:
        for p in paths:
            check_text_file(p)
    return files_sha256([str(p) for p in paths])


def _build_block(out: Path, block: int, source: CorpusBlock, done: set[int], ctx: _BuildContext, *, text_column: str,
                 max_length: int, packing: bool, rows_per_shard: int, batch_size: int) -> Iterator[int]:
    """Read one corpus block's texts (that block's only), make its rows, and write each part not in
    ``done`` with its record, then the block's record; yields the real tokens of each part written."""
    texts = iter_block_texts(source, text_column)
    if packing:
        rows = iter_packed_rows(ctx.tokenizer, texts, max_length, allow_empty=True)
    else:
        rows = iter_padded_rows(ctx.tokenizer, texts, max_length, want=lambda r: r // rows_per_shard not in done)
    pending, n_rows = [], 0
    for row, ids, am in rows:
        n_rows = row + 1
        if row // rows_per_shard in done:
            continue
        pending.append((ids, am))
        if n_rows % rows_per_shard == 0:
            yield _build_shard(out, block, row // rows_per_shard, n_rows - len(pending), pending, ctx, batch_size)
            pending = []
    if pending:  # the block's last, short part
        yield _build_shard(out, block, (n_rows - 1) // rows_per_shard, n_rows - len(pending), pending, ctx, batch_size)
    write_block_record(out, block, -(-n_rows // rows_per_shard))


def _row_seed(seed: int, block: int, row: int) -> int:
    """The generator seed of the rows of ``block`` from its row ``row`` on (block 0: what format 1 used)."""
    return (seed * 1_000_003 + block * (1 << 32) + row) % (1 << 64)


def _teacher_batch(ids: torch.Tensor, am: torch.Tensor, block: int, b0: int,
                   ctx: _BuildContext) -> dict[str, torch.Tensor]:
    """The stored fields of the rows of corpus block ``block`` from its row ``b0`` on: masking and
    sampling are seeded by the block, ``b0`` and the seed alone, so any process building these rows
    writes the same values."""
    from kdfast.losses.sparse_kd import sparsify_teacher_logits

    batch: dict[str, torch.Tensor] = {}
    mode = ctx.mode
    if mode != "none":
        gen = torch.Generator().manual_seed(_row_seed(ctx.seed, block, b0))  # per batch: resumable
        ids, labels = mask_tokens(ids, am, special_ids=ctx.special, mask_id=ctx.tokenizer.mask_token_id,
                                  vocab_size=ctx.config.vocab_size, probability=ctx.mlm_probability, generator=gen)
        batch["labels"] = labels.to(torch.int32)
    out_t = ctx.teacher(input_ids=ids, attention_mask=am, output_hidden_states=True)
    batch["input_ids"] = ids.to(torch.int32)
    batch["attention_mask"] = am.to(torch.uint8)
    if mode in ("topk", "sampled"):
        sel = labels != -100
        rows_logits = out_t.logits[sel]  # [M, V], row-major over the batch
        batch["masked_per_row"] = sel.sum(-1)
        if mode == "topk":
            tid, tval, tlse = sparsify_teacher_logits(rows_logits, ctx.k, "topk", ctx.temperature)
            batch.update(topk_ids=tid, topk_values=tval, topk_lse=tlse)
        else:
            g = torch.Generator().manual_seed(_row_seed(ctx.seed, block, b0 + 1))
            sid, scount = sparsify_teacher_logits(rows_logits, ctx.k, "sampled", ctx.temperature, generator=g)
            batch.update(sampled_ids=sid, sampled_counts=scount)
    elif mode == "head":
        _stored(batch, "head_input", ctx.head_in.value, ctx.head_dtype)
    if ctx.hidden != "none":
        for l in ctx.layers:
            _stored(batch, f"hidden_{l}", out_t.hidden_states[l], ctx.hidden)
    if ctx.captured is not None:
        for l, (query, key) in enumerate(zip(ctx.captured.q, ctx.captured.k), start=1):
            batch[f"q_{l}"], batch[f"k_{l}"] = _stored_projection(query), _stored_projection(key)
    return batch


def _build_shard(out: Path, block: int, index: int, first_row: int, rows: list, ctx: _BuildContext,
                 batch_size: int) -> int:
    """Run the teacher over part ``index`` of ``block`` (the block's rows ``first_row`` ..), write
    the part and then its ``.done`` record; the number of real tokens."""
    ids_all = torch.stack([r[0] for r in rows])
    am_all = torch.stack([r[1] for r in rows])
    parts: dict[str, list[torch.Tensor]] = {}
    for j in range(0, len(rows), batch_size):
        batch = _teacher_batch(ids_all[j:j + batch_size], am_all[j:j + batch_size], block, first_row + j, ctx)
        for name, v in batch.items():
            parts.setdefault(name, []).append(v)
    tensors = {name: torch.cat(v) for name, v in parts.items()}
    if "masked_per_row" in tensors:
        counts = tensors.pop("masked_per_row")
        tensors["logit_offsets"] = torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)])
    info = write_shard(out, part_name(block, index), tensors, block)
    write_record(out, info, index)
    return info.tokens


def _write_head(out: Path, teacher: torch.nn.Module) -> dict:
    """Write ``head.safetensors`` (the output projection's weight and bias) atomically; its manifest entry."""
    weight, bias = head_projection(teacher)
    tensors = {"weight": weight.contiguous()}
    if bias is not None:
        tensors["bias"] = bias.contiguous()
    data = safetensors_bytes(tensors)
    atomic_write_bytes(out / HEAD_FILE, data)
    return {"file": HEAD_FILE, "sha256": hashlib.sha256(data).hexdigest()}
