"""The one door to transformers' internals: every name peftkit relies on, found by capability.

Each helper answers one question about the installed transformers (what the KV-cache argument is
called, which cache class prefix-tuning can fill, how a cache layer holds its tensors, how
checkpointing is switched on) by looking at what the installed version offers, never by comparing
version numbers. Where the answer is "nothing usable", the error names the installed version and
the missing piece. ``tests/test_compat_touchpoints.py`` checks every helper on the installed
version, so a release that moves one of them fails there first, by name.

The pieces and where they changed:

- KV-cache keyword of a model's ``forward``: ``past_key_values`` up to 5.23, ``cache`` from 5.24
  (the old name still works there through a deprecation shim that warns). peftkit reads the name
  from the signature of the module it calls, and accepts either from its callers.
- The cache field of model outputs: ``past_key_values`` up to 5.23, ``cache`` from 5.24.
- ``DynamicCache(config=...)`` with per-layer objects in ``cache.layers`` (``DynamicLayer``, or a
  sliding-window kind) holding ``keys`` / ``values``: 4.57 and later.
- ``cache_position`` (an index into the cache) is still taken by models of 4.57 and early 5.x.
- Attention modules declare ``is_causal`` (True in decoders, False in BERT-style encoders).
- Activation checkpointing: ``activation_checkpointing_enable`` (5.x) or
  ``gradient_checkpointing_enable`` (4.x); the per-module flag is ``gradient_checkpointing``.
- GPT-2's ``Conv1D``: ``transformers.pytorch_utils.Conv1D``.
- Task heads: a ``*For*`` model holds its body under ``base_model_prefix`` and its head beside it;
  ``get_output_embeddings()`` and ``_tied_weights_keys`` (a list up to 4.x, a dict in 5.x) name
  the language-model head, which is pretrained or tied and so is not a task head.
- ``save_pretrained(directory, state_dict=...)`` writes the given tensors under their keys; when
  ``state_dict`` is None it reads ``self.state_dict()``. The HF Trainer's ``save_model`` and its
  checkpoints call the model's ``save_pretrained`` (looked up on the instance).
- ``PreTrainedModel.dummy_inputs``: a dict of tiny example tensors the model can run on, used for
  one trial forward that finds selected modules the forward never calls (T5's ``shared``).
- peft (the one piece of it read here): its LoRA on nn.MultiheadAttention adds the out-projection
  update twice (up to 0.21.2 at least); the peft interop scales those factors to match.

Nothing here imports transformers at module import time: ``import peftkit`` stays free of it.
"""

from __future__ import annotations

import functools
import inspect
import re
import sys
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

# The oldest transformers the suite is run against (``nox -s oldest``); pyproject declares the same.
# No upper bound: no release is known to break peftkit, and the capability checks below fail loudly
# (naming the version and the missing piece) if one does.
TRANSFORMERS_MIN = (4, 57, 1)  # 4.57.0 was yanked
# The newest release the suite has been run against, named in errors to help a bug report.
TRANSFORMERS_TESTED = "5.24.0"
# Prefix-tuning on encoder-decoder models: on 4.57 T5's encoder bias and BART's padded generation
# come out wrong with a prefix, and no release between it and the tested one has been checked.
SEQ2SEQ_PREFIX_MIN = (5, 24, 0)
CACHE_ARGUMENTS = ("cache", "past_key_values")  # the current name first
CACHE_POSITION = "cache_position"


class UnsupportedModelError(TypeError):
    """A model, or the installed transformers, lacks what a peftkit feature needs."""


def transformers_window(minimum: tuple[int, int, int] = TRANSFORMERS_MIN) -> str:
    """The declared window, as a pip requirement: ``transformers>=4.57.1``."""
    return "transformers>=" + ".".join(str(n) for n in minimum)


def transformers_version() -> str:
    """The installed transformers version (importing it)."""
    import transformers

    return str(transformers.__version__)


