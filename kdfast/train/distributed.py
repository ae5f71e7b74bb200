"""Scale-out through ``torch.distributed`` under ``torchrun`` (no home-made launcher).

    torchrun --nproc_per_node=N your_script.py     # sets RANK, WORLD_SIZE, MASTER_ADDR, ...

``init_distributed()`` joins the process group (NCCL on GPUs, gloo on CPU) when torchrun's
environment is present, and ``wrap_ddp`` wraps the student in DistributedDataParallel. Each rank
reads its own slice of the data (``TokenBatches``/``CachedBatches`` take ``rank``/``world_size``),
and the Distiller writes checkpoints and metrics from rank 0 only. ``shard_teacher`` shards a frozen
teacher too large for one device with FSDP2 (``torch.distributed.fsdp.fully_shard``, each
transformer layer, then the rest): every rank keeps 1/N of its weights and gathers one layer's at a
time during the forward. It works on GPUs (NCCL) and on CPU (gloo). The Distiller treats the
teacher as an opaque callable, so a sharded one needs nothing else.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

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


def _collective_device() -> torch.device:
    """Where a scalar collective's tensor must live: NCCL reduces CUDA tensors only, gloo CPU ones."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def mean_across_ranks(value: float) -> float:
    """The average of a scalar over ranks (for logging a global loss): (1 / W) sum_r value_r."""
    if not (dist.is_available() and dist.is_initialized()):
        return value
    t = torch.tensor([value], dtype=torch.float64, device=_collective_device())
    dist.all_reduce(t)
    return float(t) / dist.get_world_size()


def signal_on_any_rank(signum: int | None) -> int | None:
    """max_r signum_r over the ranks (None when no rank has one), so that every rank stops after the
    same step when a signal reached only some of them (a collective one rank no longer joins would
    hang the others). One rank: ``signum`` itself, no collective."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return signum
    t = torch.tensor([signum or 0], dtype=torch.int64, device=_collective_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t) or None


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _repeated_blocks(model: nn.Module) -> list[nn.Module]:
    """The elements of the outermost ``nn.ModuleList``s: the transformer layers of BERT, DistilBERT,
    MobileBERT and kdfast's students (a ModuleList inside a layer, such as MobileBERT's stacked
    FFNs, stays with its layer)."""
    blocks: list[nn.Module] = []

    def visit(module: nn.Module) -> None:
        for child in module.children():
            if isinstance(child, nn.ModuleList):
                blocks.extend(child)
            else:
                visit(child)

    visit(model)
    return blocks


def shard_teacher(model: nn.Module, device: torch.device | str, *, layers: Iterable[nn.Module] | None = None,
                  param_dtype: torch.dtype | None = None) -> nn.Module:
    """A frozen (``requires_grad=False``), eval-mode teacher, sharded over the ranks with FSDP2.

    Under an initialised process group of N ranks, ``fully_shard`` is applied to each of
    ``layers`` (default: the elements of the model's outermost ``nn.ModuleList``s, i.e. its
    transformer layers), then to the root, all with ``reshard_after_forward=True``: each rank
    holds about 1/N of the parameter bytes, and a forward gathers one layer's weights at a time
    and frees them after it. All ranks must call the teacher together (each on its own batch).
    Pass the model on the CPU: each layer moves to ``device`` as it is sharded, so the whole
    teacher never has to fit there. ``param_dtype`` (e.g. ``torch.bfloat16``) gathers and
    computes in that dtype through ``MixedPrecisionPolicy`` (the shards stay in their dtype).

    Without a process group (or with one rank) the model is returned as it is, only frozen, in
    eval mode and moved to ``device`` (and cast to ``param_dtype`` when given), so that one
    script runs alone or under torchrun.
    """
    device = torch.device(device)
    if param_dtype is not None and not (isinstance(param_dtype, torch.dtype) and param_dtype.is_floating_point):
        raise ValueError(f"param_dtype must be a floating torch.dtype or None, got {param_dtype!r}")
    blocks = _repeated_blocks(model) if layers is None else list(layers)
    inside = {id(m) for m in model.modules()}
    if any(id(b) not in inside or b is model for b in blocks):
        raise ValueError("layers must be submodules of model (and not model itself)")
    model.requires_grad_(False)
    model.eval()
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return model.to(device=device, dtype=param_dtype)
    backend = str(dist.get_backend()).lower()
    wanted = {"cuda": "nccl", "cpu": "gloo"}.get(device.type)
    if wanted is not None and wanted not in backend:
        raise ValueError(f"device {device} needs a {wanted} process group, this one is {backend!r}")
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    # an explicit mesh: the default one follows torch.cuda.is_available(), not the group's backend
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    policy = MixedPrecisionPolicy(param_dtype=param_dtype)
    # the root keeps its parameters gathered after a forward by default (good for training);
    # a teacher only runs forwards, so free them there too
    for block in blocks:
        fully_shard(block, mesh=mesh, reshard_after_forward=True, mp_policy=policy)
    fully_shard(model, mesh=mesh, reshard_after_forward=True, mp_policy=policy)
    return model


def parameter_bytes(model: nn.Module) -> int:
    """Bytes of the parameters this rank holds: its local shards of FSDP-sharded (DTensor)
    parameters, the whole of the others; a parameter shared by several modules counts once."""
    total = 0
    for p in model.parameters():
        local = p.to_local() if hasattr(p, "to_local") else p
        total += local.numel() * local.element_size()
    return total
