"""Quantized and other low-precision base layers: one small "base kind" per layer type.

A base kind tells peftkit, for one quantized linear layer type, what the layer stands for:

* ``features(module)`` -> ``(in_features, out_features)``, the logical shape (never a packed one);
* ``dequantize(module)`` -> the dense weight ``(out, in)`` in float32;
* ``requantize(module, dense)`` -> quantizes ``dense`` back into the layer in its own format and
  returns what it replaced, so that ``restore(module, saved)`` can put the original back exactly.
  ``None`` when the format cannot be rebuilt from a dense weight; merges into that base are refused.

Kinds are registered in this one place, each in its own module that is imported only once its package
has been imported by the user (a model built with that package's layers has done so), so
``import peftkit`` never pulls a quantization library in. Dispatch is by the module's type, or for
formats that keep ``nn.Linear`` and put a tensor subclass in ``weight`` (torchao), by the weight's type.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

__all__ = ["BaseKind", "QuantizedMerge", "base_kind", "dequantize", "register_base_kind"]

# package (as imported by users) -> peftkit module that registers its kinds
PACKAGES: dict[str, str] = {
    "bitsandbytes": "peftkit.quant.bnb",
    "torchao": "peftkit.quant.torchao",
    "optimum.quanto": "peftkit.quant.quanto",
    "hqq": "peftkit.quant.hqq",
}

MERGE_FIX = (
    "merge into a full-precision copy instead: peftkit.quant.dequantize(model) (or load the base "
    "without quantization and load_adapter onto it), then merge_and_unload"
)


@dataclass(frozen=True)
class BaseKind:
    """How peftkit reads (and, where it can, rewrites) one quantized linear layer type."""

    name: str
    features: Callable[[nn.Module], tuple[int, int]]
    dequantize: Callable[[nn.Module], torch.Tensor]
    compute_dtype: Callable[[nn.Module], torch.dtype]
    requantize: Callable[[nn.Module, torch.Tensor], Any] | None = None
    restore: Callable[[nn.Module, Any], None] | None = None
    no_merge_reason: str = ""


_BY_MODULE: dict[type, BaseKind] = {}
_BY_WEIGHT: dict[type, BaseKind] = {}
_LOADED: set[str] = set()


def register_base_kind(
    kind: BaseKind,
    *,
    module_types: tuple[type, ...] = (),
    weight_types: tuple[type, ...] = (),
) -> None:
    """Dispatch modules of ``module_types`` (or whose ``weight`` is one of ``weight_types``) to ``kind``."""
    if kind.requantize is not None and kind.restore is None:
        raise ValueError(f"base kind {kind.name!r}: a kind that requantizes must also restore")
    for t in module_types:
        _BY_MODULE[t] = kind
    for t in weight_types:
        _BY_WEIGHT[t] = kind


def _load_kinds() -> None:
    """Import the kind modules of the quantization packages the process has imported so far."""
    for package, module in PACKAGES.items():
        if package not in _LOADED and package in sys.modules:
            _LOADED.add(package)
            importlib.import_module(module)


def _lookup(table: dict[type, BaseKind], cls: type) -> BaseKind | None:
    return next((table[c] for c in cls.__mro__ if c in table), None)


def base_kind(module: nn.Module) -> BaseKind | None:
    """The registered kind of ``module`` (a quantized layer), or None for a plain layer."""
    if not (_BY_MODULE or _BY_WEIGHT) and not any(p in sys.modules for p in PACKAGES):
        return None  # the common case stays one dict check
    _load_kinds()
    kind = _lookup(_BY_MODULE, type(module))
    if kind is None:
        weight = module.__dict__.get("_parameters", {}).get("weight")
        kind = _lookup(_BY_WEIGHT, type(weight)) if weight is not None else None
    return kind


def is_quantized_linear(module: nn.Module) -> bool:
    """Whether ``module`` is a linear layer of a registered quantized kind."""
    return base_kind(module) is not None


def unknown_weight_subclass(module: nn.Module) -> str | None:
    """The name of ``module.weight``'s tensor subclass when no base kind handles it, else None."""
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or base_kind(module) is not None:
        return None
    cls = type(weight)
    if cls in (torch.Tensor, nn.Parameter) or isinstance(
        weight, nn.parameter.UninitializedParameter
    ):
        return None
    data_cls = type(weight.data) if isinstance(weight, nn.Parameter) else cls
    return None if data_cls is torch.Tensor else f"{cls.__module__}.{cls.__qualname__}"


def features(module: nn.Module) -> tuple[int, int] | None:
    """``(in_features, out_features)`` of a quantized linear layer, or None for other layers."""
    kind = base_kind(module)
    return None if kind is None else kind.features(module)


