"""Where a model keeps its adapters: the one leaf every other part may import.

A model carries its adapters in one plain attribute (``model.__dict__["_peftkit"]``): the named
``Method`` objects in the order they were applied, plus the ``requires_grad`` flags the base had
before the first one. Everything else about an adapter (its layers, whether it is active, what is
merged) is read from the module tree itself, so there is nothing here to keep in sync.

This module imports nothing else of peftkit, so methods, ``core``, ``plain``, the losses and the
training loop can all look adapters up without an import cycle.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from torch import nn
from torch.utils.hooks import RemovableHandle

if TYPE_CHECKING:
    from .methods.base import Method

STATE_ATTR = "_peftkit"
# Bumped whenever the module tree may have changed: by peftkit's own edits (``targeting``) and at
# the start of every model-level operation (``require_state``), so a hand edit between operations
# is seen too. ``Method.layers`` re-reads the tree when it moved; the per-step hooks in between
# (step_hooks, regularizer) do not walk the whole model on every step.
_TREE_EDITS = [0]


def tree_changed() -> None:
    """Note that the module tree may have changed (layers found in it are read again)."""
    _TREE_EDITS[0] += 1


def tree_generation() -> int:
    return _TREE_EDITS[0]


@dataclass
class AdapterState:
    methods: dict[str, Method] = field(default_factory=dict)
    base_flags: list[tuple[nn.Parameter, bool]] = field(default_factory=list)
    load_guard: RemovableHandle | None = None
    input_grads: Any = None  # input_grads.InputGrads: inputs that require grad under checkpointing


def unwrap_model(model: nn.Module) -> nn.Module:
    """The user's model inside DistributedDataParallel / torch.compile wrappers."""
    while True:
        inner = getattr(model, "_orig_mod", None) or (
            model.module if isinstance(model, nn.parallel.DistributedDataParallel) else None
        )
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def adapter_state(model: nn.Module) -> AdapterState | None:
    state = unwrap_model(model).__dict__.get(STATE_ATTR)
    return state if isinstance(state, AdapterState) else None


def require_state(model: nn.Module) -> AdapterState:
    """The model's adapter state; an error naming the fix when it has no adapter. Every
    model-level operation starts here, so each reads the module tree afresh."""
    tree_changed()
    state = adapter_state(model)
    if state is None or not state.methods:
        raise ValueError(
            "the model has no adapters; apply one first, e.g. peftkit.apply_lora(model)"
        )
    return state


def adapters(model: nn.Module) -> dict[str, Method]:
    """The model's adapters by name, in the order they were applied (empty if none)."""
    state = adapter_state(model)
    return dict(state.methods) if state else {}
