"""IA3: per-feature scaling of outputs (keys, values) and of feed-forward inputs; merges exactly."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import peftkit
from peftkit import IA3Config, TargetError, apply_ia3
from peftkit.methods.ia3 import IA3Linear

from helpers import has_adapter_layers, perturb, snapshot
from zoo import TinyTransformer, gpt2_config

PAPER = {"targets": ["k_proj", "v_proj", "down"], "feedforward": ["down"]}


def _ids() -> torch.Tensor:
    return torch.randint(50, (2, 6), generator=torch.Generator().manual_seed(0))


def _model() -> TinyTransformer:
    torch.manual_seed(0)
    return TinyTransformer()


def test_starts_at_identity_and_trains_only_the_vectors() -> None:
    model = _model()
    with torch.no_grad():
        before = model(_ids())
    apply_ia3(model, **PAPER)
    with torch.no_grad():
        torch.testing.assert_close(model(_ids()), before, atol=0, rtol=0)
    shapes = sorted(tuple(p.shape) for p in peftkit.trainable_parameters(model))
    assert shapes == [(32,)] * 4 + [(64,)] * 2  # k, v: 32 outputs; down: 64 inputs


def test_scales_outputs_and_feedforward_inputs() -> None:
    model = _model()
    apply_ia3(model, **PAPER)
    perturb(model, seed=1, scale=0.5)
    block = model.layers[0]
    x = torch.randn(3, 32)
    k, down = block.k_proj, block.down
    assert isinstance(k, IA3Linear) and isinstance(down, IA3Linear)
    base_k, base_down = k.base_layer(), down.base_layer()
    with torch.no_grad():
        torch.testing.assert_close(k(x), k.ia3_l * F.linear(x, base_k.weight, base_k.bias))
        h = torch.randn(3, 64)
        want = F.linear(h * down.ia3_l, base_down.weight, base_down.bias)
        torch.testing.assert_close(down(h), want)


def test_merge_unmerge_and_merge_and_unload_are_exact() -> None:
    model = _model()
    base = snapshot(model)
    apply_ia3(model, **PAPER)
    perturb(model, seed=2, scale=0.5)
    with torch.no_grad():
        expected = model(_ids())
        report = peftkit.merge(model)
        assert len(report.merged) == 6 and not report.kept
        torch.testing.assert_close(model(_ids()), expected, atol=1e-6, rtol=0)
        peftkit.unmerge(model)
        restored = {
            k.replace(".base.", "."): v for k, v in snapshot(model).items() if "ia3" not in k
        }
        for key, value in base.items():
            torch.testing.assert_close(restored[key], value, atol=0, rtol=0, msg=key)
        plain = peftkit.merge_and_unload(model)
        assert not has_adapter_layers(plain)
        torch.testing.assert_close(plain(_ids()), expected, atol=1e-6, rtol=0)


def test_conv1d_bases_merge_exactly() -> None:
    from transformers import GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(gpt2_config()).eval()
    apply_ia3(model, targets=["c_attn", "mlp.c_proj"], feedforward=["mlp.c_proj"])
    perturb(model, seed=3, scale=0.5)
    with torch.no_grad():
        expected = model(_ids()).logits
        assert not peftkit.merge(model).kept
        torch.testing.assert_close(model(_ids()).logits, expected, atol=1e-5, rtol=0)
        peftkit.unmerge(model)
        torch.testing.assert_close(model(_ids()).logits, expected, atol=1e-5, rtol=0)


def test_a_feedforward_pattern_must_match_a_target() -> None:
    with pytest.raises(TargetError, match="feedforward entry"):
        apply_ia3(_model(), targets=["k_proj", "v_proj"], feedforward=["dwn"])


def test_config_errors_name_the_fix() -> None:
    with pytest.raises(ValueError, match=r"feedforward=\['down_proj'\]"):
        IA3Config(feedforward="down")
