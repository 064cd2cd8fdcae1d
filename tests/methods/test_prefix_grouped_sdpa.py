"""``grouped_sdpa``: grouped-query SDPA under the explicit mask a prefix brings, through
transformers' public attention registry; outputs equal to the stock SDPA path, no repeated heads."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

import peftkit
from peftkit.methods.prefix import grouped_sdpa

from families import FAMILIES

transformers = pytest.importorskip("transformers")


def _llama() -> nn.Module:
    model = FAMILIES["llama"].build()  # 4 query heads, 2 key/value heads
    peftkit.apply_prefix(model, prefix_length=3, init_std=1.0)
    return model


def _padded() -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(4, 60, (2, 6), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    return ids, mask


def _key_heads(model: nn.Module, monkeypatch: pytest.MonkeyPatch, **inputs: Any) -> list[Any]:
    """(key heads, enable_gqa) of every torch SDPA call in one forward."""
    seen: list[Any] = []
    original = torch.nn.functional.scaled_dot_product_attention

    def spy(query: torch.Tensor, key: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        seen.append((int(key.shape[1]), bool(kwargs.get("enable_gqa", False))))
        return original(query, key, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    with torch.no_grad():
        model(**inputs)
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", original)
    return seen


def test_grouped_sdpa_keeps_the_key_value_heads_and_the_outputs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model = _llama()
    ids, mask = _padded()
    assert set(_key_heads(model, monkeypatch, input_ids=ids, attention_mask=mask)) == {(4, False)}
    with torch.no_grad():
        stock = model(input_ids=ids, attention_mask=mask).logits
    greedy = {"max_new_tokens": 4, "do_sample": False}
    stock_tokens = model.generate(input_ids=ids, attention_mask=mask, **greedy)
    assert grouped_sdpa(model) is True
    assert set(_key_heads(model, monkeypatch, input_ids=ids, attention_mask=mask)) == {(2, True)}
    with torch.no_grad():
        grouped = model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(grouped, stock, rtol=1e-5, atol=1e-6)
    assert torch.equal(model.generate(input_ids=ids, attention_mask=mask, **greedy), stock_tokens)
    assert grouped_sdpa(model) is False  # already on
    assert grouped_sdpa(model, enabled=False) is True
    assert model.config._attn_implementation == "sdpa"


def test_grouped_sdpa_trains_like_the_stock_path() -> None:
    ids, mask = _padded()
    grads = []
    for grouped in (False, True):
        model = _llama()
        if grouped:
            grouped_sdpa(model)
        model(input_ids=ids, attention_mask=mask).logits.pow(2).mean().backward()
        grads.append(next(p.grad for p in peftkit.trainable_parameters(model)))
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-6)


def test_grouped_sdpa_leaves_eager_attention_alone() -> None:
    import transformers as hf

    config = hf.AutoConfig.for_model("llama", **FAMILIES["llama"].fields, vocab_size=64,
                                     hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64)  # fmt: skip
    model = hf.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    with pytest.raises(ValueError, match="runs 'eager', which it leaves alone"):
        grouped_sdpa(model)
    assert model.config._attn_implementation == "eager"
