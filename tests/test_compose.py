"""Composition: different methods on one model, named adapters of every method, weighted LoRA
combinations (exact and SVD) and ensembles, with hand-checked numerics."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

import peftkit
from peftkit import AdapterConfig, FullConfig, LoraConfig, apply_adapter, apply_lora
from peftkit.checkpoint import CONFIG_NAME

from helpers import perturb, snapshot
from zoo import CASES, TinyTransformer

ATTENTION = {
    "gpt2": ["c_attn"],
    "bert": ["query", "value"],
    "llama": ["q_proj", "v_proj"],
    "t5": ["q", "v"],
}
SMALL_FULL = {  # Llama and T5 have no biases: train their norms in place instead
    "gpt2": FullConfig(biases_only=True),
    "bert": FullConfig(biases_only=True),
    "llama": FullConfig(modules=["post_attention_layernorm"]),
    "t5": FullConfig(modules=["layer_norm"]),
}


def _stack(case_name: str) -> nn.Module:
    model = CASES[case_name].build()
    return peftkit.compose(
        model,
        {
            "attn": LoraConfig(r=2, targets=ATTENTION[case_name]),
            "ffn": AdapterConfig(form="pfeiffer", bottleneck=4),
            "small": SMALL_FULL[case_name],
        },
    )


@pytest.mark.parametrize("case_name", list(ATTENTION))
def test_lora_adapter_and_full_on_one_model(case_name: str, tmp_path: Path) -> None:
    case = CASES[case_name]
    with torch.no_grad():
        base = case.output(case.build())
    model = _stack(case_name)
    methods = peftkit.adapters(model)
    assert [m.name for m in methods.values()] == ["lora", "adapter", "full"]
    owned = [{id(p) for p in m.parameters()} for m in methods.values()]
    assert all(owned) and not (owned[0] & owned[1] or owned[0] & owned[2] or owned[1] & owned[2])
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == owned[0] | owned[1] | owned[2]
    with torch.no_grad():
        torch.testing.assert_close(case.output(model), base, rtol=0, atol=0)
    perturb(model)
    with torch.no_grad():
        expected = case.output(model)
    peftkit.save_adapter(model, tmp_path)
    doc = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert [(e["name"], e["method"]) for e in doc["adapters"]] == [
        ("attn", "lora"),
        ("ffn", "adapter"),
        ("small", "full"),
    ]
    fresh = peftkit.load_adapter(case.build(), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(case.output(fresh), expected, rtol=0, atol=0)
        fresh, report = peftkit.merge_and_unload(fresh, report=True)
        torch.testing.assert_close(case.output(fresh), expected, rtol=1e-4, atol=1e-5)
    assert list(peftkit.adapters(fresh)) == ["ffn"]
    assert {k.split(":")[0] for k in report.merged} == {"attn", "small"}
    assert {k.split(":")[0] for k in report.kept} == {"ffn"}
    with torch.no_grad(), peftkit.disable_adapters(model):
        torch.testing.assert_close(case.output(model), base, rtol=0, atol=0)


def test_compose_applies_all_or_nothing() -> None:
    model = CASES["llama"].build()
    original = snapshot(model)
    with pytest.raises(peftkit.TargetError, match="q_prj"):
        peftkit.compose(
            model,
            [("ok", FullConfig(biases_only=False)), ("bad", LoraConfig(targets=["q_prj"]))],
        )
    assert not peftkit.adapters(model)
    assert all(p.requires_grad for p in model.parameters())
    assert all(torch.equal(v, original[k]) for k, v in snapshot(model).items())


def test_named_adapters_of_every_method_switch_and_delete() -> None:
    case = CASES["llama"]
    model = case.build()
    singles = {}
    configs = {
        "lora": LoraConfig(r=2, targets=["q_proj"]),
        "adapter": AdapterConfig(bottleneck=4, form="parallel"),
        "full": FullConfig(modules=["o_proj"]),
    }
    for name, config in configs.items():
        alone = case.build()
        peftkit.apply(alone, config, name)
        set_values(alone, name, seed=len(name))
        with torch.no_grad():
            singles[name] = case.output(alone)
        peftkit.apply(model, config, name)
        set_values(model, name, seed=len(name))
    for name in configs:
        peftkit.set_active(model, name)
        with torch.no_grad():
            torch.testing.assert_close(case.output(model), singles[name], rtol=1e-6, atol=1e-6)
    peftkit.set_active(model, ["lora", "full"])
    assert peftkit.active_adapters(model) == ["lora", "full"]
    peftkit.delete_adapter(model, "lora")
    peftkit.set_active(model, "full")
    with torch.no_grad():
        torch.testing.assert_close(case.output(model), singles["full"], rtol=1e-6, atol=1e-6)


def set_values(model: nn.Module, name: str, seed: int) -> None:
    """Give one adapter's tensors values that depend only on ``seed`` (not on their init)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in peftkit.adapters(model)[name].parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.1 - p)


