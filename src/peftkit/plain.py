"""The plain model a model with adapters computes, as a state dict: what ``save_pretrained`` writes.

A transformers model with peftkit adapters keeps the original modules inside wrappers, so its own
``state_dict()`` has keys such as ``q_proj.base.weight`` and ``q_proj.lora_A`` that no plain model
has; ``from_pretrained`` would skip them and initialise those layers at random. ``plain_state_dict``
gives the state dict of the plain model instead: canonical names, every active mergeable update
folded into its weight (computed, the model is not touched), each trained copy of
``modules_to_save`` under the module's own name. What no plain model can hold (a bottleneck
adapter, a prefix, an update on a tied weight) is refused with the fix named.

``core.attach`` makes an HF model's ``save_pretrained`` use it (one attribute on the instance,
through ``_compat``), and guards ``load_state_dict`` against such a plain state dict: loading one
into a model with adapters would leave the adapters as they are without a word.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ._merge import merge_blocker, tied_parameter_ids
from ._state import adapters, unwrap_model
from .layers import AdapterLayer, AdapterModule, SavedModule
from .targeting import iter_modules

if TYPE_CHECKING:
    from .methods.base import Method

_FIX = (
    "save the adapters with peftkit.save_adapter(model, directory) (peftkit.load_adapter puts them "
    "back on the base model); only adapters that fold into the weights save as a plain model, and "
    "peftkit.merge_and_unload(model) folds those for good and reports the ones it cannot"
)


class PlainModelError(ValueError):
    """The model computes something no plain model (without adapter layers) can hold."""


@dataclass(frozen=True)
class _Stack:
    """One wrapper stack: keys under ``raw`` belong to it; those under ``source`` are kept, renamed
    to ``path``; the updates of ``folded`` are added to the entries they change (``<path>.weight``)."""

    raw: str
    source: str
    path: str
    folded: tuple[AdapterLayer, ...]

    def fold(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """The entry ``name`` (local to the original module) with every update folded in,
        innermost first; a changed tensor comes back on the CPU: one update at a time on the
        model's device, so saving a large model does not hold all of them there."""
        with torch.no_grad():
            folded = tensor
            for layer in reversed(self.folded):
                folded = layer.merged_state(name, folded)
            return tensor if folded is tensor else folded.cpu()


