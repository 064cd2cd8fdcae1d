"""``TrainConfig(distributed="fsdp2")``: the Trainer shards the model with FSDP2 itself.

Rank 0's parameters and buffers are broadcast first (FSDP2 does not: each process would keep its
shard of its own initialisation), then every block is sharded, bottom-up, and the root last. The
blocks are the classes named in ``shard_modules``, else an HF model's ``_no_split_modules``.
``precision="bf16"`` becomes FSDP2's mixed-precision policy: bf16 parameters for the computation,
gradients reduced in fp32, fp32 parameters in the optimiser.
"""

from __future__ import annotations

import difflib
from itertools import chain
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .. import _compat, _sharding
from ..core import adapters
from . import distributed
from .config import TrainConfig
from .distributed import Dist


def shard(model: nn.Module, config: TrainConfig) -> None:
    """Broadcast rank 0's weights and shard ``model`` in place (a sharded model is left as it is)."""
    if _sharding.is_fsdp2(model):
        return
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError(
            "distributed='fsdp2' needs a process group: run the script under torchrun (or call "
            "torch.distributed.init_process_group before fit)"
        )
    from torch.distributed.fsdp import fully_shard

    broadcast_from_rank0(model)
    names = set(block_names(model, config.shard_modules))
    blocks = [m for m in model.modules() if type(m).__name__ in names and m is not model]
    options = _options(config)
    for block in reversed(blocks):  # inner blocks before the ones holding them
        fully_shard(block, **options)
    fully_shard(model, **options)


def broadcast_from_rank0(model: nn.Module) -> None:
    """Every parameter and buffer of ``model`` as rank 0 holds it, on every process."""
    with torch.no_grad():
        for tensor in chain(model.parameters(), model.buffers()):
            dist.broadcast(tensor.data, src=0)


def block_names(model: nn.Module, given: tuple[str, ...]) -> list[str]:
    """The class names to shard as units: ``given`` (each must occur), else the model's blocks."""
    present = sorted({type(m).__name__ for m in model.modules()})
    if given:
        missing = [n for n in given if n not in present]
        if missing:
            close = difflib.get_close_matches(missing[0], present, n=3)
            raise ValueError(
                f"shard_modules {missing} matched no module of the model"
                f"{f'; closest class names: {close}' if close else ''}"
            )
        return list(given)
    found = [n for n in _compat.no_split_modules(model) if n in present]
    if not found:
        raise ValueError(
            "distributed='fsdp2' shards the model per block, and found no block classes (the "
            "model has no _no_split_modules); name them: TrainConfig(shard_modules=('MyBlock',))"
        )
    return found


def _options(config: TrainConfig) -> dict[str, Any]:
    if config.precision != "bf16":
        return {}
    from torch.distributed.fsdp import MixedPrecisionPolicy

    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return {"mp_policy": policy}


def check_same_adapters(model: nn.Module, where: Dist) -> None:
    """Refuse to train a model the user sharded when the processes created or loaded different
    adapter values before sharding (compared by fingerprint, with one all-gather)."""
    mine = {
        f"{name}.{key}": float(value)
        for name, method in adapters(model).items()
        for key, value in sorted(_sharding.recorded_values(method).items())
    }
    every = distributed.gather(mine, where)
    differ = [k for k in mine if len({repr(r[k]) for r in every if k in r}) > 1]  # repr: NaN
    if not differ:
        return
    raise ValueError(
        f"the {where.world} processes hold different values of {len(differ)} adapter tensor(s) "
        f"({', '.join(differ[:3])}{', ...' if len(differ) > 3 else ''}): they applied the adapter "
        "with different random seeds (or loaded different files) before fully_shard, and FSDP2 "
        "keeps each process's shard of its own values. Seed every process the same before apply_* "
        "(torch.manual_seed(0)), load one saved adapter on every process before sharding, or let "
        "the Trainer shard: TrainConfig(distributed='fsdp2') broadcasts rank 0's values first"
    )
