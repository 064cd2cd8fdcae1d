"""LoRA numerics: per-layer-type merge equivalence, scaling, orientation, ranks, init, hot path."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from torch import nn

import peftkit
from peftkit import LoraConfig, apply_lora
from peftkit.methods.lora import LoraConv2d, LoraEmbedding, LoraLayer, LoraLinear
from peftkit.methods.lora_torch import LoraConv1d

from helpers import OutputShapes, perturb
from zoo import CASES, TinyTransformer


def _conv1d(n_in: int, n_out: int) -> nn.Module:
    from transformers.pytorch_utils import Conv1D

    return Conv1D(n_out, n_in)


LAYERS: dict[str, tuple[Any, Any]] = {
    "linear": (lambda: nn.Linear(12, 7), lambda: torch.randn(3, 5, 12)),
    "conv1d": (lambda: _conv1d(12, 7), lambda: torch.randn(3, 5, 12)),
    "embedding": (lambda: nn.Embedding(30, 9), lambda: torch.randint(30, (3, 5))),
    "conv2d": (lambda: nn.Conv2d(4, 6, 3, stride=2, padding=1), lambda: torch.randn(2, 4, 9, 9)),
    "torch_conv1d": (
        lambda: nn.Conv1d(4, 6, 3, stride=2, padding=2, dilation=2),
        lambda: torch.randn(2, 4, 13),
    ),
}


class Holder(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x)


@pytest.mark.parametrize("kind", list(LAYERS))
def test_merge_equals_unmerged_per_layer_type(kind: str) -> None:
    torch.manual_seed(0)
    make, data = LAYERS[kind]
    model = Holder(make())
    x = data()
    apply_lora(model, r=3, alpha=5, targets=["inner"])
    perturb(model)
    with torch.no_grad():
        expected = model(x)
        peftkit.merge(model)
        merged_in_place = model(x)
        peftkit.unmerge(model)
        unmerged = model(x)
        peftkit.merge_and_unload(model)
        plain = model(x)
    assert type(model.inner) is type(make())
    for got in (merged_in_place, unmerged, plain):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", list(LAYERS))
def test_delta_weight_matches_the_definition(kind: str) -> None:
    torch.manual_seed(0)
    make, _ = LAYERS[kind]
    model = Holder(make())
    apply_lora(model, r=2, alpha=6, targets=["inner"])
    perturb(model)
    layer = model.inner
    assert isinstance(layer, LoraLayer)
    ba = layer.lora_B.flatten(1) @ layer.lora_A.flatten(1)  # (out, in * kernel) or (dim, vocab)
    delta = layer.delta_weight()
    assert delta.shape == layer.base_layer().weight.shape
    if kind == "linear":
        torch.testing.assert_close(delta, 3.0 * ba)
    elif kind in ("conv1d", "embedding"):
        torch.testing.assert_close(delta, 3.0 * ba.t())
    else:
        torch.testing.assert_close(delta.flatten(1), 3.0 * ba)


def test_layer_types_are_chosen_from_the_base_type() -> None:
    kinds = {}
    for kind, (make, _) in LAYERS.items():
        model = Holder(make())
        apply_lora(model, targets=["inner"])
        kinds[kind] = type(model.inner)
    assert kinds == {
        "linear": LoraLinear,
        "conv1d": LoraLinear,
        "embedding": LoraEmbedding,
        "conv2d": LoraConv2d,
        "torch_conv1d": LoraConv1d,
    }


def test_conv1d_orientation_follows_the_transposed_weight() -> None:
    torch.manual_seed(0)
    conv = _conv1d(12, 7)
    assert conv.weight.shape == (12, 7)  # (in, out)
    model = Holder(conv)
    apply_lora(model, r=4, targets=["inner"])
    layer = model.inner
    assert layer.lora_A.shape == (4, 12) and layer.lora_B.shape == (7, 4)
    perturb(model)
    x = torch.randn(2, 12)
    reference = x @ (conv.weight + layer.delta_weight()) + conv.bias
    torch.testing.assert_close(model(x), reference, rtol=1e-5, atol=1e-5)


def test_scaling_plain_and_rslora() -> None:
    plain = Holder(nn.Linear(8, 8))
    apply_lora(plain, r=16, alpha=32, targets=["inner"])
    assert plain.inner.scaling == pytest.approx(2.0)
    rs = Holder(nn.Linear(8, 8))
    apply_lora(rs, r=16, alpha=32, rslora=True, targets=["inner"])
    assert rs.inner.scaling == pytest.approx(32 / math.sqrt(16))


def test_forward_adds_scaled_update() -> None:
    torch.manual_seed(0)
    model = Holder(nn.Linear(6, 5))
    apply_lora(model, r=2, alpha=3, rslora=True, targets=["inner"])
    perturb(model)
    layer = model.inner
    x = torch.randn(4, 6)
    expected = layer.base(x) + (3 / math.sqrt(2)) * x @ layer.lora_A.t() @ layer.lora_B.t()
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-6)


def test_per_module_rank_and_alpha_overrides() -> None:
    model = TinyTransformer()
    apply_lora(
        model,
        r=4,
        alpha=8,
        targets=["q_proj", "v_proj", "o_proj"],
        rank_pattern={"o_proj": 12, "re:layers\\.1\\.v_proj": 2},
        alpha_pattern={"o_proj": 6},
    )
    block0, block1 = model.layers
    assert (block0.q_proj.r, block0.v_proj.r, block0.o_proj.r) == (4, 4, 12)
    assert (block1.v_proj.r, block1.o_proj.r) == (2, 12)
    assert block0.o_proj.scaling == pytest.approx(6 / 12)
    assert block1.v_proj.scaling == pytest.approx(8 / 2)
    assert block0.o_proj.lora_A.shape == (12, 32)


def test_default_init_kaiming_a_and_zero_b() -> None:
    model = Holder(nn.Linear(64, 32))
    apply_lora(model, r=8, targets=["inner"])
    layer = model.inner
    assert torch.count_nonzero(layer.lora_B) == 0
    bound = 1 / math.sqrt(64)  # kaiming_uniform(a=sqrt(5)) on fan_in 64
    assert layer.lora_A.abs().max() <= bound and layer.lora_A.std() > bound / 3


def test_gaussian_init() -> None:
    torch.manual_seed(0)
    model = Holder(nn.Linear(4000, 4))
    apply_lora(model, r=4, init="gaussian", targets=["inner"])
    assert model.inner.lora_A.std().item() == pytest.approx(1 / 4, rel=0.05)
    assert torch.count_nonzero(model.inner.lora_B) == 0


def test_dropout_zero_adds_no_module_and_positive_dropout_applies_in_training() -> None:
    none = Holder(nn.Linear(8, 8))
    apply_lora(none, targets=["inner"])
    assert isinstance(none.inner.dropout, nn.Identity)
    some = Holder(nn.Linear(8, 8))
    apply_lora(some, dropout=0.5, targets=["inner"])
    assert isinstance(some.inner.dropout, nn.Dropout) and some.inner.dropout.p == 0.5
    perturb(some)
    x = torch.randn(16, 8)
    some.train()
    assert not torch.equal(some(x), some(x))  # dropout on the adapter path
    some.eval()
    assert torch.equal(some(x), some(x))


def test_forward_and_backward_never_form_the_full_update() -> None:
    model = Holder(nn.Linear(48, 40))
    apply_lora(model, r=4, targets=["inner"])
    perturb(model)
    x = torch.randn(3, 48, requires_grad=True)
    with OutputShapes() as seen:
        model(x).sum().backward()
    assert (40, 48) not in seen.shapes and (48, 40) not in seen.shapes
    assert (3, 4) in seen.shapes  # the rank-r intermediate


def test_lora_on_a_gpt2_model_uses_conv1d_and_merges() -> None:
    case = CASES["gpt2"]
    model = case.build()
    apply_lora(model, r=4, targets=["c_attn", "c_fc"])
    assert isinstance(model.transformer.h[0].attn.c_attn, LoraLinear)
    perturb(model)
    with torch.no_grad():
        expected = case.output(model)
        peftkit.merge_and_unload(model)
        torch.testing.assert_close(case.output(model), expected, rtol=1e-4, atol=1e-5)


def test_lora_on_tied_embedding_is_not_merged_and_says_why() -> None:
    case = CASES["gpt2"]
    model = case.build()
    assert model.lm_head.weight is model.transformer.wte.weight
    apply_lora(model, r=4, targets=["wte"])
    perturb(model)
    with torch.no_grad():
        expected = case.output(model)
        model, report = peftkit.merge_and_unload(model, report=True)
        torch.testing.assert_close(case.output(model), expected)
    assert not report.merged
    assert "tied" in report.kept["default:transformer.wte"]


def test_config_is_frozen_and_keyword_only() -> None:
    config = LoraConfig(r=4)
    with pytest.raises(AttributeError):
        config.r = 8  # type: ignore[misc]
    with pytest.raises(TypeError):
        LoraConfig(4)  # type: ignore[misc]


def test_config_round_trips_through_json_dict() -> None:
    config = LoraConfig(r=4, targets=["q_proj"], rank_pattern={"o_proj": 8}, layers=[0, 1])
    again = LoraConfig.from_dict(config.to_dict())
    assert again.to_dict() == config.to_dict()


def test_config_from_newer_version_warns_and_loads() -> None:
    data = {**LoraConfig(r=4).to_dict(), "future_knob": 1}
    with pytest.warns(UserWarning, match="future_knob"):
        config = LoraConfig.from_dict(data)
    assert config.r == 4


class ScaledEmbedding(nn.Embedding):
    """An embedding that multiplies its output (as Gemma's and BART's scaled embeddings do)."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return super().forward(input) * 4.0