def plain_state_dict(
    model: nn.Module, state_dict: Mapping[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """The state dict of the plain model ``model`` computes now, keyed by canonical names.

    Active mergeable adapter updates are folded into their weights (new tensors; the model is not
    changed), a trained copy of a ``modules_to_save`` module stands under the module's name, and
    inactive adapters are left out (with a warning). ``state_dict``: the model's own
    ``state_dict()`` as gathered elsewhere (same keys), used for the tensors instead of the live
    ones. Raises ``PlainModelError`` for anything a plain model cannot hold.
    """
    model = unwrap_model(model)
    methods = adapters(model)
    for method in methods.values():
        _check_foldable(model, method)
    inactive = [name for name, m in methods.items() if not m.active]
    if inactive:
        warnings.warn(
            f"adapters {inactive} are inactive, so the plain model leaves them out; activate "
            "them (peftkit.set_active) or save them with peftkit.save_adapter",
            UserWarning,
            stacklevel=3,
        )
    stacks, beside = _stacks(model), _beside(model)
    if state_dict is None:
        return _rename(model.state_dict(), stacks, beside)
    return _given(model, dict(state_dict), stacks, beside)


def _check_foldable(model: nn.Module, method: Method) -> None:
    """Refuse an active adapter with tensors outside its layers (a prefix) or outside the base."""
    if not method.active or method.trains_base_in_place:
        return
    in_layers = {id(p) for layer in method.layers for p in layer.adapter_parameters()}
    if any(id(p) not in in_layers for p in method.parameters()):
        raise PlainModelError(
            f"adapter {method.adapter_name!r} ({method.name}) adds tensors beside the model's "
            f"modules, which a plain model has no place for; {_FIX}"
        )


def _given(
    model: nn.Module, given: dict[str, torch.Tensor], stacks: list[_Stack], beside: list[str]
) -> dict[str, torch.Tensor]:
    """A state dict passed to save_pretrained: the model's own keys are folded as the live state
    dict would be; one that is plain already (``plain_state_dict``'s keys) is written as it is."""
    own = model.state_dict()
    if given.keys() <= own.keys():
        return _rename(given, stacks, beside)
    if given.keys() <= {_plain_name(k, stacks, beside) for k in own}:
        return given
    extra = sorted(given.keys() - own.keys())[:3]
    raise PlainModelError(
        f"the state_dict given to save_pretrained has keys that are neither this model's nor its "
        f"plain model's ({extra}); pass the model's own state_dict(), peftkit.plain_state_dict(model), "
        "or none"
    )


def _stacks(model: nn.Module) -> list[_Stack]:
    """Every outermost wrapper stack, outermost (shortest raw name) first."""
    raw = {id(m): name for name, m in model.named_modules()}
    tied = tied_parameter_ids(model)
    stacks = []
    for path, module in iter_modules(model):
        if isinstance(module, AdapterLayer):
            source, folded = _fold(module, tied)
            stacks.append(_Stack(raw[id(module)] + ".", raw[id(source)] + ".", path + ".", folded))
    return sorted(stacks, key=lambda s: len(s.raw))


def _fold(outer: AdapterLayer, tied: frozenset[int]) -> tuple[nn.Module, tuple[AdapterLayer, ...]]:
    """The module whose tensors the plain model holds at ``outer``'s place, and the enabled layers
    whose updates are added to its weight (each checked to be foldable)."""
    folded: list[AdapterLayer] = []
    layer: nn.Module = outer
    while isinstance(layer, AdapterLayer):
        if isinstance(layer, SavedModule) and (layer.active or layer.merged):
            return _no_nested(layer, layer.trained), tuple(folded)
        if layer.enabled and not isinstance(layer, SavedModule):
            reason = merge_blocker(layer, tied, below_folded=True)
            if reason:
                raise PlainModelError(
                    f"adapter {layer.adapter_name!r} at {layer.path!r} cannot be folded into a "
                    f"plain model ({reason}); {_FIX}"
                )
            folded.append(layer)
        layer = layer.base
    return _no_nested(outer, layer), tuple(folded)


def _no_nested(outer: AdapterLayer, source: nn.Module) -> nn.Module:
    if any(isinstance(m, (AdapterLayer, AdapterModule)) for m in source.modules()):
        raise PlainModelError(f"{outer.path!r} holds adapter layers inside another; {_FIX}")
    return source


def _beside(model: nn.Module) -> list[str]:
    """Raw name prefixes of modules adapters added beside the base (inactive prefix tables)."""
    return [name + "." for name, m in model.named_modules() if isinstance(m, AdapterModule)]


def _owner(key: str, stacks: list[_Stack]) -> _Stack | None:
    return next((s for s in stacks if key.startswith(s.raw)), None)


def _plain_name(key: str, stacks: list[_Stack], beside: list[str]) -> str | None:
    """The plain model's name for the raw ``key``, or None when no plain model has it (an
    adapter's own tensor, the original a trained copy replaces, a prefix table)."""
    stack = _owner(key, stacks)
    if stack is None:
        return None if any(key.startswith(b) for b in beside) else key
    if not key.startswith(stack.source):
        return None
    return stack.path + key[len(stack.source) :]


def _rename(
    source: Mapping[str, torch.Tensor], stacks: list[_Stack], beside: list[str]
) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for key, tensor in source.items():
        name = _plain_name(key, stacks, beside)
        if name is None:
            continue
        stack = _owner(key, stacks)
        if stack is not None and stack.folded:
            tensor = stack.fold(name[len(stack.path) :], tensor)
        out[name] = tensor
    return out


# -- hooks core.attach installs ------------------------------------------------------------------
def for_save_pretrained(model: nn.Module, state_dict: Any) -> dict[str, torch.Tensor]:
    """What a hooked ``save_pretrained`` writes (see ``_compat.hook_save_pretrained``)."""
    return plain_state_dict(model, state_dict)


def refuse_plain_state(
    module: nn.Module, state_dict: Mapping[str, Any], prefix: str, *_: Any
) -> None:
    """A ``load_state_dict`` pre-hook: refuse a plain model's state dict (canonical keys of wrapped
    modules), which would load nothing into the adapters and leave them as they are."""
    own = module.state_dict().keys()
    hits = [
        key
        for path, layer in iter_modules(module)
        if isinstance(layer, AdapterLayer)
        for local in layer.base_layer().state_dict()
        if (key := f"{path}.{local}") not in own and prefix + key in state_dict
    ]
    if hits:
        raise RuntimeError(
            f"this state dict is a plain model's (keys such as {hits[:2]}, as save_pretrained "
            "writes them with the adapters folded in); loading it into a model with adapters would "
            "leave the adapters as they are. Load it into a fresh model with from_pretrained, or "
            "restore adapters from a peftkit.save_adapter checkpoint with peftkit.load_adapter"
        )
