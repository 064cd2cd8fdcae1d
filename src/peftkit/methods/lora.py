"""LoRA: low-rank adaptation (Hu et al., 2021).

W' = W + s * B A, with A: (r, in), B: (out, r) and s = alpha / r (or alpha / sqrt(r) for rsLoRA,
Kalajdzievski 2023). B starts at zero so the model is unchanged at injection. Supported bases:
nn.Linear, transformers' Conv1D (weight stored transposed), quantized linear layers
(``peftkit.quant``: bitsandbytes, torchao, optimum-quanto, hqq), nn.Embedding and nn.Conv2d.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..config import (
    TargetedConfig,
    check_finite_number,
    check_pattern,
    check_positive_int,
    check_probability,
)
from ..layers import AdapterLayer, autocast_on, cast_like, wide
from ..registry import register_method
from ..targeting import check_patterns_match, first_match, is_conv1d, linear_features
from .base import SwapMethod, apply_with

Init = Literal["kaiming", "gaussian"]


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


class LoraLayer(AdapterLayer):
    """Shared state of the LoRA wrappers: factors ``lora_A`` and ``lora_B``, rank, scale, dropout."""

    additive = True
    mergeable = True
    weight_independent = True  # s·BA does not read W: unmerge subtracts it, no copy kept

    def __init__(
        self,
        base: nn.Module,
        adapter_name: str,
        path: str,
        *,
        r: int,
        scaling: float,
        dropout: float,
        init: Init = "kaiming",
        adapter_dtype: str = "auto",
    ) -> None:
        super().__init__(base, adapter_name, path)
        self.r = r
        self.scaling = scaling
        # p=0 must not add an op: nn.Dropout(0) would still run (and on some paths save x).
        self.dropout: nn.Module = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        kw = self.factor_placement(adapter_dtype)
        a_shape, b_shape = self.factor_shapes(self.base_layer())
        self.lora_A = nn.Parameter(torch.empty(a_shape, **kw))
        self.lora_B = nn.Parameter(torch.empty(b_shape, **kw))
        self.init_factors(init)

    def factor_shapes(self, inner: nn.Module) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Shapes of A and B for the wrapped module."""
        raise NotImplementedError

    def init_factors(self, init: Init) -> None:
        """B = 0 so the layer starts as the identity; A per ``init``."""
        with torch.no_grad():
            if init == "gaussian":
                nn.init.normal_(self.lora_A, std=1.0 / self.r)
            else:
                nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, r={self.r}, scaling={self.scaling:g}"


class LoraLinear(LoraLayer):
    """y = base(x) + s * B A dropout(x);  x: (..., in), y: (..., out).  A: (r, in), B: (out, r).

    Also wraps transformers' Conv1D, whose weight is stored as (in, out): ``delta_weight`` returns
    the update in the base weight's own layout; and quantized linear layers (``peftkit.quant``),
    sized from their logical features. Factors kept in float32 on a 16-bit base are cast to x's
    dtype in forward (r·(in+out) elements), never x to float32.
    """

    def factor_shapes(self, inner: nn.Module) -> tuple[tuple[int, ...], tuple[int, ...]]:
        in_f, out_f = linear_features(inner)
        return (self.r, in_f), (out_f, self.r)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            out: torch.Tensor = self.base(x)
            return out
        # When nothing below can observe it, the base sees x as 2-D (..., in) -> (n, in): same math
        # for a linear layer, and its fresh 2-D output can take the update in place (see
        # _add_scaled). A hook below sees x and the output in the shapes the model gave them.
        flat = x.reshape(-1, x.shape[-1])
        private = self.base_output_is_private()
        y = _base_rows(self, x, flat, private)
        y = _add_scaled(
            y, F.linear(self.dropout(flat), cast_like(self.lora_A, flat)), self, private
        )
        return y if x.dim() == 2 else y.view(*x.shape[:-1], y.shape[-1])

    def delta_weight(self) -> torch.Tensor:
        delta = (wide(self.lora_B) @ wide(self.lora_A)) * self.scaling
        return delta.t() if is_conv1d(self.base_layer()) else delta


class LoraEmbedding(LoraLayer):
    """y = base(ids) + s * A[:, ids]ᵀ Bᵀ;  ids: (...), y: (..., dim).  A: (r, vocab), B: (dim, r).

    The adapter path has no dropout: dropping token ids is meaningless. As in the base, the
    ``padding_idx`` row never changes: A's column for it starts at zero and gets no gradient.
    """

    def factor_shapes(self, inner: nn.Module) -> tuple[tuple[int, ...], tuple[int, ...]]:
        assert isinstance(inner, nn.Embedding)
        return (self.r, inner.num_embeddings), (inner.embedding_dim, self.r)

    def init_factors(self, init: Init) -> None:
        super().init_factors(init)
        pad = self._padding_row()
        if pad is not None:
            with torch.no_grad():
                self.lora_A[:, pad] = 0

    def _padding_row(self) -> int | None:
        pad = getattr(self.base_layer(), "padding_idx", None)
        return None if pad is None else int(pad)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            out: torch.Tensor = self.base(ids)
            return out
        flat = ids.reshape(-1)
        private = self.base_output_is_private()  # a hook below sees ids in the model's shape
        y = _base_rows(self, ids, flat, private)
        h = F.embedding(flat, self.lora_A.t(), self._padding_row())
        y = _add_scaled(y, h, self, private)
        return y.view(*ids.shape, y.shape[-1])

    def delta_weight(self) -> torch.Tensor:
        return (wide(self.lora_B) @ wide(self.lora_A)).t() * self.scaling


