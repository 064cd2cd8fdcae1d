"""Every touch point between peftkit and transformers' internals (src/peftkit/_compat/), checked on
the installed transformers. A failure here names the version and the piece that moved, before any
feature test fails for a reason that is harder to read."""

from __future__ import annotations

import inspect
import re
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import peftkit
from peftkit import _compat
from peftkit._compat import UnsupportedModelError

from families import FAMILIES
from helpers import SEQ2SEQ_PREFIX, pyproject
from zoo import CASES

transformers = pytest.importorskip("transformers")
VERSION = transformers.__version__


def _where(piece: str) -> str:
    return f"transformers {VERSION}: {piece} (see src/peftkit/_compat/)"


@pytest.mark.parametrize("kind", ["gpt2", "llama", "bert"])
def test_the_cache_argument_is_found_in_the_signature(kind: str) -> None:
    body = CASES[kind].build().base_model
    name = _compat.cache_argument(body)
    assert name in inspect.signature(body.forward).parameters, _where(f"{name} not taken")
    # From 5.24 the argument is `cache`; the old name only survives through a warning shim.
    if hasattr(transformers.utils.generic, "_rename_kwargs_for_bc"):
        assert name == "cache", _where("the renamed cache argument")


def test_a_module_without_a_cache_argument_is_refused_naming_the_version() -> None:
    with pytest.raises(
        UnsupportedModelError, match=rf"takes no KV cache .* transformers {VERSION}"
    ):
        _compat.cache_argument(nn.Linear(2, 2))


def test_take_cache_accepts_either_name_and_refuses_both() -> None:
    for name in _compat.CACHE_ARGUMENTS:
        kwargs = {name: "c", "input_ids": 1}
        assert _compat.take_cache(kwargs) == "c" and kwargs == {"input_ids": 1}
    with pytest.raises(ValueError, match="pass the KV cache once"):
        _compat.take_cache({"cache": 1, "past_key_values": 2})
    assert _compat.take_cache({"past_key_values": None}) is None


def test_the_returned_cache_is_found_and_can_be_dropped() -> None:
    model = CASES["llama"].build()
    ids = torch.randint(1, 20, (1, 4))
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=True)
    cache = _compat.output_cache(out)
    assert cache is not None and cache.get_seq_length() == 4, _where("the output's cache field")
    dropped = _compat.without_cache(out)
    assert type(dropped) is type(out) and _compat.output_cache(dropped) is None
    torch.testing.assert_close(dropped.logits, out.logits)
    assert _compat.output_cache(torch.zeros(1)) is None


def test_a_dynamic_cache_has_per_layer_keys_and_values() -> None:
    model = CASES["llama"].build()
    body = model.base_model
    cache = _compat.new_dynamic_cache(model.config)
    with torch.no_grad():
        body(input_ids=torch.randint(1, 20, (2, 5)), **{_compat.cache_argument(body): cache})
    pairs = _compat.cached_keys_values(cache)
    shape = (2, model.config.num_key_value_heads, 5, model.config.head_dim)
    assert len(pairs) == model.config.num_hidden_layers, _where("DynamicCache.layers")
    assert all(k.shape == shape and v.shape == shape for k, v in pairs), _where("layer.keys")
    assert _compat.is_full_attention_dynamic(cache), _where("DynamicLayer as the layer class")


def _windowed_config() -> transformers.PretrainedConfig:
    """A tiny Mistral whose attention layers use a 4-token sliding window."""
    return transformers.MistralConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=50,
        sliding_window=4,
    )


def test_cache_layer_kinds_tell_full_from_sliding_window_attention() -> None:
    full = _compat.full_attention_layer_name()
    assert _compat.cache_layer_kinds(CASES["llama"].build().config) == [full]
    windowed = _windowed_config()
    assert _compat.cache_layer_kinds(windowed) != [full], _where("sliding-window cache layers")


def test_a_static_cache_is_not_a_fillable_dynamic_cache() -> None:
    config = CASES["llama"].build().config
    static = transformers.StaticCache(config=config, max_cache_len=8)
    assert not _compat.is_full_attention_dynamic(static)
    assert not _compat.is_full_attention_dynamic(object())


