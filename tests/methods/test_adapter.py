"""Bottleneck adapters: closed-form parameter counts, preset placement, hand-computed forwards, forms
on every HF model, merge / unload behaviour, and errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import peftkit
from peftkit import AdapterConfig, SavedModule, apply_adapter
from peftkit.methods.adapter import (
    BottleneckLayer,
    ParallelAdapter,
    ResidualParallelAdapter,
    SequentialAdapter,
)

from helpers import has_adapter_layers, perturb, snapshot
from zoo import CASES, TinyMLP, TinyTransformer

HF = ["gpt2", "bert", "llama", "t5"]
FORMS = ["pfeiffer", "houlsby", "parallel"]


def _bert_base_on_meta() -> nn.Module:
    from transformers import BertConfig, BertModel

    with torch.device("meta"):
        return BertModel(BertConfig())  # hidden 768, 12 layers: no memory, no download


def _closed_form(d: int, m: int, layer_norm: bool = False) -> int:
    """down (m·d + m) + up (d·m + d), plus LayerNorm (2d)."""
    return 2 * d * m + m + d + (2 * d if layer_norm else 0)


@pytest.mark.parametrize(
    ("fields", "per_layer"),
    [
        ({"form": "pfeiffer"}, [48]),
        ({"form": "houlsby"}, [48, 48]),
        ({"form": "parallel", "reduction_factor": 8}, [96]),
        ({"form": "houlsby", "bottleneck": 64, "layer_norm": True}, [64, 64]),
    ],
)
def test_parameter_count_matches_the_closed_form_on_bert_base(
    fields: dict[str, object], per_layer: list[int]
) -> None:
    model = _bert_base_on_meta()
    apply_adapter(model, **fields)
    layer_norm = bool(fields.get("layer_norm", False))
    expected = 12 * sum(_closed_form(768, m, layer_norm) for m in per_layer)
    assert peftkit.trainable_summary(model).trainable == expected


def test_pfeiffer_reduction_16_on_bert_base_is_about_0_9m() -> None:
    model = _bert_base_on_meta()
    apply_adapter(model, form="pfeiffer", reduction_factor=16)
    assert peftkit.trainable_summary(model).trainable == 894_528  # 12 · (2·768·48 + 48 + 768)


PLACES = {
    ("llama", "pfeiffer"): ["model.layers.{i}.mlp.down_proj"],
    ("llama", "houlsby"): ["model.layers.{i}.self_attn.o_proj", "model.layers.{i}.mlp.down_proj"],
    ("llama", "parallel"): ["model.layers.{i}.mlp"],
    ("gpt2", "pfeiffer"): ["transformer.h.{i}.mlp.c_proj"],
    ("gpt2", "houlsby"): ["transformer.h.{i}.attn.c_proj", "transformer.h.{i}.mlp.c_proj"],
    ("gpt2", "parallel"): ["transformer.h.{i}.mlp"],
    ("bert", "pfeiffer"): ["bert.encoder.layer.{i}.output.dense"],
    ("bert", "houlsby"): [
        "bert.encoder.layer.{i}.attention.output.dense",
        "bert.encoder.layer.{i}.output.dense",
    ],
    ("bert", "parallel"): ["bert.encoder.layer.{i}.output"],
    ("t5", "pfeiffer"): [
        "encoder.block.{i}.layer.1.DenseReluDense.wo",
        "decoder.block.{i}.layer.2.DenseReluDense.wo",
    ],
    ("t5", "houlsby"): [
        "encoder.block.{i}.layer.0.SelfAttention.o",
        "encoder.block.{i}.layer.1.DenseReluDense.wo",
        "decoder.block.{i}.layer.0.SelfAttention.o",
        "decoder.block.{i}.layer.1.EncDecAttention.o",
        "decoder.block.{i}.layer.2.DenseReluDense.wo",
    ],
    ("t5", "parallel"): [
        "encoder.block.{i}.layer.1.DenseReluDense",
        "decoder.block.{i}.layer.2.DenseReluDense",
    ],
}


@pytest.mark.parametrize(("case_name", "form"), list(PLACES))
def test_presets_place_adapters_where_the_form_says(case_name: str, form: str) -> None:
    model = CASES[case_name].build()
    apply_adapter(model, form=form)
    layers = [
        layer
        for layer in peftkit.adapters(model)["default"].layers
        if not isinstance(layer, SavedModule)  # BERT's classifier trains by default
    ]
    paths = sorted(layer.path for layer in layers)
    assert paths == sorted(p.format(i=i) for p in PLACES[case_name, form] for i in (0, 1))
    kinds = {type(layer) for layer in layers}
    if form != "parallel":
        assert kinds == {SequentialAdapter}
    else:
        assert kinds == {ResidualParallelAdapter if case_name == "bert" else ParallelAdapter}


@pytest.mark.parametrize("case_name", HF)
@pytest.mark.parametrize("form", FORMS)
def test_every_form_on_every_hf_model_starts_at_identity_disables_and_unloads(
    case_name: str, form: str
) -> None:
    case = CASES[case_name]
    model = case.build()
    original = snapshot(model)
    with torch.no_grad():
        base = case.output(model)
        apply_adapter(model, form=form, layer_norm=True, activation="gelu")
        torch.testing.assert_close(case.output(model), base, rtol=0, atol=0)
        perturb(model)
        adapted = case.output(model)
        assert not torch.allclose(adapted, base)
        with peftkit.disable_adapters(model):
            torch.testing.assert_close(case.output(model), base, rtol=0, atol=0)
    peftkit.unload(model)
    assert not has_adapter_layers(model)
    assert all(torch.equal(v, original[k]) for k, v in snapshot(model).items())


@pytest.mark.parametrize("case_name", ["bert", "t5"])
@pytest.mark.parametrize("form", FORMS)
def test_every_form_saves_and_loads_exactly(case_name: str, form: str, tmp_path: Path) -> None:
    case = CASES[case_name]
    model = case.build()
    apply_adapter(model, form=form, bottleneck=3, layer_norm=True)
    perturb(model)
    with torch.no_grad():
        expected = case.output(model)
    peftkit.save_adapter(model, tmp_path)
    fresh = peftkit.load_adapter(case.build(), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(case.output(fresh), expected, rtol=0, atol=0)


class Holder(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.inner(*args)
        return out


def _hand_f(layer: BottleneckLayer, h: torch.Tensor, act: object = F.relu) -> torch.Tensor:
    """f(h) = U act(D LN(h) + b_D) + b_U, written out from the layer's tensors."""
    norm = layer.adapter_norm
    if isinstance(norm, nn.LayerNorm):
        mu, var = h.mean(-1, keepdim=True), h.var(-1, unbiased=False, keepdim=True)
        h = (h - mu) / torch.sqrt(var + norm.eps) * norm.weight + norm.bias
    down, up = layer.adapter_down, layer.adapter_up
    return act(h @ down.weight.t() + down.bias) @ up.weight.t() + up.bias  # type: ignore[operator]


