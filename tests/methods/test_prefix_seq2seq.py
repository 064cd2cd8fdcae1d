"""Prefix-tuning on encoder-decoder models (T5, BART): the encoder's attention computed by hand,
T5's relative position bias with the prefix, BART's positions, the pre-filled cross-attention
cache, checkpoints with generate(), training, and the refusals."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import peftkit
from peftkit import _compat
from peftkit.interop import InteropError, export_peft
from peftkit.methods.prefix import Prefix, UnsupportedModelError

from families import FAMILIES
from helpers import SEQ2SEQ_PREFIX, SEQ2SEQ_PREFIX_REFUSAL

transformers = pytest.importorskip("transformers")
needs_seq2seq_prefix = pytest.mark.skipif(
    not SEQ2SEQ_PREFIX, reason="prefix-tuning on encoder-decoder models needs transformers>=5.24.0"
)
P = 3


def _model(name: str, **fields: Any) -> nn.Module:
    model = FAMILIES[name].build()
    peftkit.apply_prefix(model, **{"prefix_length": P, "init_std": 1.0, **fields})
    return model


def _table(model: nn.Module) -> torch.Tensor:
    method = peftkit.adapters(model)["default"]
    assert isinstance(method, Prefix) and method.table is not None
    return method.table().detach()


def _ids(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(4, 60, (2, 5), generator=gen), torch.randint(4, 60, (2, 3), generator=gen)


def _captured(module: nn.Module, model: nn.Module, **inputs: Any) -> tuple[Any, Any, Any]:
    """(args, kwargs, output) of ``module``'s first call during one forward of ``model``."""
    seen: list[tuple[Any, Any, Any]] = []

    def hook(mod: nn.Module, args: Any, kwargs: Any, output: Any) -> None:
        seen.append((args, kwargs, output))

    handle = module.register_forward_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        handle.remove()
    return seen[0]


@needs_seq2seq_prefix
def test_bart_encoder_attention_attends_over_the_prefix_as_computed_by_hand() -> None:
    """softmax(q [P_k; K]ᵀ / √d) [P_v; V] in the first encoder layer, from its own projections."""
    model = _model("bart")
    ids, decoder_ids = _ids()
    attention = model.model.encoder.layers[0].self_attn
    args, kwargs, output = _captured(attention, model, input_ids=ids, decoder_input_ids=decoder_ids)
    hidden = kwargs.get("hidden_states", args[0] if args else None)
    kv = _table(model)[0]  # encoder layer 0: (2, heads, P, head_dim)
    b, s, _ = hidden.shape
    heads, dim = kv.shape[1], kv.shape[3]

    def split(x: torch.Tensor) -> torch.Tensor:
        return x.view(b, s, heads, dim).transpose(1, 2)

    with torch.no_grad():
        q = split(attention.q_proj(hidden))
        k = torch.cat([kv[0].expand(b, -1, -1, -1), split(attention.k_proj(hidden))], dim=2)
        v = torch.cat([kv[1].expand(b, -1, -1, -1), split(attention.v_proj(hidden))], dim=2)
        weights = torch.softmax(q @ k.transpose(-1, -2) / dim**0.5, dim=-1)
        expected = attention.out_proj((weights @ v).transpose(1, 2).reshape(b, s, -1))
    torch.testing.assert_close(output[0], expected, rtol=1e-5, atol=1e-5)


@needs_seq2seq_prefix
@pytest.mark.parametrize("side", ["encoder", "decoder"])
def test_t5_relative_bias_between_real_tokens_is_the_base_models(side: str) -> None:
    """With P cached prefix keys, T5 counts them as the P tokens before the input: the bias block
    between real tokens is the base model's, and the prefix columns get their own."""
    model = _model("t5")
    ids, decoder_ids = _ids()
    stack = model.encoder if side == "encoder" else model.decoder
    attention = stack.block[0].layer[0].SelfAttention
    inputs = {"input_ids": ids, "decoder_input_ids": decoder_ids}
    prefixed = _captured(attention, model, **inputs)[2][1]
    with peftkit.disable_adapters(model):
        base = _captured(attention, model, **inputs)[2][1]
    length = ids.shape[1] if side == "encoder" else decoder_ids.shape[1]
    assert prefixed.shape[-2:] == (length, P + length)
    torch.testing.assert_close(prefixed[..., P:], base, rtol=0, atol=0)


