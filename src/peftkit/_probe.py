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

import torch
from torch import nn

from . import _compat
from .layers import AdapterLayer


def _weight_id(module: nn.Module) -> int | None:
    inner = module.base_layer() if isinstance(module, AdapterLayer) else module
    weight = getattr(inner, "weight", None)
    return id(weight) if isinstance(weight, nn.Parameter) else None


def skipped_aliases(
    named: Sequence[tuple[str, nn.Module]], chosen: Sequence[str]
) -> list[tuple[str, list[str]]]:
    """``(name, aliases that ran instead)`` for each chosen module the trial forward did not call
    while another module holding its weight did. ``named``: every ``(name, module)`` of the model,
    the root first."""
    groups: dict[int, list[tuple[str, nn.Module]]] = {}
    for name, module in named:
        key = _weight_id(module)
        if key is not None:
            groups.setdefault(key, []).append((name, module))
    modules = dict(named)
    suspects = [n for n in chosen if len(groups.get(_weight_id(modules[n]) or -1, [])) > 1]
    if not suspects:
        return []
    watched = {id(m): m for n in suspects for _, m in groups[_weight_id(modules[n]) or -1]}
    ran = _trial_forward(named[0][1], list(watched.values()))
    if ran is None:
        return []
    out = []
    for name in suspects:
        group = groups[_weight_id(modules[name]) or -1]
        called = [n for n, m in group if id(m) in ran and m is not modules[name]]
        if id(modules[name]) not in ran and called:
            out.append((name, called))
    return out


def _trial_forward(model: nn.Module, watched: list[nn.Module]) -> set[int] | None:
    """Ids of the ``watched`` modules one forward on the model's example inputs calls; None when
    there are no example inputs or the forward fails on them (then nothing can be told)."""
    inputs = _compat.dummy_inputs(model)
    if inputs is None:
        return None
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    ran: set[int] = set()
    hooks = [m.register_forward_pre_hook(lambda mod, args: ran.add(id(mod))) for m in watched]
    modes = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        with torch.no_grad():
            model(**{k: v.to(device) for k, v in inputs.items()})
    except Exception:
        return None
    finally:
        for hook in hooks:
            hook.remove()
        for module, mode in modes:
            module.training = mode
    return ran
