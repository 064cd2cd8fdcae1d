"""Running under ``torchrun``: process group, device, DDP wrapping and small collectives.

A model the user sharded with FSDP2 (``fully_shard``, after applying adapters) is trained as it is.

Nothing here is used in a single process: ``Dist()`` is rank 0 of 1 and every collective returns
its input. Under ``torchrun --nproc_per_node=N`` the Trainer initialises the process group from the
environment (gloo on CPU, nccl on CUDA), pins rank r to ``cuda:LOCAL_RANK`` and wraps the model in
DistributedDataParallel.
"""

from __future__ import annotations

import atexit
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .. import _sharding


@dataclass(frozen=True)
class Dist:
    """Where this process stands: ``rank`` of ``world`` processes, ``local_rank`` on its node."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Only the main process writes logs and checkpoints."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1


def pick_device(name: str, local_rank: int = 0) -> torch.device:
    """``"auto"``: CUDA (this process's local GPU) when available, else CPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ValueError(
            f"device={name!r} is not a device torch knows; use 'auto', 'cpu', 'cuda' or 'cuda:N'"
        ) from err
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("device='cuda' but CUDA is not available; use device='cpu'")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(
                f"device={name!r}: this machine has {torch.cuda.device_count()} CUDA device(s); "
                "use 'cuda' or an index below that"
            )
        if device.index is None:
            device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    return device


def setup(device_name: str) -> tuple[Dist, torch.device]:
    """The process's place in a torchrun job (initialising the process group) and its device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist(), pick_device(device_name)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_name, local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        atexit.register(_shutdown)
    return Dist(dist.get_rank(), dist.get_world_size(), local_rank), device


def _shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def wrap(model: nn.Module, device: torch.device, where: Dist, find_unused: bool) -> nn.Module:
    """``model`` in DistributedDataParallel when running distributed (rank 0's weights broadcast).

    A model sharded with FSDP2 (``fully_shard``) is returned as it is: FSDP2 already reduces the
    gradients (to shards) after each backward.
    """
    if _sharding.is_fsdp2(model):
        return model
    if any(hasattr(p, "ds_shape") for p in model.parameters()):
        raise ValueError(
            "the model's weights are partitioned by DeepSpeed ZeRO-3 (deepspeed.zero.Init), and "
            "the Trainer does not drive DeepSpeed: train it with deepspeed.initialize (or "
            "accelerate) in your own loop, with peftkit.trainable_parameters(model) as the "
            "parameters (examples/deepspeed_zero3.py), or give the Trainer an unpartitioned model"
        )
    if _sharding.any_sharded(model.parameters()):
        raise ValueError(
            "the model holds DTensor parameters but no FSDP2 module (tensor parallel?); the "
            "Trainer trains plain, DDP and FSDP2 (fully_shard) models"
        )
    if not where.active:
        return model
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(
        model, device_ids=ids, find_unused_parameters=find_unused
    )


def mean(values: torch.Tensor, where: Dist) -> torch.Tensor:
    """Element-wise mean of ``values`` over all processes."""
    if not where.active:
        return values
    out = values.clone()
    dist.all_reduce(out)
    return out / where.world


def gather(obj: Any, where: Dist) -> list[Any]:
    """Every process's ``obj``, in rank order."""
    if not where.active:
        return [obj]
    out: list[Any] = [None] * where.world
    dist.all_gather_object(out, obj)
    return out


def broadcast(obj: Any, where: Dist) -> Any:
    """Rank 0's ``obj`` on every process."""
    if not where.active:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(where: Dist) -> None:
    if where.active:
        dist.barrier()
