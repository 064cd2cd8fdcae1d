"""Prefix-tuning: equivalence with a hand-built KV cache, generation with the cache, padding,
BERT classification, MLP folding, checkpoints, cache misuse and config errors."""

from __future__ import annotations

import copy
import inspect
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

import peftkit
from peftkit import PrefixConfig, apply_prefix, fold_prefix
from peftkit._compat import cache_argument, output_cache
from peftkit.methods.prefix import Prefix, UnsupportedModelError
from peftkit.methods.prefix.injection import ATTR, check_transformers_version

from helpers import has_adapter_layers, perturb
from zoo import CASES

transformers = pytest.importorskip("transformers")
from transformers import DynamicCache  # noqa: E402

DECODERS = ("gpt2", "llama")


def _small(kind: str, **extra: object) -> Callable[[], nn.Module]:
    """Tiny Llama-family models beyond the zoo (same size as the zoo's Llama)."""
    config_cls = {
        "mistral": transformers.MistralConfig,
        "qwen2": transformers.Qwen2Config,
        "qwen3": transformers.Qwen3Config,
    }[kind]
    model_cls = {
        "mistral": transformers.MistralForCausalLM,
        "qwen2": transformers.Qwen2ForCausalLM,
        "qwen3": transformers.Qwen3ForCausalLM,
    }[kind]
    fields = {"sliding_window": None, **extra} if kind == "mistral" else extra
    config = config_cls(
        vocab_size=50,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=64,
        **fields,
    )
    return lambda: model_cls(config)


BUILDERS: dict[str, Callable[[], nn.Module]] = {
    "gpt2": CASES["gpt2"].make,
    "llama": CASES["llama"].make,
    "bert": CASES["bert"].make,
    "mistral": _small("mistral"),
    "qwen2": _small("qwen2"),
    "qwen3": _small("qwen3"),
}


