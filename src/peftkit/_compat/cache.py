"""transformers' KV cache: the argument's name, the cache classes a prefix can fill, the
encoder-decoder cache, and the stand-in cache an encoder attention takes a prefix through."""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from .versions import UnsupportedModelError, _missing, transformers_version

CACHE_ARGUMENTS = ("cache", "past_key_values")  # the current name first
CACHE_POSITION = "cache_position"


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


# -- encoder-decoder caches ---------------------------------------------------------------------
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