def check_transformers_version(
    version: str, feature: str = "peftkit", minimum: tuple[int, int, int] = TRANSFORMERS_MIN
) -> None:
    """Raise ``UnsupportedModelError`` when ``version`` is older than ``minimum`` (by default the
    declared window's)."""
    numbers = [int(n) for n in re.findall(r"\d+", version.split("+")[0])[:3]]
    if len(numbers) < 2 or tuple(numbers + [0] * (3 - len(numbers))) < minimum:
        window = transformers_window(minimum)
        raise UnsupportedModelError(
            f"{feature} needs {window} (tested through {TRANSFORMERS_TESTED}); "
            f"transformers {version} is installed. Upgrade: pip install '{window}'"
        )


def _missing(piece: str, fix: str) -> UnsupportedModelError:
    return UnsupportedModelError(
        f"transformers {transformers_version()} lacks {piece}, which peftkit relies on (declared "
        f"window {transformers_window()}, tested through {TRANSFORMERS_TESTED}). {fix}"
    )


# -- the KV-cache argument ---------------------------------------------------------------------
def cache_argument(module: nn.Module) -> str:
    """The keyword under which ``module.forward`` takes a KV cache: ``cache`` or ``past_key_values``."""
    params = inspect.signature(module.forward).parameters
    for name in CACHE_ARGUMENTS:
        if name in params:
            return name
    raise UnsupportedModelError(
        f"{type(module).__name__}.forward takes no KV cache (none of {list(CACHE_ARGUMENTS)} is "
        f"among its arguments {list(params)}) on transformers {transformers_version()}"
    )


def take_cache(kwargs: dict[str, Any]) -> Any:
    """Remove and return the cache from a call's keyword arguments, under whichever name it came.

    Both names at once is an error (transformers refuses it too).
    """
    given = [name for name in CACHE_ARGUMENTS if kwargs.get(name) is not None]
    if len(given) > 1:
        raise ValueError(f"pass the KV cache once, as {CACHE_ARGUMENTS[0]}=, not as both {given}")
    found = kwargs.pop(given[0]) if given else None
    for name in CACHE_ARGUMENTS:
        kwargs.pop(name, None)
    return found


def output_cache(output: Any) -> Any:
    """The cache a model returned (``output.cache`` from 5.24, ``output.past_key_values`` before)."""
    if not isinstance(output, Mapping):
        return None
    for name in CACHE_ARGUMENTS:
        if output.get(name) is not None:
            return output[name]
    return None


def without_cache(output: Any) -> Any:
    """A copy of a model output with its cache field dropped (same output class)."""
    return type(output)(**{k: v for k, v in output.items() if k not in CACHE_ARGUMENTS})


# -- cache classes -----------------------------------------------------------------------------
def _cache_classes() -> tuple[type, type]:
    try:
        from transformers import DynamicCache
        from transformers.cache_utils import DynamicLayer
    except ImportError as err:
        raise _missing("transformers.DynamicCache / cache_utils.DynamicLayer", f"({err})") from None
    return DynamicCache, DynamicLayer


def new_dynamic_cache(config: Any) -> Any:
    """An empty ``DynamicCache`` laid out for ``config`` (full or sliding-window layers)."""
    dynamic_cache, _ = _cache_classes()
    cache = dynamic_cache(config=config)
    if not hasattr(cache, "layers"):
        raise _missing("DynamicCache.layers (per-layer cache objects)", "")
    return cache


def cache_layer_kinds(config: Any) -> list[str]:
    """The class names of the cache layers ``config``'s model gets, sorted and deduplicated."""
    return sorted({type(layer).__name__ for layer in new_dynamic_cache(config).layers})


def full_attention_layer_name() -> str:
    """The class name of a plain, full-attention dynamic cache layer (``DynamicLayer``)."""
    return _cache_classes()[1].__name__


def is_full_attention_dynamic(cache: Any) -> bool:
    """True for a ``DynamicCache`` whose every layer is a plain ``DynamicLayer`` (no window)."""
    dynamic_cache, dynamic_layer = _cache_classes()
    layers = getattr(cache, "layers", None)
    if not isinstance(cache, dynamic_cache) or layers is None:
        return False
    return all(type(layer) is dynamic_layer for layer in layers)


