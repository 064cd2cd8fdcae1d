"""Model-level operations: apply, switch, merge, unload, adapter tensors and training hooks.

A model carries its adapters in one plain attribute (see ``_state``, the leaf module that holds it):
named ``Method`` instances in the order they were applied, plus the ``requires_grad`` flags the base
had before the first one. All structure lives in the module tree itself (adapter layers wrap
modules), so ``model.to()``, ``copy.deepcopy`` and ``state_dict()`` keep working.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Literal, overload

import torch
from torch import nn

from . import _sharding
from ._guards import check_tensors_fit, name_list, wrapper_kind
from ._merge import MergeReport
from ._state import STATE_ATTR as STATE_ATTR
from ._state import AdapterState as AdapterState
from ._state import adapter_state as adapter_state
from ._state import adapters as adapters
from ._state import require_state
from ._state import unwrap_model as unwrap_model
from .config import MethodConfig
from .layers import AdapterLayer
from .registry import spec_for_config

if TYPE_CHECKING:
    from .methods.base import Method

_NAME = re.compile(r"[A-Za-z0-9_-]+")
_require = require_state


def _method(model: nn.Module, name: str) -> Method:
    state = _require(model)
    if not isinstance(name, str):
        raise TypeError(f"an adapter name is a str such as 'default', got {name!r}")
    if name not in state.methods:
        raise KeyError(f"no adapter named {name!r}; the model has {list(state.methods)}")
    return state.methods[name]


def adapter_name_list(
    model: nn.Module, names: str | Sequence[str] | None, what: str = "adapter_names"
) -> list[str]:
    """``names`` checked against the model's adapters (see ``_guards.name_list``); None is all."""
    known = list(_require(model).methods)
    return known if names is None else name_list(names, what, known)


def apply(model: nn.Module, config: MethodConfig, adapter_name: str = "default") -> nn.Module:
    """Inject the method ``config`` belongs to into ``model`` in place, as adapter ``adapter_name``.

    The base model is frozen; the new adapter's parameters are trainable and it is active (together
    with adapters applied before, so methods stack). Returns ``model``.
    """
    if not isinstance(config, MethodConfig):
        raise TypeError(f"config must be a method config such as LoraConfig(...), got {config!r}")
    return attach(model, spec_for_config(config).method_cls(config, adapter_name))


def attach(model: nn.Module, method: Method) -> nn.Module:
    """Inject an already constructed ``method`` (``apply`` does this; checkpoints restore state first)."""
    kind = wrapper_kind(model)
    if kind is not None:
        raise TypeError(
            f"the model is wrapped in {kind}; apply or load adapters before wrapping it (its "
            "gradients would not be synced, or the compiled graph would skip the adapter): "
            "pass the unwrapped model, then wrap it"
        )
    state = adapter_state(model)
    adapter_name = method.adapter_name
    if not isinstance(adapter_name, str) or not _NAME.fullmatch(adapter_name):
        raise ValueError(f"adapter_name {adapter_name!r} must be letters, digits, '_' or '-'")
    if state is not None and adapter_name in state.methods:
        raise ValueError(
            f"adapter {adapter_name!r} already exists; pass another adapter_name or call "
            f"peftkit.delete_adapter(model, {adapter_name!r}) first"
        )
    created = state is None
    if state is None:
        state = AdapterState(base_flags=[(p, p.requires_grad) for p in model.parameters()])
        model.__dict__[STATE_ATTR] = state
        _install_hooks(model, state)
        for p in model.parameters():
            p.requires_grad_(False)
    before = list(model.modules())
    method.bind(model)
    try:
        method.inject(model)
        _adopt_training_mode(model, before)
    except BaseException:
        method.remove(model)
        if created:
            _drop_state(model, state)
        raise
    state.methods[adapter_name] = method
    method.set_active(True)
    # for training/fsdp.check_same_adapters: the values this process created, before any sharding
    _sharding.record_values(method, method.state_dict(unwrap_model(model)))
    return model


