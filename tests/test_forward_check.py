"""A base whose class replaces ``forward`` merges when its output is the layer's standard function
of its weight (checked numerically), and is refused, naming the real cause, when it is not."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import peftkit
from peftkit._forward_check import forward_mismatch

from helpers import has_adapter_layers, perturb

transformers = pytest.importorskip("transformers")


def _tiny_falcon(bias: bool) -> nn.Module:
    config = transformers.FalconConfig(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        bias=bias,
    )
    torch.manual_seed(0)
    return transformers.FalconForCausalLM(config).eval()


@pytest.mark.parametrize("bias", [False, True])
def test_falcon_linear_merges_and_gives_the_unmerged_output(bias: bool) -> None:
    from transformers.models.falcon.modeling_falcon import FalconLinear

    model = _tiny_falcon(bias)
    targets = ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]
    falcon = [m for m in model.modules() if type(m) is FalconLinear]
    assert falcon and all((m.bias is not None) == bias for m in falcon)
    peftkit.apply_lora(model, r=2, targets=targets)
    perturb(model, seed=1)
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(input_ids=ids).logits
        report = peftkit.merge(model)
        merged = model(input_ids=ids).logits
    assert not report.kept, report.kept
    assert len(report.merged) == 4 * 2
    torch.testing.assert_close(merged, before, rtol=1e-5, atol=1e-5)
    peftkit.unmerge(model)
    plain = peftkit.merge_and_unload(model)
    assert not has_adapter_layers(plain)
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=ids).logits, before, rtol=1e-5, atol=1e-5)


class ScaledEmbedding(nn.Embedding):
    """A T5 / Gemma-style embedding: the lookup times a constant."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return super().forward(input) * 4.0


class Holder(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.inner(x)
        return out


def test_a_scaled_embedding_is_refused_with_the_scale_measured() -> None:
    model = Holder(ScaledEmbedding(10, 4))
    peftkit.apply_lora(model, r=2, targets=["inner"])
    report = peftkit.merge(model)
    assert report.merged == []
    reason = report.kept["default:inner"]
    assert "its base ScaledEmbedding computes its own forward() (ScaledEmbedding)" in reason
    assert "not torch's Embedding.forward of its weight: it scales the output by 4;" in reason


def test_transformers_scaled_word_embedding_is_refused() -> None:
    from transformers.models.bart.modeling_bart import BartScaledWordEmbedding

    embedding = BartScaledWordEmbedding(12, 8, padding_idx=0, embed_scale=8**0.5)
    model = Holder(embedding)
    peftkit.apply_lora(model, r=2, targets=["inner"])
    reason = peftkit.merge(model).kept["default:inner"]
    assert "it scales the output by 2.82843" in reason


class ReluLinear(nn.Linear):
    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return super().forward(input).relu()


def test_a_forward_that_is_not_linear_in_the_weight_is_refused() -> None:
    model = Holder(ReluLinear(6, 5))
    peftkit.apply_lora(model, r=2, targets=["inner"])
    with pytest.warns(UserWarning, match="kept 1 layer"):
        peftkit.merge_and_unload(model)
    reason = peftkit.merge(model).kept["default:inner"]
    assert "not torch's Linear.forward of its weight: it differs from it by up to" in reason


class Counting(nn.Linear):
    """Linear in its weight, with state a probe must leave alone (a counter, dropout)."""

    def __init__(self, n: int) -> None:
        super().__init__(n, n)
        self.register_buffer("calls", torch.zeros(()))
        self.drop = nn.Dropout(0.5)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return nn.functional.linear(self.drop(input), self.weight, self.bias)


def test_the_check_leaves_buffers_modes_and_the_random_state_alone() -> None:
    layer = Counting(4).train()
    rng = torch.get_rng_state()
    assert forward_mismatch(layer) is None  # in eval mode the dropout is the identity
    assert layer.calls.item() == 0
    assert layer.training and layer.drop.training
    assert torch.equal(torch.get_rng_state(), rng)


def test_a_weight_without_data_is_refused_without_a_probe() -> None:
    from transformers.models.falcon.modeling_falcon import FalconLinear

    with torch.device("meta"):
        layer = FalconLinear(4, 4)
    reason = forward_mismatch(layer)
    assert reason is not None and "its weight holds no data here (meta or offloaded)" in reason


def test_torch_own_forward_is_not_probed() -> None:
    class Plain(nn.Linear):
        pass

    with torch.device("meta"):  # no probe could run on these
        assert forward_mismatch(nn.Linear(3, 3)) is None
        assert forward_mismatch(Plain(3, 3)) is None


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_falcon_linear_passes_in_16_bit(dtype: torch.dtype) -> None:
    from transformers.models.falcon.modeling_falcon import FalconLinear

    torch.manual_seed(0)
    layer = FalconLinear(64, 48, bias=True).to(dtype)
    assert forward_mismatch(layer) is None