def _fillable_layer_classes() -> tuple[type, ...]:
    """The cache layer classes that hold plain keys/values a prefix can join: ``DynamicLayer`` and,
    where the installed transformers has it, ``DynamicSlidingWindowLayer`` (4.56 and later)."""
    import transformers.cache_utils as cache_utils

    _, dynamic_layer = _cache_classes()
    sliding = getattr(cache_utils, "DynamicSlidingWindowLayer", None)
    return (dynamic_layer,) if sliding is None else (dynamic_layer, sliding)


def fillable_layer_names() -> list[str]:
    """Names of the cache layer classes a prefix can be put into."""
    return [cls.__name__ for cls in _fillable_layer_classes()]


def is_fillable_dynamic(cache: Any) -> bool:
    """True for a ``DynamicCache`` whose every layer is a full-attention or sliding-window
    ``DynamicLayer`` (exactly those classes: quantized or linear-attention layers are not)."""
    dynamic_cache, _ = _cache_classes()
    layers = getattr(cache, "layers", None)
    if not isinstance(cache, dynamic_cache) or layers is None:
        return False
    classes = _fillable_layer_classes()
    return all(type(layer) in classes for layer in layers)


def cached_keys_values(cache: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Every filled layer's (keys, values), each (batch, heads, tokens, head_dim)."""
    pairs = []
    for layer in getattr(cache, "layers", ()):
        keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
        if isinstance(keys, torch.Tensor) and isinstance(values, torch.Tensor):
            pairs.append((keys, values))
    return pairs


# -- attention ---------------------------------------------------------------------------------
def causal_flags(module: nn.Module) -> set[bool]:
    """The ``is_causal`` flags transformers' attention modules inside ``module`` declare: {True}
    for decoders, {False} for BERT-style encoders, empty where none declares one (Bloom).

    transformers 4.x's BERT-style layers declare no ``is_causal`` but an ``is_decoder`` switch
    (False in an encoder); where no module declares ``is_causal``, those are read instead."""
    modules = list(module.modules())
    flags = {bool(m.is_causal) for m in modules if isinstance(getattr(m, "is_causal", None), bool)}
    if flags:
        return flags
    return {bool(m.is_decoder) for m in modules if isinstance(getattr(m, "is_decoder", None), bool)}


# -- activation checkpointing ------------------------------------------------------------------
def checkpointing_modules(module: nn.Module) -> list[nn.Module]:
    """The submodules that carry transformers' per-module ``gradient_checkpointing`` flag."""
    return [m for m in module.modules() if hasattr(m, "gradient_checkpointing")]


def enable_checkpointing(model: nn.Module, **kwargs: Any) -> None:
    """Switch HF activation checkpointing on with ``kwargs`` (e.g. ``use_reentrant=False``)."""
    new: Callable[..., Any] | None = getattr(model, "activation_checkpointing_enable", None)
    old: Callable[..., Any] | None = getattr(model, "gradient_checkpointing_enable", None)
    if callable(new):  # transformers 5.x
        new(activation_checkpointing_kwargs=kwargs)
    elif callable(old):  # transformers 4.x
        old(gradient_checkpointing_kwargs=kwargs)
    else:
        raise ValueError(
            "gradient_checkpointing needs an HF model (activation_checkpointing_enable or "
            "gradient_checkpointing_enable); for other models wrap blocks in torch.utils.checkpoint"
        )


# -- sharding ----------------------------------------------------------------------------------
def no_split_modules(model: nn.Module) -> list[str]:
    """The class names of an HF model's blocks (its ``_no_split_modules``), or []; FSDP2 shards
    per block."""
    names = getattr(model, "_no_split_modules", None)
    if isinstance(names, str):
        return [names]
    return [n for n in names if isinstance(n, str)] if isinstance(names, list | tuple | set) else []


# -- layer classes -----------------------------------------------------------------------------
def conv1d_class() -> type | None:
    """transformers' GPT-2 style ``Conv1D`` when transformers is already imported, else None.

    A model cannot hold a transformers Conv1D unless transformers is loaded, so peftkit never
    imports it just to ask.
    """
    if "transformers" not in sys.modules:
        return None
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError as err:
        raise _missing("transformers.pytorch_utils.Conv1D", f"({err})") from None
    return Conv1D


# -- task heads --------------------------------------------------------------------------------
def _tied_names(model: nn.Module) -> set[str]:
    """First components of the keys transformers declares tied (``lm_head`` of ``lm_head.weight``)."""
    declared = getattr(model, "_tied_weights_keys", None) or ()
    keys = list(declared.items()) if isinstance(declared, Mapping) else [(k, "") for k in declared]
    return {str(target).split(".", 1)[0] for target, _ in keys}


def task_heads(model: nn.Module) -> list[str]:
    """Names of the children of an HF ``*For*`` model that form its task head, in model order.

    The head is what sits beside the body (``model.<base_model_prefix>``) and owns parameters of
    its own: BERT's ``classifier``, GPT-2's and Llama's ``score``, ``qa_outputs``, GPT-2's
    ``multiple_choice_head``. A child sharing a parameter with the body, holding the output
    embeddings, or declared tied (a language model's ``lm_head``, BERT's ``cls``) is not one.
    A model that is its own body (``BertModel``, ``T5ForConditionalGeneration``) has none, and so
    does any model that is not a transformers model.
    """
    prefix = getattr(type(model), "base_model_prefix", None)
    body = model._modules.get(prefix) if isinstance(prefix, str) and prefix else None
    if body is None or "transformers" not in sys.modules:
        return []
    taken = {id(p) for p in body.parameters()}
    getter = getattr(model, "get_output_embeddings", None)
    output = getter() if callable(getter) else None
    if isinstance(output, nn.Module):
        taken |= {id(p) for p in output.parameters()}
    tied = _tied_names(model)
    heads = []
    for name, child in model.named_children():
        params = {id(p) for p in child.parameters()}
        if name != prefix and name not in tied and params and not params & taken:
            heads.append(name)
    return heads


# -- save_pretrained ---------------------------------------------------------------------------
def save_pretrained_state_dict_argument(model: nn.Module) -> bool:
    """Whether ``model.save_pretrained`` (its class's) takes the ``state_dict`` to write."""
    method = getattr(type(model), "save_pretrained", None)
    return callable(method) and "state_dict" in inspect.signature(method).parameters


def hook_save_pretrained(model: nn.Module, plain: Callable[[nn.Module, Any], Any]) -> bool:
    """Make ``model.save_pretrained`` write ``plain(model, state_dict)`` instead of its raw state.

    Only this instance changes (an attribute that shadows the class's method); nothing global is
    patched. Returns False for a model without an HF ``save_pretrained``.
    """
    if not save_pretrained_state_dict_argument(model):
        return False
    model.__dict__["save_pretrained"] = _PlainSave(model, plain)
    return True


def unhook_save_pretrained(model: nn.Module) -> None:
    """Undo ``hook_save_pretrained`` (no-op when it was not hooked)."""
    if isinstance(model.__dict__.get("save_pretrained"), _PlainSave):
        del model.__dict__["save_pretrained"]


class _PlainSave:
    """``model.save_pretrained`` of one hooked model. It holds the model itself (not a weak
    reference) so that ``copy.deepcopy`` and pickling carry it over to the copy."""

    def __init__(self, model: nn.Module, plain: Callable[[nn.Module, Any], Any]) -> None:
        self.model = model
        self.plain = plain

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        save = type(self.model).save_pretrained  # type: ignore[attr-defined]
        call = inspect.signature(save).bind(self.model, *args, **kwargs)
        call.arguments["state_dict"] = self.plain(self.model, call.arguments.get("state_dict"))
        return save(*call.args, **call.kwargs)


def dummy_inputs(model: nn.Module) -> dict[str, torch.Tensor] | None:
    """Tiny example inputs an HF model offers for a trial forward (``PreTrainedModel.dummy_inputs``,
    a dict of tensors), or None for other models or when the model cannot build them."""
    if "transformers" not in sys.modules:
        return None
    try:
        inputs = getattr(model, "dummy_inputs", None)
    except (AttributeError, TypeError, ValueError, RuntimeError):  # a property that cannot build
        return None
    if not isinstance(inputs, Mapping) or not inputs:
        return None
    if not all(isinstance(v, torch.Tensor) for v in inputs.values()):
        return None
    return dict(inputs)


@functools.lru_cache(maxsize=1)
def peft_attention_out_count() -> int:
    """How many times the installed peft's LoRA on nn.MultiheadAttention adds its out-projection
    update s·B A to ``out_proj.weight``, in forward and in merge: 2 in peft up to 0.21.2 at least
    (its merge adds it, then merges the out_proj layer, which adds it again), 1 once that is fixed.
    Found by running peft on a 2-wide attention; 2 without peft (the newest release known)."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        return 2
    with torch.random.fork_rng(devices=[]):  # the probe leaves the caller's random state alone
        torch.manual_seed(0)
        holder, plain = nn.Module(), nn.MultiheadAttention(2, 1, batch_first=True)
        holder.mha = nn.MultiheadAttention(2, 1, batch_first=True)
        plain.load_state_dict(holder.get_submodule("mha").state_dict())
        config = LoraConfig(r=1, lora_alpha=1, target_modules=["mha"])
        attention: Any = get_peft_model(holder, config).eval().get_submodule("base_model.model.mha")
    out_proj = attention.base_layer.out_proj  # peft's LoRA Linear at the attention's out_proj
    x = torch.ones(1, 1, 2)
    with torch.no_grad():
        out_proj.lora_B["default"].weight.fill_(1.0)
        update = out_proj.get_delta_weight("default")
        got = attention(x, x, x, need_weights=False)[0]
        for count in (1, 2):
            plain.out_proj.weight.add_(update)
            if torch.allclose(plain(x, x, x, need_weights=False)[0], got, atol=1e-6):
                return count
    raise UnsupportedModelError(
        f"peft {_peft_version()} computes LoRA on nn.MultiheadAttention as neither W + s·B A nor "
        "W + 2·s·B A on the out-projection; peftkit cannot share such adapters with it"
    )


def _peft_version() -> str:
    import peft

    return str(peft.__version__)


# -- encoder-decoder models ----------------------------------------------------------------------
def encoder_decoder_parts(model: nn.Module) -> tuple[nn.Module, nn.Module] | None:
    """(encoder, decoder) of a transformers encoder-decoder model (``config.is_encoder_decoder``
    and the public ``get_encoder()`` / ``get_decoder()``), or None for any other model."""
    if not getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        return None
    get_encoder, get_decoder = (
        getattr(model, "get_encoder", None),
        getattr(model, "get_decoder", None),
    )
    if not callable(get_encoder) or not callable(get_decoder):
        return None
    encoder, decoder = get_encoder(), get_decoder()
    if not isinstance(encoder, nn.Module) or not isinstance(decoder, nn.Module):
        return None
    return encoder, decoder


def new_encoder_decoder_cache(config: Any) -> Any:
    """An empty ``EncoderDecoderCache`` (self-attention and cross-attention ``DynamicCache``), as
    ``generate()`` makes one; its ``is_updated`` flags start False."""
    try:
        from transformers import EncoderDecoderCache
    except ImportError as err:
        raise _missing("transformers.EncoderDecoderCache", f"({err})") from None
    return EncoderDecoderCache(new_dynamic_cache(config), new_dynamic_cache(config))


def is_encoder_decoder_cache(cache: Any) -> bool:
    """True for an ``EncoderDecoderCache`` whose two halves are fillable ``DynamicCache`` objects."""
    try:
        from transformers import EncoderDecoderCache
    except ImportError:
        return False
    return (
        isinstance(cache, EncoderDecoderCache)
        and is_fillable_dynamic(getattr(cache, "self_attention_cache", None))
        and is_fillable_dynamic(getattr(cache, "cross_attention_cache", None))
    )


def cross_attention_updated(cache: Any) -> dict[int, bool]:
    """``EncoderDecoderCache.is_updated``: per decoder layer, whether its cross-attention reuses
    the cached keys/values instead of projecting the encoder's states (True after the first step)."""
    flags = getattr(cache, "is_updated", None)
    return {int(k): bool(v) for k, v in flags.items()} if isinstance(flags, Mapping) else {}


class PrependingCache:
    """Stands in for a KV cache in one call of one encoder attention module: ``update`` returns
    ``[prefix; new]`` keys and values and stores nothing.

    transformers' BART-, T5- and Whisper-style attention modules take ``cache=`` (``past_key_values=``
    before 5.24) even in the encoder, where their stack passes none, and use it only through
    ``cache.update(keys, values, layer_idx, ...)`` (and T5 ``cache.get_seq_length(layer_idx)``, so
    its relative positions count the prefix as earlier tokens). ``calls`` counts the updates.
    """

    def __init__(self, keys: torch.Tensor | None, values: torch.Tensor | None) -> None:
        self.keys, self.values = keys, values
        self.calls: list[tuple[int, ...]] = []  # the shapes of the keys each update received

    def get_seq_length(self, layer_idx: int | None = 0) -> int:
        return 0 if self.keys is None else int(self.keys.shape[-2])

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        self.calls.append(tuple(key_states.shape))
        if self.keys is None or self.values is None:
            return key_states, value_states
        keys = self.keys.to(key_states.dtype)
        values = self.values.to(value_states.dtype)
        return torch.cat([keys, key_states], dim=-2), torch.cat([values, value_states], dim=-2)


def learned_positions(decoder: nn.Module) -> nn.Module | None:
    """A decoder's learned position embedding that numbers tokens from the cache length (BART's,
    mBART's ``embed_positions``, called with ``position_ids``), or None (T5: relative positions)."""
    module = getattr(decoder, "embed_positions", None)
    if not isinstance(module, nn.Embedding):
        return None
    params = inspect.signature(module.forward).parameters
    return module if "position_ids" in params else None


# -- grouped-query SDPA with a mask ---------------------------------------------------------------
GROUPED_SDPA = "peftkit_grouped_sdpa"


def _grouped_sdpa_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' SDPA attention, but with an explicit mask under grouped-query attention it
    lets torch's SDPA share the key/value heads (``enable_gqa=True``) instead of repeating them.
    Every other call (no mask, no key/value groups, T5-style position bias, soft-capping, attention
    weights asked for) goes to transformers' own ``sdpa_attention_forward`` unchanged."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    groups = int(getattr(module, "num_key_value_groups", 1) or 1)
    plain = kwargs.get("position_bias") is None and kwargs.get("softcap") is None
    if attention_mask is None or groups <= 1 or not plain or kwargs.get("output_attentions"):
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout, scaling, is_causal, **kwargs
        )
    output = torch.nn.functional.scaled_dot_product_attention(
        query,
        key,
        value,
        attn_mask=attention_mask,
        dropout_p=dropout,
        scale=scaling,
        is_causal=False,  # the mask holds the causal pattern
        enable_gqa=True,
    )
    return output.transpose(1, 2).contiguous(), None


