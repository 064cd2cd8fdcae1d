# mypy: disable-error-code="no-any-return"
# (the quantization packages are untyped: what their layers return is Any to mypy)
"""bitsandbytes base kinds: ``Linear4bit`` (nf4 / fp4, with or without double quantization) and
``Linear8bitLt`` (LLM.int8() weights). Both merge by dequantize, add, re-quantize."""

from __future__ import annotations

from typing import Any

import bitsandbytes.functional as bnbf
import torch
from bitsandbytes.nn.modules import Linear4bit, Linear8bitLt

from . import BaseKind, register_base_kind


def _features(module: Any) -> tuple[int, int]:
    return int(module.in_features), int(module.out_features)


# -- 4-bit --------------------------------------------------------------------------------------
def _dequantize_4bit(module: Any) -> torch.Tensor:
    weight = module.weight
    if weight.quant_state is None:  # not quantized yet (still on the meta device or unmoved)
        return weight.data.float()
    return bnbf.dequantize_4bit(weight.data, weight.quant_state).float()


def _compute_dtype_4bit(module: Any) -> torch.dtype:
    dtype = getattr(module, "compute_dtype", None)
    if isinstance(dtype, torch.dtype):
        return dtype
    state = module.weight.quant_state
    return state.dtype if state is not None else torch.float32


def _requantize_4bit(module: Any, dense: torch.Tensor) -> Any:
    weight = module.weight
    state = weight.quant_state
    saved = (weight.data, state)
    data, new_state = bnbf.quantize_4bit(
        dense.to(state.dtype),
        blocksize=state.blocksize,
        compress_statistics=state.nested,
        quant_type=state.quant_type,
        quant_storage=weight.data.dtype,
    )
    weight.data, weight.quant_state = data, new_state
    return saved


def _restore_4bit(module: Any, saved: Any) -> None:
    module.weight.data, module.weight.quant_state = saved


# -- 8-bit --------------------------------------------------------------------------------------
def _scb(module: Any) -> torch.Tensor:
    """Row scales: on the weight until the first forward, then on the layer's state."""
    scb = getattr(module.weight, "SCB", None)
    return scb if scb is not None else module.state.SCB


def _dequantize_8bit(module: Any) -> torch.Tensor:
    weight = module.weight
    if module.state.has_fp16_weights or weight.dtype != torch.int8:
        return weight.data.float()
    return bnbf.int8_vectorwise_dequant(weight.data, _scb(module)).float()


def _compute_dtype_8bit(module: Any) -> torch.dtype:
    # LLM.int8() computes in the input's dtype; the bias (cast to it on each call) tells which.
    bias = module.bias
    return bias.dtype if bias is not None and bias.dtype.is_floating_point else torch.float32


def _requantize_8bit(module: Any, dense: torch.Tensor) -> Any:
    weight, state = module.weight, module.state
    saved = (weight.data, weight.CB, weight.SCB, state.CB, state.SCB)
    cb, scb, _ = bnbf.int8_vectorwise_quant(dense.to(torch.float16))
    weight.data = cb
    if state.SCB is not None:  # forward has run: the scales live on the state
        state.CB, state.SCB = cb, scb
    else:
        weight.CB, weight.SCB = cb, scb
    return saved


def _restore_8bit(module: Any, saved: Any) -> None:
    weight, state = module.weight, module.state
    weight.data, weight.CB, weight.SCB, state.CB, state.SCB = saved


register_base_kind(
    BaseKind(
        name="bitsandbytes Linear4bit",
        features=_features,
        dequantize=_dequantize_4bit,
        compute_dtype=_compute_dtype_4bit,
        requantize=_requantize_4bit,
        restore=_restore_4bit,
    ),
    module_types=(Linear4bit,),
)
register_base_kind(
    BaseKind(
        name="bitsandbytes Linear8bitLt",
        features=_features,
        dequantize=_dequantize_8bit,
        compute_dtype=_compute_dtype_8bit,
        requantize=_requantize_8bit,
        restore=_restore_8bit,
    ),
    module_types=(Linear8bitLt,),
)
