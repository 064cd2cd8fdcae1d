"""The architecture zoo (tests/families.py) × every built-in method: the contract on each family.

A (method, family) pair a method cannot handle is declared in ``refusal`` with the error it must
raise (and the model is left as it was); everything else must keep the contract: identity at
injection where the method starts at zero, trainable parameters exactly the adapter's, save → fresh
model → load identical, one optimiser step changes only adapter parameters, disable gives the base.
Prefix-tuning's own checks (the base fed the prefix by hand, generation with and without the cache,
left padding, beam search, fold_prefix) run on every decoder family below, and on every
encoder-decoder family (the decoder fed its prefixes by hand, generation, a padded encoder row,
beam search); the slow ones are marked ``slow``.
"""

from __future__ import annotations

import inspect
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import peftkit
from peftkit import (
    AdaLoraConfig,
    AdapterConfig,
    FullConfig,
    IA3Config,
    LoraConfig,
    MethodConfig,
    PrefixConfig,
)
from peftkit._compat import cache_argument
from peftkit.methods.prefix import Prefix, UnsupportedModelError
from peftkit.methods.prefix.injection import injector_of
from peftkit.methods.prefix.seq2seq import EncoderDecoderInjector
from peftkit.registry import spec
from peftkit.targeting import TargetError

from families import DECODERS, FAMILIES, PREFIX_FAMILIES, SEQ2SEQ, Family
from helpers import SEQ2SEQ_PREFIX, SEQ2SEQ_PREFIX_REFUSAL, perturb, snapshot

transformers = pytest.importorskip("transformers")

CONFIGS: dict[str, MethodConfig] = {
    "lora": LoraConfig(r=2, alpha=4),
    "adalora": AdaLoraConfig(init_r=4, target_r=2, total_steps=10, t_init=2, t_final=2),
    "adapter": AdapterConfig(form="houlsby", bottleneck=4),
    "full": FullConfig(top_layers=1),
    "ia3": IA3Config(),
    "prefix": PrefixConfig(prefix_length=3, init_std=1.0),
}
_FAST_PATH = (
    r"eval-mode fast path reads its submodules' weights"
    r"|reads out_proj's weight instead of calling it"
)


def refusal(method: str, family: Family) -> tuple[type[Exception], str] | None:
    """The error a pair must raise, or None when the method applies."""
    if method == "prefix" and family.prefix is not None:
        return UnsupportedModelError, re.escape(family.prefix)
    if method == "prefix" and family.kind == "seq2seq" and not SEQ2SEQ_PREFIX:
        return UnsupportedModelError, SEQ2SEQ_PREFIX_REFUSAL
    if family.kind == "torch" and method in ("lora", "adalora", "adapter", "ia3"):
        return Exception, _FAST_PATH  # torch's fused inference path bypasses wrapped submodules
    if method == "full" and family.name == "albert":  # one layer group, shared by every layer
        return TargetError, "no parameter sits in a block list named layers/h/layer/block"
    return None


BUILTIN = [n for n in peftkit.methods() if spec(n).method_cls.__module__.startswith("peftkit.")]
# In the default suite: one family for each mechanism (mixture of experts, multi-query, ALiBi, a
# body inside the body, sliding windows, encoders with and without a cache, speech, vision); the
# rest, and AdaLoRA (the slowest to set up), run with ``nox -s slow``.
FAST = {"mixtral", "falcon", "bloom", "opt", "gemma2", "roberta", "deberta-v2", "whisper", "vit"}
FAST |= {"t5", "bart"}  # encoder-decoder: relative positions, learned positions


# Pairs expected to fail, each with its reason; strict, so each fails as soon as it passes.
_OPEN: dict[tuple[str, str], str] = {}  # (method, family) -> why it is expected to fail


def _marked(method: str | None, name: str) -> Any:
    slow = name not in FAST or method == "adalora"
    marks: list[Any] = [pytest.mark.slow] if slow else []
    if (method, name) in _OPEN:
        marks.append(pytest.mark.xfail(reason=_OPEN[(method, name)], strict=True))
    return pytest.param(*([method] if method else []), name, marks=marks)


PAIRS = [_marked(m, f) for m in BUILTIN for f in FAMILIES]


def _build(family: Family) -> nn.Module:
    try:
        return family.build()
    except (ValueError, KeyError, ImportError, AttributeError) as err:
        pytest.skip(f"transformers {transformers.__version__} cannot build {family.name}: {err}")


def test_the_zoo_holds_at_least_25_transformers_families() -> None:
    assert len([f for f in FAMILIES.values() if f.kind != "torch"]) >= 25
    assert set(CONFIGS) == set(BUILTIN), "give every built-in method a zoo config"