def _build(kind: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = BUILDERS[kind]().eval()
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.eos_token_id = None  # greedy runs never stop early
        model.generation_config.pad_token_id = 0
    return model


def _prefixed(kind: str, seed: int = 0, **fields: object) -> nn.Module:
    model = _build(kind, seed)
    apply_prefix(model, **{"prefix_length": 3, "init_std": 1.0, **fields})  # type: ignore[arg-type]
    return model


def _table(model: nn.Module, name: str = "default") -> torch.Tensor:
    method = peftkit.adapters(model)[name]
    assert isinstance(method, Prefix) and method.table is not None
    return method.table().detach()


def _hand_cache(model: nn.Module, kv: torch.Tensor, batch: int) -> DynamicCache:
    """A DynamicCache holding ``kv`` (layers, 2, heads, P, head_dim) for every example."""
    cache = DynamicCache(config=model.config)
    for i in range(kv.shape[0]):
        keys = kv[i, 0].unsqueeze(0).repeat(batch, 1, 1, 1)
        values = kv[i, 1].unsqueeze(0).repeat(batch, 1, 1, 1)
        cache.update(keys, values, i)
    return cache


def _kv(model: nn.Module, cache: object) -> dict[str, object]:
    """``cache`` under the name the installed transformers gives the argument (no FutureWarning)."""
    return {cache_argument(model): cache}


def _padded(left: bool, lengths: tuple[int, ...] = (6, 4), seed: int = 0):
    """Token ids (pad 0) and mask for sequences of ``lengths``, padded on the left or right."""
    gen = torch.Generator().manual_seed(seed)
    rows = [torch.randint(1, 20, (n,), generator=gen) for n in lengths]
    width = max(lengths)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for b, row in enumerate(rows):
        where = slice(width - len(row), width) if left else slice(0, len(row))
        ids[b, where] = row
        mask[b, where] = 1
    return rows, ids, mask


def _hand_positions(mask: torch.Tensor) -> torch.Tensor:
    """Position of each token counted from the first real one (pads at 0), computed per row."""
    out = torch.zeros_like(mask)
    for b in range(mask.shape[0]):
        first = int(mask[b].nonzero()[0])
        out[b, first:] = torch.arange(mask.shape[1] - first)
    return out * mask


def _logits(model: nn.Module, **inputs: object) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


def _reference(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, kv: torch.Tensor):
    """The base model (adapters off) fed ``kv`` as a cache by hand, the mask extended over it and
    positions counted by hand."""
    inputs = {
        "input_ids": ids,
        "attention_mask": torch.cat(
            [torch.ones_like(mask[:, :1]).expand(-1, kv.shape[3]), mask], 1
        ),
        "position_ids": _hand_positions(mask),
        cache_argument(model.base_model): _hand_cache(model, kv, ids.shape[0]),
    }
    with peftkit.disable_adapters(model), torch.no_grad():
        if isinstance(model, transformers.BertForSequenceClassification):
            # Its forward passes no cache on in transformers 4.x: feed the body, apply the head.
            return model.classifier(model.bert(**inputs).pooler_output)
        return model(**inputs).logits


# -- the reference: the prefixed model equals the base fed the same keys/values by hand ----------
@pytest.mark.parametrize("kind", ["gpt2", "llama", "mistral", "qwen2", "qwen3", "bert"])
def test_logits_equal_the_base_given_the_prefix_as_a_hand_built_cache(kind: str) -> None:
    model = _prefixed(kind)
    _, ids, mask = _padded(left=kind != "bert")
    adapted = _logits(model, input_ids=ids, attention_mask=mask)
    reference = _reference(model, ids, mask, _table(model))
    with peftkit.disable_adapters(model):
        base = _logits(
            model, input_ids=ids, attention_mask=mask, position_ids=_hand_positions(mask)
        )
    torch.testing.assert_close(adapted, reference, rtol=0, atol=0)
    # BERT's classifier logits are small (head init std 0.02); compare relative to their size
    assert (adapted - base).abs().max() > 0.02 * base.abs().max(), "the prefix had no effect"


def test_two_active_prefixes_are_concatenated_in_application_order() -> None:
    model = _prefixed("llama")
    apply_prefix(model, prefix_length=2, init_std=1.0, adapter_name="b")
    _, ids, mask = _padded(left=True)
    both = _logits(model, input_ids=ids, attention_mask=mask)
    kv = torch.cat([_table(model), _table(model, "b")], dim=3)
    torch.testing.assert_close(both, _reference(model, ids, mask, kv), rtol=0, atol=0)
    peftkit.set_active(model, "b")
    only_b = _logits(model, input_ids=ids, attention_mask=mask)
    peftkit.delete_adapter(model, "default")
    torch.testing.assert_close(_logits(model, input_ids=ids, attention_mask=mask), only_b)


@pytest.mark.parametrize("kind", ["gpt2", "llama", "bert"])
def test_positions_after_prefix_shifts_every_position_by_the_prefix_length(kind: str) -> None:
    """HF peft's convention: real tokens count the prefix, given or computed positions alike."""
    after, plain = _prefixed(kind, positions_after_prefix=True), _prefixed(kind)
    torch.testing.assert_close(_table(after), _table(plain), rtol=0, atol=0)
    _, ids, mask = _padded(left=kind != "bert")
    counted = _hand_positions(mask)
    got = _logits(after, input_ids=ids, attention_mask=mask)
    torch.testing.assert_close(
        got, _logits(plain, input_ids=ids, attention_mask=mask, position_ids=counted + 3)
    )
    given = _logits(after, input_ids=ids, attention_mask=mask, position_ids=counted)
    torch.testing.assert_close(given, got, rtol=0, atol=0)
    assert (got - _logits(plain, input_ids=ids, attention_mask=mask)).abs().max() > 1e-4


def test_active_prefixes_that_disagree_on_positions_are_refused() -> None:
    model = _prefixed("llama")
    apply_prefix(model, prefix_length=2, positions_after_prefix=True, adapter_name="b")
    with pytest.raises(
        ValueError, match=r"disagree on positions_after_prefix \(True for \['b'\]\)"
    ):
        _logits(model, input_ids=torch.tensor([[1, 2, 3]]))
    peftkit.set_active(model, "b")
    _logits(model, input_ids=torch.tensor([[1, 2, 3]]))  # one adapter alone is fine


# -- padding -------------------------------------------------------------------------------------
@pytest.mark.parametrize("left", [True, False], ids=["left", "right"])
@pytest.mark.parametrize("kind", DECODERS)
def test_padded_batch_gives_each_example_its_unpadded_output(kind: str, left: bool) -> None:
    model = _prefixed(kind)
    rows, ids, mask = _padded(left)
    batch = _logits(model, input_ids=ids, attention_mask=mask)
    for b, row in enumerate(rows):
        alone = _logits(model, input_ids=row.unsqueeze(0))[0]
        real = batch[b][mask[b].bool()]
        torch.testing.assert_close(real, alone, rtol=1e-4, atol=1e-5)


def test_bert_classifier_right_padding_does_not_change_an_examples_logits() -> None:
    # Right padding only: BERT classifies from the first token, which left padding makes a pad.
    model = _prefixed("bert")
    rows, ids, mask = _padded(left=False)
    batch = _logits(model, input_ids=ids, attention_mask=mask)
    for b, row in enumerate(rows):
        alone = _logits(model, input_ids=row.unsqueeze(0), attention_mask=torch.ones(1, len(row)))
        torch.testing.assert_close(batch[b], alone[0], rtol=1e-4, atol=1e-5)


# -- generation with the KV cache ----------------------------------------------------------------
def _greedy_by_recomputation(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, steps: int):
    """Greedy decoding that recomputes the whole sequence at every step (no cache)."""
    for _ in range(steps):
        logits = _logits(
            model, input_ids=ids, attention_mask=mask, position_ids=_hand_positions(mask)
        )
        ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    return ids


@pytest.mark.parametrize("kind", DECODERS)
def test_greedy_generate_with_cache_equals_full_recomputation(kind: str) -> None:
    model = _prefixed(kind)
    rows, ids, mask = _padded(left=True)
    generated = model.generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False
    )
    assert torch.equal(generated, _greedy_by_recomputation(model, ids, mask, 6))
    no_cache = model.generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, use_cache=False
    )
    assert torch.equal(no_cache, generated)
    embeds = model.get_input_embeddings()(ids)
    from_embeds = model.generate(
        inputs_embeds=embeds, attention_mask=mask, max_new_tokens=6, do_sample=False
    )
    assert torch.equal(from_embeds, generated[:, -6:])  # returns only the new tokens
    for b, row in enumerate(rows):
        alone = model.generate(input_ids=row.unsqueeze(0), max_new_tokens=6, do_sample=False)
        assert torch.equal(alone[0, -6:], generated[b, -6:])
    scores = {"output_logits": True, "return_dict_in_generate": True}
    adapted = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=1, **scores)
    with peftkit.disable_adapters(model):
        base = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=1, **scores)
    assert (adapted.logits[0] - base.logits[0]).abs().max() > 1e-2, "the prefix had no effect"


