"""The tensor shapes adapters would have on a model, found without allocating them.

A checkpoint's config decides how much an adapter allocates (``r``, widths, token counts), and a
1 KB file can ask for ``r=200000000``. Before building anything on the real model, the loader
builds the adapters on a *skeleton*: a copy of the model's module tree whose parameters and
buffers are meta tensors (shapes, no storage). Every method then allocates on the meta device
(its layers follow the device of the weight they wrap), and the shapes it would own are compared
with the tensors in the checkpoint, so a config that does not fit them is refused first.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from .core import adapter_state_dict, attach
from .methods.base import Method


def skeleton(model: nn.Module) -> nn.Module:
    """A copy of ``model``'s module tree whose parameters and buffers live on the meta device."""
    memo: dict[int, Any] = {}
    for p in model.parameters():
        memo[id(p)] = nn.Parameter(torch.empty_like(p, device="meta"), p.requires_grad)
    for b in model.buffers():
        memo[id(b)] = torch.empty_like(b, device="meta")
    return copy.deepcopy(model, memo)


def planned_shapes(
    model: nn.Module, build: Callable[[], Iterable[Method]]
) -> dict[str, tuple[int, ...]] | None:
    """Shapes of every tensor the adapters ``build()`` returns would own on ``model``, keyed as in
    ``adapter_state_dict``; None when the model cannot be copied onto the meta device (e.g. a
    quantised weight class without meta support), in which case the caller checks after building.

    Errors of the adapters themselves (a target that matches nothing) surface here, before the real
    model is touched.
    """
    try:
        bones = skeleton(model)
    except (RuntimeError, TypeError, NotImplementedError, AttributeError):
        return None
    names = []
    try:
        for method in build():
            attach(bones, method)
            names.append(method.adapter_name)
    except (RuntimeError, NotImplementedError):
        # A method that runs the model to size itself (prefix-tuning's cache probe) met a kernel
        # without meta support (e.g. Mixtral's grouped matmul): build on the real model, as for a
        # model that cannot be copied, where any error of the adapter itself surfaces again.
        return None
    return {k: tuple(t.shape) for k, t in adapter_state_dict(bones, names).items()}
