"""FSDP2 (``torch.distributed.fsdp.fully_shard``) seen from peftkit: detection, gathering, loading;
and the full shape of a weight DeepSpeed ZeRO-3 partitioned.

A model sharded with FSDP2 holds its parameters as DTensors: each process keeps a shard, and a full
tensor exists only after a collective (``full_tensor``) that every process must take part in. Here
saving gathers full tensors on every process (the first process writes), and loading a full tensor
into a sharded parameter keeps this process's shard of it. Everything is detected by capability:
with a torch that lacks DTensor or FSDP2 nothing is sharded.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable, Mapping
from typing import Any, cast

import torch
import torch.distributed as dist
from torch import nn


def _dtensor_class() -> type | None:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without DTensor
        return None
    return DTensor


def is_dtensor(tensor: torch.Tensor) -> bool:
    cls = _dtensor_class()
    return cls is not None and isinstance(tensor, cls)


def any_sharded(tensors: Iterable[torch.Tensor]) -> bool:
    """Whether any of ``tensors`` is a DTensor (a shard of a larger tensor)."""
    return any(is_dtensor(t) for t in tensors)


def weight_shape(weight: torch.Tensor) -> tuple[int, ...]:
    """The logical shape of a weight: DeepSpeed ZeRO-3 partitions a parameter to an empty tensor
    (``shape == (0,)``) and keeps its full shape as ``ds_shape``."""
    full_shape = getattr(weight, "ds_shape", None)
    return tuple(int(d) for d in (weight.shape if full_shape is None else full_shape))


def is_fsdp2(model: nn.Module) -> bool:
    """Whether ``model`` (or a submodule) was sharded with FSDP2's ``fully_shard``."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch without FSDP2
        return False
    return any(isinstance(m, FSDPModule) for m in model.modules())


def set_gradient_sync(model: nn.Module, sync: bool) -> None:
    """FSDP2: reduce-scatter gradients after the coming backward (``sync``) or keep accumulating
    unsharded gradients locally (the non-final micro-batches of gradient accumulation)."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_requires_gradient_sync(sync, recurse=False)


def full(tensor: torch.Tensor) -> torch.Tensor:
    """The full tensor of a DTensor (a collective: every process must call it), else ``tensor``."""
    return cast(torch.Tensor, cast(Any, tensor).full_tensor()) if is_dtensor(tensor) else tensor


def full_tensors(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``tensors`` with every DTensor gathered to its full tensor. A collective when any is sharded:
    every process must call it with the same keys, in the same order."""
    return {k: full(t) for k, t in tensors.items()}


def like(target: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """``value`` (a full tensor) as ``target`` holds it: this process's shard when ``target`` is a
    DTensor (no communication: every process holds the full value), else ``value`` itself."""
    if not is_dtensor(target) or is_dtensor(value):
        return value
    from torch.distributed.tensor import distribute_tensor

    mesh, placements = cast(Any, target).device_mesh, cast(Any, target).placements
    local = value.to(device=mesh.device_type, dtype=target.dtype)
    try:
        return distribute_tensor(local, mesh, placements, src_data_rank=None)
    except TypeError:  # pragma: no cover - torch before src_data_rank: rank 0's value is scattered
        return distribute_tensor(local, mesh, placements)


def writes() -> bool:
    """Whether this process writes files of a sharded model: the first process, or the only one."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def refuse_sharded(model: nn.Module, what: str) -> None:
    """Raise for operations that would need the full weights in place of FSDP2 shards."""
    if any_sharded(model.parameters()):
        raise ValueError(
            f"{what} needs the full weights, but the model is sharded with FSDP2 (fully_shard). "
            "Save the adapter (save_adapter; every process calls it), load it into an unsharded "
            f"copy of the model in one process, and {what} there"
        )


def full_optimizer_state(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """``optimizer.state_dict()`` with DTensor state gathered to full tensors (a collective when
    the parameters are sharded); the live state is left as it is."""
    saved = optimizer.state_dict()
    saved["state"] = {
        index: {k: full(v) if isinstance(v, torch.Tensor) else v for k, v in per_param.items()}
        for index, per_param in saved["state"].items()
    }
    return saved


def shard_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """After ``load_state_dict`` of a full state: each sharded parameter's state tensors of its
    full shape become this process's shards, laid out as the parameter is."""
    for group in optimizer.param_groups:
        for param in group["params"]:
            per_param = optimizer.state.get(param, {})
            for key, value in per_param.items():
                if isinstance(value, torch.Tensor) and value.shape == param.shape:
                    per_param[key] = like(param, value)


# -- do the processes hold the same adapter? ------------------------------------------------------
# FSDP2 shards without communicating: each process keeps its slice of its own values, so processes
# that initialised an adapter differently train a patchwork of their inits, silently. Once sharded,
# no process sees another's values any more; what can still be compared is a fingerprint of the
# values each process had before it sharded, taken when the adapter was created or loaded.
_FINGERPRINTS: weakref.WeakKeyDictionary[object, dict[str, torch.Tensor]] = (
    weakref.WeakKeyDictionary()
)
_SAMPLES = 256  # elements read per tensor: any two different random initialisations differ there


def fingerprint(tensor: torch.Tensor) -> torch.Tensor | None:
    """A 0-d float64 (MPS: float32) checksum of up to 256 evenly spaced elements, weighted by
    position (no host sync); None for a tensor without values here (a shard, meta, or ZeRO-3's
    empty partition)."""
    if is_dtensor(tensor) or tensor.is_meta or tensor.numel() == 0:
        return None
    wide = torch.float32 if tensor.device.type == "mps" else torch.float64  # MPS has no float64
    flat = tensor.detach().reshape(-1)
    sample = flat[:: max(1, flat.numel() // _SAMPLES)].to(wide)
    weights = torch.arange(1, sample.numel() + 1, dtype=wide, device=sample.device)
    return (sample * weights).sum()


def record_values(owner: object, tensors: Mapping[str, torch.Tensor]) -> None:
    """Remember the fingerprints of ``tensors`` (full values) for ``owner`` (an adapter method)."""
    book = _FINGERPRINTS.setdefault(owner, {})
    for key, tensor in tensors.items():
        found = fingerprint(tensor)
        if found is not None:
            book[key] = found


def recorded_values(owner: object) -> dict[str, torch.Tensor]:
    """The fingerprints ``record_values`` took for ``owner``, by key."""
    return dict(_FINGERPRINTS.get(owner, {}))
