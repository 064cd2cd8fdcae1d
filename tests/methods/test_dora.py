"""DoRA numerics (``apply_lora(..., dora=True)``): the output against the paper's formula written out
in float64, the factored norm against the direct one, the detached-norm gradients, merge, dropout,
dtypes, save/load, and the refusals."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import peftkit
from peftkit import LoraConfig, apply_lora
from peftkit.methods.dora import DoraConv2d, DoraLinear, row_norms
from peftkit.methods.lora import LoraLinear
from quant_backends import quanto_int8


def _conv1d(n_in: int, n_out: int) -> nn.Module:
    from transformers.pytorch_utils import Conv1D

    return Conv1D(n_out, n_in)


LAYERS: dict[str, tuple[Any, Any]] = {
    "linear": (lambda: nn.Linear(12, 7), lambda: torch.randn(3, 5, 12)),
    "conv1d": (lambda: _conv1d(12, 7), lambda: torch.randn(3, 5, 12)),
    "conv2d": (lambda: nn.Conv2d(4, 6, 3, stride=2, padding=1), lambda: torch.randn(2, 4, 9, 9)),
}


class Holder(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.inner(x)
        return out


def _dora(kind: str, seed: int = 0, **fields: Any) -> tuple[Holder, torch.Tensor]:
    """A float64 layer of ``kind`` with a DoRA adapter moved away from its start (B, m random)."""
    torch.manual_seed(seed)
    build, inputs = LAYERS[kind]
    model = Holder(build()).double()
    apply_lora(model, r=3, alpha=5, targets=["inner"], dora=True, **fields)
    with torch.no_grad():
        for p in peftkit.trainable_parameters(model):
            p.add_(torch.randn_like(p) * 0.5)
    return model, inputs().double()


def _expected(layer: DoraLinear | DoraConv2d, x: torch.Tensor) -> torch.Tensor:
    """The paper's W' = m (W + s B A) / ||W + s B A|| (norm per output feature), applied plainly."""
    base = layer.base_layer()
    weight = base.weight.t() if kind_of(layer) == "conv1d" else base.weight  # (out, ...)
    delta = (layer.lora_B.flatten(1) @ layer.lora_A.flatten(1)).view(weight.shape) * layer.scaling
    updated = weight + delta
    norm = updated.flatten(1).norm(dim=1).view(-1, *[1] * (weight.dim() - 1))
    merged = layer.lora_magnitude.view_as(norm) * updated / norm
    if isinstance(base, nn.Conv2d):
        return F.conv2d(x, merged, base.bias, base.stride, base.padding)
    return F.linear(x, merged, base.bias)


def kind_of(layer: nn.Module) -> str:
    base = layer.base_layer() if isinstance(layer, DoraLinear | DoraConv2d) else layer
    return type(base).__name__.lower()


@pytest.mark.parametrize("kind", list(LAYERS))
def test_a_fresh_layer_is_the_identity_and_m_is_the_weight_norm(kind: str) -> None:
    torch.manual_seed(0)
    build, inputs = LAYERS[kind]
    model = Holder(build()).double()
    x = inputs().double()
    with torch.no_grad():
        before = model(x)
        apply_lora(model, r=3, targets=["inner"], dora=True)
        torch.testing.assert_close(model(x), before, rtol=0, atol=0)
    layer = model.inner
    assert isinstance(layer, DoraConv2d if kind == "conv2d" else DoraLinear)
    weight = layer.base_layer().weight
    rows = weight.t() if kind == "conv1d" else weight.flatten(1)
    torch.testing.assert_close(layer.lora_magnitude, rows.norm(dim=1), rtol=1e-12, atol=0)


@pytest.mark.parametrize("kind", list(LAYERS))
def test_output_is_the_paper_s_formula(kind: str) -> None:
    model, x = _dora(kind)
    layer = model.inner
    assert isinstance(layer, DoraLinear | DoraConv2d)
    with torch.no_grad():
        torch.testing.assert_close(model(x), _expected(layer, x), rtol=0, atol=1e-12)


@pytest.mark.parametrize("kind", list(LAYERS))
def test_factored_norm_equals_the_direct_norm(kind: str) -> None:
    model, _ = _dora(kind)
    layer = model.inner
    assert isinstance(layer, DoraLinear | DoraConv2d)
    weight = layer.base_layer().weight.detach()
    merged_rows = layer.merged_weight(weight)  # m-scaled: divide m out again to get W + sBA's norm
    direct = (weight.t() if kind == "conv1d" else weight.flatten(1)) + (
        layer.lora_B.flatten(1) @ layer.lora_A.flatten(1)
    ) * layer.scaling
    torch.testing.assert_close(row_norms(layer, weight), direct.norm(dim=1), rtol=1e-12, atol=0)
    assert merged_rows.shape == weight.shape


@pytest.mark.parametrize("kind", list(LAYERS))
def test_gradients_treat_the_norm_as_a_constant(kind: str) -> None:
    model, x = _dora(kind)
    layer = model.inner
    assert isinstance(layer, DoraLinear | DoraConv2d)
    model(x).square().sum().backward()
    got = {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}
    params = [layer.lora_A, layer.lora_B, layer.lora_magnitude]
    for p in params:
        p.grad = None
    base = layer.base_layer()
    weight = base.weight.t() if kind == "conv1d" else base.weight
    delta = (layer.lora_B.flatten(1) @ layer.lora_A.flatten(1)).view(weight.shape) * layer.scaling
    norm = (weight + delta).flatten(1).norm(dim=1).detach().view(-1, *[1] * (weight.dim() - 1))
    merged = layer.lora_magnitude.view_as(norm) * (weight + delta) / norm
    if isinstance(base, nn.Conv2d):
        want_out = F.conv2d(x, merged, base.bias, base.stride, base.padding)
    else:
        want_out = F.linear(x, merged, base.bias)
    grads = torch.autograd.grad(want_out.square().sum(), params)
    assert set(got) == {"lora_A", "lora_B", "lora_magnitude"}
    for name, want in zip(("lora_A", "lora_B", "lora_magnitude"), grads, strict=True):
        torch.testing.assert_close(got[name], want, rtol=1e-10, atol=1e-10, msg=name)


@pytest.mark.parametrize("kind", list(LAYERS))
def test_merge_is_exact_and_unmerge_restores_the_weight(kind: str) -> None:
    model, x = _dora(kind)
    weight = model.inner.base_layer().weight.detach().clone()
    with torch.no_grad():
        expected = model(x)
        peftkit.merge(model)
        assert model.inner.merged
        torch.testing.assert_close(model(x), expected, rtol=0, atol=1e-12)
        peftkit.unmerge(model)
        assert torch.equal(model.inner.base_layer().weight, weight)
        torch.testing.assert_close(model(x), expected, rtol=0, atol=1e-12)
        plain = peftkit.merge_and_unload(model)
        assert not isinstance(plain.inner, DoraLinear | DoraConv2d)
        torch.testing.assert_close(plain(x), expected, rtol=0, atol=1e-12)


def test_dropout_acts_on_the_low_rank_path_only() -> None:
    model, x = _dora("linear", dropout=0.5)
    layer = model.inner
    assert isinstance(layer, DoraLinear)
    with torch.no_grad():
        model.eval()  # eval: no dropout, the formula exactly
        torch.testing.assert_close(model(x), _expected(layer, x), rtol=0, atol=1e-12)
        model.train()
        torch.manual_seed(3)
        got = model(x)
        torch.manual_seed(3)
        dropped = F.dropout(x.reshape(-1, 12), 0.5, training=True)
    base = layer.base_layer()
    low_rank = dropped @ layer.lora_A.t() @ layer.lora_B.t() * layer.scaling
    scale = layer.lora_magnitude / row_norms(layer, base.weight)
    want = scale * (x.reshape(-1, 12) @ base.weight.t() + low_rank) + base.bias
    torch.testing.assert_close(got.detach().reshape(-1, 7), want.detach(), rtol=0, atol=1e-12)


def test_a_16_bit_base_keeps_its_output_dtype_with_float32_factors() -> None:
    torch.manual_seed(0)
    model = Holder(nn.Linear(16, 8)).to(torch.bfloat16)
    apply_lora(model, r=2, targets=["inner"], dora=True)  # adapter_dtype "auto": float32
    layer = model.inner
    assert layer.lora_magnitude.dtype == torch.float32
    x = torch.randn(4, 16, dtype=torch.bfloat16)
    y = model(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert layer.lora_magnitude.grad is not None


def test_save_and_load_keep_the_magnitude(tmp_path: Path) -> None:
    model, x = _dora("conv2d")
    peftkit.save_adapter(model, tmp_path)
    fresh = Holder(LAYERS["conv2d"][0]()).double()
    fresh.inner.load_state_dict(model.inner.base_layer().state_dict())
    peftkit.load_adapter(fresh, tmp_path)
    assert isinstance(fresh.inner, DoraConv2d)
    assert torch.equal(fresh.inner.lora_magnitude, model.inner.lora_magnitude)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)


def test_a_plain_lora_checkpoint_still_loads_as_plain_lora(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = Holder(nn.Linear(12, 7))
    apply_lora(model, r=2, targets=["inner"])
    peftkit.save_adapter(model, tmp_path)
    path = tmp_path / "peftkit_config.json"  # as written before the dora field existed
    document = json.loads(path.read_text())
    assert document["adapters"][0]["config"].pop("dora") is False
    path.write_text(json.dumps(document))
    fresh = Holder(nn.Linear(12, 7))
    peftkit.load_adapter(fresh, tmp_path)
    assert type(fresh.inner) is LoraLinear
    assert not peftkit.adapters(fresh)["default"].config.dora


def test_embeddings_and_quantized_bases_are_refused() -> None:
    with pytest.raises(ValueError, match=r"DoRA \(dora=True\) does not adapt the nn\.Embedding at"):
        apply_lora(Holder(nn.Embedding(10, 4)), r=2, targets=["inner"], dora=True)
    model = quanto_int8()
    with pytest.raises(ValueError, match=r"DoRA \(dora=True\) needs the dense weight of the quant"):
        apply_lora(model, r=2, targets=["0"], dora=True)
    assert not peftkit.adapters(model)


@pytest.mark.parametrize(
    "module", [nn.Conv1d(4, 6, 3), nn.MultiheadAttention(8, 2)], ids=["conv1d", "attention"]
)
def test_torch_conv1d_and_attention_are_refused_not_wrapped_as_linear(module: nn.Module) -> None:
    model = Holder(module)
    name = type(module).__name__
    with pytest.raises(ValueError, match=rf"DoRA \(dora=True\) does not adapt torch's {name} at"):
        apply_lora(model, r=2, targets=["inner"], dora=True)
    assert not peftkit.adapters(model)


def test_config_and_combine_refusals() -> None:
    with pytest.raises(ValueError, match=r"dora must be True or False, got 'yes'"):
        LoraConfig(dora="yes")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"peftkit calls it dora= \(did you mean dora=True\?\)"):
        LoraConfig(use_dora=True)  # type: ignore[call-arg]
    model = Holder(nn.Linear(12, 7))
    apply_lora(model, r=2, targets=["inner"], dora=True, adapter_name="a")
    apply_lora(model, r=2, targets=["inner"], adapter_name="b")
    with pytest.raises(TypeError, match=r"'a' is DoRA \(dora=True\)"):
        peftkit.combine_lora(model, {"a": 0.5, "b": 0.5}, "ab")


def _saved_bytes(model: nn.Module, x: torch.Tensor) -> int:
    """Bytes of the distinct tensors autograd keeps for backward during ``model(x)``."""
    seen: dict[tuple[int, tuple[int, ...]], int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        seen[(t.data_ptr(), tuple(t.shape))] = t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x)
    return sum(seen.values())


def test_backward_keeps_one_output_sized_tensor_more_than_lora() -> None:
    torch.manual_seed(0)
    x = torch.randn(4, 64, 96, requires_grad=True)
    kept = {}
    for dora in (False, True):
        model = Holder(nn.Linear(96, 80))
        apply_lora(model, r=4, targets=["inner"], dora=dora)
        kept[dora] = _saved_bytes(model, x)
    output = 4 * 64 * 80 * 4  # (tokens, out) in float32
    extra = kept[True] - kept[False]
    assert output <= extra <= output + 4 * 80 * 4  # and a few (out,) vectors; nothing (out, in)


def test_a_plain_state_dict_folds_lora_over_dora() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4)).double()
    plain = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4)).double()
    apply_lora(model, r=2, targets=["0", "2"], dora=True, adapter_name="a")
    apply_lora(model, r=2, targets=["2"], adapter_name="b")
    with torch.no_grad():
        for p in peftkit.trainable_parameters(model):
            p.add_(torch.randn_like(p) * 0.3)
        plain.load_state_dict(peftkit.plain_state_dict(model))
        x = torch.randn(3, 6, dtype=torch.float64)
        torch.testing.assert_close(plain(x), model(x), rtol=0, atol=1e-12)
