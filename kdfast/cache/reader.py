"""Reading a teacher cache: verification, a torch ``IterableDataset`` of aligned batches, prefetching.

The reader memory-maps shards (safetensors ``safe_open``), checks each shard's sha256 and header
(every field's dtype and shape against the manifest) the first time it opens it, and every batch
it returns (ids inside the vocabulary, sparse-logit offsets monotone and in range, finite teacher
values); it refuses a torn or altered shard, a manifest whose teacher or tokenizer hash differs
from what the run expects, and shard names pointing outside the cache directory. Every refusal is
a :class:`CacheError` naming the shard and the fault. :meth:`TeacherCache.verify` runs the same
checks over every row, so a cache that passes it reads without error.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from torch.utils.data import IterableDataset

from kdfast.cache.format import (
    HEAD_FILE,
    CacheError,
    Manifest,
    ShardInfo,
    is_kdfast_leftover,
    read_records,
    sha256_file,
    shard_path,
)
from kdfast.cache.writer import dequantize_int8

PER_ROW = ("input_ids", "attention_mask", "labels")
SPARSE = ("topk_ids", "topk_values", "topk_lse", "sampled_ids", "sampled_counts")
VERIFY_CHUNK_ROWS = 64  # verify reads shards through read_rows this many rows at a time (bounded memory)


class TeacherCache:
    """A finished cache directory, opened for reading.

    ``expect_teacher_sha256`` / ``expect_tokenizer_sha256``: refuse a cache made by another teacher
    or tokenizer (see :func:`kdfast.cache.format.teacher_weights_sha256`).
    """

    def __init__(self, cache_dir: str, *, expect_teacher_sha256: str | None = None,
                 expect_tokenizer_sha256: str | None = None, allow_incomplete: bool = False) -> None:
        self.dir = Path(cache_dir)
        self.manifest = Manifest.load(self.dir)
        if not self.manifest.complete and not allow_incomplete:
            raise CacheError(f"{cache_dir}: the cache is incomplete ({self.manifest.rows} rows so far); "
                             "finish it with `kdfast cache build` (it resumes)")
        s = self.manifest.settings
        if expect_teacher_sha256 and s["teacher"]["weights_sha256"] != expect_teacher_sha256:
            raise CacheError(f"{cache_dir} was built by another teacher (weights sha256 "
                             f"{s['teacher']['weights_sha256'][:12]}..., expected {expect_teacher_sha256[:12]}...)")
        if expect_tokenizer_sha256 and s["tokenizer_sha256"] != expect_tokenizer_sha256:
            raise CacheError(f"{cache_dir} was built with another tokenizer (sha256 {s['tokenizer_sha256'][:12]}..., "
                             f"expected {expect_tokenizer_sha256[:12]}...)")
        self._verified: set[str] = set()
        self._rows_checked = False
        self._head: tuple[torch.Tensor, torch.Tensor | None] | None = None

    def __len__(self) -> int:
        return self.manifest.rows

    @property
    def settings(self) -> dict:
        return self.manifest.settings

    def _open(self, info: ShardInfo):
        path = shard_path(self.dir, info.file)
        if not path.is_file():
            raise CacheError(f"{info.file} is listed in the manifest but missing")
        try:
            return safe_open(str(path), framework="pt")
        except Exception as e:  # SafetensorError and OSError: a torn or foreign file
            raise CacheError(f"{info.file}: unreadable safetensors ({' '.join(str(e).split())[:200]})") from None

    def head_projection(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(weight [V, d], bias [V] or None)`` of the teacher's output projection, stored once by a
        ``logits: head`` cache (hash-checked on first use): the teacher's logits at a token are
        ``head_input @ weight.T + bias``, what :func:`kdfast.fused_linear_kd_loss` takes as
        ``teacher_weight`` / ``teacher_bias`` beside ``teacher_hidden`` = the batch's ``head_input``.
        CacheError for a cache of another logits mode or an altered head file."""
        if self._head is not None:
            return self._head
        if self.manifest.settings["logits"]["mode"] != "head" or self.manifest.head is None:
            raise CacheError(f"{self.dir}: logits mode {self.manifest.settings['logits']['mode']!r} stores no "
                             "output projection (build with --logits head)")
        problems = self._head_problems()
        if problems:
            raise CacheError(f"{problems[0]} (run `kdfast cache verify {self.dir}`)")
        with safe_open(str(self.dir / HEAD_FILE), framework="pt") as f:
            weight = f.get_tensor("weight")
            bias = f.get_tensor("bias") if "bias" in f.keys() else None
        self._head = (weight, bias)
        return self._head

    def _head_problems(self) -> list[str]:
        """The head file's faults: missing, hash, fields, shapes (empty for caches without a head)."""
        if self.manifest.settings["logits"]["mode"] != "head":
            return []
        if self.manifest.head is None:
            return [] if not self.manifest.shards else [f"{HEAD_FILE}: not listed in the manifest"]
        path = self.dir / HEAD_FILE
        if path.is_symlink() or not path.is_file():
            return [f"{HEAD_FILE}: missing"]
        digest = sha256_file(path)
        if digest != self.manifest.head["sha256"]:
            return [f"{HEAD_FILE}: sha256 {digest[:12]}... differs from the manifest's "
                    f"{self.manifest.head['sha256'][:12]}..."]
        t = self.manifest.settings["teacher"]
        try:
            with safe_open(str(path), framework="pt") as f:
                names = set(f.keys())
                if "weight" not in names or not names <= {"weight", "bias"}:
                    return [f"{HEAD_FILE}: fields {sorted(names)}, expected weight (and bias)"]
                shape = list(f.get_slice("weight").get_shape())
                if len(shape) != 2 or shape[0] != t["vocab_size"]:
                    return [f"{HEAD_FILE}: weight is {shape}, expected [{t['vocab_size']}, d]"]
                if "bias" in names and list(f.get_slice("bias").get_shape()) != [t["vocab_size"]]:
                    return [f"{HEAD_FILE}: bias is not [{t['vocab_size']}]"]
                if not bool(torch.isfinite(f.get_tensor("weight")).all()):
                    return [f"{HEAD_FILE}: weight holds NaN or Inf"]
        except Exception as e:  # SafetensorError: a torn or foreign file
            return [f"{HEAD_FILE}: unreadable ({' '.join(str(e).split())[:200]})"]
        return []

    def head_width(self) -> int | None:
        """d of the stored head input (None without a head): the projection's input width."""
        if self.manifest.settings["logits"]["mode"] != "head" or self.manifest.head is None:
            return None
        with safe_open(str(self.dir / HEAD_FILE), framework="pt") as f:
            return int(f.get_slice("weight").get_shape()[1])

    def check_row_counts(self) -> None:
        """Each shard's rows, read from its header, equal the manifest's (memory of readers stays
        bounded by what the shards really hold, not by what the manifest claims)."""
        if self._rows_checked:
            return
        for info in self.manifest.shards:
            with self._open(info) as f:
                if "input_ids" not in f.keys():
                    raise CacheError(f"{info.file}: field input_ids missing")
                rows = f.get_slice("input_ids").get_shape()[0]
            if rows != info.rows:
                raise CacheError(f"{info.file} holds {rows} rows, the manifest says {info.rows}")
        self._rows_checked = True

    def open_shard(self, index: int):
        """A memory-mapped handle of shard ``index``, hash- and header-checked on first use."""
        info = self.manifest.shards[index]
        path = shard_path(self.dir, info.file)
        if info.file not in self._verified:
            if not path.is_file():
                raise CacheError(f"{info.file} is listed in the manifest but missing")
            digest = sha256_file(path)
            if digest != info.sha256:
                raise CacheError(f"{info.file} is torn or altered: sha256 {digest[:12]}... != manifest "
                                 f"{info.sha256[:12]}...")
            with self._open(info) as f:
                problems = _header_problems(info, f, self.manifest.settings, self.head_width())
            if problems:
                raise CacheError(f"{problems[0]} (run `kdfast cache verify {self.dir}`)")
            self._verified.add(info.file)
        return self._open(info)

    def read_rows(self, index: int, rows: torch.Tensor, handle=None) -> dict:
        """Rows (indices within shard ``index``) as one batch: per-row fields, teacher targets with
        hidden states dequantised, and sparse logits of their masked positions in row-major order.
        CacheError if the rows break an invariant (ids outside [0, vocab_size), offsets out of
        order or range, non-finite teacher values)."""
        info = self.manifest.shards[index]
        f = handle if handle is not None else self.open_shard(index)
        rows = rows.sort().values if rows.numel() > 1 else rows
        if rows.numel() == 0 or int(rows.min()) < 0 or int(rows.max()) >= info.rows:
            raise ValueError(f"rows must be non-empty indices in [0, {info.rows}) of {info.file}")
        try:
            batch = self._read_rows(f, rows)
        except CacheError as e:
            raise CacheError(f"{info.file}: {e} (run `kdfast cache verify {self.dir}`)") from None
        except Exception as e:  # SafetensorError / RuntimeError from a header that verify would refuse
            raise CacheError(f"{info.file}: unreadable rows ({' '.join(str(e).split())[:200]})") from None
        return batch

    def _read_rows(self, f, rows: torch.Tensor) -> dict:
        V = self.manifest.settings["teacher"]["vocab_size"]
        lo, hi = int(rows.min()), int(rows.max()) + 1
        sel = rows - lo

        def take(name):
            return f.get_slice(name)[lo:hi][sel]

        names = set(f.keys())
        batch = {n: take(n).long() for n in PER_ROW if n in names}
        _check_range(batch["input_ids"], "input_ids", 0, V)
        _check_range(batch["attention_mask"], "attention_mask", 0, 2)
        if "labels" in batch:
            _check_range(batch["labels"].masked_fill(batch["labels"] == -100, 0), "labels (besides -100)", 0, V)
        for n in sorted(names):
            if n.startswith(("hidden_", "q_", "k_", "head_input")) and not n.endswith("_scale"):
                x = take(n)
                if x.dtype == torch.int8:
                    scale = take(n + "_scale")
                    if not bool((torch.isfinite(scale) & (scale >= 0)).all()):
                        raise CacheError(f"{n}_scale holds a negative or non-finite value")
                    x = dequantize_int8(x, scale, torch.float16)
                _check_finite(x, n)
                batch[n] = x
        if "logit_offsets" in names:
            off = f.get_slice("logit_offsets")[lo:hi + 1]  # the sparse rows of rows lo..hi-1 are contiguous
            n_sparse = f.get_slice(next(n for n in SPARSE if n in names)).get_shape()[0]
            if int(off[0]) < 0 or int(off[-1]) > n_sparse or bool((off[1:] < off[:-1]).any()):
                raise CacheError(f"logit_offsets of rows {lo}..{hi - 1} are not increasing within [0, {n_sparse}]")
            per_row = off[1:] - off[:-1]
            if not torch.equal(per_row[sel], (batch["labels"] != -100).sum(-1)):
                raise CacheError(f"logit_offsets of rows {lo}..{hi - 1} disagree with the masked labels")
            base = int(off[0])
            pieces = [torch.arange(int(off[r - lo]) - base, int(off[r - lo + 1]) - base) for r in rows.tolist()]
            idx = torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.long)
            for n in SPARSE:
                if n in names:
                    part = f.get_slice(n)[base:int(off[-1])][idx]
                    if n.endswith("_ids"):
                        part = part.long()
                        _check_range(part, n, 0, V)
                    else:
                        _check_finite(part, n)
                        if n == "sampled_counts" and bool((part < 0).any()):
                            raise CacheError("sampled_counts holds a negative count")
                    batch[n] = part
        return batch

    def verify(self) -> list[str]:
        """Every problem found (empty list: the cache is sound, and reads without error): hashes,
        headers (fields, dtypes, shapes), token counts, every row's content through the reader's
        own checks, kdfast's leftover files, completeness."""
        problems: list[str] = self._head_problems()
        s = self.manifest.settings
        listed = set()
        for i, info in enumerate(self.manifest.shards):
            listed.add(info.file)
            try:
                path = shard_path(self.dir, info.file)
            except CacheError as e:
                problems.append(str(e))
                continue
            if not path.is_file():
                problems.append(f"{info.file}: missing")
                continue
            digest = sha256_file(path)
            if digest != info.sha256:
                problems.append(f"{info.file}: sha256 {digest[:12]}... differs from the manifest's "
                                f"{info.sha256[:12]}...")
                continue
            try:
                with self._open(info) as f:
                    shard_problems = _header_problems(info, f, s, self.head_width())
                    if not shard_problems:
                        shard_problems = _whole_shard_problems(info, f)
                    if not shard_problems:
                        for lo in range(0, info.rows, VERIFY_CHUNK_ROWS):
                            self._read_rows(f, torch.arange(lo, min(lo + VERIFY_CHUNK_ROWS, info.rows)))
            except CacheError as e:
                shard_problems = [f"{info.file}: {e}" if not str(e).startswith(info.file) else str(e)]
            except Exception as e:  # a header the checks above let through but safetensors cannot read
                shard_problems = [f"{info.file}: unreadable ({' '.join(str(e).split())[:200]})"]
            problems += shard_problems
        # finished, not yet listed
        recorded = set() if self.manifest.complete else read_records(self.dir, self.manifest).names()
        for p in sorted(self.dir.iterdir()):
            if is_kdfast_leftover(p, listed, recorded):
                problems.append(f"{p.name}: not in the manifest (left by an interrupted write)")
        if not self.manifest.complete:
            problems.append(f"cache incomplete: {self.manifest.rows} rows written, build not finished")
        return problems

    def differences(self, other: "TeacherCache") -> list[str]:
        """How this cache differs from ``other`` in what it holds (empty: the same rows, masks and
        values, shard by shard: settings, row and token counts, shard and head hashes). Two builds
        of one corpus with the same settings and seed agree whatever the number of processes."""
        a, b = self.manifest, other.manifest
        out = []
        keys = sorted(k for k in set(a.settings) | set(b.settings) if a.settings.get(k) != b.settings.get(k))
        if keys:
            out.append(f"settings differ from {other.dir}'s: {', '.join(keys)}")
        if len(a.shards) != len(b.shards):
            out.append(f"{len(a.shards)} shards, {other.dir} has {len(b.shards)}")
        for x, y in zip(a.shards, b.shards):
            if (x.rows, x.tokens, x.sha256) != (y.rows, y.tokens, y.sha256):
                out.append(f"{x.file} differs from {other.dir}'s ({x.rows} vs {y.rows} rows, sha256 "
                           f"{x.sha256[:12]}... vs {y.sha256[:12]}...)")
        if (a.head or {}).get("sha256") != (b.head or {}).get("sha256"):
            out.append(f"{HEAD_FILE} differs from {other.dir}'s")
        return out

    def info(self) -> dict:
        """Rows, tokens, bytes per (real, unpadded) token by field, teacher and settings, and
        ``logits_bytes_per_token``: what the logit fields cost per token in each logits mode for
        this cache's rows (measured for its own mode, computed from its shapes for the others)."""
        per_field: dict[str, int] = {}
        n_masked = 0
        for info in self.manifest.shards:
            with self._open(info) as f:
                for n in f.keys():
                    sl = f.get_slice(n)
                    numel = 1
                    for d in sl.get_shape():
                        numel *= d
                    per_field[n] = per_field.get(n, 0) + numel * _itemsize(sl.get_dtype())
                if "labels" in f.keys():
                    n_masked += int((f.get_tensor("labels") != -100).sum())
        head_bytes = (self.dir / HEAD_FILE).stat().st_size if self.manifest.head is not None else 0
        if head_bytes:
            per_field[HEAD_FILE] = head_bytes
        tokens = max(self.manifest.tokens, 1)
        return {
            "rows": self.manifest.rows, "tokens": self.manifest.tokens, "shards": len(self.manifest.shards),
            "complete": self.manifest.complete, "teacher": self.manifest.settings["teacher"],
            "bytes": sum(per_field.values()),
            "bytes_per_token": {n: round(b / tokens, 2) for n, b in sorted(per_field.items())},
            "bytes_per_token_total": round(sum(per_field.values()) / tokens, 2),
            "logits_bytes_per_token": self._logits_modes(n_masked, per_field),
        }

    def _logits_modes(self, n_masked: int, per_field: dict[str, int]) -> dict[str, float]:
        """Bytes per real token of the logit fields in each mode (labels, offsets, sparse logits, head
        input and the head file amortised over this cache's tokens), on this cache's rows."""
        s = self.manifest.settings
        rows, L, V = self.manifest.rows, s["max_length"], s["teacher"]["vocab_size"]
        tokens = max(self.manifest.tokens, 1)
        d = self.head_width() or s["teacher"]["hidden_size"]
        k = s["logits"]["k"] or 8
        if s["logits"]["mode"] == "none":  # no labels stored: the masking rate the cache would use
            n_masked = round(tokens * 0.15)
        labels, offsets = 4 * rows * L, 8 * (rows + len(self.manifest.shards))
        head_file = V * d * 4 + V * 4
        modes = {
            "none": 0,
            f"topk:{k}": labels + offsets + n_masked * (k * 6 + 4),
            f"sampled:{k}": labels + offsets + n_masked * k * 6,
            "head:fp16": labels + rows * L * d * 2 + head_file,
            "head:bf16": labels + rows * L * d * 2 + head_file,
            "head:int8": labels + rows * L * (d + 4) + head_file,
        }
        mine = {"topk": f"topk:{k}", "sampled": f"sampled:{k}", "none": "none"}.get(
            s["logits"]["mode"], f"head:{s['logits'].get('dtype')}")
        logit_fields = ("labels", "logit_offsets", "topk_ids", "topk_values", "topk_lse", "sampled_ids",
                        "sampled_counts", "head_input", "head_input_scale", HEAD_FILE)
        modes[mine] = sum(per_field.get(n, 0) for n in logit_fields)  # this cache's own: measured
        return {m: round(b / tokens, 2) for m, b in modes.items()}


