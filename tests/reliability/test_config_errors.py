"""Reliability corpus, configs: bad settings end in an error that names the fix, and a failed apply
leaves the model exactly as it was (weights, module types, requires_grad, no adapter state).

Cases are listed in docs/reliability.md.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from torch import nn

import peftkit
from peftkit import LoraConfig, TargetedConfig, TargetError, apply_lora

from helpers import snapshot
from zoo import CASES, TinyMLP, TinyTransformer

# -- configs refused when they are built ---------------------------------------------------------
FIELD_ERRORS: dict[str, tuple[dict[str, Any], str]] = {
    "rank-zero": ({"r": 0}, "r must be a positive integer, got 0"),
    "rank-negative": ({"r": -4}, "r must be a positive integer"),
    "rank-fractional": ({"r": 2.5}, "r must be a positive integer"),
    "alpha-negative": ({"alpha": -1}, "alpha must be a positive finite number"),
    "alpha-zero": ({"alpha": 0}, "alpha must be a positive finite number"),
    "alpha-nan": ({"alpha": float("nan")}, "alpha must be a positive finite number"),
    "dropout-one": ({"dropout": 1.0}, r"dropout must be in \[0, 1\)"),
    "dropout-negative": ({"dropout": -0.1}, r"dropout must be in \[0, 1\)"),
    "init-unknown": ({"init": "xavier"}, "init must be 'kaiming' or 'gaussian'"),
    "rslora-not-bool": ({"rslora": "yes"}, "rslora must be True or False"),
    "targets-bare-string": ({"targets": "q_proj"}, r"pass a list \(targets=\['q_proj'\]\)"),
    "targets-empty": ({"targets": []}, "targets is empty: name modules to adapt"),
    "rank-pattern-zero": ({"rank_pattern": {"q_proj": 0}}, r"rank_pattern\['q_proj'\]"),
    "alpha-pattern-negative": ({"alpha_pattern": {"o": -1.0}}, r"alpha_pattern\['o'\]"),
    "layers-negative": ({"layers": [-1]}, "layers must be non-negative block indices"),
    "modules-to-save-string": ({"modules_to_save": "head"}, r"modules_to_save=\['q_proj'\]"),
}


@pytest.mark.parametrize("case", list(FIELD_ERRORS))
def test_invalid_field_is_refused_when_the_config_is_built(case: str) -> None:
    fields, message = FIELD_ERRORS[case]
    with pytest.raises(ValueError, match=message):
        LoraConfig(**fields)


# -- configs refused when they meet a model ----------------------------------------------------
def _tiny() -> nn.Module:
    torch.manual_seed(0)
    return TinyTransformer()


@dataclass(frozen=True, kw_only=True)
class Unregistered(TargetedConfig):
    pass


class GroupedConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, groups=2)


APPLY_ERRORS: dict[str, tuple[Callable[[], nn.Module], Callable[[nn.Module], Any], type, str]] = {
    "unknown-target": (
        _tiny,
        lambda m: apply_lora(m, targets=["q_proj", "q_prj"]),
        TargetError,
        r"target 'q_prj' matched no module; closest names: q_proj",
    ),
    "target-selects-nothing": (
        _tiny,
        lambda m: apply_lora(m, targets=["q_proj"], exclude=["q_proj"]),
        TargetError,
        r"selects no module \(targets=\['q_proj'\], exclude=\['q_proj'\]\)",
    ),
    "unsupported-module-type": (
        _tiny,
        lambda m: apply_lora(m, targets=["norm1"]),
        TargetError,
        r"lora cannot wrap 'layers.0.norm1' \(LayerNorm\); it supports Linear, Embedding, Conv2d.*"
        "add it to exclude",
    ),
    "unsupported-conv-groups": (
        GroupedConv,
        lambda m: apply_lora(m, targets=["conv"]),
        ValueError,
        "needs groups=1 and padding_mode='zeros'; add it to exclude",
    ),
    "layers-without-block-list": (
        TinyMLP,
        lambda m: apply_lora(m, targets=["fc1"], layers=[0]),
        TargetError,
        "set layers_pattern to the name of the model's block list",
    ),
    "unknown-modules-to-save": (
        CASES["bert"].build,
        lambda m: apply_lora(m, targets=["query"], modules_to_save=["clasifier"]),
        TargetError,
        "modules_to_save 'clasifier' matched no module; closest names: classifier",
    ),
    "bad-adapter-name": (
        _tiny,
        lambda m: apply_lora(m, targets=["q_proj"], adapter_name="my.adapter"),
        ValueError,
        "adapter_name 'my.adapter' must be letters, digits, '_' or '-'",
    ),
    "config-and-fields": (
        _tiny,
        lambda m: apply_lora(m, LoraConfig(targets=["q_proj"]), r=4),
        TypeError,
        "pass either config= or LoraConfig fields, not both",
    ),
    "not-a-config": (
        _tiny,
        lambda m: peftkit.apply(m, {"r": 4}),  # type: ignore[arg-type]
        TypeError,
        r"config must be a method config such as LoraConfig\(\.\.\.\)",
    ),
    "unregistered-config": (
        _tiny,
        lambda m: peftkit.apply(m, Unregistered(targets=["q_proj"])),
        TypeError,
        r"decorate your method class with @register_method",
    ),
}


def _state(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, type], dict[str, bool]]:
    return (
        snapshot(model),
        {n: type(m) for n, m in model.named_modules()},
        {n: p.requires_grad for n, p in model.named_parameters()},
    )


def assert_unchanged(model: nn.Module, before: Any) -> None:
    weights, types, flags = _state(model)
    assert weights.keys() == before[0].keys()
    assert all(torch.equal(weights[k], before[0][k]) for k in weights)
    assert (types, flags) == (before[1], before[2])
    assert not hasattr(model, "_peftkit")


@pytest.mark.parametrize("case", list(APPLY_ERRORS))
def test_failed_apply_names_the_fix_and_leaves_the_model_as_it_was(case: str) -> None:
    make, action, error, message = APPLY_ERRORS[case]
    model = make()
    before = _state(model)
    with pytest.raises(error, match=message):
        action(model)
    assert_unchanged(model, before)


# -- refusals on a model that already has adapters ----------------------------------------------
def test_duplicate_adapter_name_is_refused_and_the_first_is_kept() -> None:
    model = _tiny()
    apply_lora(model, targets=["q_proj"], adapter_name="a")
    before = peftkit.adapter_state_dict(model)
    with pytest.raises(
        ValueError, match=r"adapter 'a' already exists.*delete_adapter\(model, 'a'\)"
    ):
        apply_lora(model, targets=["k_proj"], adapter_name="a")
    assert list(peftkit.adapters(model)) == ["a"]
    assert peftkit.adapter_state_dict(model).keys() == before.keys()
    assert isinstance(model.layers[0].k_proj, nn.Linear)


def test_modules_to_save_over_adapter_layers_is_refused_and_rolled_back() -> None:
    model = _tiny()
    apply_lora(model, targets=["q_proj"], adapter_name="a")
    with pytest.raises(
        ValueError, match="already holds adapter layers; list it in modules_to_save"
    ):
        apply_lora(model, targets=["v_proj"], modules_to_save=["layers.0"], adapter_name="b")
    assert list(peftkit.adapters(model)) == ["a"]
    assert isinstance(model.layers[0].v_proj, nn.Linear)


@pytest.mark.parametrize(
    "operation",
    [
        peftkit.merge,
        peftkit.merge_and_unload,
        lambda m: peftkit.set_active(m, "default"),
        lambda m: peftkit.delete_adapter(m, "default"),
        lambda m: peftkit.save_adapter(m, "never-written"),
    ],
    ids=["merge", "merge_and_unload", "set_active", "delete_adapter", "save_adapter"],
)
def test_model_operations_without_adapters_say_how_to_start(operation: Any) -> None:
    with pytest.raises(ValueError, match=r"apply one first"):
        operation(_tiny())


def test_adalora_target_r_above_init_r_names_the_fix() -> None:
    model = _tiny()
    before = snapshot(model)
    with pytest.raises(
        ValueError,
        match=r"target_r=12 exceeds init_r=8: AdaLoRA only prunes; raise init_r or lower",
    ):
        peftkit.apply_adalora(model, total_steps=100, init_r=8, target_r=12, targets=["q_proj"])
    assert not peftkit.adapters(model)
    assert all(torch.equal(v, before[k]) for k, v in snapshot(model).items())
    assert isinstance(model.layers[0].q_proj, nn.Linear)


def test_dropout_on_a_model_in_eval_mode_stays_off() -> None:
    """Regression: new adapter modules used to start in training mode, so LoRA dropout ran at
    inference on a model in eval mode (outputs changed from call to call)."""
    model = _tiny().eval()
    apply_lora(model, targets=["q_proj"], dropout=0.5, modules_to_save=["lm_head"])
    with torch.no_grad():
        for p in peftkit.trainable_parameters(model):
            p.add_(0.1)
    ids = torch.randint(50, (2, 6), generator=torch.Generator().manual_seed(0))
    assert torch.equal(model(ids), model(ids))
    assert not any(m.training for m in model.modules())
    model.train()
    assert not torch.equal(model(ids), model(ids))
    # Each layer follows the module it wraps: a block kept in eval mode keeps its LoRA in eval.
    mixed = _tiny().train()
    mixed.layers[0].eval()
    apply_lora(mixed, targets=["q_proj"], dropout=0.5)
    assert not mixed.layers[0].q_proj.dropout.training and mixed.layers[1].q_proj.dropout.training