def test_a_missing_cache_class_is_named_with_the_version(monkeypatch: pytest.MonkeyPatch) -> None:
    import transformers.cache_utils as cache_utils

    monkeypatch.delattr(cache_utils, "DynamicLayer")
    with pytest.raises(
        UnsupportedModelError, match=rf"transformers {VERSION} lacks .*DynamicLayer"
    ):
        _compat.new_dynamic_cache(None)


def test_checkpointing_is_switched_on_through_whichever_name_exists() -> None:
    model = CASES["llama"].build()
    flagged = _compat.checkpointing_modules(model)
    assert flagged, _where("the per-module gradient_checkpointing flag")
    _compat.enable_checkpointing(model, use_reentrant=False)
    assert any(m.gradient_checkpointing for m in flagged), _where("checkpointing enable method")
    with pytest.raises(ValueError, match="needs an HF model"):
        _compat.enable_checkpointing(nn.Linear(2, 2))


def test_gpt2_conv1d_is_recognised() -> None:
    model = CASES["gpt2"].build()
    conv1d = _compat.conv1d_class()
    assert conv1d is not None, _where("transformers.pytorch_utils.Conv1D")
    assert isinstance(model.transformer.h[0].attn.c_attn, conv1d)


@pytest.mark.parametrize("version", ["4.56.2", "4.57.0", "4.0", "dev"])
def test_a_version_older_than_the_window_is_refused_stating_both(version: str) -> None:
    with pytest.raises(UnsupportedModelError) as raised:
        _compat.check_transformers_version(version, "prefix-tuning")
    message = str(raised.value)
    assert f"transformers {version} is installed" in message
    assert _compat.transformers_window() in message and _compat.TRANSFORMERS_TESTED in message


def test_the_installed_version_is_inside_the_window() -> None:
    _compat.check_transformers_version(VERSION)


def test_pyproject_declares_the_window_compat_enforces() -> None:
    (declared,) = [r for r in pyproject()["dependencies"] if r.startswith("transformers")]
    assert declared == _compat.transformers_window()


@pytest.mark.parametrize("kind", ["gpt2", "llama", "bert"])
def test_peftkits_own_calls_raise_no_future_warning(kind: str) -> None:
    """Training a prefix and generating with it through the cache, with FutureWarning as an error."""
    case = CASES[kind]
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        model = case.build()
        peftkit.apply_prefix(model, prefix_length=2, init_token_ids=[3, 4])
        case.loss(model).backward()
        if kind != "bert":
            model.eval()
            ids = torch.randint(1, 20, (1, 3))
            with torch.no_grad():
                model.generate(input_ids=ids, max_new_tokens=3, do_sample=False, pad_token_id=0)
                first = model(input_ids=ids, use_cache=True)
                model(input_ids=ids[:, -1:], **_cache_kwargs(model, first))


def _cache_kwargs(model: nn.Module, output: object) -> dict[str, object]:
    return {_compat.cache_argument(model): _compat.output_cache(output)}


@pytest.mark.parametrize(
    ("kind", "heads"), [("bert", ["classifier"]), ("gpt2", []), ("llama", []), ("t5", [])]
)
def test_the_task_head_is_what_sits_beside_the_body(kind: str, heads: list[str]) -> None:
    model = CASES[kind].build()
    prefix = type(model).base_model_prefix
    assert isinstance(prefix, str), _where("PreTrainedModel.base_model_prefix")
    if kind in ("gpt2", "llama"):  # the language-model head is named by the output embeddings
        assert model.get_output_embeddings() is model.lm_head, _where("get_output_embeddings()")
    assert _compat.task_heads(model) == heads, _where("the body under base_model_prefix")


def test_declared_tied_keys_are_read_in_either_form() -> None:
    model = CASES["gpt2"].build()
    declared = type(model)._tied_weights_keys
    assert declared, _where("GPT2LMHeadModel._tied_weights_keys")
    assert "lm_head" in _compat.models._tied_names(model), _where("_tied_weights_keys keys")