def _itemsize(dtype: str) -> int:
    return {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2, "U16": 2,
            "I8": 1, "U8": 1, "BOOL": 1}.get(dtype, 1)  # an exotic dtype (fp8): info reports, verify refuses


def _check_range(x: torch.Tensor, name: str, lo: int, hi: int) -> None:
    if x.numel() and (int(x.min()) < lo or int(x.max()) >= hi):
        raise CacheError(f"{name} holds a value outside [{lo}, {hi})")


# A float is NaN or Inf exactly when its exponent bits are all ones: the integer maximum of the
# bits without the sign finds one about 5x faster than torch.isfinite on CPU halves.
_NONFINITE_BITS = {torch.float16: (torch.int16, 0x7FFF, 0x7C00), torch.bfloat16: (torch.int16, 0x7FFF, 0x7F80),
                   torch.float32: (torch.int32, 0x7FFFFFFF, 0x7F800000)}


def _check_finite(x: torch.Tensor, name: str) -> None:
    if x.numel() == 0:
        return
    if x.dtype in _NONFINITE_BITS:
        int_dtype, magnitude, exponent_all_ones = _NONFINITE_BITS[x.dtype]
        finite = int((x.view(int_dtype) & magnitude).max()) < exponent_all_ones
    else:
        finite = bool(torch.isfinite(x).all())
    if not finite:
        raise CacheError(f"{name} holds NaN or Inf")