@needs_seq2seq_prefix
@pytest.mark.parametrize(("after", "first"), [(False, 0), (True, P)])
def test_bart_decoder_positions_do_not_shift_for_the_prefix(after: bool, first: int) -> None:
    """The decoder numbers positions from the cache length, which holds the prefix; peftkit takes
    it off again unless positions_after_prefix (peft's counting) is asked for. Decoding steps too."""
    model = _model("bart", positions_after_prefix=after)
    ids, _ = _ids()
    seen: list[torch.Tensor] = []
    embedding = model.model.decoder.embed_positions
    handle = embedding.register_forward_hook(
        lambda m, a, kw, out: seen.append(kw["position_ids"]), with_kwargs=True
    )
    try:
        model.generate(input_ids=ids, max_new_tokens=3, do_sample=False)
    finally:
        handle.remove()
    assert [int(p.reshape(-1)[0]) for p in seen] == [first, first + 1, first + 2]


@needs_seq2seq_prefix
def test_a_prefilled_cross_attention_cache_skips_the_encoder_so_the_prefix_is_seeded_unflagged() -> (
    None
):
    """transformers 5.24: an EncoderDecoderCache built over a cross-attention half that already holds
    keys flags those layers ``is_updated``, and cross-attention then reuses the cached keys without
    projecting the encoder's states (the source is ignored). peftkit seeds the halves after the
    cache is made, so the flags stay False and the first step appends the encoder's keys."""
    model = FAMILIES["bart"].build()
    ids, decoder_ids = _ids()
    other, _ = _ids(seed=5)
    keys = torch.randn(2, 4, P, 8)

    def prefilled() -> Any:
        own, cross = (transformers.DynamicCache(config=model.config) for _ in range(2))
        for i in range(2):
            cross.update(keys, keys, i)
        return transformers.EncoderDecoderCache(own, cross)

    cache = prefilled()
    assert _compat.cross_attention_updated(cache) == {0: True, 1: True}
    with torch.no_grad():
        one = model(input_ids=ids, decoder_input_ids=decoder_ids, cache=cache).logits
        two = model(input_ids=other, decoder_input_ids=decoder_ids, cache=prefilled()).logits
    torch.testing.assert_close(one, two, rtol=0, atol=0)  # the trap: the source made no difference

    peftkit.apply_prefix(model, prefix_length=P, init_std=1.0)
    fresh = _compat.new_encoder_decoder_cache(model.config)
    with torch.no_grad():
        one = model(input_ids=ids, decoder_input_ids=decoder_ids, cache=fresh).logits
        two = model(input_ids=other, decoder_input_ids=decoder_ids).logits
    assert fresh.cross_attention_cache.get_seq_length() == P + ids.shape[1]
    assert (one - two).abs().max() > 1e-3, "the source made no difference"