def test_sequential_forward_matches_the_hand_computed_formula() -> None:
    torch.manual_seed(0)
    linear = nn.Linear(6, 10)
    model = Holder(linear)
    apply_adapter(model, targets=["inner"], bottleneck=3, scaling=0.5, layer_norm=True)
    perturb(model)
    layer = model.inner
    assert isinstance(layer, SequentialAdapter)
    x = torch.randn(4, 6)
    y = x @ linear.weight.t() + linear.bias
    torch.testing.assert_close(model(x), y + 0.5 * _hand_f(layer, y))


def test_parallel_forward_reads_the_block_input() -> None:
    torch.manual_seed(0)
    block = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8))
    model = Holder(block)
    apply_adapter(model, targets=["inner"], form="parallel", bottleneck=2, scaling=4.0,
                  activation="tanh")  # fmt: skip
    perturb(model)
    layer = model.inner
    assert isinstance(layer, ParallelAdapter) and layer.width == 8
    x = torch.randn(3, 8)
    torch.testing.assert_close(model(x), block(x) + 4.0 * _hand_f(layer, x, torch.tanh))


def test_bert_parallel_adds_beside_the_feed_forward_before_the_residual_layer_norm() -> None:
    case = CASES["bert"]
    model = case.build()
    apply_adapter(model, form="parallel", bottleneck=4, scaling=2.0)
    perturb(model)
    layer = model.bert.encoder.layer[0].output
    assert isinstance(layer, ResidualParallelAdapter)
    out = layer.base_layer()
    h, x = torch.randn(2, 5, 64), torch.randn(2, 5, 32)
    expected = out.LayerNorm(out.dense(h) + 2.0 * _hand_f(layer, x) + x)  # eval: dropout is off
    with torch.no_grad():
        torch.testing.assert_close(layer(h, x), expected)


def test_merge_leaves_adapters_in_place_and_reports_why() -> None:
    case = CASES["llama"]
    model = case.build()
    apply_adapter(model, form="houlsby")
    perturb(model)
    with torch.no_grad():
        expected = case.output(model)
        model, report = peftkit.merge_and_unload(model, report=True)
        torch.testing.assert_close(case.output(model), expected, rtol=0, atol=0)
    assert not report.merged and len(report.kept) == 4
    assert all("not linear" in why for why in report.kept.values())
    assert list(peftkit.adapters(model)) == ["default"]


def test_layers_and_exclude_narrow_the_preset() -> None:
    model = CASES["llama"].build()
    apply_adapter(model, form="houlsby", layers=[1], exclude=["o_proj"])
    paths = [layer.path for layer in peftkit.adapters(model)["default"].layers]
    assert paths == ["model.layers.1.mlp.down_proj"]


