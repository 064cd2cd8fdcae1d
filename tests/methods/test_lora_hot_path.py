"""LoRA's forward accumulates the update into the base output in place: same values, same gradients.

Each case compares the layer with the definition y = base(x) + s · (x Aᵀ) Bᵀ computed out of place
on copies of the same tensors, outputs and every gradient (x, A, B).
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from torch import nn
from torch.overrides import TorchFunctionMode

import peftkit
from peftkit import apply_lora

from helpers import perturb
from zoo import CASES


class Holder(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x)


class _Calls(TorchFunctionMode):
    """Records the names of the torch functions and tensor methods called."""

    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.names.append(getattr(func, "__name__", str(func)))
        return func(*args, **(kwargs or {}))


def _lora_linear(n_in: int = 12, n_out: int = 7, bias: bool = True) -> Holder:
    torch.manual_seed(0)
    model = Holder(nn.Linear(n_in, n_out, bias=bias))
    apply_lora(model, r=3, alpha=6, targets=["inner"])
    perturb(model, scale=0.5)
    return model


def _reference(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out: torch.Tensor = layer.base(x) + layer.scaling * (x @ layer.lora_A.t()) @ layer.lora_B.t()
    return out


def _check_against_reference(model: Holder, x: torch.Tensor) -> None:
    reference = copy.deepcopy(model)
    x_ref = x.detach().clone().requires_grad_(x.requires_grad)
    y = model(x)
    y_ref = _reference(reference.inner, x_ref)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)
    grad = torch.randn(y.shape, generator=torch.Generator().manual_seed(3))
    y.backward(grad)
    y_ref.backward(grad)
    layer, ref = model.inner, reference.inner
    torch.testing.assert_close(layer.lora_A.grad, ref.lora_A.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layer.lora_B.grad, ref.lora_B.grad, rtol=1e-5, atol=1e-6)
    if x.requires_grad:
        torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape", [(12,), (5, 12), (2, 5, 12), (2, 3, 4, 12)])
@pytest.mark.parametrize("input_grad", [True, False])
def test_linear_in_place_update_matches_the_definition(
    shape: tuple[int, ...], input_grad: bool
) -> None:
    model = _lora_linear()
    x = torch.randn(shape, requires_grad=input_grad)
    _check_against_reference(model, x)
    assert model(x).shape == (*shape[:-1], 7)


def test_linear_forward_adds_into_the_base_output_without_a_copy() -> None:
    model = _lora_linear(bias=False)
    with _Calls() as calls:
        model(torch.randn(2, 5, 12))
    assert "addmm_" in calls.names and "addmm" not in calls.names


def test_conv1d_view_output_takes_the_out_of_place_path_with_equal_results() -> None:
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    model = Holder(Conv1D(7, 12))
    apply_lora(model, r=3, targets=["inner"])
    perturb(model, scale=0.5)
    x = torch.randn(2, 5, 12, requires_grad=True)
    with _Calls() as calls:
        y = model(x)
    assert "addmm_" not in calls.names  # Conv1D returns a view: never written in place
    reference = copy.deepcopy(model)
    x_ref = x.detach().clone().requires_grad_(True)
    layer = reference.inner
    y_ref = layer.base(x_ref) + layer.scaling * (x_ref @ layer.lora_A.t()) @ layer.lora_B.t()
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)
    y.sum().backward()
    y_ref.sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model.inner.lora_A.grad, layer.lora_A.grad, rtol=1e-5, atol=1e-6)


def test_stacked_lora_layers_match_the_sum_of_updates_with_gradients() -> None:
    torch.manual_seed(0)
    model = Holder(nn.Linear(12, 7))
    apply_lora(model, r=3, targets=["inner"], adapter_name="a")
    apply_lora(model, r=2, targets=["inner"], adapter_name="b")
    perturb(model, scale=0.5)
    outer = model.inner
    inner = outer.base
    x = torch.randn(2, 5, 12, requires_grad=True)
    y = model(x)
    expected = inner.base(x)
    for layer in (inner, outer):
        expected = expected + layer.scaling * (x @ layer.lora_A.t()) @ layer.lora_B.t()
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-6)
    grads = torch.autograd.grad(y.sum(), [x, inner.lora_A, outer.lora_B])
    want = torch.autograd.grad(expected.sum(), [x, inner.lora_A, outer.lora_B])
    for got, ref in zip(grads, want, strict=True):
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)


def test_embedding_in_place_update_matches_the_definition() -> None:
    torch.manual_seed(0)
    model = Holder(nn.Embedding(30, 9))
    apply_lora(model, r=3, targets=["inner"])
    perturb(model, scale=0.5)
    ids = torch.randint(30, (2, 5))
    layer = model.inner
    y = model(ids)
    expected = layer.base(ids) + layer.scaling * layer.lora_A.t()[ids] @ layer.lora_B.t()
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-6)
    assert y.shape == (2, 5, 9)
    (grad_a,) = torch.autograd.grad(y.square().sum(), [layer.lora_A])
    (want_a,) = torch.autograd.grad(expected.square().sum(), [layer.lora_A])
    torch.testing.assert_close(grad_a, want_a, rtol=1e-4, atol=1e-5)


def test_autocast_bfloat16_forward_and_backward() -> None:
    model = _lora_linear()
    x = torch.randn(2, 5, 12)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = model(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    layer = model.inner
    assert layer.lora_A.grad is not None and layer.lora_A.grad.dtype == torch.float32
    expected = _reference(layer, x)
    torch.testing.assert_close(y.float(), expected, rtol=0.05, atol=0.05)


def test_inference_mode_and_a_full_model_step() -> None:
    case = CASES["llama"]
    model = case.build()
    apply_lora(model, r=4)
    perturb(model)
    with torch.inference_mode():
        frozen = case.output(model)
    model.train()
    case.loss(model).backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(case.output(model), frozen)


def _base_output(model: Holder, x: torch.Tensor) -> torch.Tensor:
    base = model.inner.base_layer()
    out: torch.Tensor = nn.functional.linear(x, base.weight, base.bias)
    return out


def test_a_forward_hook_on_the_base_sees_the_base_output_untouched() -> None:
    model = _lora_linear()
    seen: list[torch.Tensor] = []
    model.inner.base_layer().register_forward_hook(lambda m, i, o: seen.append(o))
    x = torch.randn(5, 12)
    with torch.no_grad():
        model(x)
        torch.testing.assert_close(seen[-1], _base_output(model, x))


def test_a_hook_below_a_disabled_inner_adapter_sees_the_base_output_untouched() -> None:
    # The inner adapter, inactive, returns the hooked base's output itself to the outer one.
    model = _lora_linear()
    apply_lora(model, r=2, targets=["inner"], adapter_name="outer")
    perturb(model, scale=0.5)
    peftkit.set_active(model, ["outer"])
    seen: list[torch.Tensor] = []
    model.inner.base_layer().register_forward_hook(lambda m, i, o: seen.append(o))
    x = torch.randn(5, 12)
    with torch.no_grad():
        y = model(x)
        torch.testing.assert_close(seen[-1], _base_output(model, x))
        assert not torch.equal(y, seen[-1])


def test_a_hook_on_the_base_sees_the_shapes_the_model_passed() -> None:
    # Flattening to 2-D is an internal shortcut: a hook below must see (batch, seq, features).
    model = _lora_linear()
    perturb(model, scale=0.5)
    seen: list[tuple[torch.Size, torch.Size]] = []
    model.inner.base_layer().register_forward_hook(
        lambda m, i, o: seen.append((i[0].shape, o.shape))
    )
    for x in (torch.randn(2, 5, 12), torch.randn(12), torch.randn(2, 0, 12)):
        with torch.no_grad():
            y = model(x)
        assert seen[-1] == (x.shape, y.shape)
        torch.testing.assert_close(y, _reference(model.inner, x))


def test_a_hook_on_a_base_embedding_sees_the_ids_shape() -> None:
    model = nn.Sequential(nn.Embedding(20, 6))
    apply_lora(model, r=2, targets=["0"])
    perturb(model, scale=0.5)
    seen: list[torch.Size] = []
    model[0].base_layer().register_forward_hook(lambda m, i, o: seen.append(o.shape))
    ids = torch.randint(20, (3, 4))
    with torch.no_grad():
        y = model(ids)
    assert seen == [torch.Size([3, 4, 6])]
    peftkit.merge_and_unload(model)
    with torch.no_grad():
        torch.testing.assert_close(y, model(ids))


def test_a_process_wide_forward_hook_sees_the_base_output_untouched() -> None:
    model = _lora_linear()
    base = model.inner.base_layer()
    seen: list[torch.Tensor] = []

    def keep(module: nn.Module, args: Any, out: torch.Tensor) -> None:
        if module is base:
            seen.append(out)

    handle = nn.modules.module.register_module_forward_hook(keep)
    try:
        x = torch.randn(5, 12)
        with torch.no_grad():
            model(x)
        torch.testing.assert_close(seen[-1], _base_output(model, x))
    finally:
        handle.remove()