class LoraConv2d(LoraLayer):
    """y = base(x) + s * conv1x1_B(conv_A(dropout(x))), conv_A with the base's kernel, stride, padding.

    x: (N, in, H, W).  A: (r, in, kh, kw), B: (out, r, 1, 1).
    """

    def factor_shapes(self, inner: nn.Module) -> tuple[tuple[int, ...], tuple[int, ...]]:
        assert isinstance(inner, nn.Conv2d)
        if inner.groups != 1 or inner.padding_mode != "zeros":
            raise ValueError(
                f"LoRA on Conv2d {self.path!r} needs groups=1 and padding_mode='zeros'; "
                "add it to exclude"
            )
        kh, kw = inner.kernel_size
        return (self.r, inner.in_channels, kh, kw), (inner.out_channels, self.r, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y: torch.Tensor = self.base(x)
        if not self.enabled:
            return y
        conv = self.base_layer()
        assert isinstance(conv, nn.Conv2d)
        a, b = cast_like(self.lora_A, x), cast_like(self.lora_B, x)
        h = F.conv2d(self.dropout(x), a, None, conv.stride, conv.padding, conv.dilation)
        return y + F.conv2d(h, b) * self.scaling

    def delta_weight(self) -> torch.Tensor:
        flat = wide(self.lora_B).flatten(1) @ wide(self.lora_A).flatten(1)
        return flat.view(self.lora_B.shape[0], *self.lora_A.shape[1:]) * self.scaling


def _base_rows(
    layer: LoraLayer, x: torch.Tensor, flat: torch.Tensor, private: bool
) -> torch.Tensor:
    """The base's output as rows (n, out): called on ``flat`` when its output is private, else on
    ``x`` as the model passed it, so a hook below sees the shapes it would see without LoRA."""
    if private:
        out: torch.Tensor = layer.base(flat)
        return out
    y: torch.Tensor = layer.base(x)
    return y.reshape(-1, y.shape[-1])


def _add_scaled(y: torch.Tensor, h: torch.Tensor, layer: LoraLayer, private: bool) -> torch.Tensor:
    """y + s · h Bᵀ as one GEMM;  y: (n, out) the base's output, h: (n, r).  B A is never formed.

    The GEMM accumulates into y's own memory when y is a fresh tensor (not a view) of h's dtype
    that no forward hook below could hold (``private``, from ``base_output_is_private``): then
    nothing else sees the wrapped layer's output and its backward does not need it, so this saves
    allocating and copying an output-sized tensor per call (the largest cost of the adapter path
    after the GEMMs themselves). Otherwise (transformers' Conv1D returns a view; mixed dtypes; a
    hook that may keep the base output) an out-of-place addmm computes the same.
    """
    b: torch.Tensor = layer.lora_B
    scale = layer.scaling
    if not autocast_on(y):
        h, b = h.to(y.dtype), b.to(y.dtype)  # float32 factors on a 16-bit base: cast the small ones
    if private and y._base is None and y.dtype == h.dtype:
        return y.addmm_(h, b.to(y.dtype).t(), alpha=scale)
    return torch.addmm(y, h, b.t(), alpha=scale)


@register_method("lora", LoraConfig)
class Lora(SwapMethod):
    """Low-rank updates on linear, Conv1D, embedding and 2-D convolution layers."""

    supported = (nn.Linear, nn.Embedding, nn.Conv2d)
    config: LoraConfig

    def check_selection(self, paths: list[str]) -> None:
        """Each rank_pattern / alpha_pattern key must match a module this adapter wraps."""
        check_patterns_match(paths, self.config.rank_pattern, "rank_pattern key")
        check_patterns_match(paths, self.config.alpha_pattern, "alpha_pattern key")

    def wrap(self, module: nn.Module, path: str) -> AdapterLayer:
        cfg = self.config
        inner = module.base_layer() if isinstance(module, AdapterLayer) else module
        kind: type[LoraLayer] = LoraLinear
        if isinstance(inner, nn.Embedding):
            kind = LoraEmbedding
        elif isinstance(inner, nn.Conv2d):
            kind = LoraConv2d
        if cfg.dora:
            from .dora import dora_kind  # dora.py builds on this module's layers

            kind = dora_kind(module, path)
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
