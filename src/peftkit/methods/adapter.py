"""Bottleneck adapters (Houlsby et al., 2019; Pfeiffer et al., 2021; He et al., 2022).

An adapter is a small two-layer network f(h) = up(act(down(dropout(norm(h))))) with down: (m, d) and
up: (d, m), m << d, inserted into a frozen model. Three forms:

    houlsby   y = g(x) + s·f(g(x))   after the attention output and after the feed-forward output
    pfeiffer  y = g(x) + s·f(g(x))   after the feed-forward output only
    parallel  y = g(x) + s·f(x)      beside the feed-forward block g, reading the block's input

``up`` starts at zero, so the model is unchanged at injection. Adapters are non-linear in the base
weights: merging leaves them in place (the merge report says so); ``unload`` removes them exactly.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from .. import quant
from ..config import (
    MethodConfig,
    TargetedConfig,
    TrainDefaults,
    _check_patterns,
    check_adapter_dtype,
    check_finite_number,
    check_positive_int,
    check_probability,
)
from ..layers import AdapterLayer, autocast_on
from ..registry import register_method
from ..targeting import (
    TargetError,
    is_linear,
    iter_modules,
    linear_features,
    select,
    set_module,
)
from .adapter_places import derive_places
from .base import Method, apply_with

Form = Literal["houlsby", "pfeiffer", "parallel"]
Activation = Literal["relu", "gelu", "silu", "tanh"]

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": F.relu,
    "gelu": F.gelu,
    "silu": F.silu,
    "tanh": torch.tanh,
}


@dataclass(frozen=True, kw_only=True)
class AdapterConfig(MethodConfig):
    """Bottleneck adapter settings.

    form: ``"pfeiffer"`` (after the feed-forward output), ``"houlsby"`` (after the attention output
        and after the feed-forward output) or ``"parallel"`` (beside the feed-forward block).
    bottleneck: the adapter's inner width m; when None, m = width // reduction_factor.
    activation: the non-linearity between the two projections.
    scaling: s, the factor on the adapter's output (He et al. use 4 for parallel adapters).
    dropout: dropout on the adapter's input (0 adds no op).
    layer_norm: a trainable LayerNorm on the adapter's input.
    targets: None places adapters by the preset for BERT/RoBERTa, GPT-2, Llama-family or T5 module
        names, or for any other transformer by its structure (``adapter_places``). A list (name
        suffixes or ``re:<regex>``) puts one adapter at each matching module: after its output for
        houlsby/pfeiffer, beside it (reading its first input) for parallel.
    exclude / layers / layers_pattern: as for LoRA; they narrow presets and explicit targets alike.
    adapter_dtype: as for LoRA (``"auto"``: float32 on a bf16/fp16 or quantized base).
    """

    form: Form = "pfeiffer"
    bottleneck: int | None = None
    reduction_factor: float = 16.0
    activation: Activation = "relu"
    scaling: float = 1.0
    dropout: float = 0.0
    layer_norm: bool = False
    targets: Sequence[str] | None = None
    exclude: Sequence[str] = ()
    layers: Sequence[int] | None = None
    layers_pattern: str | None = None
    adapter_dtype: Literal["auto", "base"] = "auto"

    train_defaults: ClassVar[TrainDefaults | None] = TrainDefaults(
        lr=1e-3, why="a fresh bottleneck next to a pretrained stream: the rate LoRA wants"
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        check_adapter_dtype(self.adapter_dtype)
        if self.form not in ("houlsby", "pfeiffer", "parallel"):
            raise ValueError(f"form must be 'houlsby', 'pfeiffer' or 'parallel', got {self.form!r}")
        if self.bottleneck is not None:
            check_positive_int("bottleneck", self.bottleneck)
        check_finite_number("reduction_factor", self.reduction_factor, positive=True)
        if self.activation not in ACTIVATIONS:
            raise ValueError(
                f"activation must be one of {sorted(ACTIVATIONS)}, got {self.activation!r}"
            )
        check_finite_number("scaling", self.scaling)
        check_probability("dropout", self.dropout)
        if not isinstance(self.layer_norm, bool):
            raise ValueError(f"layer_norm must be True or False, got {self.layer_norm!r}")
        if self.targets is not None:
            _check_patterns("targets", self.targets)
            if not self.targets:
                raise ValueError("targets is empty: name modules, or pass None to use the presets")
        # exclude / layers / layers_pattern mean what they mean for every targeted method.
        TargetedConfig(
            targets=["-"],
            exclude=self.exclude,
            layers=self.layers,
            layers_pattern=self.layers_pattern,
        )

    def size_for(self, width: int) -> int:
        """The bottleneck width m for an adapter on a stream of ``width`` features."""
        if self.bottleneck is not None:
            return self.bottleneck
        return max(1, int(width // self.reduction_factor))


# -- presets ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Preset:
    """Full-match regexes for one model family's module names.

    attention: attention output projections; ffn: feed-forward output projections; block: the
    feed-forward block a parallel adapter sits beside. ``residual_block``: the block is called as
    ``block(hidden, residual)`` and adds the residual itself (BERT's post-LayerNorm ``BertOutput``).
    """

    family: str
    attention: str
    ffn: str
    block: str
    residual_block: bool = False
    widths: Mapping[str, int] = field(default_factory=dict)  # of places no linear layer tells


PRESETS = (
    Preset(
        "bert",
        attention=r"(.*\.)?layer\.\d+\.(attention|crossattention)\.output\.dense",
        ffn=r"(.*\.)?layer\.\d+\.output\.dense",
        block=r"(.*\.)?layer\.\d+\.output",
        residual_block=True,
    ),
    Preset(
        "gpt2",
        attention=r"(.*\.)?h\.\d+\.(attn|crossattention)\.c_proj",
        ffn=r"(.*\.)?h\.\d+\.mlp\.c_proj",
        block=r"(.*\.)?h\.\d+\.mlp",
    ),
    Preset(
        "llama",
        attention=r"(.*\.)?layers\.\d+\.self_attn\.o_proj",
        ffn=r"(.*\.)?layers\.\d+\.mlp\.down_proj",
        block=r"(.*\.)?layers\.\d+\.mlp",
    ),
    Preset(
        "t5",
        attention=r"(.*\.)?block\.\d+\.layer\.\d+\.(SelfAttention|EncDecAttention)\.o",
        ffn=r"(.*\.)?block\.\d+\.layer\.\d+\.DenseReluDense\.wo",
        block=r"(.*\.)?block\.\d+\.layer\.\d+\.DenseReluDense",
    ),
)


def match_preset(model: nn.Module) -> Preset | None:
    """The hand-written preset whose feed-forward names occur in ``model``, if any."""
    names = [n for n, _ in iter_modules(model) if n]
    for preset in PRESETS:
        if any(re.fullmatch(preset.ffn, n) for n in names):
            return preset
    return None


def find_preset(model: nn.Module) -> Preset:
    """The preset for ``model``: a hand-written one, else one derived from its module structure
    (``adapter_places``); an error asking for targets if neither finds the feed-forward outputs."""
    preset = match_preset(model)
    if preset is not None:
        return preset
    places = derive_places(model)
    if places:
        return Preset(
            f"derived from {type(model).__name__}",
            attention=_exactly(places.attention),
            ffn=_exactly(places.ffn),
            block=_exactly(places.block),
            widths=places.widths,
        )
    names = [n for n, _ in iter_modules(model) if n]
    leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
    raise TargetError(
        f"adapter: no preset recognises {type(model).__name__} and its structure shows no repeated "
        "blocks with attention and a feed-forward output; pass targets=[...] naming the modules to "
        f"put adapters after, e.g. the feed-forward output projection. Module names include: "
        f"{leaves[:12]}"
    )


def _exactly(names: list[str]) -> str:
    """A full-match regex for exactly ``names`` (one that matches nothing when there are none)."""
    return "|".join(re.escape(n) for n in names) if names else r"(?!)"


# -- layers -----------------------------------------------------------------------------------------
class BottleneckLayer(AdapterLayer):
    """Shared parts: f(h) = up(act(down(dropout(norm(h))))); down: (m, d), up: (d, m), up = 0 at start.

    Not linear in the base weight, so never merged.
    """

    mergeable = False

    def __init__(
        self, base: nn.Module, adapter_name: str, path: str, *, width: int, config: AdapterConfig
    ) -> None:
        super().__init__(base, adapter_name, path)
        kw = _placement(base, path, config.adapter_dtype)
        size = config.size_for(width)
        self.width, self.size, self.scaling = width, size, float(config.scaling)
        self.adapter_norm: nn.Module = (
            nn.LayerNorm(width, **kw) if config.layer_norm else nn.Identity()
        )
        self.adapter_dropout: nn.Module = (
            nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        )
        self.adapter_down = nn.Linear(width, size, **kw)
        self.adapter_up = nn.Linear(size, width, **kw)
        self.activation = ACTIVATIONS[config.activation]
        with torch.no_grad():
            self.adapter_up.weight.zero_()
            self.adapter_up.bias.zero_()

    def bottleneck(self, h: torch.Tensor) -> torch.Tensor:
        """f(h) without the scale;  h: (..., d) -> (..., d), in h's dtype.

        float32 parameters on a 16-bit stream (``adapter_dtype="auto"``): the small (m, d) weights
        are cast to the stream's dtype, never the (..., d) activations to float32."""
        if h.dtype == self.adapter_down.weight.dtype or autocast_on(h):
            hidden = self.activation(self.adapter_down(self.adapter_dropout(self.adapter_norm(h))))
            out: torch.Tensor = self.adapter_up(hidden)
            return out
        return _cast_bottleneck(self, h)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {self.width}→{self.size}→{self.width}, scaling={self.scaling:g}"


def _cast_bottleneck(layer: BottleneckLayer, h: torch.Tensor) -> torch.Tensor:
    """``layer.bottleneck(h)`` computed in h's dtype with parameters kept in another dtype."""
    norm = layer.adapter_norm
    if isinstance(norm, nn.LayerNorm):
        h = F.layer_norm(
            h, norm.normalized_shape, _maybe(norm.weight, h), _maybe(norm.bias, h), norm.eps
        )
    down, up = layer.adapter_down, layer.adapter_up
    hidden = layer.activation(
        F.linear(layer.adapter_dropout(h), _to(down.weight, h), _to(down.bias, h))
    )
    return F.linear(hidden, _to(up.weight, h), _to(up.bias, h))


def _to(param: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return param.to(like.dtype)


def _maybe(param: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor | None:
    return None if param is None else param.to(like.dtype)


class SequentialAdapter(BottleneckLayer):
    """y = g(x) + s·f(g(x)) for the wrapped module g (Houlsby / Pfeiffer);  y: (..., d)."""

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        y = self.base(*args, **kwargs)
        if not self.enabled:
            return y
        if not isinstance(y, torch.Tensor):
            raise TypeError(
                f"adapter at {self.path!r}: the wrapped module returned {type(y).__name__}, not a "
                "tensor; target a module that returns one (e.g. an output projection)"
            )
        return torch.add(y, self.bottleneck(y), alpha=self.scaling)


class ParallelAdapter(BottleneckLayer):
    """y = g(x) + s·f(x) for the wrapped block g (He et al., 2022);  x, y: (..., d)."""

    additive = True  # f reads the block's input, not its output

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        y = self.base(x, *args, **kwargs)
        if not self.enabled:
            return y
        return torch.add(y, self.bottleneck(x), alpha=self.scaling)


class ResidualParallelAdapter(BottleneckLayer):
    """For a block called as g(h, x) that adds the residual x itself (BERT's ``LN(W h + x)``):

    y = g(h, x + s·f(x)) = LN(W h + s·f(x) + x), i.e. the parallel adapter's output joins the
    feed-forward output before the residual sum, exactly as in He et al. (2022).
    """

    def forward(self, hidden: torch.Tensor, residual: torch.Tensor, *args: Any, **kw: Any) -> Any:
        if self.enabled:
            residual = torch.add(residual, self.bottleneck(residual), alpha=self.scaling)
        return self.base(hidden, residual, *args, **kw)


def _placement(module: nn.Module, path: str, policy: str) -> dict[str, Any]:
    """Device and dtype of the adapter's parameters: from the base's compute dtype (a quantized
    layer's, not its packed storage) and ``policy`` (``AdapterConfig.adapter_dtype``)."""
    inner = module.base_layer() if isinstance(module, AdapterLayer) else module
    found = quant.reference(inner)
    if found is None:
        raise TargetError(f"adapter: {path!r} has no parameters to take a device and dtype from")
    return {"device": found[0], "dtype": quant.adapter_dtype(found[1], policy)}


def stream_width(module: nn.Module, path: str) -> int:
    """Width of the stream an adapter on ``module`` sees: its output features (for a block, those of
    its last linear layer)."""
    inner = module.base_layer() if isinstance(module, AdapterLayer) else module
    if is_linear(inner):
        return linear_features(inner)[1]
    if isinstance(inner, nn.Embedding):
        return inner.embedding_dim
    linears = [m for _, m in iter_modules(inner) if is_linear(_unwrap(m))]
    if not linears:
        raise TargetError(
            f"adapter: cannot tell the width of {path!r} ({type(inner).__name__}); target a linear "
            "layer or a block that contains one"
        )
    return stream_width(linears[-1], path)


def _unwrap(module: nn.Module) -> nn.Module:
    return module.base_layer() if isinstance(module, AdapterLayer) else module


# -- the method -------------------------------------------------------------------------------------
Placement = list[tuple[str, nn.Module, type[BottleneckLayer]]]


@register_method("adapter", AdapterConfig)
class Adapter(Method):
    """Bottleneck adapters placed by architecture presets or explicit targets."""

    config: AdapterConfig

    @classmethod
    def demo_config(cls, total_steps: int) -> MethodConfig:
        # A pre-LayerNorm model's feed-forward outputs are small; normalising the adapter's input
        # makes it learn several times faster in a short run (docs/methods/adapter.md).
        return AdapterConfig(form="pfeiffer", layer_norm=True)

    def inject(self, model: nn.Module) -> None:
        widths = {} if self.config.targets is not None else find_preset(model).widths
        for path, module, kind in self.placement(model):
            width = widths.get(path) or stream_width(module, path)
            if kind is ParallelAdapter:
                _check_square(module, path)
            layer = kind(module, self.adapter_name, path, width=width, config=self.config)
            set_module(model, path, layer)
        self.inject_saved_modules(model)

    def placement(self, model: nn.Module) -> Placement:
        """Where adapters go and which kind: ``(path, module, layer class)`` in model order."""
        cfg = self.config
        if cfg.targets is not None:
            kind: type[BottleneckLayer] = (
                ParallelAdapter if cfg.form == "parallel" else SequentialAdapter
            )
            return [(n, m, kind) for n, m in self._select(model, cfg.targets)]
        preset = find_preset(model)
        if cfg.form == "parallel":
            if preset.block == r"(?!)":
                raise TargetError(
                    f"adapter: the feed-forward layers of {type(model).__name__} are not held by one "
                    "module a parallel adapter could sit beside; pass targets=[...] naming the "
                    "feed-forward blocks, or use form='pfeiffer'"
                )
            kind = ResidualParallelAdapter if preset.residual_block else ParallelAdapter
            return [(n, m, kind) for n, m in self._select(model, ["re:" + preset.block])]
        patterns = ["re:" + preset.ffn]
        if cfg.form == "houlsby" and preset.attention != r"(?!)":
            patterns.insert(0, "re:" + preset.attention)
        return [(n, m, SequentialAdapter) for n, m in self._select(model, patterns)]

    def _select(self, model: nn.Module, patterns: Sequence[str]) -> list[tuple[str, nn.Module]]:
        cfg = self.config
        narrowed = TargetedConfig(
            targets=list(patterns),
            exclude=cfg.exclude,
            layers=cfg.layers,
            layers_pattern=cfg.layers_pattern,
            modules_to_save=cfg.modules_to_save,
            train_head=cfg.train_head,
        )
        return select(model, narrowed, None, method="adapter")

    def describe(self) -> dict[str, Any]:
        sizes = sorted({layer.size for layer in self.layers if isinstance(layer, BottleneckLayer)})
        return {"form": self.config.form, "bottleneck": sizes[0] if len(sizes) == 1 else sizes}


def _check_square(module: nn.Module, path: str) -> None:
    inner = _unwrap(module)
    if isinstance(inner, nn.Linear) and inner.in_features != inner.out_features:
        raise TargetError(
            f"adapter: a parallel adapter reads {path!r}'s input and adds to its output, which "
            f"needs equal widths ({inner.in_features} → {inner.out_features}); target the whole "
            "block, or use form='pfeiffer'"
        )


def apply_adapter(
    model: nn.Module,
    config: AdapterConfig | None = None,
    *,
    adapter_name: str = "default",
    **fields: Any,
) -> nn.Module:
    """Add bottleneck adapters to ``model`` in place and return it.

    ``apply_adapter(model)`` puts Pfeiffer adapters (reduction 16) after each feed-forward block of a
    BERT/GPT-2/Llama/T5 model; ``apply_adapter(model, form="houlsby", bottleneck=64)``; for other
    models name the places: ``apply_adapter(model, targets=["mlp.down"])``.
    """
    return apply_with(AdapterConfig, model, config, adapter_name, fields)
