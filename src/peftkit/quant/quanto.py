# mypy: disable-error-code="no-any-return"
# (the quantization packages are untyped: what their layers return is Any to mypy)
"""optimum-quanto base kind: ``QLinear`` with frozen (quantized) weights. Merges re-quantize with the
layer's own weight type (qint8, qint4...) through ``freeze``."""

from __future__ import annotations

from typing import Any

import torch
from optimum.quanto.nn import QLinear
from optimum.quanto.tensor import QTensor
from torch import nn

from . import BaseKind, register_base_kind


def _features(module: Any) -> tuple[int, int]:
    return int(module.in_features), int(module.out_features)


def _dequantize(module: Any) -> torch.Tensor:
    weight = module.weight
    return (weight.dequantize() if isinstance(weight, QTensor) else weight.data).float()


def _compute_dtype(module: Any) -> torch.dtype:
    return module.weight.dtype


def _requantize(module: Any, dense: torch.Tensor) -> Any:
    saved = module.weight
    module.weight = nn.Parameter(dense.to(saved.dtype), requires_grad=False)
    module.freeze()  # quantizes with the layer's own qtype and optimizer
    module.weight.requires_grad_(False)
    return saved


def _restore(module: Any, saved: Any) -> None:
    module.weight = saved


register_base_kind(
    BaseKind(
        name="optimum-quanto QLinear",
        features=_features,
        dequantize=_dequantize,
        compute_dtype=_compute_dtype,
        requantize=_requantize,
        restore=_restore,
    ),
    module_types=(QLinear,),
)
