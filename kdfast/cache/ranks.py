"""A cache built by many processes (``torchrun``): who builds which corpus block, and how finished
shards enter the manifest.

The corpus is cut into blocks that are read independently (:func:`kdfast.data.corpus_blocks`).
Block ``b`` is built by rank ``b mod world_size``, which reads that block's texts only, skipping
the shards of it already finished, so any number of ranks resumes any partial cache. A rank writes
each shard of its block as a part, then the part's ``.done`` record, and after the block's last part
the block's record; rank 0 alone writes the manifest, renaming each recorded part to the next
``shard-NNNNN`` once every shard before it is listed (:func:`fold_records`). A build is complete
only when rank 0 has listed every block of the corpus after all ranks met at the end: a rank that
fails leaves records and a manifest that the next build resumes from, never a cache marked complete
with a shard missing.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch

from kdfast.cache.format import (
    CacheError,
    Manifest,
    ShardInfo,
    block_record_name,
    part_record_name,
    read_records,
    shard_name,
)

T = TypeVar("T")


@dataclass(frozen=True)
class Ranks:
    """This process's place in the build: ``rank`` of ``world_size`` (1 process: 0 of 1)."""

    rank: int = 0
    world_size: int = 1

    def owns(self, block: int) -> bool:
        return block % self.world_size == self.rank

    def barrier(self) -> None:
        if self.world_size > 1:
            torch.distributed.barrier()

    def share(self, fn: Callable[[], T]) -> T:
        """``fn()`` run by rank 0 alone and its result handed to every rank; a ValueError it raises is
        raised on every rank (with its message), so no rank waits for one that gave up."""
        if self.world_size == 1:
            return fn()
        box: list = [None]
        if self.rank == 0:
            try:
                box[0] = ("ok", fn())
            except ValueError as e:
                box[0] = ("error", str(e))
        torch.distributed.broadcast_object_list(box, src=0)
        kind, value = box[0]
        if kind == "error":
            raise ValueError(value)
        return value


def current_ranks() -> Ranks:
    """The ranks of the initialised ``torch.distributed`` group (1 process when there is none)."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return Ranks(dist.get_rank(), dist.get_world_size())
    return Ranks()


def init_from_env() -> bool:
    """Join the ``torchrun`` group named by the environment (``WORLD_SIZE`` > 1) over gloo, unless a
    group exists already; True when this call created it (the caller destroys it at the end)."""
    dist = torch.distributed
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_available() or dist.is_initialized():
        return False
    dist.init_process_group("gloo")
    return True


def fold_records(out: Path, manifest: Manifest) -> int:
    """Rank 0: list every recorded part that continues the manifest's list, block by block (each
    renamed to the next ``shard-NNNNN``; a block's record moves ``blocks_done`` past it once all its
    parts are listed), save the manifest, then delete the folded records; the number of shards listed.

    A crash between a rename and the save leaves an unlisted shard (deleted on resume) and a record
    whose part is gone (ignored): that part is built again, never listed twice or skipped."""
    records = read_records(out, manifest)
    folded: list[str] = []
    block, index = manifest.blocks_done, manifest.listed_parts(manifest.blocks_done)
    while True:
        part = records.parts.get((block, index))
        if part is not None:
            name = shard_name(len(manifest.shards))
            os.replace(out / part.file, out / name)
            manifest.shards.append(ShardInfo(file=name, rows=part.rows, tokens=part.tokens, sha256=part.sha256,
                                             block=block))
            folded.append(part_record_name(block, index))
            index += 1
        elif records.blocks.get(block) == index:
            folded.append(block_record_name(block))
            block, index = block + 1, 0
            manifest.blocks_done = block
        else:
            break
    if folded:
        manifest.save(out)  # listed first: a record left by a crash here is a leftover, cleaned on resume
        for name in folded:
            (out / name).unlink(missing_ok=True)
    return sum(name.startswith("part-") for name in folded)


def finish(out: Path, manifest: Manifest, n_blocks: int) -> None:
    """Rank 0, after every rank met: list the remaining recorded shards and mark the cache complete,
    or raise CacheError naming the blocks no rank finished (the cache stays resumable)."""
    fold_records(out, manifest)
    if manifest.blocks_done != n_blocks:
        records = read_records(out, manifest)
        missing = [b for b in range(manifest.blocks_done, n_blocks) if b not in records.blocks] or \
            [manifest.blocks_done]
        shown = ", ".join(map(str, missing[:5])) + (", ..." if len(missing) > 5 else "")
        raise CacheError(f"{out}: corpus block(s) {shown} of {n_blocks} were not finished (a process failed?); "
                         "run the build again to resume it")
    manifest.complete = True
    manifest.save(out)