def test_training_step_moves_the_up_projection_first() -> None:
    case = CASES["gpt2"]
    model = case.build()
    apply_adapter(model, dropout=0.1, bottleneck=8, activation="gelu")
    layer = model.transformer.h[0].mlp.c_proj
    assert isinstance(layer.adapter_dropout, nn.Dropout)
    model.train()
    case.loss(model).backward()
    assert layer.adapter_up.weight.grad.abs().sum() > 0
    assert layer.adapter_down.weight.grad.abs().sum() == 0  # up is zero, so no signal reaches down


def test_adapter_tensors_are_float32_on_a_bf16_base_unless_asked_for_the_base_dtype() -> None:
    model = CASES["llama"].build().to(torch.bfloat16)
    apply_adapter(model)
    assert {p.dtype for p in peftkit.trainable_parameters(model)} == {torch.float32}
    assert case_output_dtype(model) == torch.bfloat16  # the stream stays in the base's dtype
    other = CASES["llama"].build().to(torch.bfloat16)
    apply_adapter(other, adapter_dtype="base")
    assert {p.dtype for p in peftkit.trainable_parameters(other)} == {torch.bfloat16}


def case_output_dtype(model: nn.Module) -> torch.dtype:
    ids = torch.randint(0, 32, (2, 5))
    out: torch.Tensor = model(input_ids=ids).logits
    return out.dtype


def test_no_dropout_adds_no_module() -> None:
    model = CASES["llama"].build()
    apply_adapter(model)
    assert isinstance(model.model.layers[0].mlp.down_proj.adapter_dropout, nn.Identity)
    assert isinstance(model.model.layers[0].mlp.down_proj.adapter_norm, nn.Identity)


@pytest.mark.parametrize("model", [TinyMLP(), TinyTransformer()], ids=["mlp", "transformer"])
def test_an_unrecognised_model_gets_an_error_asking_for_targets(model: nn.Module) -> None:
    with pytest.raises(peftkit.TargetError, match=r"no preset recognises .*pass targets=\["):
        apply_adapter(model)
    assert not peftkit.adapters(model) and not has_adapter_layers(model)


def test_explicit_targets_work_on_a_plain_model() -> None:
    torch.manual_seed(0)
    model = TinyTransformer()
    apply_adapter(model, targets=["down"], bottleneck=4)
    assert [layer.path for layer in peftkit.adapters(model)["default"].layers] == [
        "layers.0.down",
        "layers.1.down",
    ]
    assert peftkit.trainable_summary(model).trainable == 2 * _closed_form(32, 4)


def test_parallel_on_a_layer_that_changes_width_is_refused() -> None:
    with pytest.raises(peftkit.TargetError, match=r"equal widths \(16 → 32\).*whole block"):
        apply_adapter(TinyMLP(), targets=["fc1"], form="parallel")


def test_a_target_that_returns_no_tensor_is_reported_at_forward() -> None:
    case = CASES["gpt2"]
    model = case.build()
    apply_adapter(model, targets=["attn"])  # GPT2Attention returns a tuple
    with pytest.raises(TypeError, match="returned tuple, not a tensor"):
        case.output(model)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"form": "serial"}, "form must be"),
        ({"bottleneck": 0}, "bottleneck must be a positive integer"),
        ({"reduction_factor": 0}, "reduction_factor must be a positive"),
        ({"activation": "swish"}, "activation must be one of"),
        ({"dropout": 1.0}, r"dropout must be in \[0, 1\)"),
        ({"targets": []}, "targets is empty"),
        ({"targets": "fc1"}, "must be a list"),
        ({"layers": [-1]}, "layers must be non-negative"),
        ({"layer_norm": 1}, "layer_norm must be True or False"),
    ],
)
def test_bad_config_names_the_fix(fields: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        AdapterConfig(**fields)  # type: ignore[arg-type]


def test_config_round_trips_through_json() -> None:
    config = AdapterConfig(form="parallel", bottleneck=8, targets=("mlp",), layers=(0, 2))
    assert AdapterConfig.from_dict(config.to_dict()) == config


@pytest.mark.gpu
def test_adapters_live_on_the_base_device_and_dtype_on_cuda() -> None:
    case = CASES["llama"]
    model = case.build().cuda().to(torch.bfloat16)
    apply_adapter(model, form="houlsby", layer_norm=True)
    params = peftkit.trainable_parameters(model)
    assert {(p.device.type, p.dtype) for p in params} == {("cuda", torch.bfloat16)}
    inputs = {k: v.cuda() for k, v in case.inputs().items()}
    model.train()
    model(**inputs).logits.float().pow(2).mean().backward()
    assert all(p.grad is not None for p in params)
