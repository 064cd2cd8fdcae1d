"""IA3: learned per-feature scaling vectors (Liu et al., 2022, "Few-Shot Parameter-Efficient
Fine-Tuning is Better and Cheaper than In-Context Learning").

A wrapped linear layer's output is scaled feature by feature, y = l ⊙ (W x + b) (the paper's l_k and
l_v on the attention keys and values), or, for a feed-forward module, its input is,
y = W (l ⊙ x) + b (l_ff on the input of the down projection). Every l starts at ones, so the model
is unchanged at injection. Merging is exact: an output scaling scales W's rows and the bias, an
input scaling scales W's columns. Supported bases: nn.Linear and transformers' Conv1D (weight
stored (in, out)); quantized bases are refused (the scaled weight would be re-quantized).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from .. import quant
from ..config import TargetedConfig, TrainDefaults, check_pattern
from ..layers import AdapterLayer, cast_like
from ..registry import register_method
from ..targeting import check_patterns_match, first_match, is_conv1d, linear_features
from .base import SwapMethod, apply_with


@dataclass(frozen=True, kw_only=True)
class IA3Config(TargetedConfig):
    """IA3 settings.

    targets: the modules to scale (by default every linear layer but the output head; the paper
        scales the attention keys and values and the feed-forward's down projection, e.g.
        ``targets=["k_proj", "v_proj", "down_proj"], feedforward=["down_proj"]``).
    feedforward: patterns (name suffix or ``re:<regex>``) of targeted modules whose *input* is
        scaled (l_ff); the other targets have their output scaled. Each must match a target.
    """

    feedforward: Sequence[str] = ()

    # SST-2, MiniLM, 200 steps x 32, seed 0: 77.6% at 3e-3 (T-Few's rate), 80.4% at 1e-2,
    # 81.8% at 3e-2, 75.9% at 1e-1 (benchmarks/README.md).
    train_defaults: ClassVar[TrainDefaults | None] = TrainDefaults(
        lr=3e-2,
        why="one number per feature, starting at one, must move by tenths in a short run: the "
        "best of 3e-3 to 1e-1 measured",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.feedforward, str) or not isinstance(self.feedforward, Sequence):
            raise ValueError(
                "feedforward must be a list of module patterns, e.g. feedforward=['down_proj'], "
                f"got {self.feedforward!r}"
            )
        for pattern in self.feedforward:
            check_pattern("feedforward entry", pattern)

    def scales_input(self, path: str) -> bool:
        return first_match(path, self.feedforward) is not None


class IA3Linear(AdapterLayer):
    """y = l ⊙ base(x) (output scaling) or y = base(l ⊙ x) (``scales_input``, a feed-forward module).

    x: (..., in), y: (..., out); l: (out,) or (in,), starting at ones. Not additive: it transforms
    its base's output, so it folds into the weight only once every layer below it is merged, and
    an update further out waits for it.
    """

    mergeable = True

    def __init__(
        self,
        base: nn.Module,
        adapter_name: str,
        path: str,
        *,
        scales_input: bool,
        adapter_dtype: str = "auto",
    ) -> None:
        super().__init__(base, adapter_name, path)
        inner = self.base_layer()
        if quant.base_kind(inner) is not None:
            raise ValueError(
                f"IA3 does not scale the quantized {type(inner).__name__} at {path!r}: a merge "
                "would re-quantize the scaled weight; add it to exclude"
            )
        self.scales_input = scales_input
        in_f, out_f = linear_features(inner)
        size = in_f if scales_input else out_f
        self.ia3_l = nn.Parameter(torch.ones(size, **self.factor_placement(adapter_dtype)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            out: torch.Tensor = self.base(x)
            return out
        if self.scales_input:
            scaled: torch.Tensor = self.base(x * cast_like(self.ia3_l, x))
            return scaled
        y: torch.Tensor = self.base(x)
        return y * cast_like(self.ia3_l, y)

    def _along_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """l shaped to broadcast over ``weight`` (Linear: (out, in); Conv1D: (in, out))."""
        l_vec = self.ia3_l.detach().to(device=weight.device, dtype=weight.dtype)
        on_rows = self.scales_input == is_conv1d(self.base_layer())
        return l_vec[:, None] if on_rows else l_vec[None, :]

    def merged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * self._along_weight(weight)

    def merged_bias(self, bias: torch.Tensor) -> torch.Tensor:
        if self.scales_input:  # W (l ⊙ x) + b: the bias is not scaled
            return bias
        return bias * self.ia3_l.detach().to(device=bias.device, dtype=bias.dtype)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, scales={'input' if self.scales_input else 'output'}"


@register_method("ia3", IA3Config)
class IA3(SwapMethod):
    """Per-feature scaling of linear layers' outputs (or of feed-forward modules' inputs)."""

    supported = (nn.Linear,)
    config: IA3Config

    def check_selection(self, paths: list[str]) -> None:
        """Each feedforward pattern must match a module this adapter wraps."""
        check_patterns_match(paths, self.config.feedforward, "feedforward entry")

    def wrap(self, module: nn.Module, path: str) -> AdapterLayer:
        return IA3Linear(
            module,
            self.adapter_name,
            path,
            scales_input=self.config.scales_input(path),
            adapter_dtype=self.config.adapter_dtype,
        )

    def describe(self) -> dict[str, object]:
        kinds = [la.scales_input for la in self.layers if isinstance(la, IA3Linear)]
        return {"scales": f"{kinds.count(False)} outputs, {kinds.count(True)} inputs"}


def apply_ia3(
    model: nn.Module,
    config: IA3Config | None = None,
    *,
    adapter_name: str = "default",
    **fields: Any,
) -> nn.Module:
    """Add IA3 to ``model`` in place and return it:
    ``apply_ia3(model, targets=["k_proj", "v_proj", "down_proj"], feedforward=["down_proj"])``.

    Takes an ``IA3Config`` or its fields as keywords. The base is frozen; only the vectors train.
    """
    return apply_with(IA3Config, model, config, adapter_name, fields)
