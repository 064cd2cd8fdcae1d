"""What a method is: the object that injects one named adapter into a model and answers for it.

``Method`` is the general interface (injection, owned tensors, merging, hooks). ``SwapMethod`` covers
the common case of methods that swap selected submodules for wrapping adapter layers: a subclass only
says which module types it supports and how to wrap one.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

import torch
from torch import nn

from .. import _compat, quant
from ..config import MethodConfig, TargetedConfig
from ..layers import AdapterLayer, SavedModule
from ..targeting import (
    check_called,
    get_module,
    is_conv1d_class,
    remove_wrapper,
    select,
    select_named,
    set_module,
)


@dataclass
class MergeReport:
    """What a merge did: names of layers folded in, and layers left in place with the reason."""

    merged: list[str] = field(default_factory=list)
    kept: dict[str, str] = field(default_factory=dict)
    # merged layers whose base is quantized -> re-quantisation error of the merged weight,
    # ‖Q(W + ΔW) − (W + ΔW)‖_F / ‖ΔW‖_F (see peftkit.quant.QuantizedMerge)
    requantized: dict[str, float] = field(default_factory=dict)

    def extend(self, other: MergeReport) -> None:
        self.merged.extend(other.merged)
        self.kept.update(other.kept)
        self.requantized.update(other.requantized)

    def __str__(self) -> str:
        lines = [f"merged {len(self.merged)} layer(s)"]
        lines += [f"kept {name}: {why}" for name, why in self.kept.items()]
        lines += [
            f"re-quantized {name}: error {err:.3g} of the update's norm"
            for name, err in self.requantized.items()
        ]
        return "\n".join(lines)


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
        self.layers: list[AdapterLayer] = []
        self.active = True

    # -- lifecycle ---------------------------------------------------------------------------
    def inject(self, model: nn.Module) -> None:
        """Add this adapter to ``model`` (in place). The base stays frozen."""
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
            layer = SavedModule(module, self.adapter_name, path)
            set_module(model, path, layer)
            self.layers.append(layer)

    def remove(self, model: nn.Module) -> None:
        """Take this adapter out, restoring exactly what was there before ``inject``."""
        for layer in reversed(self.layers):
            layer.unmerge()
            remove_wrapper(model, layer, layer.base)
        self.layers.clear()

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

    def check_switch(self, model: nn.Module, active: bool) -> None:
        """Raise, naming the fix, if this adapter cannot be switched to ``active`` (or, with
        ``active=False``, deleted) right now. Model-level operations call it for every adapter they
        will touch before touching any, so a refused switch changes nothing."""

    def set_active(self, active: bool) -> None:
        self.active = active
        for layer in self.layers:
            layer.active = active
        for p in self.parameters():
            p.requires_grad_(active)

    # -- merging -----------------------------------------------------------------------------
    def check_merge(self) -> None:
        """Raise, naming the fix, if this adapter must not be merged now. Model-level merges call
        it for every adapter they will merge before merging any."""

    def merge(self, model: nn.Module, *, unload: bool) -> MergeReport:
        """Fold mergeable layers into the base weights; with ``unload``, drop their wrappers too."""
        report = MergeReport()
        tied = tied_parameter_ids(model)
        kept = _kept_original_ids(model) if unload else set()
        for layer in list(self.layers):
            reason = merge_blocker(layer, tied) or _unload_blocker(layer, kept)
            if reason:
                report.kept[f"{self.adapter_name}:{layer.path}"] = reason
                continue
            name = f"{self.adapter_name}:{layer.path}"
            if unload:
                remove_wrapper(model, layer, layer.merged_module())
                self.layers.remove(layer)
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
            layer = self.wrap(module, path)
            set_module(model, path, layer)
            self.layers.append(layer)
        self.inject_saved_modules(model)


C = TypeVar("C", bound=MethodConfig)


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
    from ..core import apply

    if config is not None and fields:
        raise TypeError(f"pass either config= or {config_cls.__name__} fields, not both")
    if config is not None and not isinstance(config, config_cls):
        raise TypeError(f"config must be a {config_cls.__name__}, got {type(config).__name__}")
    return apply(model, config if config is not None else config_cls(**fields), adapter_name)


def merge_blocker(layer: AdapterLayer, tied: set[int], *, below_folded: bool = False) -> str | None:
    """Why ``layer`` cannot be folded into its base weight, or None when it can.

    ``below_folded``: every enabled layer below is folded into the same weight first (a plain
    state dict folds whole stacks), so a layer that transforms their output may fold too."""
    if not layer.mergeable:
        return f"{type(layer).__name__} is not linear in the base weight; it stays as a layer"
    if not layer.active:
        return "adapter is inactive; activate it to merge it"
    if isinstance(layer, SavedModule):
        return None
    inner = layer.base
    while isinstance(inner, AdapterLayer):
        if isinstance(inner, SavedModule):  # it computes with its trained copy, not this weight
            return "sits outside a module trained in full (modules_to_save); it stays as a layer"
        # folded first (a plain state dict), it leaves a weight this layer adds to as usual
        if not inner.additive and not inner.merged and not below_folded:
            return f"sits outside a non-linear {type(inner).__name__}; merging would change outputs"
        # folded, a transform of the output would act on W only, not on what ``inner`` adds
        if not layer.additive and inner.enabled and not below_folded:
            return (
                f"it transforms the output of {type(inner).__name__} (adapter "
                f"{inner.adapter_name!r}) below it, which is not merged; merge that adapter first"
            )
        inner = inner.base
    return _base_blocker(inner, tied)


def _base_blocker(inner: nn.Module, tied: set[int]) -> str | None:
    """Why an update cannot be folded into the original module ``inner``, or None when it can."""
    weight = getattr(inner, "weight", None)
    if weight is not None and id(weight) in tied:
        return "its base weight is tied to another module (e.g. input and output embeddings)"
    refused = quant.merge_refusal(inner)
    if refused is not None:
        return refused
    if isinstance(inner, nn.Embedding) and inner.max_norm is not None:
        return (
            "its base nn.Embedding renormalises the rows it looks up (max_norm), in place: a "
            "folded update would be renormalised too, and unmerge could not subtract it exactly"
        )
    owner = None if quant.base_kind(inner) is not None else _forward_owner(inner)
    if owner is not None:
        return (
            f"its base {type(inner).__name__} computes its own forward() ({owner}, e.g. a scaled "
            "embedding), so the update folded into the weight would not give the same outputs"
        )
    return None


def _kept_original_ids(model: nn.Module) -> set[int]:
    """Base parameters an adapter trains in place while keeping their original values to restore."""
    from ..core import adapters

    return {
        id(p)
        for method in adapters(model).values()
        if method.trains_base_in_place and method.restorable
        for p in method.parameters()
    }


def _unload_blocker(layer: AdapterLayer, kept: set[int]) -> str | None:
    """Why ``layer`` cannot be merged for good: restoring the kept original would drop its update."""
    if (
        isinstance(layer, SavedModule)
        or id(getattr(layer.base_layer(), "weight", None)) not in kept
    ):
        return None
    return (
        "its base weight is trained in place by an adapter that keeps the original to restore it, "
        "which would drop this update; merge_and_unload that adapter first, or merge without unload"
    )


def _forward_owner(module: nn.Module) -> str | None:
    """The class that replaces a torch layer's forward, or None when the forward is torch's own (or
    transformers' Conv1D). A merge assumes the output is the layer's standard function of its weight;
    a subclass such as an embedding that multiplies its output by a constant breaks that."""
    owner = next((c for c in type(module).__mro__ if "forward" in vars(c)), None)
    if owner is None or owner.__module__.startswith("torch.nn.") or is_conv1d_class(owner):
        return None
    return owner.__qualname__


def tied_parameter_ids(model: nn.Module) -> set[int]:
    """Ids of parameters the model reaches under more than one name."""
    seen: set[int] = set()
    tied: set[int] = set()
    for _, p in model.named_parameters(remove_duplicate=False):
        (tied if id(p) in seen else seen).add(id(p))
    return tied