def _adopt_training_mode(model: nn.Module, before: list[nn.Module]) -> None:
    """Modules an injection created take the train/eval mode of what they wrap (else the model's).

    A new ``nn.Module`` starts in training mode; without this, LoRA dropout added to a model in
    eval mode would be active at inference. ``before`` lists the modules present before injection
    (held, not just their ids, so no id can be reused by a new module).
    """
    settled = {id(m) for m in before}
    for module in model.modules():
        if id(module) in settled:
            continue
        wrapped = module.base_layer() if isinstance(module, AdapterLayer) else model
        mode = wrapped.training
        for inner in module.modules():
            if id(inner) not in settled:
                inner.training = mode
                settled.add(id(inner))


def active_adapters(model: nn.Module) -> list[str]:
    return [name for name, m in adapters(model).items() if m.active]


def set_active(model: nn.Module, names: str | Sequence[str]) -> None:
    """Make exactly ``names`` active; the others stop contributing and stop training."""
    wanted = adapter_name_list(model, names, "names")
    state = _require(model)
    inner = unwrap_model(model)
    for name, method in state.methods.items():
        check_switch(inner, method, name in wanted)
    for name, method in state.methods.items():
        method.set_active(name in wanted)


@contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block the model computes as its base (adapters skipped, nothing removed)."""
    state = _require(model)
    were = {name: m.active for name, m in state.methods.items()}
    for method in state.methods.values():
        check_switch(unwrap_model(model), method, False)
    try:
        for method in state.methods.values():
            method.set_active(False)
        yield model
    finally:
        for name, method in state.methods.items():
            method.set_active(were[name])


def check_switch(model: nn.Module, method: Method, active: bool, *, unmerges: bool = False) -> None:
    """The one check before an adapter is switched to ``active`` (or, with ``active=False``,
    deleted): raise, naming the fix, before anything changes, when it cannot be.

    A change of state is refused while the adapter is merged (``unmerges``: the caller unmerges it
    itself first, as deletion does); switching off is refused for an adapter that kept no copy of
    base weights it changed in place; and the method's own ``check_switch`` has the last word.
    """
    if active != method.active and not unmerges:
        _check_not_merged(method)
    if not active and method.active:
        _check_restorable(method)
    method.check_switch(model, active)


def _check_restorable(method: Method) -> None:
    if not method.restorable:
        name = method.adapter_name
        raise RuntimeError(
            f"adapter {name!r} changed base weights in place and kept no copy of the originals, "
            "so it cannot be switched off, deleted or unloaded; "
            f"peftkit.merge_and_unload(model, [{name!r}]) keeps the trained weights and drops it"
        )


def _check_not_merged(method: Method) -> None:
    if any(layer.merged for layer in method.layers):
        raise RuntimeError(
            f"adapter {method.adapter_name!r} is merged into the base weights; "
            "call peftkit.unmerge(model) first"
        )


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove adapter ``name``, restoring exactly the modules that were there before it."""
    check_switch(unwrap_model(model), _method(model, name), False, unmerges=True)
    _check_unmerge_order(unwrap_model(model), _method(model, name))
    detach(model, name)


def detach(model: nn.Module, name: str) -> None:
    """Take adapter ``name`` out without the checks of ``delete_adapter``: the inverse of ``attach``,
    for rolling back an adapter that was just attached (nothing has changed its weights yet)."""
    method = _method(model, name)
    state = _require(model)
    method.remove(unwrap_model(model))
    del state.methods[name]
    if not state.methods:
        _drop_state(unwrap_model(model), state)


def unload(model: nn.Module) -> nn.Module:
    """Remove every adapter without merging: the original modules, weights and flags come back.

    Returns the model (the module inside a DDP / ``torch.compile`` wrapper), so
    ``model = unload(model)`` works as with HF peft; the change is in place either way.
    """
    for method in adapters(model).values():  # refused before the unmerge changes anything
        _check_restorable(method)
    unmerge(model)
    for method in adapters(model).values():
        check_switch(unwrap_model(model), method, False, unmerges=True)
    for name in reversed(list(adapters(model))):
        delete_adapter(model, name)
    return unwrap_model(model)


