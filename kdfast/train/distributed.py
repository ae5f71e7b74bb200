"""Scale-out through ``torch.distributed`` under ``torchrun`` (no home-made launcher).

    torchrun --nproc_per_node=N your_script.py     # sets RANK, WORLD_SIZE, MASTER_ADDR, ...

``init_distributed()`` joins the process group (NCCL on GPUs, gloo on CPU) when torchrun's
environment is present, and ``wrap_ddp`` wraps the student in DistributedDataParallel. Each rank
reads its own slice of the data (``TokenBatches``/``CachedBatches`` take ``rank``/``world_size``),
and the Distiller writes checkpoints and metrics from rank 0 only. A teacher too large for one
device can be sharded with FSDP (``torch.distributed.fsdp.fully_shard``) by the caller; the
Distiller treats it as an opaque callable.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import nn


def init_distributed(backend: str | None = None) -> tuple[int, int, torch.device]:
    """(rank, world_size, device) of this process; initialises the process group under torchrun."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not dist.is_initialized():
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        dist.init_process_group(backend=backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", rank))
        torch.cuda.set_device(local)
        return rank, world, torch.device("cuda", local)
    return rank, world, torch.device("cpu")


def wrap_ddp(model: nn.Module, device: torch.device) -> nn.Module:
    """DistributedDataParallel around ``model`` when a process group is up, else ``model``."""
    if not (dist.is_available() and dist.is_initialized()):
        return model
    return nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def mean_across_ranks(value: float) -> float:
    """The average of a scalar over ranks (for logging a global loss)."""
    if not (dist.is_available() and dist.is_initialized()):
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t) / dist.get_world_size()


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