def _expected_fields(info: ShardInfo, s: dict, n_sparse: int,
                     head_width: int | None = None) -> dict[str, tuple[str, list[int]]]:
    """Field name -> (safetensors dtype, shape) of a shard as :func:`build_cache` writes it."""
    N, L, d = info.rows, s["max_length"], s["teacher"]["hidden_size"]
    fields = {"input_ids": ("I32", [N, L]), "attention_mask": ("U8", [N, L])}
    lg = s["logits"]
    if lg["mode"] == "head":
        dtype = {"fp16": "F16", "bf16": "BF16", "int8": "I8"}[lg["dtype"]]
        fields.update(labels=("I32", [N, L]), head_input=(dtype, [N, L, head_width or d]))
        if dtype == "I8":
            fields["head_input_scale"] = ("F32", [N, L])
    elif lg["mode"] != "none":
        k = lg["k"]
        fields.update(labels=("I32", [N, L]), logit_offsets=("I64", [N + 1]))
        if lg["mode"] == "topk":
            fields.update(topk_ids=("I32", [n_sparse, k]), topk_values=("F16", [n_sparse, k]),
                          topk_lse=("F32", [n_sparse]))
        else:
            fields.update(sampled_ids=("I32", [n_sparse, k]), sampled_counts=("F16", [n_sparse, k]))
    if s["hidden"]:
        dtype = {"fp16": "F16", "bf16": "BF16", "int8": "I8"}[s["hidden"]["dtype"]]
        for l in s["hidden"]["layers"]:
            fields[f"hidden_{l}"] = (dtype, [N, L, d])
            if dtype == "I8":
                fields[f"hidden_{l}_scale"] = ("F32", [N, L])
    if s["qk"]:
        for l in s["qk"]["layers"]:
            fields[f"q_{l}"] = fields[f"k_{l}"] = ("F16", [N, L, d])
    return fields


