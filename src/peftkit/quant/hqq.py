# mypy: disable-error-code="no-any-return"
# (the quantization packages are untyped: what their layers return is Any to mypy)
"""hqq base kind: ``HQQLinear`` (half-quadratic quantization, any bit width). It is not an
``nn.Linear``; its shape and settings live on the layer. Merges re-quantize with the layer's own
settings."""

from __future__ import annotations

from typing import Any

import torch
from hqq.core.quantize import HQQLinear

from . import BaseKind, register_base_kind


def _features(module: Any) -> tuple[int, int]:
    return int(module.in_features), int(module.out_features)


def _dequantize(module: Any) -> torch.Tensor:
    out_f, in_f = int(module.out_features), int(module.in_features)
    return module.dequantize().reshape(out_f, in_f).float()


def _compute_dtype(module: Any) -> torch.dtype:
    return module.compute_dtype


def _requantize(module: Any, dense: torch.Tensor) -> Any:
    saved = (module.W_q, module.meta)
    del module.W_q  # quantize() assigns a plain tensor, then makes it a parameter again
    module.quantize(dense.to(module.compute_dtype), **module.quant_config)
    return saved


def _restore(module: Any, saved: Any) -> None:
    module.W_q, module.meta = saved


register_base_kind(
    BaseKind(
        name="hqq HQQLinear",
        features=_features,
        dequantize=_dequantize,
        compute_dtype=_compute_dtype,
        requantize=_requantize,
        restore=_restore,
    ),
    module_types=(HQQLinear,),
)
