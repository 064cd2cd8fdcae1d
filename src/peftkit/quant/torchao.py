# mypy: disable-error-code="no-any-return"
# (the quantization packages are untyped: what their layers return is Any to mypy)
"""torchao base kind: an ``nn.Linear`` whose weight is a torchao quantized tensor subclass (int8 /
intx weight-only and the like, from ``torchao.quantization.quantize_``). The format's settings are
not recoverable from the tensor alone, so merges into it are refused with the fix named."""

from __future__ import annotations

from typing import Any

import torch
from torchao.utils import TorchAOBaseTensor

from . import BaseKind, register_base_kind


def _features(module: Any) -> tuple[int, int]:
    out_f, in_f = module.weight.shape  # the subclass reports the logical shape
    return int(in_f), int(out_f)


def _dequantize(module: Any) -> torch.Tensor:
    return module.weight.dequantize().float()


def _compute_dtype(module: Any) -> torch.dtype:
    return module.weight.dtype  # the logical (high-precision) dtype


register_base_kind(
    BaseKind(
        name=f"torchao {TorchAOBaseTensor.__name__}",
        features=_features,
        dequantize=_dequantize,
        compute_dtype=_compute_dtype,
        no_merge_reason="its quantization settings cannot be read back from the weight",
    ),
    weight_types=(TorchAOBaseTensor,),
)