class PlainLinearSubclass(nn.Linear):
    """A subclass that keeps nn.Linear's forward: merging into it is exact."""


def test_lora_on_a_layer_with_its_own_forward_is_not_merged_and_says_why() -> None:
    model = nn.Sequential(ScaledEmbedding(10, 8), PlainLinearSubclass(8, 8))
    apply_lora(model, r=2, targets=["0", "1"])
    perturb(model)
    ids = torch.arange(10).unsqueeze(0)
    with torch.no_grad():
        expected = model(ids)
        model, report = peftkit.merge_and_unload(model, report=True)
        torch.testing.assert_close(model(ids), expected, rtol=1e-5, atol=1e-6)
    assert report.merged == ["default:1"]
    assert "ScaledEmbedding" in report.kept["default:0"]
    assert "forward()" in report.kept["default:0"]
    assert isinstance(model[1], PlainLinearSubclass)


def test_lora_on_an_embedding_with_max_norm_is_not_merged_and_says_why() -> None:
    # The embedding renormalises looked-up rows in place: W + Δ renormalised is not W renormalised
    # plus Δ, and a forward after the merge would rewrite the merged rows.
    torch.manual_seed(0)
    model = Holder(nn.Embedding(10, 4, max_norm=1.0))
    apply_lora(model, r=2, targets=["inner"])
    perturb(model, scale=1.0)
    ids = torch.tensor([[1, 2, 3], [4, 1, 5]])
    with torch.no_grad():
        expected = model(ids)
        report = peftkit.merge(model)
        assert "max_norm" in report.kept["default:inner"]
        torch.testing.assert_close(model(ids), expected)


def test_lora_on_an_embedding_keeps_the_padding_row() -> None:
    torch.manual_seed(0)
    model = Holder(nn.Embedding(10, 4, padding_idx=0))
    apply_lora(model, r=2, targets=["inner"])
    layer = model.inner
    assert torch.count_nonzero(layer.lora_A[:, 0]) == 0 and torch.count_nonzero(layer.lora_A) > 0
    ids = torch.tensor([[0, 1, 2], [3, 0, 4]])
    optimizer = torch.optim.SGD(peftkit.trainable_parameters(model), lr=0.5)
    for _ in range(3):
        model(ids).square().sum().backward()
        optimizer.step()
        optimizer.zero_grad()
    pad = layer.base.weight[0]
    with torch.no_grad():
        out = model(ids)
        torch.testing.assert_close(out[0, 0], pad)
        assert not torch.allclose(out[0, 1], layer.base.weight[1])
        torch.testing.assert_close(layer.delta_weight()[0], torch.zeros(4))
    # Model code (transformers' resize_token_embeddings) reads the wrapped embedding's padding_idx.
    assert layer.padding_idx == 0
