"""On-disk format of the teacher activation cache.

A cache is a directory:

    manifest.json                    what is stored and the list of finished shards
    shard-00000.safetensors, ...     N examples each (safetensors: no pickle)

Fields of a shard (``N`` examples padded to ``max_length`` L, ``M`` MLM-masked positions):

    input_ids        int32 [N, L]     what the teacher saw (after MLM masking, if any)
    attention_mask   uint8 [N, L]
    labels           int32 [N, L]     MLM targets, -100 where not masked (only with logits)
    logit_offsets    int64 [N + 1]    row n's sparse-logit rows are [offsets[n], offsets[n+1])
    topk_ids         int32 [M, k]     teacher's top-k token ids at the masked positions, row-major
    topk_values      fp16  [M, k]     their raw logits (T = 1)
    topk_lse         fp32  [M]        logsumexp(t / T) of the full row at the cache's temperature
    sampled_ids      int32 [M, k]     or: ids drawn from softmax(t / T) with replacement,
    sampled_counts   fp16  [M, k]         their counts (see kdfast.sparsify_teacher_logits)
    hidden_<l>       fp16/bf16 [N, L, d], or int8 [N, L, d] + hidden_<l>_scale fp32 [N, L]
                     (<l> is the index in ``output_hidden_states``: 0 = embeddings)
    q_<l>, k_<l>     fp16 [N, L, H * dh]  query / key projections of transformer layer <l> (1-based)

A shard is written under a temporary name, fsynced, renamed, and only then entered in the
manifest (itself replaced atomically) with its row count, token count and sha256. Anything in
the directory that the manifest does not list is an interrupted write and is deleted on resume.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

FORMAT = "kdfast-teacher-cache"
VERSION = 1
MANIFEST = "manifest.json"
SHARD_RE = re.compile(r"^shard-\d{5}\.safetensors$")


class CacheError(ValueError):
    """A cache that is malformed, altered, torn, or does not match the run."""


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.safetensors"


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_files(paths: list[Path]) -> str:
    """One digest over several files (names and contents), order-independent of the caller."""
    h = hashlib.sha256()
    for p in sorted(paths, key=lambda p: p.name):
        h.update(p.name.encode())
        h.update(sha256_file(p).encode())
    return h.hexdigest()


WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.pth")
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json",
                   "merges.txt", "vocab.json", "spiece.model")


def teacher_weights_sha256(model_dir: str | os.PathLike) -> str:
    files = [p for pat in WEIGHT_PATTERNS for p in Path(model_dir).glob(pat) if p.is_file()]
    if not files:
        raise CacheError(f"no weight files ({', '.join(WEIGHT_PATTERNS)}) in teacher directory {model_dir}")
    return sha256_files(files)


def tokenizer_sha256(tokenizer_dir: str | os.PathLike) -> str:
    files = [Path(tokenizer_dir) / n for n in TOKENIZER_FILES if (Path(tokenizer_dir) / n).is_file()]
    if not files:
        raise CacheError(f"no tokenizer files in {tokenizer_dir}")
    return sha256_files(files)


@dataclass
class ShardInfo:
    file: str
    rows: int
    tokens: int
    sha256: str


@dataclass
class Manifest:
    """What a cache holds; ``settings`` must match for a run to resume or read it."""

    settings: dict
    shards: list[ShardInfo] = field(default_factory=list)
    complete: bool = False
    format: str = FORMAT
    version: int = VERSION

    @property
    def rows(self) -> int:
        return sum(s.rows for s in self.shards)

    @property
    def tokens(self) -> int:
        return sum(s.tokens for s in self.shards)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def load(cls, cache_dir: str | os.PathLike) -> "Manifest":
        path = Path(cache_dir) / MANIFEST
        if not path.is_file():
            raise CacheError(f"{cache_dir} is not a kdfast cache: {MANIFEST} is missing")
        try:
            raw = json.loads(path.read_text())
            if raw.get("format") != FORMAT:
                raise CacheError(f"{path}: format {raw.get('format')!r} is not {FORMAT!r}")
            if raw.get("version") != VERSION:
                raise CacheError(f"{path}: format version {raw.get('version')} is not supported (want {VERSION})")
            shards = [ShardInfo(**s) for s in raw["shards"]]
            m = cls(settings=raw["settings"], shards=shards, complete=bool(raw["complete"]))
        except CacheError:
            raise
        except (KeyError, TypeError, json.JSONDecodeError) as e:
            raise CacheError(f"{path} is malformed: {e}") from None
        for s in m.shards:
            shard_path(cache_dir, s.file)  # refuses names outside the cache directory
        return m

    def save(self, cache_dir: str | os.PathLike) -> None:
        """Atomically replace manifest.json (write, fsync, rename, fsync the directory)."""
        atomic_write_bytes(Path(cache_dir) / MANIFEST, self.to_json().encode())


def shard_path(cache_dir: str | os.PathLike, name: str) -> Path:
    """The path of a shard named in a manifest; refuses anything but a plain shard name inside the cache."""
    root = Path(cache_dir).resolve()
    if not SHARD_RE.match(name):
        raise CacheError(f"shard name {name!r} is not of the form shard-NNNNN.safetensors")
    path = (root / name).resolve()
    if path.parent != root:
        raise CacheError(f"shard name {name!r} points outside the cache directory {root}")
    return path


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)