@pytest.mark.parametrize(("method", "name"), PAIRS)
def test_contract_on_every_family(method: str, name: str, tmp_path: Path) -> None:
    family = FAMILIES[name]
    model = _build(family)
    config = CONFIGS[method]
    expected = refusal(method, family)
    if expected is not None:
        original = snapshot(model)
        with pytest.raises(expected[0], match=expected[1]):
            peftkit.apply(model, config)
        assert not peftkit.adapters(model)
        assert all(torch.equal(v, original[k]) for k, v in snapshot(model).items())
        return
    inputs = family.inputs()
    with torch.no_grad():
        base = family.output(model, inputs)
    peftkit.apply(model, config)
    method_obj = peftkit.adapters(model)["default"]
    with torch.no_grad():
        if type(method_obj).starts_at_identity:
            torch.testing.assert_close(family.output(model, inputs), base, rtol=0, atol=1e-6)
    owned = {id(p) for p in method_obj.parameters()}
    assert owned and {id(p) for p in model.parameters() if p.requires_grad} == owned
    perturb(model)
    _one_step_changes_only_the_adapter(model, family, owned)
    with torch.no_grad():
        adapted = family.output(model, inputs)
    peftkit.save_adapter(model, tmp_path)
    fresh = peftkit.load_adapter(family.build(), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(family.output(fresh.eval(), inputs), adapted, rtol=0, atol=0)
    if method_obj.restorable:
        with peftkit.disable_adapters(model), torch.no_grad():
            torch.testing.assert_close(family.output(model, inputs), base, rtol=0, atol=0)


def _one_step_changes_only_the_adapter(model: nn.Module, family: Family, owned: set[int]) -> None:
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    # Adam's first step moves every parameter with a non-zero gradient by about lr, whatever the
    # gradient's size: on a tiny random ViT, IA3's gradients are ~1e-10, which an SGD step would
    # leave below float32's resolution at 1.0.
    opt = torch.optim.Adam(peftkit.trainable_parameters(model), lr=1e-2)
    model.train()
    family.output(model).float().pow(2).mean().backward()
    opt.step()
    model.eval()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed, "the step changed nothing"
    assert changed <= {n for n, p in model.named_parameters() if id(p) in owned}


# -- adapter presets: derived from the structure, sized by the closed form ----------------------
ADAPTED = [f.name for f in FAMILIES.values() if refusal("adapter", f) is None]


@pytest.mark.parametrize("name", [_marked(None, n) for n in ADAPTED])
@pytest.mark.parametrize("form", ["pfeiffer", "houlsby"])
def test_adapter_presets_place_one_adapter_per_block_with_the_closed_form_size(
    name: str, form: str
) -> None:
    """m = 4, stream width d: each adapter holds down (m·d + m) and up (d·m + d) = 2dm + m + d."""
    family = FAMILIES[name]
    model = _build(family)
    peftkit.apply_adapter(model, form=form, bottleneck=4, train_head=False)
    layers = peftkit.adapters(model)["default"].layers
    widths = [layer.width for layer in layers]  # type: ignore[attr-defined]
    expected = sum(2 * d * 4 + 4 + d for d in widths)
    assert sum(p.numel() for p in peftkit.trainable_parameters(model)) == expected
    blocks = _block_count(model)
    per_block = 2 if form == "houlsby" else 1
    if family.kind in ("seq2seq", "speech"):  # decoder blocks also adapt their cross-attention
        assert len(layers) >= per_block * blocks
    else:
        assert len(layers) == per_block * blocks, [layer.path for layer in layers]
    assert set(widths) == {_width(model)}


def _block_count(model: nn.Module) -> int:
    from peftkit.methods.adapter_places import _blocks

    return len(_blocks(model))


def _width(model: nn.Module) -> int:
    config = model.config
    for name in ("hidden_size", "d_model", "dim", "n_embd"):
        if isinstance(getattr(config, name, None), int):
            return int(getattr(config, name))
    raise AssertionError("no width in the config")


# -- prefix-tuning on every decoder family -------------------------------------------------------
def _prefixed(family: Family, **fields: Any) -> nn.Module:
    model = _build(family)
    peftkit.apply_prefix(model, **{"prefix_length": 3, "init_std": 1.0, **fields})
    return model


def _left_padded(seed: int = 0) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    rows = [torch.randint(4, 60, (n,), generator=gen) for n in (6, 4)]
    ids = torch.zeros(2, 6, dtype=torch.long)
    mask = torch.zeros(2, 6, dtype=torch.long)
    for b, row in enumerate(rows):
        ids[b, 6 - len(row) :], mask[b, 6 - len(row) :] = row, 1
    return rows, ids, mask


def _logits(model: nn.Module, **inputs: Any) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


def _table(model: nn.Module) -> torch.Tensor:
    method = peftkit.adapters(model)["default"]
    assert isinstance(method, Prefix) and method.table is not None
    return method.table().detach()


@pytest.mark.parametrize("name", [_marked(None, f.name) for f in DECODERS])
def test_prefix_equals_the_base_fed_the_prefix_as_a_hand_built_cache(name: str) -> None:
    model = _prefixed(FAMILIES[name])
    ids = torch.randint(4, 60, (2, 5), generator=torch.Generator().manual_seed(1))
    adapted = _logits(model, input_ids=ids)
    kv = _table(model)
    cache = transformers.DynamicCache(config=model.config)
    for i in range(kv.shape[0]):
        cache.update(kv[i, 0].expand(2, -1, -1, -1), kv[i, 1].expand(2, -1, -1, -1), i)
    hand = {cache_argument(model): cache, "attention_mask": torch.ones(2, 3 + 5, dtype=torch.long)}
    if "position_ids" in inspect.signature(model.forward).parameters:  # ALiBi (Bloom) takes none
        hand["position_ids"] = torch.arange(5).expand(2, -1)
    with peftkit.disable_adapters(model):
        reference = _logits(model, input_ids=ids, **hand)
        base = _logits(model, input_ids=ids)
    torch.testing.assert_close(adapted, reference, rtol=1e-5, atol=1e-5)
    assert (adapted - base).abs().max() > 1e-3, "the prefix had no effect"


@pytest.mark.parametrize("name", [_marked(None, f.name) for f in DECODERS])
def test_prefix_generation_with_and_without_cache_and_left_padding(name: str) -> None:
    model = _prefixed(FAMILIES[name])
    rows, ids, mask = _left_padded()
    greedy = {"max_new_tokens": 4, "do_sample": False}
    cached = model.generate(input_ids=ids, attention_mask=mask, **greedy)
    uncached = model.generate(input_ids=ids, attention_mask=mask, use_cache=False, **greedy)
    assert torch.equal(cached, uncached)
    window = getattr(model.config, "sliding_window", None)
    if window is not None and window < 3 + 6 + 4:
        # On a sliding-window layer the prefix is seen while it is inside the window, and left
        # pads take window places: a padded row loses its prefix sooner than the row alone.
        return
    for b, row in enumerate(rows):
        alone = model.generate(input_ids=row.unsqueeze(0), **greedy)
        assert torch.equal(alone[0, -4:], cached[b, -4:]), f"row {b} differs when padded"


@pytest.mark.slow
@pytest.mark.parametrize("name", [f.name for f in DECODERS])
def test_prefix_beam_search_with_cache_equals_without(name: str) -> None:
    model = _prefixed(FAMILIES[name])
    _, ids, mask = _right_padded()
    beams = {"max_new_tokens": 4, "num_beams": 3, "do_sample": False}
    with_cache = model.generate(input_ids=ids, attention_mask=mask, **beams)
    without = model.generate(input_ids=ids, attention_mask=mask, use_cache=False, **beams)
    assert torch.equal(with_cache, without)


PREFIXED = [f for f in PREFIX_FAMILIES if SEQ2SEQ_PREFIX or f.kind != "seq2seq"]


@pytest.mark.parametrize("name", [_marked(None, f.name) for f in PREFIXED])
def test_fold_prefix_keeps_outputs_bit_exact_on_every_family(name: str) -> None:
    family = FAMILIES[name]
    model = _prefixed(family, mlp_hidden=8)
    inputs = family.inputs()
    with torch.no_grad():
        before = family.output(model, inputs)
    assert peftkit.fold_prefix(model) == ["default"]
    with torch.no_grad():
        torch.testing.assert_close(family.output(model, inputs), before, rtol=0, atol=0)


# -- prefix-tuning on every encoder-decoder family ------------------------------------------------
needs_seq2seq_prefix = pytest.mark.skipif(
    not SEQ2SEQ_PREFIX, reason="prefix-tuning on encoder-decoder models needs transformers>=5.24.0"
)


def _seq2seq_inputs(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(4, 60, (2, 5), generator=gen), torch.randint(4, 60, (2, 3), generator=gen)


@needs_seq2seq_prefix
@pytest.mark.parametrize("name", [_marked(None, f.name) for f in SEQ2SEQ])
def test_seq2seq_prefix_decoder_equals_the_base_fed_a_hand_built_cache(name: str) -> None:
    """Given the prefixed encoder's states, the prefixed decoder equals the base decoder fed an
    EncoderDecoderCache holding the self-attention and cross-attention prefixes (masks over them).
    Learned positions count the cached prefix there, so this compares positions_after_prefix."""
    model = _prefixed(FAMILIES[name], positions_after_prefix=True)
    ids, decoder_ids = _seq2seq_inputs()
    adapted = _logits(model, input_ids=ids, decoder_input_ids=decoder_ids)
    with torch.no_grad():
        states = model.get_encoder()(input_ids=ids)
    found = injector_of(model)
    assert found is not None and isinstance(found[1], EncoderDecoderInjector)
    kv, layers = _table(model), found[1].places.decoder_layers
    first = kv.shape[0] - 2 * layers
    own, cross = (
        transformers.DynamicCache(config=model.config),
        transformers.DynamicCache(config=model.config),
    )
    for i in range(layers):
        own.update(
            kv[first + i, 0].expand(2, -1, -1, -1), kv[first + i, 1].expand(2, -1, -1, -1), i
        )
        j = first + layers + i
        cross.update(kv[j, 0].expand(2, -1, -1, -1), kv[j, 1].expand(2, -1, -1, -1), i)
    cache = transformers.EncoderDecoderCache(own, cross)
    cache.is_updated = {i: False for i in range(layers)}  # the encoder's keys still to be appended
    hand = {
        cache_argument(model): cache,
        "encoder_outputs": states,
        "attention_mask": torch.ones(2, 3 + 5, dtype=torch.long),
        "decoder_attention_mask": torch.ones(2, 3 + 3, dtype=torch.long),
    }
    with peftkit.disable_adapters(model):
        reference = _logits(model, decoder_input_ids=decoder_ids, **hand)
        base = _logits(model, input_ids=ids, decoder_input_ids=decoder_ids)
    torch.testing.assert_close(adapted, reference, rtol=1e-5, atol=1e-5)
    assert (adapted - base).abs().max() > 1e-3, "the prefix had no effect"
    assert cache.cross_attention_cache.get_seq_length() == 3 + 5  # [prefix; encoder]


def _right_padded(seed: int = 0) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    rows, _, _ = _left_padded(seed)
    ids = torch.zeros(2, 6, dtype=torch.long)
    mask = torch.zeros(2, 6, dtype=torch.long)
    for b, row in enumerate(rows):
        ids[b, : len(row)], mask[b, : len(row)] = row, 1
    return rows, ids, mask


def _generated(model: nn.Module, **inputs: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy tokens and the scores of every step, (batch, steps, vocab)."""
    out = model.generate(
        **inputs,
        max_new_tokens=4,
        do_sample=False,
        output_scores=True,
        return_dict_in_generate=True,
    )
    return out.sequences, torch.stack(out.scores, dim=1)


@needs_seq2seq_prefix
@pytest.mark.parametrize("name", [_marked(None, f.name) for f in SEQ2SEQ])
def test_seq2seq_prefix_generation_with_and_without_cache_and_a_padded_encoder_row(
    name: str,
) -> None:
    """Tiny random models often pick the same tokens whatever the input, so the scores of every
    step are compared too. The source is padded on the right, as seq2seq tokenizers do: BART's
    encoder numbers positions without looking at the mask, and T5's relative bias would put
    left pads between the prefix and the real tokens."""
    model = _prefixed(FAMILIES[name])
    rows, ids, mask = _right_padded()
    tokens, scores = _generated(model, input_ids=ids, attention_mask=mask)
    uncached, uncached_scores = _generated(
        model, input_ids=ids, attention_mask=mask, use_cache=False
    )
    assert torch.equal(tokens, uncached)
    torch.testing.assert_close(scores, uncached_scores, rtol=1e-5, atol=1e-5)
    for b, row in enumerate(rows):
        alone, alone_scores = _generated(model, input_ids=row.unsqueeze(0))
        assert torch.equal(alone[0], tokens[b]), f"row {b} differs when its source is padded"
        torch.testing.assert_close(alone_scores[0], scores[b], rtol=1e-5, atol=1e-5)
    with peftkit.disable_adapters(model):
        _, base_scores = _generated(model, input_ids=ids, attention_mask=mask)
    assert (base_scores - scores).nan_to_num(0.0).abs().max() > 1e-3, "the prefix had no effect"


@pytest.mark.slow
@needs_seq2seq_prefix
@pytest.mark.parametrize("name", [f.name for f in SEQ2SEQ])
def test_seq2seq_prefix_beam_search_with_cache_equals_without(name: str) -> None:
    model = _prefixed(FAMILIES[name])
    _, ids, mask = _right_padded()
    beams = {"max_new_tokens": 4, "num_beams": 3, "do_sample": False}
    with_cache = model.generate(input_ids=ids, attention_mask=mask, **beams)
    without = model.generate(input_ids=ids, attention_mask=mask, use_cache=False, **beams)
    assert torch.equal(with_cache, without)
