"""A cache built by many processes (``torchrun``): who builds which shard, and how finished shards
enter the manifest.

Shard ``i`` holds rows ``[i R, (i + 1) R)`` (R = ``rows_per_shard``) and is built by rank
``i mod world_size``, skipping shards already finished, so any number of ranks resumes any partial
cache. A rank writes its shard, then the shard's ``.done`` record; rank 0 alone writes the manifest,
appending each recorded shard once every shard before it is listed (:func:`fold_records`). A build
is complete only when rank 0 has listed every shard of the corpus after all ranks met at the end:
a rank that fails leaves records and a manifest that the next build resumes from, never a cache
marked complete with a shard missing.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from kdfast.cache.format import CacheError, Manifest, read_records, record_name


@dataclass(frozen=True)
class Ranks:
    """This process's place in the build: ``rank`` of ``world_size`` (1 process: 0 of 1)."""

    rank: int = 0
    world_size: int = 1

    def owns(self, shard: int) -> bool:
        return shard % self.world_size == self.rank

    def barrier(self) -> None:
        if self.world_size > 1:
            torch.distributed.barrier()


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
    """Rank 0: append to ``manifest`` every recorded shard that continues its list, save it, then
    delete the folded records; the number of shards appended."""
    records = read_records(out, manifest)
    folded = []
    while len(manifest.shards) in records:
        folded.append(len(manifest.shards))
        manifest.shards.append(records[len(manifest.shards)])
    if folded:
        manifest.save(out)  # listed first: a record left by a crash here is a leftover, cleaned on resume
        for i in folded:
            (out / record_name(i)).unlink(missing_ok=True)
    return len(folded)


def finish(out: Path, manifest: Manifest, n_shards: int) -> None:
    """Rank 0, after every rank met: list the remaining recorded shards and mark the cache complete,
    or raise CacheError naming the shards no rank finished (the cache stays resumable)."""
    fold_records(out, manifest)
    if len(manifest.shards) != n_shards:
        missing = sorted(set(range(n_shards)) - set(range(len(manifest.shards))) - set(read_records(out, manifest)))
        shown = ", ".join(map(str, missing[:5])) + (", ..." if len(missing) > 5 else "")
        raise CacheError(f"{out}: shard(s) {shown} of {n_shards} were not finished (a process failed?); "
                         "run the build again to resume it")
    manifest.complete = True
    manifest.save(out)
