"""Prefix-tuning on transformers encoder-decoder models (T5, BART and their kin): found by capability.

Every attention of the model gets its own prefix, one table row block each: the encoder's
self-attention (rows ``0 … E−1``), the decoder's self-attention (``E … E+D−1``) and its
cross-attention (``E+D … E+2D−1``), E and D the encoder's and decoder's layer counts.

- Decoder (self and cross): a forward pre-hook on the decoder seeds an ``EncoderDecoderCache``
  (a new one, or the empty one ``generate()`` passes on its first step) with ``update``: the
  self-attention half with the decoder prefix, the cross-attention half with the cross prefix.
  Its ``is_updated`` flags stay False, so on the first step every cross-attention still projects
  the encoder's states and the cache appends them after the prefix; later steps reuse
  ``[prefix; encoder]``. The decoder's and the encoder's padding masks get ones over the prefix.
- Encoder (which takes no cache): a pre-hook on each encoder attention module passes it a
  ``PrependingCache`` for that call, whose ``update`` returns ``[prefix; keys]``; a pre-hook on the
  encoder extends its padding mask over the prefix.
- Positions: T5's relative position bias counts the cached prefix as earlier tokens, so distances
  between real tokens are unchanged. Learned positions (BART's ``embed_positions``) number tokens
  from the cache length, which holds the prefix; a pre-hook on that embedding takes the prefix
  off again (unless ``positions_after_prefix``), so real tokens keep the base model's positions.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

from ... import _compat
from ..._compat import UnsupportedModelError
from ...layers import AdapterModule
from .discovery import Seq2SeqPlaces, locate_seq2seq
from .marks import MARK, CacheMark, cache_mark, continue_marked, drop_created_cache, signature_of
from .table import PrefixTable

ATTR = "peftkit_prefix"


class EncoderDecoderInjector(AdapterModule):
    """Holds every prefix adapter's table on an encoder-decoder model and feeds the active ones to
    the encoder's self-attention, the decoder's self-attention and the cross-attention.

    Lives on the decoder as ``peftkit_prefix``; several prefix adapters share it.
    """

    encoder = False  # as PrefixInjector.encoder: the decoder is causal

    def __init__(self, places: Seq2SeqPlaces) -> None:
        super().__init__()
        self.tables = nn.ModuleDict()
        self.places = places
        self.cache_arg = _compat.cache_argument(places.decoder)
        self.hooks: list[tuple[nn.Module, int]] = []
        self.kv: torch.Tensor | None = None  # the encoder's prefix during one encoder call
        self.shift = 0  # positions to take off the decoder's learned positions during one call

    @staticmethod
    def install(model: nn.Module) -> EncoderDecoderInjector:
        """The model's injector, created (with its hooks) on first use."""
        parts = _compat.encoder_decoder_parts(model)
        found = parts[1]._modules.get(ATTR) if parts is not None else None
        if isinstance(found, EncoderDecoderInjector):
            return found
        places, _ = locate_seq2seq(model)
        if hasattr(places.decoder, ATTR):
            raise ValueError(f"{type(places.decoder).__name__} already has an attribute {ATTR!r}")
        injector = EncoderDecoderInjector(places)
        places.decoder.add_module(ATTR, injector)
        injector._hook(places.encoder, injector.before_encoder, injector.after_encoder)
        for index, attention in enumerate(places.attentions):
            injector._hook(attention, _EncoderAttentionHook(injector, index, attention), None)
        injector._hook(places.decoder, injector.before_decoder, injector.after_decoder)
        if places.positions is not None:
            injector._hook(places.positions, injector.before_positions, None)
        return injector

    def _hook(self, module: nn.Module, pre: Any, post: Any) -> None:
        self.hooks.append((module, module.register_forward_pre_hook(pre, with_kwargs=True).id))
        if post is not None:
            handle = module.register_forward_hook(post, with_kwargs=True, always_call=True)
            self.hooks.append((module, handle.id))

    def uninstall(self, body: nn.Module) -> None:
        """Take the injector and all its hooks off the model (removed by id, see PrefixInjector)."""
        for module, hook_id in self.hooks:
            for name in (
                "_forward_pre_hooks",
                "_forward_pre_hooks_with_kwargs",
                "_forward_hooks",
                "_forward_hooks_with_kwargs",
                "_forward_hooks_always_called",
            ):
                getattr(module, name, {}).pop(hook_id, None)
        self.hooks = []
        if body._modules.get(ATTR) is self:
            delattr(body, ATTR)

    # -- the prefix --------------------------------------------------------------------------
    def active(self) -> list[PrefixTable]:
        return [t for t in self.tables.values() if isinstance(t, PrefixTable) and t.active]

    @staticmethod
    def table(active: list[PrefixTable]) -> torch.Tensor:
        """(E + 2D, 2, heads, prefix, head_dim): every active adapter's prefix, in order."""
        return active[0]() if len(active) == 1 else torch.cat([t() for t in active], dim=3)

    # -- encoder ---------------------------------------------------------------------------
    def before_encoder(
        self, encoder: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
        active = self.active()
        if not active:
            return None
        kv = self.table(active)
        self.kv = kv[: self.places.encoder_layers]
        named = _named(encoder, args, kwargs)
        lead = named.get("input_ids")
        lead = named.get("inputs_embeds") if lead is None else lead
        if lead is None:
            return None  # the model itself reports the missing input
        mask = named.get("attention_mask")
        if mask is None:
            mask = torch.ones(lead.shape[0], lead.shape[1], dtype=torch.long, device=lead.device)
        named["attention_mask"] = _extended(mask, int(kv.shape[3]), int(lead.shape[1]), "encoder")
        return (), named

    def after_encoder(self, *_: Any) -> None:
        self.kv = None

    # -- decoder ---------------------------------------------------------------------------
    def before_decoder(
        self, decoder: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
        named = _named(decoder, args, kwargs)
        given = _compat.take_cache(named)
        mark = cache_mark(given)
        active = self.active()
        if not active:
            if mark is not None:
                raise RuntimeError(
                    f"the KV cache holds the prefix of {[n for n, _ in mark.signature]}, but no "
                    f"prefix adapter is active; start a new cache ({self.cache_arg}=None)"
                )
            named[self.cache_arg] = given
            return (), named
        lead = named.get("input_ids")
        lead = named.get("inputs_embeds") if lead is None else lead
        states = named.get("encoder_hidden_states")
        if lead is None or states is None:
            return None  # the model itself reports the missing input
        cache, past, prefix = self._cache(given, mark, active, int(lead.shape[0]))
        named[self.cache_arg] = cache
        seq, device = int(lead.shape[1]), lead.device
        mask = named.get("attention_mask")
        if mask is not None:
            named["attention_mask"] = _extended(mask, prefix, past + seq, "decoder")
        source = named.get("encoder_attention_mask")
        if source is None:
            source = torch.ones(states.shape[:2], dtype=torch.long, device=device)
        named["encoder_attention_mask"] = _extended(source, prefix, states.shape[1], "encoder")
        if named.get(_compat.CACHE_POSITION) is not None:  # models of 4.57 take it
            named[_compat.CACHE_POSITION] = named[_compat.CACHE_POSITION] + prefix
        self.shift = 0 if all(t.positions_after_prefix for t in active) else prefix
        return (), named

    def after_decoder(
        self, decoder: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any
    ) -> Any:
        """Drop a cache the hook created from the output when the caller asked for no cache."""
        self.shift = 0
        mark = cache_mark(kwargs.get(self.cache_arg))
        return drop_created_cache(mark, kwargs, decoder.config, output)

    def _cache(
        self, cache: Any, mark: Any, active: list[PrefixTable], batch: int
    ) -> tuple[Any, int, int]:
        """The cache holding the decoder's prefixes, the real tokens already in it, the prefix length."""
        signature = signature_of(active)
        if mark is not None:
            return continue_marked(cache, mark, signature, self.cache_arg)
        fresh = cache is None
        if fresh:
            cache = _compat.new_encoder_decoder_cache(self.places.decoder.config)
        else:
            _check_fillable(cache)
        kv = self.table(active)
        first, layers = self.places.encoder_layers, self.places.decoder_layers
        for i in range(layers):
            own, cross = kv[first + i], kv[first + layers + i]
            cache.self_attention_cache.update(_batched(own[0], batch), _batched(own[1], batch), i)
            cache.cross_attention_cache.update(
                _batched(cross[0], batch), _batched(cross[1], batch), i
            )
        setattr(cache, MARK, CacheMark(signature, fresh))
        return cache, 0, int(kv.shape[3])

    # -- positions -------------------------------------------------------------------------
    def before_positions(
        self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
        """Count learned positions without the prefix (the cache length the decoder read holds it)."""
        if not self.shift:
            return None
        if kwargs.get("position_ids") is not None:
            return args, {**kwargs, "position_ids": kwargs["position_ids"] - self.shift}
        if "cache_length" in kwargs:
            return args, {**kwargs, "cache_length": kwargs["cache_length"] - self.shift}
        if len(args) > 1:
            return (args[0], args[1] - self.shift, *args[2:]), kwargs
        return None


class _EncoderAttentionHook:
    """The pre-hook of encoder attention ``index``: passes it the prefix as a ``PrependingCache``."""

    def __init__(self, injector: EncoderDecoderInjector, index: int, attention: nn.Module) -> None:
        self.injector = injector
        self.index = index
        self.argument = _compat.cache_argument(attention)

    def __call__(
        self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
        kv = self.injector.kv
        if kv is None:
            return None
        states = args[0] if args else kwargs["hidden_states"]
        batch = int(states.shape[0])
        for other in _compat.CACHE_ARGUMENTS:
            kwargs.pop(other, None)
        keys, values = _batched(kv[self.index, 0], batch), _batched(kv[self.index, 1], batch)
        return args, {**kwargs, self.argument: _compat.PrependingCache(keys, values)}


def _batched(tensor: torch.Tensor, batch: int) -> torch.Tensor:
    return tensor.unsqueeze(0).expand(batch, -1, -1, -1)


def _named(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    if not args:
        return dict(kwargs)
    params = inspect.signature(module.forward).parameters.values()
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    names = [p.name for p in params if p.kind in kinds]
    if len(args) > len(names):
        raise TypeError(f"too many positional arguments ({len(args)}) for {type(module).__name__}")
    return {**dict(zip(names, args, strict=False)), **kwargs}


def _extended(mask: torch.Tensor, prefix: int, length: int, side: str) -> torch.Tensor:
    """The 2-D padding ``mask`` with ones over the prefix in front."""
    if mask.ndim != 2:
        raise ValueError(
            f"prefix-tuning extends the {side}'s 2-D attention mask (batch, tokens) over its "
            f"prefix; got shape {tuple(mask.shape)}. Pass the 2-D padding mask"
        )
    if mask.shape[-1] != length:
        raise ValueError(
            f"the {side}'s attention mask covers {mask.shape[-1]} tokens but the input and cache "
            f"hold {length} (the mask counts tokens without the prefix)"
        )
    return torch.cat([mask.new_ones(mask.shape[0], prefix), mask], dim=-1)


def _check_fillable(cache: Any) -> None:
    if not _compat.is_encoder_decoder_cache(cache):
        raise UnsupportedModelError(
            "prefix-tuning puts an encoder-decoder model's prefix into an EncoderDecoderCache of "
            f"two DynamicCache halves (generate()'s default); got {type(cache).__name__}. Use the "
            "default cache"
        )
    if cache.get_seq_length() != 0 or any(_compat.cross_attention_updated(cache).values()):
        raise RuntimeError(
            f"the KV cache holds {cache.get_seq_length()} tokens computed without this prefix; "
            "pass a cache the prefixed model returned, or start a new one (cache=None)"
        )