def merge(model: nn.Module, adapter_names: str | Sequence[str] | None = None) -> MergeReport:
    """Fold active (or the named) adapters into the base weights, keeping the wrappers for ``unmerge``.

    Forward then costs the base's compute only. What cannot be merged stays active and is reported.
    """
    _sharding.refuse_sharded(model, "merge")
    return _merge(model, adapter_names, unload=False)


@overload
def merge_and_unload(
    model: nn.Module,
    adapter_names: str | Sequence[str] | None = None,
    *,
    report: Literal[False] = False,
) -> nn.Module: ...


@overload
def merge_and_unload(
    model: nn.Module, adapter_names: str | Sequence[str] | None = None, *, report: Literal[True]
) -> tuple[nn.Module, MergeReport]: ...


def merge_and_unload(
    model: nn.Module, adapter_names: str | Sequence[str] | None = None, *, report: bool = False
) -> nn.Module | tuple[nn.Module, MergeReport]:
    """Fold active (or the named) adapters into the weights and remove their layers: a plain model.

    Returns the model (the module inside a DDP / ``torch.compile`` wrapper, as ``unload`` does), so
    ``model = merge_and_unload(model)`` works as with HF peft. It changes the model in place either
    way. Layers that cannot be merged (non-linear adapters, inactive ones, tied weights) stay and
    keep computing; a ``UserWarning`` names them. ``report=True`` returns ``(model, MergeReport)``
    instead, listing what was merged and each kept layer with the reason (no warning then).

    The report is opt-in, not the return value, because code written for HF peft reassigns the
    result and calls ``.generate()`` on it; ``merge``, which is reversible and leaves the wrappers
    in place, keeps returning its report.
    """
    _sharding.refuse_sharded(model, "merge_and_unload")
    done = _merge(model, adapter_names, unload=True)
    if report:
        return unwrap_model(model), done
    if done.kept:
        names = ", ".join(list(done.kept)[:3]) + (", ..." if len(done.kept) > 3 else "")
        warnings.warn(
            f"merge_and_unload kept {len(done.kept)} layer(s) that cannot be merged ({names}); "
            "they still compute as adapters. merge_and_unload(model, report=True) returns "
            "(model, report) with the reason for each",
            UserWarning,
            stacklevel=2,
        )
    return unwrap_model(model)


def _merge(model: nn.Module, names: str | Sequence[str] | None, *, unload: bool) -> MergeReport:
    state = _require(model)
    inner = unwrap_model(model)
    chosen = adapter_name_list(model, names) if names is not None else active_adapters(model)
    chosen = [name for name in state.methods if name in chosen]  # inner stacks merge first
    for name in chosen:  # every refusal before the first change
        state.methods[name].check_merge()
    report = MergeReport()
    for name in chosen:
        report.extend(state.methods[name].merge(inner, unload=unload))
    if unload:
        for name in [n for n, m in state.methods.items() if m.is_empty()]:
            del state.methods[name]
        if not state.methods:
            _drop_state(inner, state)
    return report


def unmerge(model: nn.Module) -> None:
    """Undo ``merge``: every merged layer restores what its merge changed, the latest merge first
    (so each finds the weight its merge left); adapters compute on their own path again."""
    merged = [layer for m in adapters(model).values() for layer in m.layers if layer.merged]
    for layer in sorted(merged, key=lambda la: la.merge_order, reverse=True):
        layer.unmerge()


def _check_unmerge_order(model: nn.Module, method: Method) -> None:
    """Refuse to unmerge ``method`` alone while a later merge into the same weight stands: putting
    back the weight it found would drop that merge. Nothing changes before the refusal."""
    wrappers = [m for m in model.modules() if isinstance(m, AdapterLayer) and m.merged]
    for layer in method.layers:
        if not layer.merged:
            continue
        bottom = layer.base_layer()
        later = [
            m.adapter_name
            for m in wrappers
            if m.merge_order > layer.merge_order and m.base_layer() is bottom
        ]
        if later:
            raise RuntimeError(
                f"adapter {method.adapter_name!r} at {layer.path!r} was merged before adapter "
                f"{later[0]!r}, which is still merged into the same weight; call "
                "peftkit.unmerge(model) first (it undoes merges latest first)"
            )