def _header_problems(info: ShardInfo, f, s: dict, head_width: int | None = None) -> list[str]:
    """Fields missing or unexpected, or of another dtype or shape than the manifest implies (header only)."""
    names = set(f.keys())
    ids = "topk_ids" if s["logits"]["mode"] == "topk" else "sampled_ids"
    n_sparse = f.get_slice(ids).get_shape()[0] if s["logits"]["mode"] in ("topk", "sampled") and ids in names else 0
    expected = _expected_fields(info, s, n_sparse, head_width)
    problems = [f"{info.file}: field {n} missing" for n in sorted(set(expected) - names)]
    problems += [f"{info.file}: field {n} is not part of this cache's format" for n in sorted(names - set(expected))]
    for n in sorted(set(expected) & names):
        sl = f.get_slice(n)
        dtype, shape = expected[n]
        if sl.get_dtype() != dtype or list(sl.get_shape()) != shape:
            problems.append(f"{info.file}: field {n} is {sl.get_dtype()} {list(sl.get_shape())}, "
                            f"expected {dtype} {shape}")
    return problems


def _whole_shard_problems(info: ShardInfo, f) -> list[str]:
    """What only the whole shard shows: the token count, the offsets spanning all sparse rows."""
    problems = []
    if int(f.get_tensor("attention_mask").sum(dtype=torch.int64)) != info.tokens:
        problems.append(f"{info.file}: {info.tokens} tokens in the manifest, not what attention_mask holds")
    if "logit_offsets" in f.keys():
        off = f.get_tensor("logit_offsets")
        n_sparse = f.get_slice("topk_ids" if "topk_ids" in f.keys() else "sampled_ids").get_shape()[0]
        if int(off[0]) != 0 or int(off[-1]) != n_sparse:
            problems.append(f"{info.file}: logit_offsets run from {int(off[0])} to {int(off[-1])}, "
                            f"not 0 to the {n_sparse} sparse rows")
    return problems


