"""The module tree is the one record of an adapter's layers and flags; each layer answers its own
merge blocker from a frozen context; ``evaluate`` runs without a Trainer."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import pytest
import torch
from torch import nn

import peftkit
from peftkit._merge import MergeContext
from peftkit.config import TargetedConfig
from peftkit.core import attach
from peftkit.layers import AdapterLayer
from peftkit.methods.base import SwapMethod
from peftkit.plain import PlainModelError, plain_state_dict
from peftkit.targeting import set_module
from peftkit.training.evaluation import evaluate


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.q = nn.Linear(6, 5)
        self.v = nn.Linear(5, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.v(torch.tanh(self.q(x)))
        return out


class Capped(AdapterLayer):
    """y = (1 + c) base(x), folded as (1 + c) W; refuses to merge while c > 1, a rule of its own."""

    mergeable = True
    seen: ClassVar[list[MergeContext]] = []

    def __init__(self, base: nn.Module, adapter_name: str, path: str) -> None:
        super().__init__(base, adapter_name, path)
        self.c = nn.Parameter(torch.tensor(0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.base(x)
        return out * (1 + self.c) if self.enabled else out

    def merged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * (1 + self.c.detach())

    def merged_bias(self, bias: torch.Tensor) -> torch.Tensor:
        return bias * (1 + self.c.detach())

    def merge_blocker(self, ctx: MergeContext) -> str | None:
        Capped.seen.append(ctx)
        if float(self.c.detach()) > 1:
            return f"c = {float(self.c.detach()):g} is above its cap of 1"
        return super().merge_blocker(ctx)


class _Capped(SwapMethod):
    name = "capped"

    def wrap(self, module: nn.Module, path: str) -> AdapterLayer:
        return Capped(module, self.adapter_name, path)


def _capped(model: nn.Module, name: str = "cap", targets: tuple[str, ...] = ("q",)) -> None:
    attach(model, _Capped(TargetedConfig(targets=list(targets)), name))


def test_a_layer_s_own_blocker_is_what_merge_and_the_plain_state_dict_hear() -> None:
    model = Net()
    _capped(model)
    with torch.no_grad():
        model.q.c.fill_(2.0)
    report = peftkit.merge(model)
    assert report.kept == {"cap:q": "c = 2 is above its cap of 1"}
    with pytest.raises(PlainModelError, match=r"cannot be folded .*c = 2 is above its cap of 1"):
        plain_state_dict(model)
    with torch.no_grad():
        model.q.c.fill_(0.25)
    x = torch.randn(3, 6)
    before = model(x)
    assert peftkit.merge(model).merged == ["cap:q"]
    torch.testing.assert_close(model(x), before)


def test_the_context_is_frozen_and_names_the_stack_below() -> None:
    model = Net()
    peftkit.apply_lora(model, r=2, targets=["q"], adapter_name="lora")
    _capped(model)
    Capped.seen.clear()
    report = peftkit.merge(model, ["cap"])
    ctx = Capped.seen[-1]
    lora = peftkit.adapters(model)["lora"].layers[0]
    assert ctx.below == (lora,) and ctx.bottom is lora.base
    assert not ctx.facts.unload and not ctx.facts.below_folded
    with pytest.raises(dataclasses.FrozenInstanceError):
        ctx.facts.unload = True  # type: ignore[misc]
    # the default rule for a layer that transforms its base's output: LoRA below is not merged
    assert "it transforms the output of LoraLinear (adapter 'lora')" in report.kept["cap:q"]


def test_layers_are_read_from_the_module_tree() -> None:
    model = Net()
    peftkit.apply_lora(model, r=2, targets=["q", "v"])
    method = peftkit.adapters(model)["default"]
    assert [la.path for la in method.layers] == ["q", "v"]
    set_module(model, "v", model.v.base)  # the tree changes: so does the adapter's record
    assert [la.path for la in method.layers] == ["q"]
    assert [p.shape for p in method.parameters()] == [torch.Size([2, 6]), torch.Size([5, 2])]
    model.v = peftkit.layers.SavedModule(model.v, "default", "v")  # a hand edit, no peftkit call
    assert peftkit.merge(model).merged == ["default:q", "default:v"]  # an operation re-reads
    peftkit.unmerge(model)
    peftkit.merge_and_unload(model)
    assert method.layers == () and peftkit.adapters(model) == {}


def test_active_is_read_from_the_layers_flags() -> None:
    model = Net()
    peftkit.apply_lora(model, r=2, targets=["q", "v"], adapter_name="a")
    peftkit.apply_ia3(model, targets=["q"], adapter_name="b")
    peftkit.set_active(model, ["b"])
    assert peftkit.active_adapters(model) == ["b"]
    assert [la.active for la in peftkit.adapters(model)["a"].layers] == [False, False]
    for layer in peftkit.adapters(model)["b"].layers:  # a flag set on the layers themselves
        layer.active = False
    assert peftkit.active_adapters(model) == []


def test_full_fine_tuning_without_layers_keeps_its_own_flag() -> None:
    model = Net()
    peftkit.apply_full(model, modules=["q"], train_head=False)
    method = peftkit.adapters(model)["default"]
    assert method.layers == () and method.active
    with peftkit.disable_adapters(model):
        assert not method.active
    assert method.active


def test_evaluate_takes_what_it_needs() -> None:
    model = nn.Linear(3, 2)
    gen = torch.Generator().manual_seed(0)
    batches = [
        (torch.randn(n, 3, generator=gen), torch.randint(0, 2, (n,), generator=gen)) for n in (4, 2)
    ]
    entered: list[int] = []

    def loss_fn(m: nn.Module, batch: Any) -> torch.Tensor:
        return nn.functional.cross_entropy(m(batch[0]), batch[1])

    def autocast() -> Any:
        entered.append(1)
        return torch.autocast("cpu", enabled=False)

    out = evaluate(model, batches, loss_fn, autocast=autocast)
    with torch.no_grad():
        want = (4 * loss_fn(model, batches[0]) + 2 * loss_fn(model, batches[1])) / 6
    assert out["loss"] == pytest.approx(float(want))
    assert entered == [1, 1] and model.training