def test_save_pretrained_writes_the_state_dict_it_is_given(tmp_path: Path) -> None:
    from safetensors import safe_open

    model = CASES["llama"].build()
    assert _compat.save_pretrained_state_dict_argument(model), _where(
        "save_pretrained(state_dict=)"
    )
    given = model.state_dict()
    expected = given["model.norm.weight"] = given["model.norm.weight"] + 1.0
    model.save_pretrained(tmp_path, state_dict=given)  # it may empty the dict as it writes
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as f:
        written = f.get_tensor("model.norm.weight")
    assert torch.equal(written, expected), _where("save_pretrained(state_dict=)")


def test_the_hf_trainer_saves_through_the_models_own_save_pretrained(tmp_path: Path) -> None:
    model = CASES["llama"].build()
    calls: list[object] = []

    def plain(module: nn.Module, state_dict: object) -> object:
        calls.append(state_dict)
        return module.state_dict() if state_dict is None else state_dict

    assert _compat.hook_save_pretrained(model, plain)
    args = transformers.TrainingArguments(str(tmp_path), report_to="none", use_cpu=True)
    transformers.Trainer(model=model, args=args).save_model(str(tmp_path / "out"))
    assert calls, _where("Trainer.save_model -> model.save_pretrained (looked up on the instance)")
    assert (tmp_path / "out" / "model.safetensors").exists(), _where("Trainer.save_model's files")
    _compat.unhook_save_pretrained(model)
    assert "save_pretrained" not in model.__dict__


@pytest.mark.parametrize("kind", ["t5", "gpt2"])
def test_hf_models_offer_example_inputs_for_a_trial_forward(kind: str) -> None:
    """The probe for modules the forward never calls (T5's ``shared``) runs on these."""
    model = CASES[kind].build()
    inputs = _compat.dummy_inputs(model)
    assert inputs, _where("PreTrainedModel.dummy_inputs is gone or empty")
    with torch.no_grad():
        model(**inputs)  # the model runs on its own example inputs
    assert _compat.dummy_inputs(nn.Linear(2, 2)) is None


def test_full_and_sliding_window_dynamic_layers_are_fillable_and_others_are_not() -> None:
    names = _compat.fillable_layer_names()
    assert names[0] == _compat.full_attention_layer_name()
    assert "DynamicSlidingWindowLayer" in names, _where("cache_utils.DynamicSlidingWindowLayer")
    windowed = _windowed_config()
    assert _compat.is_fillable_dynamic(_compat.new_dynamic_cache(windowed))
    static = transformers.StaticCache(config=windowed, max_cache_len=8)
    assert not _compat.is_fillable_dynamic(static)
    assert not _compat.is_fillable_dynamic(object())


def test_attention_modules_declare_whether_they_are_causal() -> None:
    assert _compat.causal_flags(CASES["llama"].build()) == {True}, _where("is_causal on Llama")
    assert _compat.causal_flags(CASES["bert"].build()) == {False}, _where("is_causal on BERT")
    assert _compat.causal_flags(nn.Linear(2, 2)) == set()


def test_hf_models_name_their_blocks_for_sharding() -> None:
    blocks = {kind: _compat.no_split_modules(CASES[kind].build()) for kind in ("gpt2", "llama")}
    assert blocks == {"gpt2": ["GPT2Block"], "llama": ["LlamaDecoderLayer"]}, _where(
        f"_no_split_modules gave {blocks}"
    )
    assert _compat.no_split_modules(nn.Linear(2, 2)) == []


