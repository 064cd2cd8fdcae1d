"""LoRA: low-rank adaptation (Hu et al., 2021).

W' = W + s * B A, with A: (r, in), B: (out, r) and s = alpha / r (or alpha / sqrt(r) for rsLoRA,
Kalajdzievski 2023). B starts at zero so the model is unchanged at injection. Supported bases:
nn.Linear, transformers' Conv1D (weight stored transposed), quantized linear layers
(``peftkit.quant``: bitsandbytes, torchao, optimum-quanto, hqq), nn.Embedding and nn.Conv2d;
nn.Conv1d and nn.MultiheadAttention (in ``lora_torch``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from torch import nn

from ..config import (
    TargetedConfig,
    TrainDefaults,
    check_finite_number,
    check_pattern,
    check_positive_int,
    check_probability,
)
from ..layers import AdapterLayer
from ..registry import register_method
from ..targeting import check_patterns_match, first_match
from .base import SwapMethod, apply_with
from .dora import dora_kind
from .lora_layers import Init as Init
from .lora_layers import LoraConv2d as LoraConv2d
from .lora_layers import LoraEmbedding as LoraEmbedding
from .lora_layers import LoraLayer as LoraLayer
from .lora_layers import LoraLinear as LoraLinear
from .lora_torch import LoraConv1d, LoraMultiheadAttention


@dataclass(frozen=True, kw_only=True)
class LoraConfig(TargetedConfig):
    """LoRA settings.

    r: rank of the update.  alpha: scale numerator (s = alpha / r; alpha / sqrt(r) with ``rslora``).
    dropout: dropout on the adapter path's input (0 adds no op and saves no activation).
    init: ``"kaiming"`` (A Kaiming-uniform, B zero) or ``"gaussian"`` (A ~ N(0, 1/r), B zero).
    rank_pattern / alpha_pattern: per-module overrides, keyed by target patterns
        (name suffix or ``re:<regex>``), e.g. ``rank_pattern={"o_proj": 16}``.
    dora: DoRA (Liu et al., 2024): the updated weight is renormalised per output feature and
        scaled by a trained magnitude, W' = m ⊙ (W + s B A) / ‖W + s B A‖ (see ``methods.dora``).
        Linear, transformers' Conv1D and Conv2d only.
    """

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    rslora: bool = False
    init: Init = "kaiming"
    rank_pattern: Mapping[str, int] = field(default_factory=dict)
    alpha_pattern: Mapping[str, float] = field(default_factory=dict)
    dora: bool = False

    train_defaults: ClassVar[TrainDefaults | None] = TrainDefaults(
        lr=1e-3,
        why="B starts at zero, so the update grows from nothing: 20x full fine-tuning's rate",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive_int("r", self.r)
        check_finite_number("alpha", self.alpha, positive=True)
        check_probability("dropout", self.dropout)
        if self.init not in ("kaiming", "gaussian"):
            raise ValueError(f"init must be 'kaiming' or 'gaussian', got {self.init!r}")
        for flag in ("rslora", "dora"):
            if not isinstance(getattr(self, flag), bool):
                raise ValueError(f"{flag} must be True or False, got {getattr(self, flag)!r}")
        for field_name in ("rank_pattern", "alpha_pattern"):
            value = getattr(self, field_name)
            if not isinstance(value, Mapping):
                raise ValueError(
                    f"{field_name} must map module patterns to values, e.g. "
                    f"{field_name}={{'o_proj': 16}}, got {value!r}"
                )
            for pattern in value:
                check_pattern(f"{field_name} key", pattern)
        for pattern, rank in dict(self.rank_pattern).items():
            check_positive_int(f"rank_pattern[{pattern!r}]", rank)
        for pattern, alpha in dict(self.alpha_pattern).items():
            check_finite_number(f"alpha_pattern[{pattern!r}]", alpha, positive=True)

    def rank_for(self, path: str) -> int:
        key = first_match(path, self.rank_pattern)
        return self.r if key is None else int(self.rank_pattern[key])

    def alpha_for(self, path: str) -> float:
        key = first_match(path, self.alpha_pattern)
        return self.alpha if key is None else float(self.alpha_pattern[key])

    def scaling_for(self, path: str) -> float:
        alpha = self.alpha_for(path)
        rank = self.rank_for(path)
        return alpha / math.sqrt(rank) if self.rslora else alpha / rank


@register_method("lora", LoraConfig)
class Lora(SwapMethod):
    """Low-rank updates on linear, Conv1D, embedding, convolution and multi-head attention layers."""

    supported = (nn.Linear, nn.Embedding, nn.Conv2d, nn.Conv1d, nn.MultiheadAttention)
    config: LoraConfig

    def check_selection(self, paths: list[str]) -> None:
        """Each rank_pattern / alpha_pattern key must match a module this adapter wraps."""
        check_patterns_match(paths, self.config.rank_pattern, "rank_pattern key")
        check_patterns_match(paths, self.config.alpha_pattern, "alpha_pattern key")

    def wrap(self, module: nn.Module, path: str) -> AdapterLayer:
        cfg = self.config
        inner = module.base_layer() if isinstance(module, AdapterLayer) else module
        kind = dora_kind(module, path) if cfg.dora else layer_kind(inner)
        return kind(
            module,
            self.adapter_name,
            path,
            r=cfg.rank_for(path),
            scaling=cfg.scaling_for(path),
            dropout=cfg.dropout,
            init=cfg.init,
            adapter_dtype=cfg.adapter_dtype,
        )

    def describe(self) -> dict[str, object]:
        ranks = {layer.r for layer in self.layers if isinstance(layer, LoraLayer)}
        return {"rank": sorted(ranks)[0] if len(ranks) == 1 else sorted(ranks)}


def layer_kind(inner: nn.Module) -> type[LoraLayer]:
    """The LoRA layer class for the original module ``inner`` (LoraLinear unless listed)."""
    kinds: dict[type[nn.Module], type[LoraLayer]] = {
        nn.Embedding: LoraEmbedding,
        nn.Conv2d: LoraConv2d,
        nn.Conv1d: LoraConv1d,
        nn.MultiheadAttention: LoraMultiheadAttention,
    }
    return next((kind for t, kind in kinds.items() if isinstance(inner, t)), LoraLinear)


def apply_lora(
    model: nn.Module,
    config: LoraConfig | None = None,
    *,
    adapter_name: str = "default",
    **fields: Any,
) -> nn.Module:
    """Add LoRA to ``model`` in place and return it: ``apply_lora(model, r=8, targets=["q_proj"])``.

    Takes a ``LoraConfig`` or its fields as keywords. The base is frozen; only LoRA factors train.
    """
    return apply_with(LoraConfig, model, config, adapter_name, fields)
