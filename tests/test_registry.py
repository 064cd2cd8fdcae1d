"""A third-party method registers from outside peftkit and works with every model-level operation."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import peftkit
from peftkit import AdapterLayer, SwapMethod, TargetedConfig, register_method

from helpers import has_adapter_layers, perturb, temporarily_registered
from zoo import TinyTransformer


@dataclass(frozen=True, kw_only=True)
class GainConfig(TargetedConfig):
    """Learn one scalar gain g per layer: y = base(x) + g * W x."""

    init: float = 0.0


class GainLayer(AdapterLayer):
    additive = True
    mergeable = True

    def __init__(self, base: nn.Module, adapter_name: str, path: str, init: float) -> None:
        super().__init__(base, adapter_name, path)
        self.gain = nn.Parameter(torch.tensor(init))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if not self.enabled:
            return y
        return y + self.gain * F.linear(x, self.base_layer().weight)

    def delta_weight(self) -> torch.Tensor:
        return self.gain.detach() * self.base_layer().weight.detach()


class Gain(SwapMethod):
    supported = (nn.Linear,)
    config: GainConfig

    def wrap(self, module: nn.Module, path: str) -> AdapterLayer:
        return GainLayer(module, self.adapter_name, path, self.config.init)


@pytest.fixture(autouse=True, scope="module")
def _gain_registered() -> Iterator[None]:
    # Registered the way a third-party module does it, for this module's tests only: a method
    # left in the registry would reach every later test that walks all registered methods.
    with temporarily_registered("test-gain", GainConfig, Gain):
        yield
    assert "test-gain" not in peftkit.methods()


def _ids() -> torch.Tensor:
    return torch.randint(50, (2, 5), generator=torch.Generator().manual_seed(0))


def test_registered_method_is_listed_and_applied() -> None:
    assert "test-gain" in peftkit.methods()
    assert GainConfig.method == "test-gain"
    model = TinyTransformer()
    peftkit.apply(model, GainConfig(targets=["o_proj"]))
    assert isinstance(model.layers[0].o_proj, GainLayer)
    assert peftkit.trainable_summary(model).trainable == 2


def test_registered_method_trains_saves_loads_and_merges(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = TinyTransformer()
    peftkit.apply(model, GainConfig(targets=["o_proj", "down"]), adapter_name="g")
    perturb(model)
    with torch.no_grad():
        expected = model(_ids())
    peftkit.save_adapter(model, tmp_path)
    torch.manual_seed(0)
    fresh = peftkit.load_adapter(TinyTransformer(), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(fresh(_ids()), expected, rtol=0, atol=0)
        peftkit.merge_and_unload(fresh)
        assert not has_adapter_layers(fresh)
        torch.testing.assert_close(fresh(_ids()), expected, rtol=1e-5, atol=1e-5)


def test_registering_a_taken_name_needs_override() -> None:
    with pytest.raises(ValueError, match="already registered.*override=True"):
        register_method("lora", GainConfig)(Gain)


def test_registering_a_non_config_is_refused() -> None:
    with pytest.raises(TypeError, match="MethodConfig"):
        register_method("x", dict)  # type: ignore[arg-type]