@needs_seq2seq_prefix
@pytest.mark.parametrize("name", ["t5", "bart"])
def test_a_saved_prefix_generates_the_same_tokens_and_scores_after_loading(
    name: str, tmp_path: Path
) -> None:
    model = _model(name, mlp_hidden=8)
    ids, _ = _ids()
    greedy: dict[str, Any] = {"max_new_tokens": 4, "do_sample": False, "output_scores": True}
    greedy["return_dict_in_generate"] = True
    before = model.generate(input_ids=ids, **greedy)
    peftkit.save_adapter(model, tmp_path)
    fresh = peftkit.load_adapter(FAMILIES[name].build(), tmp_path)
    after = fresh.generate(input_ids=ids, **greedy)
    assert torch.equal(before.sequences, after.sequences)
    for a, b in zip(before.scores, after.scores, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@needs_seq2seq_prefix
@pytest.mark.parametrize("name", ["t5", "bart"])
def test_training_the_prefix_lowers_the_loss(name: str) -> None:
    model = _model(name, init_std=0.02)
    ids, labels = _ids()
    opt = torch.optim.Adam(peftkit.trainable_parameters(model), lr=0.1)
    losses = []  # in eval mode: the tiny models' dropout would hide the trend in few steps
    for _ in range(10):
        loss = model(input_ids=ids, labels=labels).loss
        losses.append(float(loss))
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert all(b < a for a, b in itertools.pairwise(losses)), losses
    assert losses[-1] < losses[0] - 0.03, losses


@needs_seq2seq_prefix
def test_two_prefix_adapters_on_one_model_are_concatenated() -> None:
    model = _model("t5")
    peftkit.apply_prefix(model, prefix_length=2, init_std=1.0, adapter_name="other")
    ids, decoder_ids = _ids()
    attention = model.encoder.block[0].layer[0].SelfAttention
    bias = _captured(attention, model, input_ids=ids, decoder_input_ids=decoder_ids)[2][1]
    assert bias.shape[-1] == P + 2 + ids.shape[1]
    peftkit.delete_adapter(model, "other")
    peftkit.delete_adapter(model, "default")
    base = FAMILIES["t5"].build()
    with torch.no_grad():
        torch.testing.assert_close(
            model(input_ids=ids, decoder_input_ids=decoder_ids).logits,
            base(input_ids=ids, decoder_input_ids=decoder_ids).logits,
            rtol=0,
            atol=0,
        )


@needs_seq2seq_prefix
def test_a_cache_the_base_model_filled_is_refused() -> None:
    model = FAMILIES["t5"].build()
    ids, decoder_ids = _ids()
    with torch.no_grad():
        cache = model(input_ids=ids, decoder_input_ids=decoder_ids, use_cache=True).cache
    peftkit.apply_prefix(model, prefix_length=P)
    with pytest.raises(RuntimeError, match="computed without this prefix"):
        model(input_ids=ids, decoder_input_ids=decoder_ids[:, -1:], cache=cache)


@needs_seq2seq_prefix
def test_a_prefix_cache_is_refused_once_the_active_prefixes_change() -> None:
    model = _model("t5")
    ids, decoder_ids = _ids()
    with torch.no_grad():
        cache = model(input_ids=ids, decoder_input_ids=decoder_ids, use_cache=True).cache
    peftkit.apply_prefix(model, prefix_length=2, adapter_name="other")
    with pytest.raises(RuntimeError, match=r"holds the prefixes \[\('default', 3\)\].*start a new"):
        model(input_ids=ids, decoder_input_ids=decoder_ids[:, -1:], cache=cache)


@needs_seq2seq_prefix
def test_init_token_ids_is_refused_on_an_encoder_decoder_model() -> None:
    model = FAMILIES["t5"].build()
    with pytest.raises(UnsupportedModelError, match="initialise the prefix randomly"):
        peftkit.apply_prefix(model, prefix_length=2, init_token_ids=[5, 6])
    assert not peftkit.adapters(model)


@needs_seq2seq_prefix
def test_export_to_peft_is_refused_naming_the_layouts(tmp_path: Path) -> None:
    model = _model("t5")
    with pytest.raises(InteropError, match="decoder's self-attention only .* layouts differ"):
        export_peft(model, tmp_path, task_type="SEQ_2_SEQ_LM")
    assert not any(tmp_path.iterdir())


def test_an_older_transformers_refuses_encoder_decoder_prefixes_naming_the_version(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model = FAMILIES["bart"].build()
    monkeypatch.setattr(_compat, "transformers_version", lambda: "5.0.0")
    with pytest.raises(UnsupportedModelError, match=SEQ2SEQ_PREFIX_REFUSAL):
        peftkit.apply_prefix(model, prefix_length=2)
    assert not peftkit.adapters(model)
