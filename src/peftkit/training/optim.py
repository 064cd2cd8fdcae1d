"""Optimisers over the trainable parameters, and learning-rate schedules with warm-up.

Which parameters get weight decay is decided structurally: matrices and higher-rank tensors do;
vectors (biases, norm scales) and anything owned by a normalisation layer do not. Names are never
consulted.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..core import adapters
from ..methods.base import Method
from .config import TrainConfig

_NORMS: tuple[type[nn.Module], ...] = (
    nn.LayerNorm,
    nn.GroupNorm,
    nn.LocalResponseNorm,
    nn.modules.batchnorm._NormBase,
    *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()),
)


def parameters_to_train(model: nn.Module) -> list[nn.Parameter]:
    """The active adapters' parameters; for a model without adapters, those that require grad."""
    methods = adapters(model)
    if methods:
        return _adapter_parameters(methods)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters; apply an adapter first")
    return params


def _adapter_parameters(methods: dict[str, Method]) -> list[nn.Parameter]:
    """Parameters of the active adapters that are not merged (a merged one gets no gradient)."""
    merged = [n for n, m in methods.items() if m.active and any(la.merged for la in m.layers)]
    skip = {id(p) for n in merged for p in methods[n].parameters()}
    params = [p for m in methods.values() if m.active for p in m.parameters() if id(p) not in skip]
    unique = list({id(p): p for p in params}.values())
    if unique:
        return unique
    if merged:
        raise ValueError(
            f"adapter {', '.join(map(repr, merged))} is merged into the base weights, so training "
            "would not change the model; unmerge first (peftkit.unmerge(model)) or apply a new "
            "adapter"
        )
    raise ValueError(
        f"every adapter is inactive ({', '.join(map(repr, methods))}), so nothing would train; "
        f"activate one first, e.g. peftkit.set_active(model, {next(iter(methods))!r})"
    )


def decays(param: nn.Parameter, owner: nn.Module | None) -> bool:
    """Weight decay applies to matrices (ndim >= 2) not owned by a normalisation layer."""
    return param.ndim >= 2 and not isinstance(owner, _NORMS)


def param_groups(
    model: nn.Module, params: Sequence[nn.Parameter], weight_decay: float
) -> list[dict[str, Any]]:
    """``params`` split into a decayed and an undecayed group (empty groups dropped)."""
    owners = {id(p): m for m in model.modules() for p in m.parameters(recurse=False)}
    decayed = [p for p in params if decays(p, owners.get(id(p)))]
    plain = [p for p in params if not decays(p, owners.get(id(p)))]
    groups = [
        {"params": decayed, "weight_decay": weight_decay},
        {"params": plain, "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


def build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """The configured optimiser over ``parameters_to_train(model)``. ``config.lr`` must be set
    (the Trainer fills an unset one from the model's methods first: ``training.defaults``)."""
    if config.lr is None:
        raise ValueError(
            "build_optimizer needs TrainConfig.lr; fill it with "
            "peftkit.training.defaults.resolve(model, config) or pass lr=..."
        )
    lr = config.lr
    groups = param_groups(model, parameters_to_train(model), config.weight_decay)
    if config.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=config.betas, eps=config.eps)
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=config.momentum)
    adafactor = getattr(torch.optim, "Adafactor", None)
    if adafactor is None:
        raise ValueError("optimizer='adafactor' needs torch >= 2.5; upgrade torch or use 'adamw'")
    optimizer: torch.optim.Optimizer = adafactor(groups, lr=lr)
    return optimizer


@dataclass(frozen=True)
class Schedule:
    """lr multiplier at optimiser step ``step`` (0-based).

    Warm-up: (step + 1) / (warmup + 1) for step < warmup. Then with p = (step - warmup) /
    (total - warmup): constant 1; linear m + (1 - m)(1 - p); cosine m + (1 - m)(1 + cos(pi p)) / 2,
    where m is ``min_ratio``.
    """

    kind: str
    total: int
    warmup: int = 0
    min_ratio: float = 0.0

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / (self.warmup + 1)
        if self.kind == "constant":
            return 1.0
        progress = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
        linear = self.kind == "linear"
        shape = 1.0 - progress if linear else 0.5 * (1.0 + math.cos(math.pi * progress))
        return self.min_ratio + (1.0 - self.min_ratio) * shape


def build_scheduler(
    optimizer: torch.optim.Optimizer, config: TrainConfig, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    warmup = config.warmup_steps or int(config.warmup_ratio * total_steps)
    schedule = Schedule(config.schedule, total_steps, warmup, config.min_lr_ratio)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


def scheduler_state(scheduler: torch.optim.lr_scheduler.LambdaLR) -> dict[str, Any]:
    """The scheduler's counters (the schedule itself is rebuilt from the config)."""
    return {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"}


def load_scheduler_state(
    scheduler: torch.optim.lr_scheduler.LambdaLR, state: dict[str, Any]
) -> None:
    lambdas: list[Any] = [None] * len(scheduler.lr_lambdas)  # the schedule comes from the config
    scheduler.load_state_dict({**state, "lr_lambdas": lambdas})
