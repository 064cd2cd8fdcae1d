"""Shared test helpers."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

import peftkit


def perturb(model: nn.Module, seed: int = 0, scale: float = 0.1) -> None:
    """Give every adapter tensor random values, so merges and reloads are not trivially zero."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in peftkit.trainable_parameters(model):
            p.add_(torch.randn(p.shape, generator=gen, dtype=torch.float32).to(p.dtype) * scale)


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def has_adapter_layers(model: nn.Module) -> bool:
    return any(isinstance(m, peftkit.AdapterLayer) for m in model.modules())


@contextmanager
def temporarily_registered(name: str, config_cls: type, method_cls: type) -> Iterator[None]:
    """Register a test-only method for the duration of a test, then remove it again, so it does
    not leak into tests that walk every registered method (the demo, the contract)."""
    from peftkit import registry

    registry.register_method(name, config_cls, override=True)(method_cls)
    try:
        yield
    finally:
        registry._BY_NAME.pop(name, None)
