"""What an HF peft user writes by habit works: ``m = merge_and_unload(m)`` then ``m.generate``,
``m = unload(m)``, and ``print_trainable_parameters(model)``'s one line."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import peftkit
from peftkit import apply_adapter, apply_lora

from helpers import has_adapter_layers, perturb, snapshot
from zoo import CASES, TinyTransformer


def _prompt() -> torch.Tensor:
    return torch.randint(1, 50, (1, 4), generator=torch.Generator().manual_seed(0))


def _greedy(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        out: torch.Tensor = model.generate(  # type: ignore[operator]
            _prompt(), max_new_tokens=6, do_sample=False, pad_token_id=0
        )
    return out


def test_merge_and_unload_returns_the_model_so_reassigning_then_generate_works() -> None:
    torch.manual_seed(0)
    model = CASES["llama"].build().eval()
    apply_lora(model, r=4, targets=["q_proj", "v_proj"])
    perturb(model, scale=0.5)
    with torch.no_grad():
        expected_logits = model(input_ids=_prompt()).logits
    expected = _greedy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # everything merges: no warning
        merged = peftkit.merge_and_unload(model)
    assert merged is model and not has_adapter_layers(merged)
    with torch.no_grad():
        torch.testing.assert_close(
            merged(input_ids=_prompt()).logits, expected_logits, rtol=1e-4, atol=1e-5
        )
    assert torch.equal(_greedy(merged), expected)


def test_merge_and_unload_with_report_returns_the_model_and_what_was_merged() -> None:
    torch.manual_seed(0)
    model = TinyTransformer()
    apply_lora(model, r=2, targets=["q_proj"], layers=[0])
    model2, report = peftkit.merge_and_unload(model, report=True)
    assert model2 is model
    assert report.merged == ["default:layers.0.q_proj"] and report.kept == {}


def test_merge_and_unload_warns_naming_the_layers_it_kept() -> None:
    torch.manual_seed(0)
    model = TinyTransformer()
    apply_adapter(model, targets=["o_proj"], bottleneck=4)
    with pytest.warns(UserWarning) as caught:
        same = peftkit.merge_and_unload(model)
    assert same is model
    assert str(caught[0].message) == (
        "merge_and_unload kept 2 layer(s) that cannot be merged (default:layers.0.o_proj, "
        "default:layers.1.o_proj); they still compute as adapters. "
        "merge_and_unload(model, report=True) returns (model, report) with the reason for each"
    )
    assert list(peftkit.adapters(model)) == ["default"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # asking for the report replaces the warning
        _, report = peftkit.merge_and_unload(model, report=True)
    assert report.merged == [] and len(report.kept) == 2


def test_unload_returns_the_base_model_with_its_weights() -> None:
    torch.manual_seed(0)
    model = TinyTransformer()
    before = snapshot(model)
    apply_lora(model, targets=["q_proj"])
    perturb(model)
    model = peftkit.unload(model)
    assert isinstance(model, TinyTransformer) and not has_adapter_layers(model)
    after = snapshot(model)
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)


def test_print_trainable_parameters_prints_peft_s_line(capsys: pytest.CaptureFixture[str]) -> None:
    torch.manual_seed(0)
    model = CASES["gpt2"].build()  # wte and lm_head share one weight: counted once
    apply_lora(model, r=4, targets=["c_attn"])
    summary = peftkit.trainable_summary(model)
    peftkit.print_trainable_parameters(model)
    line = capsys.readouterr().out
    lora = 2 * 4 * (32 + 96)  # two layers of A (r, in) + B (out, r); c_attn: 32 -> 96
    assert summary.trainable == lora
    assert line == (
        f"trainable params: {lora:,} || all params: {summary.total:,} || "
        f"trainable%: {100 * lora / summary.total:.4f}\n"
    )
    every = [p.numel() for _, p in model.named_parameters(remove_duplicate=False)]
    tied = model.transformer.wte.weight.numel()
    assert model.lm_head.weight is model.transformer.wte.weight
    assert summary.total == sum(every) - tied