def test_beam_search_with_cache_equals_beam_search_without() -> None:
    model = _prefixed("llama")
    _, ids, mask = _padded(left=True)
    kwargs = {"max_new_tokens": 5, "num_beams": 3, "do_sample": False}
    with_cache = model.generate(input_ids=ids, attention_mask=mask, **kwargs)
    without = model.generate(input_ids=ids, attention_mask=mask, use_cache=False, **kwargs)
    assert torch.equal(with_cache, without)


def test_prompt_lookup_generation_equals_greedy_or_is_refused() -> None:
    model = _prefixed("llama")
    model.generation_config.eos_token_id = 49  # older versions' candidate search needs one
    ids = torch.tensor([[3, 4, 5, 6, 3, 4, 5, 6, 3, 4]])
    greedy = model.generate(input_ids=ids, max_new_tokens=8, do_sample=False)
    lookup = {"input_ids": ids, "max_new_tokens": 8, "do_sample": False}
    lookup["prompt_lookup_num_tokens"] = 3  # drafts tokens, then crops the cache on rejection
    crop = inspect.signature(transformers.cache_utils.DynamicLayer.crop).parameters
    if "tokens_to_remove" in crop:  # crops by a number of tokens: the prefix stays
        assert torch.equal(model.generate(**lookup), greedy)
    else:  # crops to an absolute length, which would cut into the prefix: refused, not wrong
        with pytest.raises(ValueError, match="cropped to an absolute length"):
            model.generate(attention_mask=torch.ones_like(ids), **lookup)