def test_peft_attention_out_count_is_found_on_the_installed_peft(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    peft = pytest.importorskip("peft")
    release = tuple(int(n) for n in re.findall(r"\d+", peft.__version__)[:3])
    count = _compat.peft_attention_out_count()
    where = f"peft {peft.__version__}: LoRA on nn.MultiheadAttention (see src/peftkit/_compat/)"
    assert count in (1, 2), where
    if release <= (0, 21, 2):  # its merge adds the update twice
        assert count == 2, where
    _compat.peft_attention_out_count.cache_clear()
    monkeypatch.setitem(sys.modules, "peft", None)  # as if peft were not installed
    try:
        assert _compat.peft_attention_out_count() == 2
    finally:
        _compat.peft_attention_out_count.cache_clear()


@pytest.mark.skipif(
    not SEQ2SEQ_PREFIX,
    reason="on transformers before 5.24 (4.57.1 checked) T5's encoder attention does not put its "
    "keys through a given cache; encoder-decoder prefixes are refused there",
)
@pytest.mark.parametrize("kind", ["t5", "bart"])
def test_encoder_attention_modules_put_their_keys_through_a_given_cache(kind: str) -> None:
    """Prefix-tuning's encoder prefix: each encoder attention module takes ``cache=`` (its stack
    passes none) and calls ``update`` once; its output changes with the prepended keys."""
    model = FAMILIES[kind].build()
    encoder = model.get_encoder()
    attention = next(
        m for m in encoder.modules() if hasattr(m, "layer_idx") and "Attention" in type(m).__name__
    )
    hidden = torch.randn(1, 4, model.config.d_model)
    argument = _compat.cache_argument(attention)
    recorder = _compat.PrependingCache(None, None)
    with torch.no_grad():
        plain = attention(hidden, **{argument: recorder})[0]
    assert len(recorder.calls) == 1, _where(f"{type(attention).__name__} calls cache.update once")
    heads, dim = recorder.calls[0][1], recorder.calls[0][3]
    prefix = _compat.PrependingCache(torch.randn(1, heads, 2, dim), torch.randn(1, heads, 2, dim))
    with torch.no_grad():
        prefixed = attention(hidden, **{argument: prefix})[0]
    assert (prefixed - plain).abs().max() > 1e-4, _where("the cache's keys reach the attention")


def test_an_encoder_decoder_cache_over_a_filled_cross_half_reuses_it() -> None:
    """``EncoderDecoderCache.__init__`` flags layers whose cross-attention half holds keys as
    ``is_updated`` (reused as they are); one made empty and filled later stays unflagged."""
    config = FAMILIES["t5"].build().config
    filled = transformers.DynamicCache(config=config)
    filled.update(torch.zeros(1, 4, 2, 8), torch.zeros(1, 4, 2, 8), 0)
    cache = transformers.EncoderDecoderCache(transformers.DynamicCache(config=config), filled)
    assert _compat.cross_attention_updated(cache)[0] is True, _where("is_updated from the halves")
    empty = _compat.new_encoder_decoder_cache(config)
    empty.cross_attention_cache.update(torch.zeros(1, 4, 2, 8), torch.zeros(1, 4, 2, 8), 0)
    assert not any(_compat.cross_attention_updated(empty).values()), _where("is_updated set once")
    assert _compat.is_encoder_decoder_cache(empty) and not _compat.is_encoder_decoder_cache(filled)


def test_learned_decoder_positions_are_numbered_through_position_ids() -> None:
    """BART's decoder calls ``embed_positions(..., position_ids=...)``; T5 has no such module."""
    assert _compat.learned_positions(FAMILIES["t5"].build().get_decoder()) is None
    module = _compat.learned_positions(FAMILIES["bart"].build().get_decoder())
    assert module is not None, _where("BartDecoder.embed_positions takes position_ids")


def test_the_grouped_sdpa_attention_and_its_mask_are_registered_publicly() -> None:
    """``AttentionInterface.register`` / ``AttentionMaskInterface.register``: a name transformers
    has no mask builder for gets no mask at all, so both are registered."""
    name = _compat.register_grouped_sdpa()
    from transformers import AttentionInterface, AttentionMaskInterface

    assert name in AttentionInterface._global_mapping, _where("AttentionInterface.register")
    assert name in AttentionMaskInterface._global_mapping, _where("AttentionMaskInterface.register")
    model = CASES["llama"].build()
    _compat.set_attention_implementation(model, name)
    assert _compat.attention_implementation(model) == name, _where("set_attn_implementation")
