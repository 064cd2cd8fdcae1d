"""A merge records what it changed and unmerge restores exactly that, latest merge first.

Two test-local layers stand for the updates an additive-only design gets wrong: one whose update is
computed from the base weight, one that scales the layer's output (its weight rows and its bias).
"""

from __future__ import annotations

import itertools
from typing import Any, ClassVar

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import peftkit
from peftkit.config import TargetedConfig
from peftkit.core import attach
from peftkit.layers import AdapterLayer
from peftkit.methods.base import SwapMethod


class WeightTimes(AdapterLayer):
    """y = base(x) + (W ∘ M) x, W the weight below: an update read from the weight it folds into."""

    mergeable = True

    def __init__(self, base: nn.Module, adapter_name: str, path: str) -> None:
        super().__init__(base, adapter_name, path)
        gen = torch.Generator().manual_seed(len(path) + len(adapter_name))
        weight = self.base_weight()
        self.mask = nn.Parameter(torch.randn(weight.shape, generator=gen).to(weight) * 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.base(x)
        if self.enabled:
            out = out + F.linear(x, self.weight_below() * self.mask)
        return out

    def merged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + weight * self.mask


class RowScale(AdapterLayer):
    """y = g ⊙ base(x): scales the weight's rows and the bias."""

    mergeable = True

    def __init__(self, base: nn.Module, adapter_name: str, path: str) -> None:
        super().__init__(base, adapter_name, path)
        gen = torch.Generator().manual_seed(7 + len(adapter_name))
        weight = self.base_weight()
        self.g = nn.Parameter(1 + torch.randn(weight.shape[0], generator=gen).to(weight) * 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.base(x)
        return out * self.g if self.enabled else out

    def merged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * self.g[:, None]

    def merged_bias(self, bias: torch.Tensor) -> torch.Tensor:
        return bias * self.g


class _Local(SwapMethod):
    layer_cls: ClassVar[type[AdapterLayer]] = AdapterLayer

    def wrap(self, module: nn.Module, path: str) -> AdapterLayer:
        return self.layer_cls(module, self.adapter_name, path)


class _WeightTimes(_Local):
    name = "weight-times"
    layer_cls = WeightTimes


class _RowScale(_Local):
    name = "row-scale"
    layer_cls = RowScale


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)  # float64: what is compared is the bookkeeping, not the rounding
        self.q = nn.Linear(6, 5, dtype=torch.float64)
        self.v = nn.Linear(5, 4, dtype=torch.float64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.v(torch.tanh(self.q(x)))
        return out


def _add(model: nn.Module, kind: str, name: str) -> None:
    if kind == "lora":
        peftkit.apply_lora(model, r=2, targets=["q", "v"], adapter_name=name)
        with torch.no_grad():
            for p in peftkit.adapters(model)[name].parameters():
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(3)).to(p) * 0.5)
        return
    if kind == "ia3":
        peftkit.apply_ia3(model, targets=["q", "v"], feedforward=["v"], adapter_name=name)
        with torch.no_grad():
            for p in peftkit.adapters(model)[name].parameters():
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(5)).to(p) * 0.5)
        return
    if kind == "full":
        peftkit.apply_full(model, adapter_name=name)
        with torch.no_grad():
            for p in peftkit.adapters(model)[name].parameters():
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(4)).to(p) * 0.5)
        return
    cls = {"weight": _WeightTimes, "scale": _RowScale}[kind]
    attach(model, cls(TargetedConfig(targets=["q", "v"]), name))


def _base_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    out: dict[str, Any] = {}
    for name in ("q", "v"):
        inner = getattr(model, name)
        inner = inner.base_layer() if isinstance(inner, AdapterLayer) else inner
        out[f"{name}.weight"] = inner.weight.detach().clone()
        out[f"{name}.bias"] = inner.bias.detach().clone()
    return out


def _close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=0, msg=key)


