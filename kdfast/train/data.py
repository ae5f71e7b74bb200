"""Batch sources for the Distiller: deterministic per (seed, epoch), restartable at any batch,
so that a resumed run sees exactly the batches an uninterrupted one would."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from kdfast.cache import CacheDataset, Prefetcher, TeacherCache


class TokenBatches:
    """Tokenised texts held in memory ([E, L] ids and mask), shuffled per epoch with ``seed``.

    Under ``torchrun`` each of ``world_size`` ranks takes its ``batch_size`` rows of every global
    batch of ``world_size * batch_size`` rows, so N ranks see exactly what one process with an
    N times larger batch sees.

    ``extra`` holds further per-example tensors ([E, ...], e.g. ``token_type_ids`` and ``labels``
    of a classification task), batched with the same rows under their own keys.
    """

    def __init__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, batch_size: int, *, seed: int = 0,
                 shuffle: bool = True, drop_last: bool = True, rank: int | None = None,
                 world_size: int | None = None, extra: dict[str, torch.Tensor] | None = None) -> None:
        from kdfast.train.distributed import rank_and_world

        if rank is None or world_size is None:
            rank, world_size = rank_and_world()
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} must lie in [0, world_size={world_size})")
        self.rank, self.world_size = rank, world_size
        if input_ids.shape != attention_mask.shape or input_ids.dim() != 2:
            raise ValueError(f"input_ids {tuple(input_ids.shape)} and attention_mask "
                             f"{tuple(attention_mask.shape)} must both be [examples, length]")
        if batch_size < 1 or batch_size * world_size > input_ids.shape[0]:
            raise ValueError(f"batch_size must be in [1, {input_ids.shape[0] // world_size}] "
                             f"({input_ids.shape[0]} examples, {world_size} ranks), got {batch_size}")
        extra = dict(extra or {})
        for name, t in extra.items():
            if name in ("input_ids", "attention_mask"):
                raise ValueError(f"extra must not redefine {name!r}")
            if not isinstance(t, torch.Tensor) or t.dim() < 1 or t.shape[0] != input_ids.shape[0]:
                raise ValueError(f"extra[{name!r}] must be a tensor with {input_ids.shape[0]} rows (one per "
                                 f"example), got {tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
        self.input_ids, self.attention_mask, self.extra = input_ids, attention_mask, extra
        self.batch_size, self.seed, self.shuffle, self.drop_last = batch_size, seed, shuffle, drop_last

    def num_batches(self) -> int:
        n, g = self.input_ids.shape[0], self.batch_size * self.world_size
        return n // g if self.drop_last else -(-n // g)

    def batches(self, epoch: int, start: int = 0) -> Iterator[dict]:
        n = self.input_ids.shape[0]
        order = (torch.randperm(n, generator=torch.Generator().manual_seed(self.seed * 1_000_003 + epoch))
                 if self.shuffle else torch.arange(n))
        g = self.batch_size * self.world_size
        for b in range(start, self.num_batches()):
            idx = order[b * g:(b + 1) * g][self.rank * self.batch_size:(self.rank + 1) * self.batch_size]
            yield {"input_ids": self.input_ids[idx], "attention_mask": self.attention_mask[idx],
                   **{name: t[idx] for name, t in self.extra.items()}}


class CachedBatches:
    """Batches of a teacher cache (inputs + teacher targets), this rank's slice, shuffled per epoch."""

    def __init__(self, cache: TeacherCache, batch_size: int, *, seed: int = 0, shuffle: bool = True,
                 rank: int | None = None, world_size: int | None = None) -> None:
        self.ds = CacheDataset(cache, batch_size, shuffle=shuffle, seed=seed, rank=rank, world_size=world_size,
                               drop_last=True)

    def num_batches(self) -> int:
        return len(self.ds)

    def batches(self, epoch: int, start: int = 0) -> Iterator[dict]:
        self.ds.set_epoch(epoch)
        # Read ahead on a thread, into pinned memory when a GPU is present, so that the Distiller's
        # non_blocking copies overlap with the step instead of waiting for the disk and a pageable copy.
        yield from Prefetcher(self.ds.iter_from(start))