def _install_hooks(model: nn.Module, state: AdapterState) -> None:
    """An HF model's ``save_pretrained`` writes the plain model (``plain.plain_state_dict``), and
    ``load_state_dict`` refuses a plain model's state dict, which would miss the adapters."""
    from . import _compat, plain

    _compat.hook_save_pretrained(model, plain.for_save_pretrained)
    state.load_guard = model.register_load_state_dict_pre_hook(plain.refuse_plain_state)
    from .input_grads import InputGrads

    state.input_grads = InputGrads(model)


def _drop_state(model: nn.Module, state: AdapterState) -> None:
    for p, flag in state.base_flags:
        p.requires_grad_(flag)
    if state.load_guard is not None:
        state.load_guard.remove()
    if state.input_grads is not None:
        state.input_grads.remove()
    from . import _compat

    _compat.unhook_save_pretrained(model)
    model.__dict__.pop(STATE_ATTR, None)


# -- tensors ------------------------------------------------------------------------------------
def adapter_state_dict(
    model: nn.Module, adapter_names: str | Sequence[str] | None = None
) -> dict[str, torch.Tensor]:
    """Every owned tensor keyed ``<adapter>.<module path>.<local name>`` (live tensors, not copies)."""
    chosen = adapter_name_list(model, adapter_names) if adapter_names is not None else []
    chosen = chosen if adapter_names is not None else list(adapters(model))
    inner = unwrap_model(model)
    out: dict[str, torch.Tensor] = {}
    for name in chosen:
        for key, tensor in _method(model, name).state_dict(inner).items():
            out[f"{name}.{key}"] = tensor
    return out


def load_adapter_state_dict(
    model: nn.Module,
    tensors: dict[str, torch.Tensor],
    adapter_names: str | Sequence[str] | None = None,
) -> None:
    """Copy ``tensors`` (as from ``adapter_state_dict``) into the model's (or the named) adapters.

    Missing keys, unexpected keys and shape mismatches raise one error naming every offending tensor;
    nothing is copied unless everything fits.
    """
    chosen = adapter_name_list(model, adapter_names)
    for name in chosen:  # unmerge would subtract the new update, not the one merged
        _check_not_merged(_method(model, name))
    own = adapter_state_dict(model, chosen)
    check_tensors_fit({k: tuple(t.shape) for k, t in own.items()}, tensors)
    inner = unwrap_model(model)
    shards = {k: _sharding.like(own[k], v) for k, v in tensors.items()}  # FSDP2: keep our shard
    for name in chosen:
        prefix = name + "."
        mine = {k[len(prefix) :]: v for k, v in shards.items() if k.startswith(prefix)}
        _method(model, name).load_state_dict(inner, mine)
        given = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
        _sharding.record_values(_method(model, name), given)  # the full values, as loaded


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Parameters of the active adapters (what an optimiser should get)."""
    seen: set[int] = set()
    out = []
    for method in adapters(model).values():
        if method.active:
            for p in method.parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    out.append(p)
    return out


# -- training hooks -----------------------------------------------------------------------------
def regularizer(model: nn.Module) -> torch.Tensor | None:
    """Sum of the active methods' regularisers (e.g. AdaLoRA's orthogonality penalty), or None."""
    terms = [m.regularizer(unwrap_model(model)) for m in adapters(model).values() if m.active]
    present = [t for t in terms if t is not None]
    return torch.stack(present).sum() if present else None


def step_hooks(model: nn.Module, step: int) -> None:
    """Call after each optimiser step (before zero_grad) in a hand-written loop; the Trainer does.

    ``step`` is the index of the optimiser step just taken, 0 for the first (as in
    ``for step, batch in enumerate(loader)``); methods with a schedule (AdaLoRA) count from it.
    """
    for method in adapters(model).values():
        if method.active:
            method.on_step_end(unwrap_model(model), step)