class CacheDataset(IterableDataset):
    """Batches of a :class:`TeacherCache`: student inputs with aligned teacher targets.

    Each ``torchrun`` rank (``rank``/``world_size``, default from ``torch.distributed`` when it is
    initialised) gets a disjoint, equally long slice of the rows. With ``shuffle``, shard order
    and rows within a buffer of ``buffer_shards`` shards are permuted by a generator seeded with
    ``seed`` and ``epoch`` (:meth:`set_epoch`): the same seed gives the same batches.
    """

    def __init__(self, cache: TeacherCache, batch_size: int, *, shuffle: bool = False, seed: int = 0,
                 rank: int | None = None, world_size: int | None = None, drop_last: bool = False,
                 buffer_shards: int = 2) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if rank is None or world_size is None:
            dist = torch.distributed
            initialised = dist.is_available() and dist.is_initialized()
            rank = dist.get_rank() if initialised else 0
            world_size = dist.get_world_size() if initialised else 1
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} must lie in [0, world_size={world_size})")
        cache.check_row_counts()  # _my_rows lists every row: only as many as the shards hold
        self.cache, self.batch_size, self.shuffle, self.seed = cache, batch_size, shuffle, seed
        self.rank, self.world_size, self.drop_last, self.buffer_shards = rank, world_size, drop_last, buffer_shards
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _my_rows(self) -> list[tuple[int, int]]:
        """(shard, row) pairs of this rank, in reading order."""
        g = torch.Generator().manual_seed(self.seed * 7919 + self.epoch)
        n_shards = len(self.cache.manifest.shards)
        order = torch.randperm(n_shards, generator=g).tolist() if self.shuffle else list(range(n_shards))
        pairs = [(s, r) for s in order for r in range(self.cache.manifest.shards[s].rows)]
        per_rank = len(pairs) // self.world_size
        mine = pairs[self.rank * per_rank:(self.rank + 1) * per_rank]
        if self.shuffle:  # shuffle within windows of buffer_shards shards: reads stay local
            window = self.buffer_shards * max(1, self.cache.manifest.settings["rows_per_shard"])
            out = []
            for i in range(0, len(mine), window):
                chunk = mine[i:i + window]
                out += [chunk[j] for j in torch.randperm(len(chunk), generator=g).tolist()]
            mine = out
        return mine

    def __len__(self) -> int:
        n = len(self.cache) // self.world_size
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[dict]:
        return self.iter_from(0)

    def iter_from(self, start_batch: int) -> Iterator[dict]:
        """Batches from number ``start_batch`` on (resuming mid-epoch reads nothing before it)."""
        rows = self._my_rows()
        handles: dict[int, object] = {}
        for b in range(start_batch * self.batch_size, len(rows), self.batch_size):
            chunk = rows[b:b + self.batch_size]
            if self.drop_last and len(chunk) < self.batch_size:
                break
            parts = []
            # group the batch's rows by shard, keeping the batch's order
            by_shard: dict[int, list[int]] = {}
            for pos, (s, r) in enumerate(chunk):
                by_shard.setdefault(s, []).append(r)
            for s, rs in by_shard.items():
                if s not in handles:
                    handles[s] = self.cache.open_shard(s)
                parts.append(self.cache.read_rows(s, torch.tensor(rs), handles[s]))
            yield _concat(parts)


