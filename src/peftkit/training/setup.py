"""Making a model ready to train: device, activation checkpointing, the adversarial hook, FSDP2
sharding (``distributed="fsdp2"``) or DDP, and ``torch.compile``, in that order (DDP wraps the
model the hooks are on; compile wraps DDP)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import torch
from torch import nn

from .. import _compat, _sharding
from ..losses.adversarial import EmbeddingAttack, find_input_embedding
from . import distributed, fsdp
from .config import TrainConfig
from .distributed import Dist
from .optim import parameters_to_train


@dataclass
class Prepared:
    model: nn.Module  # what the step calls: the model, or its DDP / compiled wrapper
    ddp: nn.parallel.DistributedDataParallel | None
    fsdp2: bool  # sharded with fully_shard: gradient sync per micro-batch through FSDP2's switch
    attack: EmbeddingAttack | None


def prepare(model: nn.Module, config: TrainConfig, device: torch.device, where: Dist) -> Prepared:
    model.to(device)
    if config.gradient_checkpointing:
        enable_checkpointing(model)
    attack = None
    if config.adversarial is not None:
        attack = EmbeddingAttack(
            find_input_embedding(model),
            method=config.adversarial,
            epsilon=config.adv_epsilon,
            alpha=config.adv_alpha,
            steps=config.adv_steps,
        )
    model.train()
    parameters_to_train(model)  # a clear error before DDP's when nothing is trainable
    if _sharding.is_fsdp2(model) and where.active:  # sharded by the user: from what values?
        fsdp.check_same_adapters(model, where)
    elif config.distributed == "fsdp2":
        fsdp.shard(model, config)  # rank 0's values broadcast first
    wrapped = distributed.wrap(model, device, where, config.find_unused_parameters)
    ddp = wrapped if isinstance(wrapped, nn.parallel.DistributedDataParallel) else None
    if config.compile:
        wrapped = cast(nn.Module, torch.compile(wrapped))
    return Prepared(wrapped, ddp, _sharding.is_fsdp2(model), attack)


def enable_checkpointing(model: nn.Module) -> None:
    """HF activation (gradient) checkpointing, non-reentrant: it needs no input that requires grad."""
    _compat.enable_checkpointing(model, use_reentrant=False)
