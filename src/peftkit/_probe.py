"""Which of the selected modules a model's forward actually calls, where a static look cannot tell.

A module can hold the same weight as others and never be called itself: T5 and BART keep the
word embedding as ``shared`` while their encoder and decoder call their own ``embed_tokens``, which
hold the same weight. An adapter on ``shared`` would then be skipped without a word. When a
selected module's weight is shared like that and the model offers example inputs (an HF model's
``dummy_inputs``), one trial forward in eval mode, without gradients, records which of those modules
run. Models without example inputs, and selections without shared weights, are not probed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from . import _compat
from ._state import tree_changed
from .layers import AdapterLayer


def _identity(module: nn.Module) -> int:
    """What a module computes with: its weight (shared weights alias), else the module itself."""
    inner = module.base_layer() if isinstance(module, AdapterLayer) else module
    weight = getattr(inner, "weight", None)
    return id(weight) if isinstance(weight, nn.Parameter) else id(inner)


def skipped_aliases(
    named: Sequence[tuple[str, nn.Module]], chosen: Sequence[str]
) -> list[tuple[str, list[str]]]:
    """``(name, aliases that ran instead)`` for each chosen name the trial forward did not call
    while another name holding the same weight (or the very same module, which transformers 4.x
    reaches as T5's ``shared`` and ``encoder.embed_tokens``) was called. ``named``: every
    ``(name, module)`` of the model, the root first, a module once per name it is reached by."""
    groups: dict[int, list[str]] = {}
    for name, module in named[1:]:
        groups.setdefault(_identity(module), []).append(name)
    modules = dict(named)
    suspects = [n for n in chosen if len(groups.get(_identity(modules[n]), [])) > 1]
    if not suspects:
        return []
    watched = sorted({p for n in suspects for p in groups[_identity(modules[n])]})
    ran = _trial_forward(named[0][1], watched)
    if ran is None:
        return []
    out = []
    for name in suspects:
        called = [p for p in groups[_identity(modules[name])] if p in ran and p != name]
        if name not in ran and called:
            out.append((name, called))
    return out


class _Recorder(nn.Module):
    """Stands in for a module under one name during the trial forward and notes that it ran."""

    def __init__(self, inner: nn.Module, name: str, ran: set[str]) -> None:
        super().__init__()
        self.inner = inner
        self.__dict__["_seen"] = (name, ran)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        name, ran = self.__dict__["_seen"]
        ran.add(name)
        return self.inner(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["inner"], name)


def _trial_forward(model: nn.Module, watched: list[str]) -> set[str] | None:
    """The ``watched`` names one forward on the model's example inputs calls (each name stands in
    a recorder for the call, so a module reached by two names tells them apart); None when there
    are no example inputs or the forward fails on them (then nothing can be told)."""
    inputs = _compat.dummy_inputs(model)
    if inputs is None:
        return None
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    ran: set[str] = set()
    originals = {name: model.get_submodule(name) for name in watched}
    modes = [(m, m.training) for m in model.modules()]
    try:
        for name, module in originals.items():
            _put(model, name, _Recorder(module, name, ran))
        model.eval()
        with torch.no_grad():
            model(**{k: v.to(device) for k, v in inputs.items()})
    except Exception:
        return None
    finally:
        for name, module in originals.items():
            _put(model, name, module)
        for module, mode in modes:
            module.training = mode
    return ran


def _put(model: nn.Module, name: str, module: nn.Module) -> None:
    owner, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(owner) if owner else model, leaf, module)
    tree_changed()