def _concat(parts: list[dict]) -> dict:
    if len(parts) == 1:
        return parts[0]
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


class Prefetcher:
    """Iterate ``batches`` on a background thread, ``depth`` batches ahead, pinning memory when a
    GPU is present so that ``.to(device, non_blocking=True)`` overlaps with compute."""

    _END = object()

    def __init__(self, batches, depth: int = 2, pin_memory: bool | None = None) -> None:
        self.batches, self.depth = batches, depth
        self.pin = torch.cuda.is_available() if pin_memory is None else pin_memory

    def __iter__(self):
        q: queue.Queue = queue.Queue(maxsize=self.depth)
        stop = threading.Event()

        def work():
            try:
                for batch in self.batches:
                    if self.pin:
                        batch = {k: v.pin_memory() for k, v in batch.items()}
                    while not stop.is_set():
                        try:
                            q.put(batch, timeout=0.1)
                            break
                        except queue.Full:
                            continue
                    if stop.is_set():
                        return
                q.put(self._END)
            except BaseException as e:  # surface reader errors (e.g. a torn shard) in the consumer
                q.put(e)

        t = threading.Thread(target=work, daemon=True, name="kdfast-cache-prefetch")
        t.start()
        try:
            while True:
                item = q.get()
                if item is self._END:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()