def test_lora_inside_an_adapter_merges_but_outside_it_stays() -> None:
    torch.manual_seed(0)
    inside = TinyTransformer()
    apply_lora(inside, r=2, targets=["o_proj"], adapter_name="lora")
    apply_adapter(inside, targets=["o_proj"], bottleneck=4, adapter_name="ad")
    torch.manual_seed(0)
    outside = TinyTransformer()
    apply_adapter(outside, targets=["o_proj"], bottleneck=4, adapter_name="ad")
    apply_lora(outside, r=2, targets=["o_proj"], adapter_name="lora")
    ids = torch.randint(50, (2, 5), generator=torch.Generator().manual_seed(0))
    for model in (inside, outside):
        perturb(model)
        with torch.no_grad():
            expected = model(ids)
            model, report = peftkit.merge_and_unload(model, report=True)
            torch.testing.assert_close(model(ids), expected, rtol=1e-5, atol=1e-5)
        kept = {k.split(":")[0]: why for k, why in report.kept.items()}
        if model is inside:
            assert set(kept) == {"ad"} and len(report.merged) == 2
        else:
            assert set(kept) == {"ad", "lora"} and "outside a non-linear" in kept["lora"]


# -- combine_lora -----------------------------------------------------------------------------------
def _two_loras() -> nn.Module:
    torch.manual_seed(0)
    model = TinyTransformer()
    apply_lora(model, r=4, alpha=8, targets=["q_proj", "v_proj"], adapter_name="a")
    apply_lora(model, r=2, alpha=3, rslora=True, targets=["v_proj", "up"], adapter_name="b")
    perturb(model)
    return model


def _deltas(model: nn.Module, name: str) -> dict[str, torch.Tensor]:
    method = peftkit.adapters(model)[name]
    return {layer.path: layer.delta_weight().double() for layer in method.layers}


