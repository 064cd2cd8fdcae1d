"""What a method is: the object that injects one named adapter into a model and answers for it.

``Method`` is the general interface (injection, owned tensors, merging, hooks). ``SwapMethod`` covers
the common case of methods that swap selected submodules for wrapping adapter layers: a subclass only
says which module types it supports and how to wrap one.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from typing import Any, ClassVar, TypeVar

import torch
from torch import nn

from .. import _compat
from .._merge import MergeFacts, tied_parameter_ids
from .._merge import MergeReport as MergeReport
from .._merge import merge_blocker as merge_blocker
from .._state import adapters, tree_generation
from ..config import MethodConfig, TargetedConfig
from ..core import apply
from ..layers import AdapterLayer, SavedModule
from ..targeting import (
    check_called,
    get_module,
    remove_wrapper,
    select,
    select_named,
    set_module,
)


class Method:
    """One named adapter of one method on one model.

    Class attributes (``name``/``config_cls`` are set by ``register_method``):
        starts_at_identity: the model's output is unchanged right after injection.
        trains_base_in_place: the trainable parameters are base parameters, changed in place (full
            fine-tuning); its checkpoints then hold base tensors, but only the ones it trains.
    Hooks the training loop calls (override as needed):
        ``regularizer(model)`` -> a scalar added to the loss, or None;
        ``on_step_end(model, step)`` after each optimiser step;
        ``planned_steps()`` the run length a step schedule is planned for, or None.
    """

    name: ClassVar[str] = ""
    config_cls: ClassVar[type[MethodConfig]] = MethodConfig
    starts_at_identity: ClassVar[bool] = True
    trains_base_in_place: ClassVar[bool] = False

    @classmethod
    def demo_config(cls, total_steps: int) -> MethodConfig:
        """A config that works on any transformer, for a run of ``total_steps`` optimiser steps.

        ``peftkit demo`` and the benchmarks use it to apply every registered method without special
        cases; a method whose config needs the run length (AdaLoRA's schedule) overrides it.
        """
        return cls.config_cls()

    def __init__(self, config: MethodConfig, adapter_name: str) -> None:
        self.config = config
        self.adapter_name = adapter_name
        self.model: nn.Module | None = None  # the model this adapter is in (``bind``)
        self._active = True  # read only by an adapter without layers (see ``active``)
        self._found: tuple[int, tuple[AdapterLayer, ...]] | None = None  # (tree generation, layers)

    # -- state, read from the module tree ----------------------------------------------------
    def bind(self, model: nn.Module) -> None:
        """Note the model this adapter is injected into; ``core.attach`` calls it first."""
        self.model = model

    @property
    def layers(self) -> tuple[AdapterLayer, ...]:
        """This adapter's layers, found in the module tree (model order): the tree is the one
        record of what is wrapped, so a layer removed or replaced there is gone here too.

        What was found is reused until the tree may have changed (``_state.tree_changed``: any
        edit peftkit makes, and the start of each model-level operation), so hooks that run on
        every training step do not walk the whole model each time."""
        if self.model is None:
            return ()
        generation = tree_generation()
        if self._found is None or self._found[0] != generation:
            self._found = (generation, _layers_in(self.model, self.adapter_name))
        return self._found[1]

    @property
    def active(self) -> bool:
        """Whether the adapter computes and trains: its layers' flags (any layer on), or, for an
        adapter without layers (full fine-tuning of base parameters), its own flag."""
        seen = False
        for flag in self.active_flags():
            if flag:
                return True
            seen = True
        return False if seen else self._active

    def active_flags(self) -> Iterator[bool]:
        """The flags ``active`` is read from; a method with modules beside its layers (a prefix
        table) adds theirs."""
        return (layer.active for layer in self.layers)

    # -- lifecycle ---------------------------------------------------------------------------
    def inject(self, model: nn.Module) -> None:
        """Add this adapter to ``model`` (in place): put its layers into the module tree (they
        are found there again through ``layers``). The base stays frozen."""
        raise NotImplementedError

    def inject_saved_modules(
        self, model: nn.Module, in_place: frozenset[int] = frozenset()
    ) -> None:
        """Wrap ``config.modules_to_save``, and the task head (``config.train_head``), in trainable
        copies owned by this adapter. ``in_place``: ids of base parameters this adapter trains in
        place (a head among them needs no copy)."""
        chosen = select_named(model, self.config.modules_to_save, "modules_to_save")
        chosen += task_head_modules(
            model, self.config.train_head, chosen, in_place, self.adapter_name
        )
        check_called(model, chosen, "modules_to_save")
        for path, module in chosen:
            set_module(model, path, SavedModule(module, self.adapter_name, path))

    def remove(self, model: nn.Module) -> None:
        """Take this adapter out, restoring exactly what was there before ``inject``."""
        for layer in reversed(self.layers):
            layer.unmerge()
            remove_wrapper(model, layer, layer.base)

    def is_empty(self) -> bool:
        """True once nothing of this adapter is left in the model (e.g. after merge-and-unload)."""
        return not self.layers

    # -- tensors -----------------------------------------------------------------------------
    def parameters(self) -> Iterator[nn.Parameter]:
        """Parameters this adapter owns (and trains)."""
        seen: set[int] = set()
        for layer in self.layers:
            for p in layer.adapter_parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    yield p

    def state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Owned tensors keyed ``<module path>.<local name>``; what a checkpoint stores."""
        return {
            f"{layer.path}.{n}": t
            for layer in self.layers
            for n, t in layer.named_adapter_tensors()
        }

    def load_state_dict(self, model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
        """Copy ``tensors`` into the owned tensors (keys and shapes already checked)."""
        own = self.state_dict(model)
        with torch.no_grad():
            for key, value in tensors.items():
                own[key].copy_(value)

    def extra_state(self) -> dict[str, Any]:
        """JSON-ready runtime state a checkpoint needs besides the config (e.g. live ranks)."""
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        """Restore what ``extra_state`` returned; called before ``inject`` on load."""

    def before_save(self, model: nn.Module) -> None:
        """Check or settle state before a checkpoint is written (raise to refuse the save)."""

    # -- switching ---------------------------------------------------------------------------
    @property
    def restorable(self) -> bool:
        """Whether disabling, deleting or unloading this adapter gives the base model back exactly.

        False for an adapter that changed base weights in place without keeping their original
        values; those operations then raise an error that names the alternative.
        """
        return True

    def restored_parameters(self) -> Iterator[nn.Parameter]:
        """Base parameters this adapter will put back to their original values when it is
        switched off or removed (full fine-tuning that keeps the originals). A merge-and-unload
        into one of them is refused: the restore would drop the folded update."""
        return iter(())

    def check_switch(self, model: nn.Module, active: bool) -> None:
        """Raise, naming the fix, if this adapter cannot be switched to ``active`` (or, with
        ``active=False``, deleted) right now. Model-level operations call it for every adapter they
        will touch before touching any, so a refused switch changes nothing."""

    def set_active(self, active: bool) -> None:
        self._active = active
        for layer in self.layers:
            layer.active = active
        for p in self.parameters():
            p.requires_grad_(active)

    # -- merging -----------------------------------------------------------------------------
    def check_merge(self) -> None:
        """Raise, naming the fix, if this adapter must not be merged now. Model-level merges call
        it for every adapter they will merge before merging any."""

    def merge(self, model: nn.Module, *, unload: bool) -> MergeReport:
        """Fold mergeable layers into the base weights; with ``unload``, drop their wrappers too.

        Each layer answers for itself (``AdapterLayer.merge_blocker``) from one ``MergeFacts`` of
        the model; a layer that refuses is reported in ``kept`` with its reason and left as it is.
        """
        report = MergeReport()
        facts = merge_facts(model, unload=unload)
        for layer in list(self.layers):
            name = f"{self.adapter_name}:{layer.path}"
            reason = layer.merge_blocker(layer.merge_context(facts))
            if reason:
                report.kept[name] = reason
                continue
            if unload:
                remove_wrapper(model, layer, layer.merged_module())
            else:
                layer.merge()
            report.merged.append(name)
            if layer.requantized is not None:
                report.requantized[name] = layer.requantized.error
        return report

    def unmerge(self) -> None:
        """Restore what this adapter's merges changed, the latest merge first."""
        for layer in sorted(self.layers, key=lambda la: la.merge_order, reverse=True):
            layer.unmerge()

    # -- training hooks ----------------------------------------------------------------------
    def regularizer(self, model: nn.Module) -> torch.Tensor | None:
        return None

    def on_step_end(self, model: nn.Module, step: int) -> None:
        return None

    def planned_steps(self) -> int | None:
        """Optimiser steps the method's step schedule is planned for (None: it has none).

        The Trainer compares it with the run's length: a shorter run is refused (the schedule
        would be cut short), a longer one warned about.
        """
        return None

    def describe(self) -> dict[str, Any]:
        """Extra facts for ``trainable_summary`` (e.g. live ranks)."""
        return {}


class SwapMethod(Method):
    """A method that replaces each selected module with ``wrap(module, path)``."""

    supported: ClassVar[tuple[type[nn.Module], ...]] = (nn.Linear,)
    config: TargetedConfig

    def wrap(self, module: nn.Module, path: str) -> AdapterLayer:
        raise NotImplementedError

    def check_selection(self, paths: list[str]) -> None:
        """Raise, naming the fix, if the config does not fit the selected module ``paths`` (e.g. a
        per-module override that matches none of them); called before anything is wrapped."""

    def inject(self, model: nn.Module) -> None:
        chosen = select(model, self.config, self.supported, method=self.name)
        self.check_selection([path for path, _ in chosen])
        for path, module in chosen:
            set_module(model, path, self.wrap(module, path))
        self.inject_saved_modules(model)


C = TypeVar("C", bound=MethodConfig)


def _layers_in(model: nn.Module, adapter_name: str) -> tuple[AdapterLayer, ...]:
    """The adapter layers named ``adapter_name`` in ``model``, in ``model.modules()`` order (an
    explicit walk: torch's generator costs several times more on a model of a thousand modules)."""
    found: list[AdapterLayer] = []
    seen: set[int] = set()
    stack = [model]
    while stack:
        module = stack.pop()
        if id(module) in seen:
            continue
        seen.add(id(module))
        if isinstance(module, AdapterLayer) and module.adapter_name == adapter_name:
            found.append(module)
        stack.extend(reversed([m for m in module._modules.values() if m is not None]))
    return tuple(found)


def _warn_shared(found: list[tuple[str, nn.Module]], adapter_name: str) -> None:
    """Say so when another adapter already trains the head: a model holds one trained copy per
    module, so this adapter alone computes with the original, untrained head."""
    for path, module in found:
        if isinstance(module, SavedModule):
            warnings.warn(
                f"task head {path!r} already trains in full with adapter {module.adapter_name!r}; "
                f"adapter {adapter_name!r} computes with that copy while {module.adapter_name!r} "
                "is active and with the original head without it. Apply it to its own base model "
                "to give it its own head, or pass train_head=False to share it knowingly",
                UserWarning,
                stacklevel=5,
            )


def task_head_modules(
    model: nn.Module,
    train_head: bool | None,
    chosen: list[tuple[str, nn.Module]],
    in_place: frozenset[int] = frozenset(),
    adapter_name: str = "default",
) -> list[tuple[str, nn.Module]]:
    """The model's task head modules an adapter trains by default (see ``MethodConfig.train_head``).

    A head is left out when the user already chose it (or a module inside it) in
    ``modules_to_save``, when it holds adapter layers (an earlier adapter trains it, or this one
    adapts it), or when this adapter trains its parameters in place.
    """
    if train_head is False:
        return []
    found = [(path, get_module(model, path)) for path in _compat.task_heads(model)]
    if train_head and not found:
        raise ValueError(
            f"train_head=True, but {type(model).__name__} has no task head beside its body; name "
            "the modules to train in modules_to_save, or leave train_head=None"
        )
    _warn_shared(found, adapter_name)
    named = [path for path, _ in chosen]
    return [
        (path, module)
        for path, module in found
        if not any(n == path or n.startswith(path + ".") for n in named)
        and not any(isinstance(m, AdapterLayer) for m in module.modules())
        and not any(id(p) in in_place for p in module.parameters())
    ]


def apply_with(
    config_cls: type[C],
    model: nn.Module,
    config: C | None,
    adapter_name: str,
    fields: dict[str, Any],
) -> nn.Module:
    """Shared body of the ``apply_<method>`` shortcuts: a config object or its fields, not both."""
    if config is not None and fields:
        raise TypeError(f"pass either config= or {config_cls.__name__} fields, not both")
    if config is not None and not isinstance(config, config_cls):
        raise TypeError(f"config must be a {config_cls.__name__}, got {type(config).__name__}")
    return apply(model, config if config is not None else config_cls(**fields), adapter_name)


def merge_facts(model: nn.Module, *, unload: bool) -> MergeFacts:
    """What a merge into ``model`` needs to know about the model as a whole."""
    kept = {id(p) for m in adapters(model).values() for p in m.restored_parameters()}
    return MergeFacts(
        tied=tied_parameter_ids(model),
        kept_originals=frozenset(kept) if unload else frozenset(),
        unload=unload,
    )
