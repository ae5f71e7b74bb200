"""Reading a teacher cache: verification, a torch ``IterableDataset`` of aligned batches, prefetching.

The reader memory-maps shards (safetensors ``safe_open``), checks each shard's sha256 the first
time it opens it, refuses a torn or altered shard, a manifest whose teacher or tokenizer hash
differs from what the run expects, and shard names pointing outside the cache directory.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from torch.utils.data import IterableDataset

from kdfast.cache.format import MANIFEST, SHARD_RE, CacheError, Manifest, sha256_file, shard_path
from kdfast.cache.writer import dequantize_int8

PER_ROW = ("input_ids", "attention_mask", "labels")
SPARSE = ("topk_ids", "topk_values", "topk_lse", "sampled_ids", "sampled_counts")


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
        self._offsets = [0]
        for sh in self.manifest.shards:
            self._offsets.append(self._offsets[-1] + sh.rows)

    def __len__(self) -> int:
        return self.manifest.rows

    @property
    def settings(self) -> dict:
        return self.manifest.settings

    def open_shard(self, index: int):
        """A memory-mapped handle of shard ``index``, hash-checked on first use."""
        info = self.manifest.shards[index]
        path = shard_path(self.dir, info.file)
        if info.file not in self._verified:
            if not path.is_file():
                raise CacheError(f"{info.file} is listed in the manifest but missing")
            digest = sha256_file(path)
            if digest != info.sha256:
                raise CacheError(f"{info.file} is torn or altered: sha256 {digest[:12]}... != manifest "
                                 f"{info.sha256[:12]}...")
            self._verified.add(info.file)
        return safe_open(str(path), framework="pt")

    def read_rows(self, index: int, rows: torch.Tensor, handle=None) -> dict:
        """Rows (indices within shard ``index``) as one batch: per-row fields, teacher targets with
        hidden states dequantised, and sparse logits of their masked positions in row-major order."""
        f = handle if handle is not None else self.open_shard(index)
        rows = rows.sort().values if rows.numel() > 1 else rows
        lo, hi = int(rows.min()), int(rows.max()) + 1
        sel = rows - lo

        def take(name):
            return f.get_slice(name)[lo:hi][sel]

        names = set(f.keys())
        batch = {n: take(n).long() for n in PER_ROW if n in names}
        for n in sorted(names):
            if n.startswith(("hidden_", "q_", "k_")) and not n.endswith("_scale"):
                x = take(n)
                if x.dtype == torch.int8:
                    x = dequantize_int8(x, take(n + "_scale"), torch.float16)
                batch[n] = x
        if "logit_offsets" in names:
            off = f.get_slice("logit_offsets")[lo:hi + 1]  # the sparse rows of rows lo..hi-1 are contiguous
            base = int(off[0])
            pieces = [torch.arange(int(off[r - lo]) - base, int(off[r - lo + 1]) - base) for r in rows.tolist()]
            idx = torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.long)
            for n in SPARSE:
                if n in names:
                    part = f.get_slice(n)[base:int(off[-1])][idx]
                    batch[n] = part.long() if n.endswith("_ids") else part
        return batch

    def verify(self) -> list[str]:
        """Every problem found (empty list: the cache is sound): hashes, headers, shapes, strays."""
        problems: list[str] = []
        s = self.manifest.settings
        L = s["max_length"]
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
                problems.append(f"{info.file}: sha256 {digest[:12]}... differs from the manifest's {info.sha256[:12]}...")
                continue
            try:
                with safe_open(str(path), framework="pt") as f:
                    problems += _check_shard_fields(info, f, s, L)
            except Exception as e:  # header unreadable
                problems.append(f"{info.file}: unreadable safetensors ({e})")
        for p in self.dir.iterdir():
            if p.name != MANIFEST and p.name not in listed and (SHARD_RE.match(p.name) or p.name.startswith(".")):
                problems.append(f"{p.name}: not in the manifest (left by an interrupted write)")
        if not self.manifest.complete:
            problems.append(f"cache incomplete: {self.manifest.rows} rows written, build not finished")
        return problems

    def info(self) -> dict:
        """Rows, tokens, bytes per (real, unpadded) token by field, teacher and settings."""
        per_field: dict[str, int] = {}
        for i in range(len(self.manifest.shards)):
            with safe_open(str(shard_path(self.dir, self.manifest.shards[i].file)), framework="pt") as f:
                for n in f.keys():
                    sl = f.get_slice(n)
                    numel = 1
                    for d in sl.get_shape():
                        numel *= d
                    per_field[n] = per_field.get(n, 0) + numel * _itemsize(sl.get_dtype())
        tokens = max(self.manifest.tokens, 1)
        return {
            "rows": self.manifest.rows, "tokens": self.manifest.tokens, "shards": len(self.manifest.shards),
            "complete": self.manifest.complete, "teacher": self.manifest.settings["teacher"],
            "bytes": sum(per_field.values()),
            "bytes_per_token": {n: round(b / tokens, 2) for n, b in sorted(per_field.items())},
            "bytes_per_token_total": round(sum(per_field.values()) / tokens, 2),
        }


def _itemsize(dtype: str) -> int:
    return {"F64": 8, "I64": 8, "F32": 4, "I32": 4, "F16": 2, "BF16": 2, "I16": 2, "U16": 2, "I8": 1, "U8": 1,
            "BOOL": 1}[dtype]


def _check_shard_fields(info, f, s: dict, L: int) -> list[str]:
    problems = []
    names = set(f.keys())
    N = info.rows

    def expect(name, shape_prefix):
        if name not in names:
            problems.append(f"{info.file}: field {name} missing")
            return None
        shape = f.get_slice(name).get_shape()
        if list(shape[: len(shape_prefix)]) != list(shape_prefix):
            problems.append(f"{info.file}: field {name} has shape {shape}, expected {shape_prefix}...")
        return shape

    expect("input_ids", [N, L])
    expect("attention_mask", [N, L])
    if "attention_mask" in names and int(f.get_tensor("attention_mask").sum()) != info.tokens:
        problems.append(f"{info.file}: {info.tokens} tokens in the manifest, not what attention_mask holds")
    if s["logits"]["mode"] != "none":
        expect("labels", [N, L])
        offs = expect("logit_offsets", [N + 1])
        if offs is not None:
            M = int(f.get_tensor("logit_offsets")[-1])
            prefix = "topk" if s["logits"]["mode"] == "topk" else "sampled"
            fields = ("ids", "values", "lse") if prefix == "topk" else ("ids", "counts")
            for fld in fields:
                expect(f"{prefix}_{fld}", [M])
    if s["hidden"]:
        d = s["teacher"]["hidden_size"]
        for l in s["hidden"]["layers"]:
            expect(f"hidden_{l}", [N, L, d])
            if s["hidden"]["dtype"] == "int8":
                expect(f"hidden_{l}_scale", [N, L])
    if s["qk"]:
        for l in s["qk"]["layers"]:
            expect(f"q_{l}", [N, L])
            expect(f"k_{l}", [N, L])
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