def compute_dtype(module: nn.Module) -> torch.dtype | None:
    """The floating dtype a quantized layer computes in, or None for other layers."""
    kind = base_kind(module)
    return None if kind is None else kind.compute_dtype(module)


def _device(module: nn.Module) -> torch.device:
    tensor: torch.Tensor | None = next(iter(module.parameters()), None)
    if tensor is None:
        tensor = next(iter(module.buffers()), None)
    return tensor.device if tensor is not None else torch.device("cpu")


def reference(module: nn.Module) -> tuple[torch.device, torch.dtype] | None:
    """Device and floating compute dtype of the layer (or block) ``module``: a quantized layer's
    compute dtype, never its storage dtype (4-bit weights are packed into uint8)."""
    for inner in module.modules():
        kind = base_kind(inner)
        if kind is not None:
            return _device(inner), kind.compute_dtype(inner)
    for p in module.parameters():
        if p.is_floating_point():
            return p.device, p.dtype
    return None


def adapter_dtype(base_dtype: torch.dtype, policy: str) -> torch.dtype:
    """The dtype an adapter's own parameters take on a base computing in ``base_dtype``.

    ``"auto"``: float32 on a 16-bit (bf16 / fp16) or quantized base, where the optimiser's small
    steps would otherwise round away (the forward casts the small factors, not the activations);
    the base's own dtype otherwise. ``"base"``: always the base's compute dtype.
    """
    if policy == "base" or base_dtype.itemsize >= 4:
        return base_dtype
    return torch.float32


def merge_refusal(module: nn.Module) -> str | None:
    """Why an update cannot be folded into ``module``'s weight, or None when it can."""
    kind = base_kind(module)
    if kind is not None and kind.requantize is None:
        why = f" ({kind.no_merge_reason})" if kind.no_merge_reason else ""
        return f"quantized base {kind.name}{why} cannot take the update back; {MERGE_FIX}"
    subclass = unknown_weight_subclass(module)
    if subclass is not None:
        return (
            f"its base weight is a {subclass} tensor subclass that peftkit cannot add an update to "
            f"(a quantized base?); {MERGE_FIX}"
        )
    return None


@dataclass
class QuantizedMerge:
    """What a merge into a quantized base replaced, and how far the re-quantised weight is from the
    exact sum: ``error`` = ‖Q(W + ΔW) − (W + ΔW)‖_F / ‖ΔW‖_F (0 is exact; near 1 or more means the
    format's step is as large as the update, which then largely does not survive the merge)."""

    saved: Any
    error: float


def merge_into(module: nn.Module, delta: torch.Tensor) -> QuantizedMerge:
    """Dequantize ``module``'s weight, add ``delta`` (out, in), and quantize the sum back in place."""
    kind = base_kind(module)
    if kind is None or kind.requantize is None:
        raise TypeError(merge_refusal(module) or f"{type(module).__name__} is not a quantized base")
    with torch.no_grad():
        target = kind.dequantize(module).float() + delta.float()
        saved = kind.requantize(module, target)
        got = kind.dequantize(module).float()
        norm = float(delta.float().norm())
        error = float((got - target).norm()) / norm if norm > 0 else 0.0
    return QuantizedMerge(saved, error)


def unmerge_from(module: nn.Module, merged: QuantizedMerge) -> None:
    """Put back exactly the quantized weight ``merge_into`` replaced."""
    kind = base_kind(module)
    assert kind is not None and kind.restore is not None
    kind.restore(module, merged.saved)


def dequantized_copy(module: nn.Module) -> nn.Linear:
    """A full-precision ``nn.Linear`` with the same function as a quantized linear layer."""
    kind = base_kind(module)
    if kind is None:
        raise TypeError(f"{type(module).__name__} is not a registered quantized layer")
    in_f, out_f = kind.features(module)
    weight = kind.dequantize(module).to(kind.compute_dtype(module))
    bias = getattr(module, "bias", None)
    dense = nn.Linear(in_f, out_f, bias=bias is not None, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        dense.weight.copy_(weight)
        if bias is not None:
            dense.bias.copy_(bias)
    dense.requires_grad_(False)
    return dense


def dequantize(model: nn.Module) -> nn.Module:
    """Replace every registered quantized linear layer of ``model`` (adapters' bases included) by a
    full-precision ``nn.Linear`` computing the same function, in place; returns ``model``.

    The way to merge an adapter that a quantized base refuses: ``merge_and_unload`` after this.
    """
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if base_kind(child) is not None:
                setattr(parent, name, dequantized_copy(child))
    return model