@pytest.mark.parametrize("kind", DECODERS)
def test_a_returned_cache_continues_the_sequence(kind: str) -> None:
    model = _prefixed(kind)
    ids = torch.randint(1, 20, (2, 7), generator=torch.Generator().manual_seed(3))
    full = _logits(model, input_ids=ids)
    with torch.no_grad():
        first = model(input_ids=ids[:, :4], use_cache=True)
        rest = model(input_ids=ids[:, 4:], **_kv(model, output_cache(first))).logits
    torch.testing.assert_close(rest, full[:, 4:], rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        plain = model(input_ids=ids, use_cache=False)
    assert output_cache(plain) is None  # as the base returns: no cache when none was asked for


def test_inputs_embeds_and_positional_arguments_reach_the_prefix() -> None:
    model = _prefixed("gpt2")
    _, ids, mask = _padded(left=True)
    expected = _logits(model, input_ids=ids, attention_mask=mask)
    embeds = model.get_input_embeddings()(ids)
    torch.testing.assert_close(_logits(model, inputs_embeds=embeds, attention_mask=mask), expected)
    names = list(inspect.signature(model.transformer.forward).parameters)
    args: list[object] = [None] * (names.index("attention_mask") + 1)
    args[0], args[-1] = ids, mask  # GPT2Model takes the cache (and more) before the mask
    with torch.no_grad():
        hidden = model.transformer(*args).last_hidden_state
    torch.testing.assert_close(model.lm_head(hidden), expected)


# -- cache misuse gets a clear error -------------------------------------------------------------
def test_a_cache_computed_without_the_prefix_is_refused() -> None:
    model = _prefixed("llama")
    ids = torch.randint(1, 20, (1, 5))
    with peftkit.disable_adapters(model), torch.no_grad():
        foreign = output_cache(model(input_ids=ids, use_cache=True))
    with pytest.raises(RuntimeError, match="computed without this prefix"):
        model(input_ids=ids[:, -1:], **_kv(model, foreign))


def test_a_prefix_cache_is_refused_once_the_active_prefixes_change() -> None:
    model = _prefixed("llama")
    ids = torch.randint(1, 20, (1, 5))
    with torch.no_grad():
        cache = output_cache(model(input_ids=ids, use_cache=True))
    with peftkit.disable_adapters(model), pytest.raises(RuntimeError, match="no prefix adapter"):
        model(input_ids=ids[:, -1:], **_kv(model, cache))
    apply_prefix(model, prefix_length=2, adapter_name="b")
    with pytest.raises(RuntimeError, match="start a new cache"):
        model(input_ids=ids[:, -1:], **_kv(model, cache))


def test_static_cache_and_bad_masks_are_refused() -> None:
    model = _prefixed("llama")
    ids = torch.randint(1, 20, (1, 5))
    static = transformers.StaticCache(config=model.config, max_cache_len=16)
    with pytest.raises(UnsupportedModelError, match="DynamicCache"):
        model(input_ids=ids, **_kv(model, static))
    with pytest.raises(ValueError, match="covers 4 tokens but the cache and input hold 5"):
        model(input_ids=ids, attention_mask=torch.ones(1, 4))
    with pytest.raises(ValueError, match="2-D attention_mask"):
        model(input_ids=ids, attention_mask=torch.ones(1, 1, 5, 5))


@pytest.mark.parametrize("which", ["all layers", "one layer"])
def test_activation_checkpointing_raises_a_clear_error_in_training(which: str) -> None:
    model = _prefixed("llama")
    if which == "one layer":
        model.model.layers[1].gradient_checkpointing = True  # as every_n_layers=2 leaves it
    else:  # activation_checkpointing_enable since transformers 5.x; the older name before
        getattr(model, "activation_checkpointing_enable", model.gradient_checkpointing_enable)()
    ids = torch.randint(1, 20, (1, 5))
    model.train()
    with pytest.raises(RuntimeError, match=r"activation_checkpointing_disable\(\)"):
        model(input_ids=ids)
    model.eval()
    model(input_ids=ids)  # checkpointing only acts in training; inference is fine
    for module in model.modules():
        if hasattr(module, "gradient_checkpointing"):
            module.gradient_checkpointing = False
    model.train()
    model(input_ids=ids).logits.sum().backward()


# -- unsupported models and versions -------------------------------------------------------------
@pytest.mark.parametrize(
    ("make", "message"),
    [
        (
            lambda: transformers.DistilBertModel(
                transformers.DistilBertConfig(dim=16, n_layers=1, n_heads=2, hidden_dim=32)
            ),
            r"no module of it takes one with an attention mask .* no place for extra keys",
        ),
        (
            lambda: transformers.GPT2LMHeadModel(
                transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, add_cross_attention=True)
            ),
            "cross-attention",
        ),
    ],
    ids=["no-cache", "cross-attention"],
)
def test_unsupported_attention_is_a_clear_error(
    make: Callable[[], nn.Module], message: str
) -> None:
    model = make()
    with pytest.raises(UnsupportedModelError, match=message):
        apply_prefix(model)
    assert not peftkit.adapters(model)
    assert not any(hasattr(m, ATTR) for m in model.modules())


