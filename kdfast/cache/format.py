"""On-disk format of the teacher activation cache.

A cache is a directory:

    manifest.json                    what is stored and the list of finished shards
    shard-00000.safetensors, ...     N examples each (safetensors: no pickle)
    head.safetensors                 with ``logits: head`` only: the teacher's output projection,
                                     ``weight`` [V, d] and ``bias`` [V] (its dtype), listed with its sha256
    part-000003-00001.safetensors    while a build runs: shard 1 of corpus block 3, finished by one of
    part-000003-00001.done           its processes and not yet listed, and its record (JSON: rows,
                                     tokens, sha256); renamed to the next shard-NNNNN when listed
    block-000003.done                while a build runs: every shard of block 3 is written (JSON: shards)

Fields of a shard (``N`` examples padded to ``max_length`` L, or with ``settings.packing`` rows packed
full from texts joined by [SEP] (:func:`kdfast.data.pack_texts`), ``M`` MLM-masked positions):

    input_ids        int32 [N, L]     what the teacher saw (after MLM masking, if any)
    attention_mask   uint8 [N, L]
    labels           int32 [N, L]     MLM targets, -100 where not masked (only with logits)
    logit_offsets    int64 [N + 1]    row n's sparse-logit rows are [offsets[n], offsets[n+1])
    topk_ids         int32 [M, k]     teacher's top-k token ids at the masked positions, row-major
    topk_values      fp16  [M, k]     their raw logits (T = 1)
    topk_lse         fp32  [M]        logsumexp(t / T) of the full row at the cache's temperature
    sampled_ids      int32 [M, k]     or: ids drawn from softmax(t / T) with replacement,
    sampled_counts   fp16  [M, k]         their counts (see kdfast.sparsify_teacher_logits)
    head_input       fp16/bf16 [N, L, d], or int8 + head_input_scale fp32 [N, L] (``logits: head``):
                     the input of the teacher's output projection at every position, so that
                     logits = head_input weight^T + bias exactly (up to the storage rounding)
    hidden_<l>       fp16/bf16 [N, L, d], or int8 [N, L, d] + hidden_<l>_scale fp32 [N, L]
                     (<l> is the index in ``output_hidden_states``: 0 = embeddings)
    q_<l>, k_<l>     fp16 [N, L, H * dh]  query / key projections of transformer layer <l> (1-based)

The corpus is cut into blocks (:func:`kdfast.data.corpus_blocks`: Parquet row groups, byte ranges of
``settings.data.block_bytes`` of text and JSON-lines files, other files whole), a function of the
corpus alone; each block's rows are made from its texts alone (packed rows never cross a block) and
cut into shards of ``rows_per_shard`` rows, the last of a block possibly shorter. The shards are
listed block by block, so the list, and every shard's rows, masks and values, do not depend on which
process built which block: a build by many processes (``torchrun``) writes the same files as one.
A part is written under a temporary name (``.part-BBBBBB-JJJJJ.safetensors.tmp-PID``), fsynced,
renamed, and only then recorded: its ``.done`` record (written the same way); once every shard
before it is listed, it is renamed to the next ``shard-NNNNN`` and listed in the manifest (itself
replaced atomically) with its block, row count, token count and sha256; ``blocks_done`` counts the
leading blocks listed whole. On resume, the only files deleted are those an interrupted write of
kdfast's leaves: temporaries of that exact form, shard files not listed, parts not recorded, and
records of listed parts and blocks.
Anything else in the directory (``.git/``, ``.gitignore``, notes) is never touched; a build
refuses an output directory that is neither empty nor a kdfast cache.

``manifest.json`` is validated as a schema before use (:func:`validate_manifest`): exact types
(``"complete": "false"`` is not a bool), ranges, shard names ``shard-00000`` .. in order, blocks in
order, each shard but the last of its block holding exactly ``rows_per_shard`` rows.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from kdfast.fileio import atomic_write_bytes, fsync_dir, sha256_file, sha256_files  # noqa: F401  (re-exported)

FORMAT = "kdfast-teacher-cache"
VERSION = 2  # 2: shards listed block by block (corpus blocks read by separate processes)
MANIFEST = "manifest.json"
# match with .fullmatch: "$" would accept a trailing newline, "\d" non-ASCII digits
SHARD_RE = re.compile(r"shard-[0-9]{5}\.safetensors")
PART_RE = re.compile(r"part-[0-9]{6}-[0-9]{5}\.safetensors")
PART_RECORD_RE = re.compile(r"part-[0-9]{6}-[0-9]{5}\.done")
BLOCK_RECORD_RE = re.compile(r"block-[0-9]{6}\.done")
RECORD_RE = re.compile(r"(part-[0-9]{6}-[0-9]{5}|block-[0-9]{6})\.done")
HEAD_FILE = "head.safetensors"
# atomic_write_bytes' names
TEMP_RE = re.compile(r"\.(manifest\.json|head\.safetensors|part-[0-9]{6}-[0-9]{5}\.(safetensors|done)"
                     r"|block-[0-9]{6}\.done)\.tmp-[0-9]+")
SHA256_RE = re.compile(r"[0-9a-f]{64}")
LOGIT_MODES = ("topk", "sampled", "none", "head")
MAX_MANIFEST_BYTES = 64 << 20  # about 400k shards; a larger file is not one kdfast wrote


class CacheError(ValueError):
    """A cache that is malformed, altered, torn, or does not match the run."""


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.safetensors"


def part_name(block: int, index: int) -> str:
    """Shard ``index`` of corpus block ``block`` as its process writes it, before it is listed."""
    return f"part-{block:06d}-{index:05d}.safetensors"


def part_record_name(block: int, index: int) -> str:
    """The ``.done`` record of a finished part not yet in the manifest."""
    return f"part-{block:06d}-{index:05d}.done"


def block_record_name(block: int) -> str:
    """The ``.done`` record of a block whose every part is written (JSON: ``{"shards": n}``)."""
    return f"block-{block:06d}.done"


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
    block: int = 0  # the corpus block its rows come from


@dataclass
class Manifest:
    """What a cache holds; ``settings`` must match for a run to resume or read it."""

    settings: dict
    shards: list[ShardInfo] = field(default_factory=list)
    complete: bool = False
    format: str = FORMAT
    version: int = VERSION
    head: dict | None = None  # logits "head": {"file": HEAD_FILE, "sha256": ...} once it is written
    blocks_done: int = 0  # the leading corpus blocks whose every shard is listed

    def listed_parts(self, block: int) -> int:
        """How many shards of ``block`` are listed (all of a block before ``blocks_done``: unknown, -1)."""
        if block < self.blocks_done:
            return -1
        n = 0
        for s in reversed(self.shards):
            if s.block != block:
                break
            n += 1
        return n

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
        """Read and validate ``manifest.json`` (:func:`validate_manifest`); CacheError naming the fault."""
        path = Path(cache_dir) / MANIFEST
        if not path.is_file():
            raise CacheError(f"{cache_dir} is not a kdfast cache: {MANIFEST} is missing")
        if path.stat().st_size > MAX_MANIFEST_BYTES:
            raise CacheError(f"{path} is malformed: larger than {MAX_MANIFEST_BYTES >> 20} MiB")
        try:
            raw = json.loads(path.read_bytes().decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
            raise CacheError(f"{path} is malformed: not UTF-8 JSON ({' '.join(str(e).split())[:200]})") from None
        m = validate_manifest(raw, path)
        for s in m.shards:
            shard_path(cache_dir, s.file)  # refuses names (or links) outside the cache directory
        return m

    def save(self, cache_dir: str | os.PathLike) -> None:
        """Atomically replace manifest.json (write, fsync, rename, fsync the directory)."""
        atomic_write_bytes(Path(cache_dir) / MANIFEST, self.to_json().encode())


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _show(x: object, limit: int = 80) -> str:
    """repr(x), cut short: a hostile manifest must not turn an error into megabytes."""
    text = repr(x)
    return text if len(text) <= limit else text[:limit] + "..."


def _need(ok: bool, where: str, what: str) -> None:
    if not ok:
        raise CacheError(f"{where} is malformed: {what}")


def _dict(x: object, where: str, name: str, keys: set[str]) -> dict:
    """``x`` is a dict with exactly ``keys`` (a missing key or an unknown one is refused)."""
    _need(isinstance(x, dict), where, f"{name} must be an object, got {type(x).__name__}")
    missing, extra = keys - set(x), set(x) - keys
    _need(not missing, where, f"{name} lacks {', '.join(sorted(missing))}")
    _need(not extra, where, f"{name} has unknown field(s) {_show(sorted(map(str, extra)))}")
    return x


def _int(x: object, where: str, name: str, lo: int, hi: int | None = None) -> int:
    ok = _is_int(x) and x >= lo and (hi is None or x <= hi)
    _need(ok, where, f"{name} must be an integer in [{lo}, {'inf' if hi is None else hi}], got {_show(x)}")
    return x


def _str(x: object, where: str, name: str, pattern: re.Pattern | None = None) -> str:
    _need(isinstance(x, str) and (pattern is None or pattern.fullmatch(x) is not None), where,
          f"{name} must be a string{'' if pattern is None else f' matching {pattern.pattern}'}, got {_show(x)}")
    return x


def _int_list(x: object, where: str, name: str, lo: int, hi: int) -> list[int]:
    _need(isinstance(x, list) and len(x) > 0, where, f"{name} must be a non-empty list, got {_show(x)}")
    for v in x:
        _int(v, where, f"{name} entries", lo, hi)
    _need(x == sorted(set(x)), where, f"{name} must be increasing without repeats, got {_show(x)}")
    return x


def validate_settings(settings: object, where: str) -> dict:
    """The build settings as :func:`kdfast.cache.build_cache` writes them: every key, type and range.

    ``packing`` (bool) is absent from caches written before packing existed: those hold padded
    rows, so the returned copy says ``"packing": false`` and they compare equal to a padded build."""
    _need(isinstance(settings, dict), where, f"settings must be an object, got {type(settings).__name__}")
    settings = {**settings, "packing": settings.get("packing", False)}
    s = _dict(settings, where, "settings", {"teacher", "tokenizer_sha256", "data", "max_length", "packing",
                                            "batch_size", "rows_per_shard", "logits", "mlm", "hidden", "qk"})
    t = _dict(s["teacher"], where, "settings.teacher", {"path", "weights_sha256", "model_type", "num_hidden_layers",
                                                         "hidden_size", "num_attention_heads", "vocab_size"})
    _str(t["path"], where, "settings.teacher.path")
    _str(t["weights_sha256"], where, "settings.teacher.weights_sha256", SHA256_RE)
    _str(t["model_type"], where, "settings.teacher.model_type")
    n_layers = _int(t["num_hidden_layers"], where, "settings.teacher.num_hidden_layers", 1)
    for key in ("hidden_size", "num_attention_heads", "vocab_size"):
        _int(t[key], where, f"settings.teacher.{key}", 1)
    _str(s["tokenizer_sha256"], where, "settings.tokenizer_sha256", SHA256_RE)
    d = _dict(s["data"], where, "settings.data", {"files", "sha256", "text_column", "block_bytes"})
    _need(isinstance(d["files"], list) and all(isinstance(f, str) for f in d["files"]), where,
          "settings.data.files must be a list of strings")
    _str(d["sha256"], where, "settings.data.sha256", SHA256_RE)
    _str(d["text_column"], where, "settings.data.text_column")
    _int(d["block_bytes"], where, "settings.data.block_bytes", 1)
    _int(s["max_length"], where, "settings.max_length", 2)
    _need(isinstance(s["packing"], bool), where, f"settings.packing must be true or false, got {_show(s['packing'])}")
    batch = _int(s["batch_size"], where, "settings.batch_size", 1)
    per_shard = _int(s["rows_per_shard"], where, "settings.rows_per_shard", 1)
    _need(per_shard % batch == 0, where, f"settings.rows_per_shard {per_shard} is not a multiple of batch_size {batch}")
    mode = s["logits"].get("mode") if isinstance(s["logits"], dict) else None
    lg = _dict(s["logits"], where, "settings.logits",
               {"mode", "k", "temperature"} | ({"dtype"} if mode == "head" else set()))
    _need(lg["mode"] in LOGIT_MODES, where,
          f"settings.logits.mode must be one of {', '.join(map(repr, LOGIT_MODES))}, got {_show(lg['mode'])}")
    no_k = lg["mode"] in ("none", "head")
    _int(lg["k"], where, "settings.logits.k", 0 if no_k else 1, 0 if no_k else None)
    if lg["mode"] == "head":
        _need(lg["dtype"] in ("fp16", "bf16", "int8"), where,
              f"settings.logits.dtype must be 'fp16', 'bf16' or 'int8', got {_show(lg['dtype'])}")
    temp = lg["temperature"]
    _need(_is_number(temp) and math.isfinite(temp) and temp > 0, where,
          f"settings.logits.temperature must be a finite number > 0, got {_show(temp)}")
    if lg["mode"] == "none":
        _need(s["mlm"] is None, where, "settings.mlm must be null without logits")
    else:
        mlm = _dict(s["mlm"], where, "settings.mlm", {"probability", "seed"})
        p = mlm["probability"]
        _need(_is_number(p) and 0 <= p <= 1, where,
              f"settings.mlm.probability must be a number in [0, 1], got {_show(p)}")
        _int(mlm["seed"], where, "settings.mlm.seed", -(2**63), 2**63 - 1)
    if s["hidden"] is not None:
        h = _dict(s["hidden"], where, "settings.hidden", {"layers", "dtype"})
        _int_list(h["layers"], where, "settings.hidden.layers", 0, n_layers)
        _need(h["dtype"] in ("fp16", "bf16", "int8"), where,
              f"settings.hidden.dtype must be 'fp16', 'bf16' or 'int8', got {_show(h['dtype'])}")
    if s["qk"] is not None:
        _int_list(_dict(s["qk"], where, "settings.qk", {"layers"})["layers"], where, "settings.qk.layers", 1, n_layers)
    return s


def validate_manifest(raw: object, where: str | os.PathLike) -> Manifest:
    """A :class:`Manifest` from parsed JSON, refusing anything :func:`build_cache` would not have written:
    wrong types (``"complete"`` must be a real bool), out-of-range numbers, shards not named
    ``shard-00000``, ``shard-00001``, ... in order (so no repeats), a shard other than the last with
    fewer than ``rows_per_shard`` rows, more tokens than ``rows * max_length``. Row counts are
    checked against the shards themselves by the reader (:meth:`TeacherCache.check_row_counts`)."""
    where = str(where)
    keys = {"format", "version", "settings", "shards", "complete", "blocks_done"}
    m = _dict(raw, where, "the manifest", keys | ({"head"} if isinstance(raw, dict) and "head" in raw else set()))
    _need(m["format"] == FORMAT, where, f"format {_show(m['format'])} is not {FORMAT!r}")
    if not (_is_int(m["version"]) and m["version"] == VERSION):
        raise CacheError(f"{where}: format version {_show(m['version'])} is not supported (want {VERSION}); "
                         "build the cache again")
    _need(isinstance(m["complete"], bool), where, f"complete must be true or false, got {_show(m['complete'])}")
    settings = validate_settings(m["settings"], where)
    per_shard, L = settings["rows_per_shard"], settings["max_length"]
    blocks_done = _int(m["blocks_done"], where, "blocks_done", 0)
    _need(isinstance(m["shards"], list), where, f"shards must be a list, got {type(m['shards']).__name__}")
    for i, sh in enumerate(m["shards"]):  # names first: a repeated shard is reported as such
        sh = _dict(sh, where, f"shards[{i}]", {"file", "block", "rows", "tokens", "sha256"})
        _need(sh["file"] == shard_name(i), where,
              f"shards[{i}].file must be {shard_name(i)!r}, got {_show(sh['file'])}")
    shards: list[ShardInfo] = []
    for i, sh in enumerate(m["shards"]):
        block = _int(sh["block"], where, f"shards[{i}].block", shards[-1].block if shards else 0, blocks_done)
        if shards and shards[-1].rows < per_shard:
            _need(block > shards[-1].block, where, f"shards[{i - 1}] holds {shards[-1].rows} < rows_per_shard "
                  f"{per_shard} rows but is not the last shard of its block")
        rows = _int(sh["rows"], where, f"shards[{i}].rows", 1, per_shard)
        _int(sh["tokens"], where, f"shards[{i}].tokens", 0, rows * L)
        _str(sh["sha256"], where, f"shards[{i}].sha256", SHA256_RE)
        shards.append(ShardInfo(file=sh["file"], rows=rows, tokens=sh["tokens"], sha256=sh["sha256"], block=block))
    head = m.get("head")
    if head is not None:
        _dict(head, where, "head", {"file", "sha256"})
        _need(head["file"] == HEAD_FILE, where, f"head.file must be {HEAD_FILE!r}, got {_show(head['file'])}")
        _str(head["sha256"], where, "head.sha256", SHA256_RE)
    _need(head is not None or settings["logits"]["mode"] != "head" or not shards, where,
          "logits mode 'head' with shards but no head entry")
    return Manifest(settings=settings, shards=shards, complete=m["complete"], head=head, blocks_done=blocks_done)


def shard_path(cache_dir: str | os.PathLike, name: str) -> Path:
    """The path of a shard named in a manifest; refuses anything but a plain shard name inside the cache."""
    root = Path(cache_dir).resolve()
    if not isinstance(name, str) or not SHARD_RE.fullmatch(name):
        raise CacheError(f"shard name {name!r} is not of the form shard-NNNNN.safetensors")
    path = (root / name).resolve()
    if path.parent != root:
        raise CacheError(f"shard name {name!r} points outside the cache directory {root}")
    return path


def is_kdfast_leftover(path: Path, listed: set[str], recorded: set[str] = frozenset()) -> bool:
    """A plain file that only an interrupted write of kdfast's leaves in a cache directory: a
    temporary of :func:`atomic_write_bytes`, a shard file not in ``listed`` (the manifest's), a part
    not in ``recorded`` (:meth:`Records.names`), or a record of a part or block not in ``recorded``."""
    if path.is_symlink() or not path.is_file():
        return False
    if TEMP_RE.fullmatch(path.name) is not None:
        return True
    if SHARD_RE.fullmatch(path.name) is not None:
        return path.name not in listed
    if PART_RE.fullmatch(path.name) is not None:
        return path.name not in recorded
    if PART_RECORD_RE.fullmatch(path.name) is not None:
        return path.name.replace(".done", ".safetensors") not in recorded
    if BLOCK_RECORD_RE.fullmatch(path.name) is not None:
        return path.name not in recorded
    return False


@dataclass
class Records:
    """What the processes of a running build finished and the manifest does not list yet:
    ``parts[(block, index)]`` (``file`` is the part's name) and ``blocks[block]`` = its number of shards."""

    parts: dict[tuple[int, int], ShardInfo] = field(default_factory=dict)
    blocks: dict[int, int] = field(default_factory=dict)

    def names(self) -> set[str]:
        """The part files and block records these records keep (:func:`is_kdfast_leftover`)."""
        return {i.file for i in self.parts.values()} | {block_record_name(b) for b in self.blocks}


def _read_json_record(p: Path, keys: set[str]) -> dict | None:
    if p.is_symlink() or not p.is_file():
        return None
    try:
        return _dict(json.loads(p.read_bytes()[:4096].decode("utf-8")), str(p), "the record", keys)
    except (UnicodeDecodeError, json.JSONDecodeError, CacheError):
        return None


def read_records(cache_dir: str | os.PathLike, manifest: Manifest) -> Records:
    """The records of parts and blocks the manifest does not list yet: a part's record counts when it
    parses and its part file exists (its sha256 is checked where it is used)."""
    out = Records()
    per_shard, L = manifest.settings["rows_per_shard"], manifest.settings["max_length"]
    for p in Path(cache_dir).iterdir():
        if PART_RECORD_RE.fullmatch(p.name) is not None:
            block, index = int(p.name[5:11]), int(p.name[12:17])
            listed = manifest.listed_parts(block)
            if listed < 0 or index < listed or not (Path(cache_dir) / part_name(block, index)).is_file():
                continue
            raw = _read_json_record(p, {"rows", "tokens", "sha256"})
            try:
                rows = _int(raw["rows"], str(p), "rows", 1, per_shard) if raw else None
                if raw:
                    _int(raw["tokens"], str(p), "tokens", 0, rows * L)
                    _str(raw["sha256"], str(p), "sha256", SHA256_RE)
            except CacheError:
                continue
            if raw:
                out.parts[(block, index)] = ShardInfo(file=part_name(block, index), rows=rows, tokens=raw["tokens"],
                                                       sha256=raw["sha256"], block=block)
        elif BLOCK_RECORD_RE.fullmatch(p.name) is not None:
            block = int(p.name[6:12])
            raw = _read_json_record(p, {"shards"})
            if block >= manifest.blocks_done and raw and _is_int(raw["shards"]) and raw["shards"] >= 0:
                out.blocks[block] = raw["shards"]
    return out


def write_record(cache_dir: str | os.PathLike, info: ShardInfo, index: int) -> None:
    """Atomically write the ``.done`` record of part ``index`` of ``info.block`` (after the part itself)."""
    data = json.dumps({"rows": info.rows, "tokens": info.tokens, "sha256": info.sha256}).encode()
    atomic_write_bytes(Path(cache_dir) / part_record_name(info.block, index), data)


def write_block_record(cache_dir: str | os.PathLike, block: int, shards: int) -> None:
    """Atomically write ``block``'s record: its ``shards`` parts are all written and recorded."""
    atomic_write_bytes(Path(cache_dir) / block_record_name(block), json.dumps({"shards": shards}).encode())
