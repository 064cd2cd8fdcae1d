"""Methods size their factors from the full shape of a weight DeepSpeed ZeRO-3 partitioned.

Under ``deepspeed.zero.Init`` a parameter is an empty tensor (shape ``(0,)``) carrying its full
shape as ``ds_shape``. These tests build such parameters by hand (deepspeed itself is not needed):
the factors must come out as on the unpartitioned model.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import peftkit

from zoo import CASES, TinyTransformer


def _partition_like_zero3(model: nn.Module) -> None:
    """Every weight replaced by an empty parameter that remembers its shape, as ZeRO-3 leaves it."""
    for module in model.modules():
        weight = module._parameters.get("weight")
        if weight is not None and weight.dim() == 2:
            empty = nn.Parameter(torch.empty(0, dtype=weight.dtype), requires_grad=False)
            empty.ds_shape = weight.shape  # type: ignore[attr-defined]
            module._parameters["weight"] = empty


def _shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in peftkit.adapter_state_dict(model).items()}


@pytest.mark.parametrize(
    ("build", "apply"),
    [
        (TinyTransformer, lambda m: peftkit.apply_lora(m, r=4, targets=["q_proj", "up"])),
        (
            TinyTransformer,
            lambda m: peftkit.apply_adalora(
                m, init_r=8, target_r=4, targets=["q_proj"], total_steps=10
            ),
        ),
        (lambda: CASES["gpt2"].build(), lambda m: peftkit.apply_lora(m, r=4, targets=["c_attn"])),
        (lambda: CASES["gpt2"].build(), lambda m: peftkit.apply_adapter(m, bottleneck=8)),
    ],
    ids=["lora-linear", "adalora-linear", "lora-conv1d", "adapter-gpt2"],
)
def test_factors_are_sized_from_ds_shape(build: object, apply: object) -> None:
    plain, partitioned = build(), build()  # type: ignore[operator]
    apply(plain)  # type: ignore[operator]
    _partition_like_zero3(partitioned)
    apply(partitioned)  # type: ignore[operator]
    assert _shapes(partitioned) == _shapes(plain)


def test_the_trainer_refuses_a_zero3_partitioned_model() -> None:
    model = TinyTransformer()
    _partition_like_zero3(model)
    peftkit.apply_lora(model, r=4, targets=["q_proj"])
    config = peftkit.TrainConfig(max_steps=1, progress=False)
    with pytest.raises(
        ValueError,
        match=r"partitioned by DeepSpeed ZeRO-3 \(deepspeed.zero.Init\), and the Trainer does not "
        r"drive DeepSpeed: train it with deepspeed.initialize",
    ):
        peftkit.Trainer(model, config).fit([torch.randint(0, 50, (2, 8))])
