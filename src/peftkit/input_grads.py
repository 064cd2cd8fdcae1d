"""Inputs that require grad while activation checkpointing trains a frozen model.

Reentrant checkpointing (``use_reentrant=True``) records a checkpointed layer for backward only if
one of its inputs requires grad. With the base frozen, the hidden states entering the first layer
do not (every parameter before it is frozen), so the adapters inside never get a gradient and
backward fails ("element 0 of tensors does not require grad"). transformers'
``enable_input_require_grads`` marks the output of the input embeddings, which covers token models
but not models whose main input is already a float tensor (Whisper's ``input_features``, ViT's and
CLIP's ``pixel_values``).

peftkit does both, and only while a checkpointed module trains: a forward pre-hook on the model
passes each floating-point input tensor on as a detached alias that requires grad (the caller's
tensor is left as it was) and, for that call only, hooks the input embeddings so that their output
requires grad; a forward hook on the model takes that hook off again. The
gradient then flows from the first layer back to that alias: the frozen front-end (a convolution,
a patch embedding) computes one input gradient more, nothing else changes.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from . import _compat

__all__ = ["InputGrads"]


class InputGrads:
    """The two hooks on one model; ``remove`` takes them off."""

    def __init__(self, model: nn.Module) -> None:
        self.flagged = _compat.checkpointing_modules(model)
        self.handles: list[Any] = []
        self.embeddings: nn.Module | None = None
        self.during: Any = None  # the embeddings' hook while a checkpointed call runs
        if not self.flagged:
            return  # nothing can be checkpointed: no hooks
        self.embeddings = _input_embeddings(model)
        pre = model.register_forward_pre_hook(self._inputs, with_kwargs=True)
        post = model.register_forward_hook(self._done, always_call=True)
        self.handles.extend([pre, post])

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []
        self._done()

    def active(self) -> bool:
        """A checkpointed module would train now (grad enabled, some flag on, in training mode)."""
        if not torch.is_grad_enabled():
            return False
        return any(m.gradient_checkpointing and m.training for m in self.flagged)

    def _inputs(
        self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
        if not self.active():
            return None
        if self.embeddings is not None and self.during is None:
            self.during = self.embeddings.register_forward_hook(_embedded)
        named = {k: _needing_grad(v) for k, v in kwargs.items()}
        return tuple(_needing_grad(a) for a in args), named

    def _done(self, *_: Any) -> None:
        if self.during is not None:
            self.during.remove()
            self.during = None


def _embedded(module: nn.Module, args: Any, output: Any) -> None:
    if isinstance(output, torch.Tensor) and not output.requires_grad:
        output.requires_grad_(True)


def _needing_grad(value: Any) -> Any:
    if isinstance(value, torch.Tensor) and value.is_floating_point() and not value.requires_grad:
        return value.detach().requires_grad_(True)
    return value


def _input_embeddings(model: nn.Module) -> nn.Module | None:
    getter = getattr(model, "get_input_embeddings", None)
    if not callable(getter):
        return None
    try:
        found = getter()
    except (NotImplementedError, AttributeError):
        return None
    return found if isinstance(found, nn.Module) else None
