"""Tiny models whose linear layers are quantized by each backend peftkit supports, built from a
seeded random MLP. Each builder skips the test (naming the package) when its package is absent."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

QUANTIZED = ("0", "2")  # the MLP's hidden layers; the output layer "4" stays full precision


def mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 4)
    )


def _bnb_4bit(quant_type: str, double: bool) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        bnb = pytest.importorskip("bitsandbytes")
        model = mlp()
        for i in QUANTIZED:
            dense = model[int(i)]
            layer = bnb.nn.Linear4bit(
                dense.in_features,
                dense.out_features,
                compute_dtype=torch.float32,
                quant_type=quant_type,
                compress_statistics=double,
            )
            layer.load_state_dict(dense.state_dict())
            model[int(i)] = layer.to("cpu")  # the move quantizes
        return model

    return build


def bnb_8bit() -> nn.Module:
    bnb = pytest.importorskip("bitsandbytes")
    model = mlp()
    for i in QUANTIZED:
        dense = model[int(i)]
        layer = bnb.nn.Linear8bitLt(dense.in_features, dense.out_features, has_fp16_weights=False)
        layer.load_state_dict(dense.state_dict())
        model[int(i)] = layer.to("cpu")
    return model


def _torchao(config_name: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        q = pytest.importorskip("torchao.quantization")
        model = mlp()
        q.quantize_(model, getattr(q, config_name)(), filter_fn=lambda _, fqn: fqn in QUANTIZED)
        return model

    return build


def quanto_int8() -> nn.Module:
    quanto = pytest.importorskip("optimum.quanto")
    model = mlp()
    quanto.quantize(model, weights=quanto.qint8, exclude=["4"])
    quanto.freeze(model)
    return model


def hqq_4bit() -> nn.Module:
    pytest.importorskip("hqq")
    from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

    model = mlp()
    for i in QUANTIZED:
        config = BaseQuantizeConfig(nbits=4, group_size=32)
        model[int(i)] = HQQLinear(model[int(i)], config, compute_dtype=torch.float32, device="cpu")
    return model


# backend -> (builder, whether merges re-quantize into it)
BACKENDS: dict[str, tuple[Callable[[], nn.Module], bool]] = {
    "bnb-nf4": (_bnb_4bit("nf4", False), True),
    "bnb-fp4-double-quant": (_bnb_4bit("fp4", True), True),
    "bnb-int8": (bnb_8bit, True),
    "torchao-int8": (_torchao("Int8WeightOnlyConfig"), False),
    "torchao-intx": (_torchao("IntxWeightOnlyConfig"), False),
    "quanto-qint8": (quanto_int8, True),
    "hqq-4bit": (hqq_4bit, True),
}