X = torch.randn(3, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


@pytest.mark.parametrize("kind", ["weight", "scale"])
def test_a_weight_dependent_update_merges_and_unmerges_exactly(kind: str) -> None:
    model = Net()
    base = _base_tensors(model)
    _add(model, kind, "a")
    with torch.no_grad():
        expected = model(X)
        report = peftkit.merge(model)
        assert sorted(report.merged) == ["a:q", "a:v"] and not report.kept
        torch.testing.assert_close(model(X), expected, atol=1e-6, rtol=0)
        peftkit.unmerge(model)
        _close(_base_tensors(model), base)
        torch.testing.assert_close(model(X), expected, atol=1e-6, rtol=0)


def test_a_layer_that_cannot_depend_on_the_weight_keeps_no_copy() -> None:
    model = Net()
    _add(model, "lora", "a")
    _add(model, "scale", "b")
    peftkit.merge(model)
    lora, scale = model.q.base, model.q
    assert lora.record is not None and lora.record.weight is None and lora.record.bias is None
    assert scale.record is not None and scale.record.weight is not None
    assert scale.record.bias is not None


KINDS = ["weight", "scale", "ia3", "lora", "full"]
PAIRS = [(a, b) for a, b in itertools.product(KINDS, KINDS) if (a, b) != ("full", "full")]


@pytest.mark.parametrize(("inner", "outer"), PAIRS)
def test_two_deep_stacks_merge_unmerge_and_unload_to_the_base(inner: str, outer: str) -> None:
    model = Net()
    _add(model, inner, "a")
    _add(model, outer, "b")
    base = _base_tensors(model)  # with full fine-tuning: its trained weights
    original = _base_tensors(Net())
    with torch.no_grad():
        expected = model(X)
        report = peftkit.merge(model)
        assert not report.kept, report
        torch.testing.assert_close(model(X), expected, atol=1e-6, rtol=0)
        peftkit.unmerge(model)
        _close(_base_tensors(model), base)
        torch.testing.assert_close(model(X), expected, atol=1e-6, rtol=0)
        peftkit.merge(model)
        peftkit.unload(model)
        _close(_base_tensors(model), original)


def test_unmerge_runs_latest_merge_first_across_calls() -> None:
    model = Net()
    base = _base_tensors(model)
    _add(model, "lora", "a")
    _add(model, "scale", "b")
    peftkit.merge(model, ["a"])
    peftkit.merge(model, ["b"])
    peftkit.unmerge(model)
    _close(_base_tensors(model), base)


def test_unmerging_an_earlier_merge_alone_is_refused() -> None:
    model = Net()
    _add(model, "scale", "a")
    _add(model, "lora", "b")
    peftkit.merge(model)
    before = _base_tensors(model)
    with pytest.raises(RuntimeError, match=r"adapter 'a' at 'q' was merged before adapter 'b'"):
        peftkit.delete_adapter(model, "a")
    _close(_base_tensors(model), before)


def test_a_scaling_is_not_folded_past_an_unmerged_layer_below() -> None:
    model = Net()
    _add(model, "lora", "a")
    _add(model, "scale", "b")
    with torch.no_grad():
        expected = model(X)
        report = peftkit.merge(model, ["b"])
        assert report.merged == []
        assert report.kept["b:q"] == (
            "it transforms the output of LoraLinear (adapter 'a') below it, which is not "
            "merged; merge that adapter first"
        )
        torch.testing.assert_close(model(X), expected, atol=1e-6, rtol=0)


def test_merge_follows_application_order_whatever_the_names_order() -> None:
    model = Net()
    _add(model, "lora", "a")
    _add(model, "scale", "b")
    with torch.no_grad():
        expected = model(X)
        report = peftkit.merge(model, ["b", "a"])
        assert not report.kept
        torch.testing.assert_close(model(X), expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("kind", ["weight", "scale"])
def test_plain_state_dict_folds_weight_dependent_updates(kind: str) -> None:
    model = Net()
    _add(model, "lora", "a")
    _add(model, kind, "b")
    with torch.no_grad():
        expected = model(X)
        plain = Net()
        plain.load_state_dict(peftkit.plain_state_dict(model))
        torch.testing.assert_close(plain(X), expected, atol=1e-6, rtol=0)