def _weighted(model: nn.Module, weights: dict[str, float]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for name, w in weights.items():
        for path, delta in _deltas(model, name).items():
            out[path] = out.get(path, torch.zeros_like(delta)) + w * delta
    return out


def test_linear_combination_is_exactly_the_weighted_sum_of_updates() -> None:
    model = _two_loras()
    weights = {"a": 0.7, "b": -0.3}
    peftkit.combine_lora(model, weights, "ab")
    expected = _weighted(model, weights)
    got = _deltas(model, "ab")
    assert (
        got.keys()
        == expected.keys()
        == {f"layers.{i}.{m}" for i in (0, 1) for m in ("q_proj", "v_proj", "up")}
    )
    for path in expected:
        torch.testing.assert_close(got[path], expected[path], rtol=0, atol=1e-6)
    ranks = {layer.path: layer.r for layer in peftkit.adapters(model)["ab"].layers}
    assert (
        ranks["layers.0.v_proj"] == 6
        and ranks["layers.0.q_proj"] == 4
        and ranks["layers.0.up"] == 2
    )
    assert peftkit.active_adapters(model) == ["ab"]


def test_combination_with_unit_weights_computes_like_both_sources_together() -> None:
    model = _two_loras()
    ids = torch.randint(50, (2, 6), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        both = model(ids)
        peftkit.combine_lora(model, {"a": 1.0, "b": 1.0}, "ab")
        torch.testing.assert_close(model(ids), both, rtol=1e-5, atol=1e-6)


def test_svd_to_full_rank_equals_the_linear_combination_and_reloads(tmp_path: Path) -> None:
    model = _two_loras()
    weights = {"a": 0.5, "b": 2.0}
    peftkit.combine_lora(model, weights, "svd", rank=16)
    expected = _weighted(model, weights)
    for path, delta in _deltas(model, "svd").items():
        torch.testing.assert_close(delta, expected[path], rtol=0, atol=1e-6)
    ids = torch.randint(50, (2, 6), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = model(ids)
    peftkit.save_adapter(model, tmp_path, ["svd"])
    torch.manual_seed(0)
    fresh = peftkit.load_adapter(TinyTransformer(), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids), out, rtol=0, atol=0)


def test_svd_truncation_is_the_best_rank_k_approximation() -> None:
    model = _two_loras()
    weights = {"a": 0.7, "b": 0.3}
    peftkit.combine_lora(model, weights, "k2", rank=2)
    exact = _weighted(model, weights)
    for path, delta in _deltas(model, "k2").items():
        u, s, vh = torch.linalg.svd(exact[path])
        best = (u[:, :2] * s[:2]) @ vh[:2]
        torch.testing.assert_close(delta, best, rtol=0, atol=1e-6)
        residual = torch.linalg.matrix_norm(exact[path] - delta)
        torch.testing.assert_close(residual, s[2:].square().sum().sqrt(), rtol=1e-5, atol=1e-6)
    assert {layer.r for layer in peftkit.adapters(model)["k2"].layers} == {2}


class Convs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(30, 6)
        self.conv = nn.Conv2d(6, 5, 3, padding=1)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.emb(ids).permute(0, 2, 1)[..., None].expand(-1, -1, -1, 4)
        out: torch.Tensor = self.conv(x)
        return out


@pytest.mark.parametrize("rank", [None, 12, 1])
def test_combination_of_embedding_and_conv_updates(rank: int | None) -> None:
    torch.manual_seed(0)
    model = Convs()
    apply_lora(model, r=3, targets=["emb", "conv"], adapter_name="a")
    apply_lora(model, r=2, targets=["conv"], adapter_name="b")
    perturb(model)
    peftkit.combine_lora(model, {"a": 0.25, "b": 1.5}, "ab", rank=rank)
    exact = _weighted(model, {"a": 0.25, "b": 1.5})
    for path, delta in _deltas(model, "ab").items():
        if rank == 1:
            flat = exact[path].flatten(1)
            u, s, vh = torch.linalg.svd(flat)
            torch.testing.assert_close(delta.flatten(1), s[0] * torch.outer(u[:, 0], vh[0]))
        else:
            torch.testing.assert_close(delta, exact[path], rtol=0, atol=1e-6)


def test_combination_keeps_unrelated_adapters_active() -> None:
    model = _two_loras()
    apply_adapter(model, targets=["down"], bottleneck=2, adapter_name="other")
    peftkit.combine_lora(model, {"a": 1.0}, "a2")
    assert peftkit.active_adapters(model) == ["b", "other", "a2"]
    peftkit.combine_lora(model, {"b": 1.0}, "b2", activate=False)
    assert "b2" not in peftkit.active_adapters(model)


@pytest.mark.parametrize(
    ("weights", "kwargs", "error", "message"),
    [
        ({}, {}, ValueError, "weights is empty"),
        ({"c": 1.0}, {}, KeyError, r"no adapter named 'c'"),
        ({"ad": 1.0}, {}, TypeError, "combines LoRA adapters; 'ad' is 'adapter'"),
        ({"a": float("nan")}, {}, ValueError, "must be finite"),
        ({"a": 1.0}, {"rank": 0}, ValueError, "rank must be a positive integer"),
    ],
)
def test_combine_errors_name_the_fix(
    weights: dict[str, float], kwargs: dict[str, int], error: type[Exception], message: str
) -> None:
    model = _two_loras()
    apply_adapter(model, targets=["down"], adapter_name="ad")
    with pytest.raises(error, match=message):
        peftkit.combine_lora(model, weights, "new", **kwargs)
    assert "new" not in peftkit.adapters(model)


def test_combine_refuses_modules_to_save() -> None:
    model = CASES["bert"].build()
    apply_lora(model, targets=["query"], modules_to_save=["classifier"])
    with pytest.raises(ValueError, match="modules_to_save.*not low-rank"):
        peftkit.combine_lora(model, {"default": 1.0}, "new")


# -- ensemble ---------------------------------------------------------------------------------------
def test_ensemble_is_the_mean_of_each_adapters_logits() -> None:
    case = CASES["gpt2"]
    model = case.build()
    apply_lora(model, r=2, targets=["c_attn"], adapter_name="a")
    apply_adapter(model, bottleneck=4, adapter_name="b")
    peftkit.apply(model, FullConfig(biases_only=True), "c")
    perturb(model)
    peftkit.set_active(model, ["a", "c"])
    inputs = case.inputs()
    with torch.no_grad():
        each = {}
        for name in ("a", "b", "c"):
            peftkit.set_active(model, name)
            each[name] = case.output(model, inputs)
        peftkit.set_active(model, ["a", "c"])
        mean = peftkit.ensemble(model, ["a", "b", "c"], inputs)
        weighted = peftkit.ensemble(model, ["a", ["b", "c"]], inputs, weights=[0.25, 0.75])
        peftkit.set_active(model, ["b", "c"])
        bc = case.output(model, inputs)
    torch.testing.assert_close(mean, (each["a"] + each["b"] + each["c"]) / 3)
    torch.testing.assert_close(weighted, 0.25 * each["a"] + 0.75 * bc)
    assert not torch.allclose(each["a"], each["b"])


def test_ensemble_restores_the_active_adapters_even_on_error() -> None:
    model = _two_loras()
    peftkit.set_active(model, "b")
    with pytest.raises(IndexError):
        peftkit.ensemble(model, ["a", "b"], torch.full((1, 3), 99))  # id out of the vocabulary
    assert peftkit.active_adapters(model) == ["b"]
    with pytest.raises(ValueError, match="2 weights for 1"):
        peftkit.ensemble(model, ["a"], torch.zeros(1, 3, dtype=torch.long), weights=[1, 2])