def register_grouped_sdpa() -> str:
    """Register peftkit's grouped SDPA (and SDPA's mask builder) under ``GROUPED_SDPA`` through
    transformers' public ``AttentionInterface`` / ``AttentionMaskInterface``; returns the name.
    Without the mask entry transformers would build no mask at all for an unknown name."""
    try:
        from transformers import AttentionInterface, AttentionMaskInterface
        from transformers.masking_utils import sdpa_mask
    except ImportError as err:
        raise _missing("AttentionInterface / AttentionMaskInterface", f"({err})") from None
    AttentionInterface.register(GROUPED_SDPA, _grouped_sdpa_forward)
    AttentionMaskInterface.register(GROUPED_SDPA, sdpa_mask)
    return GROUPED_SDPA


def attention_implementation(model: nn.Module) -> str | None:
    """The attention a transformers model runs (``config._attn_implementation``), or None."""
    found = getattr(getattr(model, "config", None), "_attn_implementation", None)
    return found if isinstance(found, str) else None


def set_attention_implementation(model: nn.Module, name: str) -> None:
    """``model.set_attn_implementation(name)`` (public from transformers 4.56)."""
    setter = getattr(model, "set_attn_implementation", None)
    if not callable(setter):
        raise _missing(
            "PreTrainedModel.set_attn_implementation", "Load the model with attn_implementation="
        )
    setter(name)