@pytest.mark.parametrize("version", ["4.56.2", "3.0.0", "dev"])
def test_transformers_older_than_the_declared_window_is_refused(
    version: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(UnsupportedModelError, match=r"transformers>=4\.57\.1 \(tested through"):
        check_transformers_version(version)
    model = _build("gpt2")
    # transformers' lazy module may replace its sys.modules entry on first use: patch the live one
    monkeypatch.setattr(sys.modules["transformers"], "__version__", version)
    with pytest.raises(UnsupportedModelError, match=f"transformers {version} is installed"):
        apply_prefix(model)
    assert not peftkit.adapters(model)


def test_the_installed_transformers_is_in_the_supported_range() -> None:
    check_transformers_version(transformers.__version__)


# -- BERT classifier trains ----------------------------------------------------------------------
def test_bert_classifier_trains_its_prefix_and_head() -> None:
    model = _build("bert")
    apply_prefix(model, prefix_length=4, modules_to_save=["classifier"])
    _, ids, mask = _padded(left=False, lengths=(6, 4, 5, 3, 6, 2))
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    table = peftkit.adapters(model)["default"].table
    assert table is not None and table.key_values is not None
    start = table.key_values.detach().clone()
    opt = torch.optim.Adam(peftkit.trainable_parameters(model), lr=3e-2)
    model.train()
    losses = []
    for _ in range(30):
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        losses.append(loss.item())
        opt.step()
        opt.zero_grad()
    assert losses[-1] < 0.6 * losses[0], losses
    assert not torch.equal(table.key_values, start), "the prefix did not train"


# -- MLP re-parametrisation and folding ----------------------------------------------------------
def _mlp_model() -> nn.Module:
    return _prefixed("llama", mlp_hidden=16)


def test_training_through_the_mlp_reaches_embedding_and_mlp() -> None:
    model = _mlp_model()
    model.train()
    model(input_ids=torch.randint(1, 20, (2, 5))).logits.pow(2).mean().backward()
    params = list(peftkit.adapters(model)["default"].parameters())
    assert len(params) == 5  # embedding, W1, b1, W2, b2
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
    assert {id(p) for p in params} == {id(p) for p in model.parameters() if p.requires_grad}


def test_fold_prefix_drops_the_mlp_and_keeps_outputs_bit_exact() -> None:
    model = _mlp_model()
    _, ids, mask = _padded(left=True)
    before = _logits(model, input_ids=ids, attention_mask=mask)
    assert fold_prefix(model) == ["default"]
    assert fold_prefix(model) == []  # already plain
    after = _logits(model, input_ids=ids, attention_mask=mask)
    torch.testing.assert_close(after, before, rtol=0, atol=0)
    injector = getattr(model.base_model, ATTR)
    assert not any(isinstance(m, nn.Linear) for m in injector.modules())
    (table,) = peftkit.trainable_parameters(model)
    assert table.shape == (2, 2, 2, 3, 8)  # layers, k/v, kv heads, length, head dim
    with pytest.raises(KeyError, match="no adapter named"):
        fold_prefix(model, ["nope"])


def test_checkpoint_holds_the_folded_prefix_and_the_live_model_keeps_its_mlp(
    tmp_path: Path,
) -> None:
    model = _mlp_model()
    _, ids, mask = _padded(left=True)
    expected = _logits(model, input_ids=ids, attention_mask=mask)
    peftkit.save_adapter(model, tmp_path)
    doc, tensors = peftkit.checkpoint.read_checkpoint(tmp_path)
    assert {k: tuple(v.shape) for k, v in tensors.items()} == {
        "default.prefix.key_values": (2, 2, 2, 3, 8)
    }
    assert doc["adapters"][0]["state"] == {"folded": True}
    assert not peftkit.adapters(model)["default"].table.folded  # training can go on
    fresh = peftkit.load_adapter(_build("llama"), tmp_path)
    assert peftkit.adapters(fresh)["default"].table.folded
    torch.testing.assert_close(
        _logits(fresh, input_ids=ids, attention_mask=mask), expected, rtol=0, atol=0
    )


def test_loading_tensors_into_an_mlp_adapter_folds_it_to_them() -> None:
    source, target = _mlp_model(), _mlp_model()
    perturb(target, seed=1)
    peftkit.load_adapter_state_dict(target, peftkit.adapter_state_dict(source))
    assert peftkit.adapters(target)["default"].table.folded
    _, ids, mask = _padded(left=True)
    torch.testing.assert_close(
        _logits(target, input_ids=ids, attention_mask=mask),
        _logits(source, input_ids=ids, attention_mask=mask),
        rtol=0,
        atol=0,
    )


# -- initialisation from real tokens -------------------------------------------------------------
@pytest.mark.parametrize("kind", ["gpt2", "llama", "bert"])
def test_init_token_ids_takes_the_keys_and_values_the_model_computes_for_them(kind: str) -> None:
    model = _build(kind)
    tokens = [5, 9, 2]
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model.base_model(input_ids=torch.tensor([tokens]), **_kv(model.base_model, cache))
    apply_prefix(model, prefix_length=3, init_token_ids=tokens)
    table = _table(model)
    assert table.shape[0] == len(cache.layers)
    for i, layer in enumerate(cache.layers):
        torch.testing.assert_close(table[i, 0], layer.keys[0])
        torch.testing.assert_close(table[i, 1], layer.values[0])


def test_a_failed_apply_leaves_no_hook_or_table_behind() -> None:
    model = _build("gpt2")
    with pytest.raises(peftkit.TargetError, match="matched no module"):
        apply_prefix(model, modules_to_save=["no_such_head"])
    body = model.base_model
    assert not hasattr(body, ATTR) and not body._forward_pre_hooks and not body._forward_hooks
    assert not peftkit.adapters(model)


# -- lifecycle, composition, merging -------------------------------------------------------------
def test_unload_removes_the_hooks_and_deepcopies_stay_independent() -> None:
    model = _prefixed("llama")
    ids = torch.randint(1, 20, (1, 5))
    expected = _logits(model, input_ids=ids)
    twin = copy.deepcopy(model)
    torch.testing.assert_close(_logits(twin, input_ids=ids), expected, rtol=0, atol=0)
    peftkit.unload(twin)
    body = twin.base_model
    assert not hasattr(body, ATTR)
    assert not body._forward_pre_hooks and not body._forward_hooks
    torch.testing.assert_close(_logits(model, input_ids=ids), expected, rtol=0, atol=0)


def test_lora_applied_after_a_prefix_never_targets_the_prefix_mlp(tmp_path: Path) -> None:
    model = _mlp_model()
    peftkit.apply_lora(model, r=2, adapter_name="lora")
    injector = getattr(model.base_model, ATTR)
    assert not has_adapter_layers(injector)
    peftkit.adapters(model)["lora"].layers[0].lora_B.data.normal_()
    _, ids, mask = _padded(left=True)
    expected = _logits(model, input_ids=ids, attention_mask=mask)
    peftkit.save_adapter(model, tmp_path)
    fresh = peftkit.load_adapter(_build("llama"), tmp_path)
    torch.testing.assert_close(
        _logits(fresh, input_ids=ids, attention_mask=mask), expected, rtol=0, atol=0
    )


def test_merge_keeps_the_prefix_and_says_why() -> None:
    model = _prefixed("gpt2")
    ids = torch.randint(1, 20, (1, 5))
    expected = _logits(model, input_ids=ids)
    model, report = peftkit.merge_and_unload(model, report=True)
    assert report.merged == []
    assert "no weight update reproduces" in report.kept["default:prefix"]
    torch.testing.assert_close(_logits(model, input_ids=ids), expected, rtol=0, atol=0)
    assert "prefix" in peftkit.adapters(model)["default"].describe()


# -- config validation ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"prefix_length": 0}, "prefix_length must be a positive integer"),
        ({"prefix_length": True}, "prefix_length must be a positive integer"),
        ({"mlp_hidden": 0}, "mlp_hidden must be a positive integer"),
        ({"init_std": 0.0}, "init_std must be a positive finite number"),
        ({"init_std": float("nan")}, "init_std must be a positive finite number"),
        ({"init_token_ids": "abc"}, "init_token_ids must be a list of token ids"),
        ({"prefix_length": 2, "init_token_ids": [1, -1]}, "non-negative integers"),
        ({"prefix_length": 2, "init_token_ids": [1]}, "has 1 ids but prefix_length is 2"),
        (
            {"prefix_length": 1, "init_token_ids": [1], "mlp_hidden": 8},
            "use mlp_hidden=None with init_token_ids",
        ),
        ({"positions_after_prefix": "yes"}, "positions_after_prefix must be True or False"),
    ],
)
def test_bad_config_values_raise_errors_that_name_the_fix(
    fields: dict[str, object], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        PrefixConfig(**fields)  # type: ignore[arg-type]


def test_config_round_trips_through_json() -> None:
    config = PrefixConfig(prefix_length=2, init_token_ids=(3, 4), modules_to_save=("classifier",))
    assert PrefixConfig.from_dict(config.to_dict()) == config


def test_supported_model_types_still_answers_with_a_deprecation_warning() -> None:
    prefix_module = sys.modules["peftkit.methods.prefix"]
    with pytest.warns(DeprecationWarning, match="works on any transformers model"):
        assert "llama" in prefix_module.SUPPORTED_MODEL_TYPES


def test_cache_layers_without_plain_keys_and_values_are_refused_with_the_reason(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # As a state-space or linear-attention layer's cache would be: nothing a prefix can join.
    from peftkit import _compat

    monkeypatch.setattr(_compat, "is_fillable_dynamic", lambda cache: False)
    model = _build("llama")
    with pytest.raises(UnsupportedModelError, match=r"LlamaModel: its cache layers are \['Dyn"):
        apply_prefix(model)
    assert not peftkit.adapters(model)
    assert not any(hasattr(m, ATTR) for m in model.modules())


def test_the_body_is_the_innermost_module_that_takes_a_cache() -> None:
    opt = transformers.OPTForCausalLM(
        transformers.OPTConfig(
            vocab_size=50, hidden_size=16, num_hidden_layers=1, ffn_dim=32, num_attention_heads=2,
            word_embed_proj_dim=16,
        )
    )  # fmt: skip
    apply_prefix(opt, prefix_length=2)
    assert hasattr(opt.model.decoder, ATTR) and not hasattr(opt.model, ATTR)
