"""Reliability corpus, properties (hypothesis): random LoRA configs on random MLPs.

For every drawn model and config:
- merge then unmerge restores the base weights within float32 rounding (tolerance below);
- merged outputs equal unmerged outputs within tolerance;
- save then load on a fresh base is the identity (tensors and outputs bit-exact, same config);
- export to the HF peft format then import is the identity (bit-exact);
- unload restores the base bit-exactly (weights, module types, requires_grad), with one adapter
  or two stacked on the same modules.

Examples are derandomised (the same on every run, so CI cannot flake); set
``HYPOTHESIS_PROFILE=thorough`` for 500 fresh random examples per property.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import peftkit
from peftkit import LoraConfig
from peftkit.interop import export_peft, import_peft

settings.register_profile(
    "default", max_examples=25, deadline=None, derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)  # fmt: skip
settings.register_profile("thorough", max_examples=500, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

EPS = torch.finfo(torch.float32).eps


@dataclass(frozen=True)
class Spec:
    widths: tuple[int, ...]
    bias: tuple[bool, ...]
    seed: int

    def build(self) -> nn.Sequential:
        torch.manual_seed(self.seed)
        layers: list[nn.Module] = []
        for i, (n_in, n_out) in enumerate(zip(self.widths, self.widths[1:], strict=False)):
            layers.append(nn.Linear(n_in, n_out, bias=self.bias[i]))
            layers.append(nn.Tanh())
        return nn.Sequential(*layers).eval()

    def linear_names(self) -> list[str]:
        return [str(2 * i) for i in range(len(self.widths) - 1)]

    def inputs(self) -> torch.Tensor:
        return torch.randn(3, self.widths[0], generator=torch.Generator().manual_seed(self.seed))


@st.composite
def mlps(draw: st.DrawFn) -> Spec:
    depth = draw(st.integers(1, 4))
    widths = tuple(draw(st.lists(st.integers(1, 24), min_size=depth + 1, max_size=depth + 1)))
    bias = tuple(draw(st.lists(st.booleans(), min_size=depth, max_size=depth)))
    return Spec(widths, bias, draw(st.integers(0, 2**16)))


@st.composite
def setups(draw: st.DrawFn) -> tuple[Spec, LoraConfig, int]:
    spec = draw(mlps())
    names = spec.linear_names()
    targets = draw(st.lists(st.sampled_from(names), min_size=1, unique=True))
    ranks = st.integers(1, 12)
    alphas = st.floats(0.01, 64, allow_nan=False, allow_infinity=False)
    config = LoraConfig(
        r=draw(ranks),
        alpha=draw(alphas),
        rslora=draw(st.booleans()),
        targets=targets,
        rank_pattern=draw(st.dictionaries(st.sampled_from(targets), ranks, max_size=2)),
        alpha_pattern=draw(st.dictionaries(st.sampled_from(targets), alphas, max_size=2)),
        init=draw(st.sampled_from(["kaiming", "gaussian"])),
    )
    return spec, config, draw(st.integers(0, 2**16))


def _applied(spec: Spec, config: LoraConfig, seed: int) -> nn.Module:
    model = spec.build()
    peftkit.apply(model, config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # B starts at zero; give every factor a value so updates are not trivial
        for p in peftkit.trainable_parameters(model):
            p.add_(torch.randn(p.shape, generator=gen))
    return model


def _weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _merge_tolerance(model: nn.Module) -> float:
    """Adding then subtracting a float32 update rounds each entry by at most ~2 ulp of the larger of
    the weight and the update; this bound (8 ulp of the largest magnitude seen) is safely above."""
    sizes = [layer.delta_weight().abs().max().item() for layer in _layers(model)]
    sizes += [layer.base_weight().abs().max().item() for layer in _layers(model)]
    return 8 * EPS * max(1.0, *sizes)


def _layers(model: nn.Module) -> list[peftkit.AdapterLayer]:
    return [m for m in model.modules() if isinstance(m, peftkit.AdapterLayer)]


@given(setups())
def test_merge_then_unmerge_restores_the_base_weights(setup: tuple[Spec, LoraConfig, int]) -> None:
    spec, config, seed = setup
    model = _applied(spec, config, seed)
    before = _weights(model)
    tolerance = _merge_tolerance(model)
    with torch.no_grad():
        expected = model(spec.inputs())
        peftkit.merge(model)
        merged = model(spec.inputs())
        peftkit.unmerge(model)
    scale = max(1.0, expected.abs().max().item())
    torch.testing.assert_close(merged, expected, rtol=1e-4, atol=1e-4 * scale)
    after = _weights(model)
    for key, value in before.items():
        torch.testing.assert_close(after[key], value, rtol=0, atol=tolerance)


@given(setups())
def test_save_then_load_is_the_identity(setup: tuple[Spec, LoraConfig, int]) -> None:
    spec, config, seed = setup
    model = _applied(spec, config, seed)
    with tempfile.TemporaryDirectory() as directory:
        peftkit.save_adapter(model, directory)
        loaded = peftkit.load_adapter(spec.build(), directory)
    _assert_identical(spec, model, loaded)
    assert peftkit.adapters(loaded)["default"].config.to_dict() == config.to_dict()


@given(setups())
def test_peft_format_round_trip_is_the_identity(setup: tuple[Spec, LoraConfig, int]) -> None:
    spec, config, seed = setup
    model = _applied(spec, config, seed)
    with tempfile.TemporaryDirectory() as directory:
        export_peft(model, Path(directory))
        loaded = import_peft(spec.build(), Path(directory))
    _assert_identical(spec, model, loaded)


def _assert_identical(spec: Spec, model: nn.Module, loaded: nn.Module) -> None:
    ours, theirs = peftkit.adapter_state_dict(model), peftkit.adapter_state_dict(loaded)
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    with torch.no_grad():
        assert torch.equal(model(spec.inputs()), loaded(spec.inputs()))
    assert [(x.path, x.r, x.scaling) for x in _layers(model)] == [
        (x.path, x.r, x.scaling) for x in _layers(loaded)
    ]


@given(setups(), st.booleans())
def test_unload_restores_the_base_bit_exactly(
    setup: tuple[Spec, LoraConfig, int], second: bool
) -> None:
    spec, config, seed = setup
    model = spec.build()
    before = _weights(model)
    types = [type(m) for m in model.modules()]
    peftkit.apply(model, config)
    if second:  # a second adapter stacked on the same modules
        peftkit.apply(model, config, adapter_name="second")
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in peftkit.trainable_parameters(model):
            p.add_(torch.randn(p.shape, generator=gen))
        model(spec.inputs())
    peftkit.unload(model)
    after = _weights(model)
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert [type(m) for m in model.modules()] == types
    assert all(p.requires_grad for p in model.parameters())
    assert not hasattr(model, "_peftkit")
