"""Full fine-tuning as a method: base parameters train in place.

All parameters, or a freezing strategy: only the last k blocks, only biases (BitFit, Ben Zaken et
al., 2022), or named modules. Nothing is wrapped; the method owns the chosen base parameters.

Switching it off and removing it must give the base model back, so by default it keeps a copy of the
original values of the parameters it trains (memory: one more copy of those parameters, on their
device). Switching swaps the two sets of storages in O(1) with no copy. With ``keep_original=False``
there is no copy: disable / delete / unload raise an error, and ``merge_and_unload`` keeps the
trained weights (the usual end of a full fine-tune).
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from .._state import adapters
from ..config import MethodConfig, TrainDefaults, _check_patterns, check_positive_int
from ..layers import AdapterLayer, SavedModule
from ..registry import register_method
from ..targeting import (
    LAYER_LISTS,
    TargetError,
    check_patterns_match,
    first_match,
    iter_modules,
    select_named,
)
from .base import MergeReport, Method, apply_with


@dataclass(frozen=True, kw_only=True)
class FullConfig(MethodConfig):
    """Which base parameters train. With no field set: all of them. Each field narrows the choice.

    top_layers: only parameters inside the last k blocks of each block list (``model.layers``,
        ``transformer.h``, T5's ``encoder.block`` and ``decoder.block`` separately, ...).
    biases_only: only parameters registered as ``bias`` on their module (BitFit).
    modules: only parameters inside these modules (name suffixes or ``re:<regex>``).
    exclude: never parameters inside these modules, or with these names (same pattern forms).
    layers_pattern: the name of the block list for ``top_layers`` when it is not a usual one.
    keep_original: keep a copy of the trained parameters' original values so that disabling,
        deleting and unloading restore them exactly. Costs one copy of those parameters.
    modules_to_save: as for every method, modules trained as a separate copy (not in place).
    """

    top_layers: int | None = None
    biases_only: bool = False
    modules: Sequence[str] = ()
    exclude: Sequence[str] = ()
    layers_pattern: str | None = None
    keep_original: bool = True

    train_defaults: ClassVar[TrainDefaults | None] = TrainDefaults(
        lr=5e-5, why="every pretrained weight moves: BERT's fine-tuning range (2e-5 to 5e-5)"
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.top_layers is not None:
            check_positive_int("top_layers", self.top_layers)
        for name in ("biases_only", "keep_original"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        _check_patterns("modules", self.modules)
        _check_patterns("exclude", self.exclude)
        if self.layers_pattern is not None and not self.layers_pattern:
            raise ValueError("layers_pattern must be a non-empty name such as 'layers'")

    def describe(self) -> str:
        parts = []
        if self.modules:
            parts.append(f"modules {list(self.modules)}")
        if self.top_layers is not None:
            parts.append(f"top {self.top_layers} layer(s)")
        if self.biases_only:
            parts.append("biases")
        if self.exclude:
            parts.append(f"excluding {list(self.exclude)}")
        return ", ".join(parts) or "all"


@dataclass(frozen=True)
class BaseParameter:
    """A base parameter by canonical name, found live through its owner (survives ``model.to``)."""

    name: str
    owner: nn.Module
    local: str

    def get(self) -> nn.Parameter:
        param = self.owner._parameters[self.local]
        assert param is not None
        return param


def base_parameters(model: nn.Module) -> list[BaseParameter]:
    """Every base parameter once (tied ones under their first name), by canonical name.

    Adapter layers' own parameters and saved-module copies are not base parameters.
    """
    seen: set[int] = set()
    out = []
    for path, module in iter_modules(model):
        inner = module.base_layer() if isinstance(module, AdapterLayer) else module
        for local, param in inner._parameters.items():
            if param is not None and id(param) not in seen:
                seen.add(id(param))
                out.append(BaseParameter(f"{path}.{local}" if path else local, inner, local))
    return out


def select_parameters(model: nn.Module, config: FullConfig) -> list[BaseParameter]:
    """The base parameters ``config`` trains, in model order; errors name the fix."""
    everything = base_parameters(model)
    saved = [n for n, _ in select_named(model, config.modules_to_save, "modules_to_save")]
    chosen = [p for p in everything if not _inside(p.name, saved)]
    if config.modules:
        wanted = [n for n, _ in select_named(model, config.modules, "modules")]
        chosen = [p for p in chosen if _inside(p.name, wanted)]
    every_path = sorted({a for p in everything for a in _paths(p.name)})
    check_patterns_match(every_path, config.exclude, "exclude")
    chosen = [p for p in chosen if not any(first_match(a, config.exclude) for a in _paths(p.name))]
    if config.biases_only:
        chosen = [p for p in chosen if p.local == "bias"]
    if config.top_layers is not None:
        chosen = _top_layers(chosen, everything, config.top_layers, config.layers_pattern)
    if not chosen:
        raise TargetError(
            f"full: the config selects no parameter ({config.describe()}); "
            "loosen modules / exclude / biases_only (this model may have no biases)"
        )
    return chosen


def _paths(name: str) -> Iterator[str]:
    """``a.b.weight`` -> ``a``, ``a.b``, ``a.b.weight``: the parameter and every module above it."""
    parts = name.split(".")
    return (".".join(parts[: i + 1]) for i in range(len(parts)))


def _inside(name: str, modules: Sequence[str]) -> bool:
    return any(m == "" or name.startswith(m + ".") for m in modules)


def _block(name: str, layers_pattern: str | None) -> tuple[str, int] | None:
    """``encoder.block.3.layer.0.w`` -> (``encoder.block``, 3): the outermost block list and index."""
    lists = (layers_pattern,) if layers_pattern else LAYER_LISTS
    alternatives = "|".join(re.escape(n) for n in lists)
    found = re.search(rf"(?:^|\.)({alternatives})\.(\d+)(?:\.|$)", name)
    return (name[: found.end(1)], int(found.group(2))) if found else None


def _top_layers(
    chosen: list[BaseParameter], everything: list[BaseParameter], k: int, pattern: str | None
) -> list[BaseParameter]:
    counts: dict[str, int] = {}
    for p in everything:
        block = _block(p.name, pattern)
        if block is not None:
            counts[block[0]] = max(counts.get(block[0], 0), block[1] + 1)
    if not counts:
        where = pattern or "/".join(LAYER_LISTS)
        raise TargetError(
            f"full: top_layers={k}, but no parameter sits in a block list named {where}; "
            "set layers_pattern to the name of the model's block list"
        )
    for prefix, count in counts.items():
        if k > count:
            raise TargetError(f"full: top_layers={k}, but {prefix!r} has {count} blocks")
    keep = []
    for p in chosen:
        block = _block(p.name, pattern)
        if block is not None and block[1] >= counts[block[0]] - k:
            keep.append(p)
    return keep


@register_method("full", FullConfig)
class Full(Method):
    """Trains base parameters in place; optionally keeps their originals to restore them."""

    trains_base_in_place = True
    config: FullConfig

    @classmethod
    def demo_config(cls, total_steps: int) -> MethodConfig:
        # The benchmark baseline: what a plain full fine-tune costs, without the restore copy.
        return FullConfig(keep_original=False)

    def __init__(self, config: MethodConfig, adapter_name: str) -> None:
        super().__init__(config, adapter_name)
        self.owned: list[BaseParameter] = []
        # The values not in the model right now: originals while active, trained ones while not.
        self.held: dict[str, torch.Tensor] = {}

    @property
    def restorable(self) -> bool:
        return self.config.keep_original or not self.owned

    # -- lifecycle ---------------------------------------------------------------------------
    def inject(self, model: nn.Module) -> None:
        chosen = select_parameters(model, self.config)
        _check_disjoint(model, chosen, self.adapter_name)
        merged = _merged_into(model, {id(p.get()) for p in chosen})
        if merged:  # the kept copy would hold another adapter's update
            raise RuntimeError(
                f"adapter {self.adapter_name!r} would train weights that merged adapter layers "
                f"were folded into ({', '.join(merged[:3])}); call peftkit.unmerge(model) first"
            )
        self.inject_saved_modules(model, frozenset(id(p.get()) for p in chosen))
        if self.config.keep_original:
            with torch.no_grad():
                self.held = {p.name: p.get().detach().clone() for p in chosen}
        self.owned = chosen
        for p in chosen:
            p.get().requires_grad_(True)

    def remove(self, model: nn.Module) -> None:
        """Put the original values back (when they were kept) and give the parameters up."""
        if self.owned and self.active and self.config.keep_original:
            self._swap()
        for p in self.owned:
            p.get().requires_grad_(False)
        self.owned, self.held = [], {}
        super().remove(model)

    def is_empty(self) -> bool:
        return not self.owned and not self.layers

    # -- tensors -----------------------------------------------------------------------------
    def parameters(self) -> Iterator[nn.Parameter]:
        for p in self.owned:
            yield p.get()
        yield from super().parameters()

    def state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The trained values (held aside while the adapter is inactive), keyed by parameter name."""
        out: dict[str, torch.Tensor] = {
            p.name: p.get() if self.active else self.held[p.name] for p in self.owned
        }
        out.update(super().state_dict(model))
        return out

    # -- switching ---------------------------------------------------------------------------
    def restored_parameters(self) -> Iterator[nn.Parameter]:
        """The parameters it trains, when it keeps their originals to put back."""
        if self.config.keep_original:
            yield from (p.get() for p in self.owned)

    def check_switch(self, model: nn.Module, active: bool) -> None:
        if active == self.active or not self.owned:
            return
        merged = _merged_into(model, {id(p.get()) for p in self.owned})
        if merged:
            raise RuntimeError(
                f"adapter {self.adapter_name!r} trains weights that merged adapter layers were "
                f"folded into ({', '.join(merged[:3])}); call peftkit.unmerge(model) first"
            )

    def set_active(self, active: bool) -> None:
        if active != self.active and self.owned:
            if not self.config.keep_original:
                raise RuntimeError(
                    f"adapter {self.adapter_name!r} kept no copy of the original weights "
                    "(keep_original=False), so it cannot be switched off or on"
                )
            self._swap()
        super().set_active(active)

    def _swap(self) -> None:
        """Exchange the values in the model with the held ones (storages swap; no copy)."""
        with torch.no_grad():
            for p in self.owned:
                param = p.get()
                held = self.held[p.name].to(device=param.device, dtype=param.dtype)
                self.held[p.name] = param.data
                param.data = held

    # -- merging -----------------------------------------------------------------------------
    def merge(self, model: nn.Module, *, unload: bool) -> MergeReport:
        """The update is already in the weights; with ``unload`` the adapter lets them go."""
        report = super().merge(model, unload=unload)
        names = [f"{self.adapter_name}:{p.name}" for p in self.owned]
        if not self.active:
            report.kept.update(dict.fromkeys(names, "adapter is inactive; activate it to merge it"))
            return report
        report.merged.extend(names)
        if unload:
            for p in self.owned:
                p.get().requires_grad_(False)
            self.owned, self.held = [], {}
        return report

    def describe(self) -> dict[str, Any]:
        held = sum(t.numel() * t.element_size() for t in self.held.values())
        copy = f"{held / 2**20:.1f} MiB" if self.config.keep_original else "none"
        return {"trains": self.config.describe(), "original copy": copy}


def _check_disjoint(model: nn.Module, chosen: list[BaseParameter], name: str) -> None:
    mine = {id(p.get()): p.name for p in chosen}
    for other, method in adapters(model).items():
        if method.trains_base_in_place:
            shared = [mine[id(p)] for p in method.parameters() if id(p) in mine]
            if shared:
                raise ValueError(
                    f"adapter {name!r} would train parameters adapter {other!r} already trains in "
                    f"place ({', '.join(shared[:3])}); narrow modules / exclude so they are disjoint"
                )


def _merged_into(model: nn.Module, ids: set[int]) -> list[str]:
    """Paths of merged adapter layers whose base weight is one of ``ids``."""
    found = []
    for module in model.modules():
        if (
            isinstance(module, AdapterLayer)
            and module.merged
            and not isinstance(module, SavedModule)
        ):
            weight = getattr(module.base_layer(), "weight", None)
            if weight is not None and id(weight) in ids:
                found.append(module.path)
    return found


def apply_full(
    model: nn.Module,
    config: FullConfig | None = None,
    *,
    adapter_name: str = "default",
    **fields: Any,
) -> nn.Module:
    """Make ``model``'s parameters (or the chosen ones) trainable in place, as a named adapter.

    ``apply_full(model)`` trains everything; ``apply_full(model, biases_only=True)`` is BitFit;
    ``apply_full(model, top_layers=2, modules_to_save=["lm_head"])`` trains the last two blocks in
    place and a copy of the head.
    """
    return apply_with(FullConfig, model, config, adapter_name, fields)
