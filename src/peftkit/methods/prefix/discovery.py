"""Where a prefix enters a transformers model, and what its KV cache holds: found by capability.

No list of model types: a model takes a prefix when one of its modules (the *body*: ``GPT2Model``,
``LlamaModel``, OPT's ``OPTDecoder``, ``BertModel``...) takes token ids or embeddings together with
an ``attention_mask`` and a KV cache, and its attention writes keys and values into that cache.
The body is the innermost such module (OPT's causal LM calls its decoder directly, past
``OPTModel``). One forward of a single token into an empty ``DynamicCache`` then shows the cache's
layout, whatever the attention: the number of key/value heads (grouped- and multi-query attention,
Falcon's layouts), the head size (Gemma's), sliding-window layers (Mistral, Gemma 2/3).

What cannot take a prefix is refused with the reason: a body whose forward takes no cache (DeBERTa-v2,
ALBERT, DistilBERT: their attention has no place for extra keys), cache layers that hold no keys and
values (state-space or linear-attention layers), layers of different shapes.
"""

from __future__ import annotations

import inspect
import sys
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ... import _compat
from ..._compat import UnsupportedModelError, check_transformers_version
from .table import KVShape

__all__ = ["find_body", "locate", "locate_seq2seq", "probe_shape"]

_INPUTS = ("input_ids", "inputs_embeds")
WHAT_IT_NEEDS = (
    "a module (the transformer body) whose forward takes input_ids or inputs_embeds together with "
    "attention_mask and a KV cache (cache= or past_key_values=), and attention that writes keys and "
    "values into that cache"
)


def locate(model: nn.Module) -> tuple[nn.Module, KVShape, bool]:
    """The body to hook, the per-layer cache shape, and whether the body is bidirectional (an
    encoder, which needs an explicit mask over the prefix).

    Raises ``UnsupportedModelError`` with the reason the model cannot take a prefix.
    """
    config = getattr(model, "config", None)
    name = type(model).__name__
    if "transformers" not in sys.modules or getattr(config, "model_type", None) is None:
        raise UnsupportedModelError(
            f"prefix-tuning cannot handle {name}: it is not a transformers model. It needs "
            f"{WHAT_IT_NEEDS}"
        )
    check_transformers_version(_compat.transformers_version(), "prefix-tuning")
    if getattr(config, "is_encoder_decoder", False):
        raise UnsupportedModelError(
            f"prefix-tuning cannot handle {name}: it is an encoder-decoder model, whose encoder, "
            "decoder and cross-attention each need their own prefix; peftkit's prefix-tuning "
            "supports decoder-only models and encoders. Use LoRA or adapters"
        )
    if getattr(config, "add_cross_attention", False):
        raise UnsupportedModelError(
            f"prefix-tuning cannot handle {name} with cross-attention (add_cross_attention=True); "
            "it supports self-attention decoders and encoders"
        )
    body = find_body(model)
    return body, probe_shape(body, config), is_bidirectional(body)


def takes_prefix(module: nn.Module) -> bool:
    """Whether ``module.forward`` takes tokens (or embeddings), an attention mask and a KV cache."""
    try:
        params = inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return False
    return (
        "attention_mask" in params
        and any(n in params for n in _INPUTS)
        and any(n in params for n in _compat.CACHE_ARGUMENTS)
    )


def find_body(model: nn.Module) -> nn.Module:
    """The innermost module of ``model`` that takes a prefix (see ``takes_prefix``)."""
    found = [(n, m) for n, m in model.named_modules() if takes_prefix(m)]
    inner = [(n, m) for n, m in found if not any(o is not m and _inside(o, m) for _, o in found)]
    if not inner:
        bodies = sorted({type(m).__name__ for m in model.modules() if _takes_tokens(m)})
        raise UnsupportedModelError(
            f"prefix-tuning cannot handle {type(model).__name__}: a prefix reaches attention through "
            f"the KV cache, and no module of it takes one with an attention mask on transformers "
            f"{_compat.transformers_version()} (its bodies {bodies} take no cache, so there is no "
            f"place for extra keys and values). It needs {WHAT_IT_NEEDS}. Use LoRA or adapters"
        )
    if len(inner) > 1:
        raise UnsupportedModelError(
            f"prefix-tuning cannot handle {type(model).__name__}: it has several transformer bodies "
            f"that take a KV cache ({[n for n, _ in inner]}), and a prefix enters exactly one"
        )
    body: nn.Module = inner[0][1]
    return body


def _inside(inner: nn.Module, outer: nn.Module) -> bool:
    return any(m is inner for m in outer.modules())


def _takes_tokens(module: nn.Module) -> bool:
    try:
        params = inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return False
    return "attention_mask" in params and any(n in params for n in _INPUTS)


def is_bidirectional(body: nn.Module) -> bool:
    """True when ``body``'s attention modules declare themselves non-causal (BERT-like encoders)."""
    return _compat.causal_flags(body) == {False}


def probe_shape(body: nn.Module, config: Any) -> KVShape:
    """The cache layout, read from one forward of a single token into an empty ``DynamicCache``."""
    cache = _compat.new_dynamic_cache(config)
    param = next(body.parameters())
    params = inspect.signature(body.forward).parameters
    if "input_ids" in params:
        inputs: dict[str, Any] = {
            "input_ids": torch.zeros(1, 1, dtype=torch.long, device=param.device)
        }
    else:
        width = int(config.hidden_size)
        inputs = {"inputs_embeds": torch.zeros(1, 1, width, dtype=param.dtype, device=param.device)}
    was_training = body.training
    body.eval()
    try:
        with torch.no_grad():
            body(**inputs, **{_compat.cache_argument(body): cache}, use_cache=True)
    finally:
        body.train(was_training)
    return _shape_of(cache, body, config)


def _shape_of(cache: Any, body: nn.Module, config: Any) -> KVShape:
    name = type(body).__name__
    kinds = sorted({type(layer).__name__ for layer in cache.layers})
    if not _compat.is_fillable_dynamic(cache):
        raise UnsupportedModelError(
            f"prefix-tuning cannot handle {name}: its cache layers are {kinds}, which hold states "
            f"other than keys and values ({_compat.fillable_layer_names()} do); there is no place "
            "for a prefix in them"
        )
    pairs = _compat.cached_keys_values(cache)
    shapes = sorted({(int(k.shape[1]), int(k.shape[3])) for k, _ in pairs})
    if len(pairs) != len(cache.layers) or not pairs:
        raise UnsupportedModelError(
            f"prefix-tuning cannot handle {name}: only {len(pairs)} of its {len(cache.layers)} cache "
            "layers were filled by a forward (layers that share or skip keys and values)"
        )
    if len(shapes) != 1:
        raise UnsupportedModelError(
            f"prefix-tuning cannot handle {name}: its layers cache keys of different shapes "
            f"(heads, head_dim) {shapes}; a prefix table holds one shape for every layer"
        )
    heads, head_dim = shapes[0]
    hidden = int(getattr(config, "hidden_size", None) or heads * head_dim)
    return KVShape(len(pairs), heads, head_dim, hidden)


# -- encoder-decoder models ------------------------------------------------------------------
@dataclass
class Seq2SeqPlaces:
    """Where an encoder-decoder model takes its prefix."""

    encoder: nn.Module
    attentions: list[nn.Module]  # the encoder's self-attention modules, in layer order
    decoder: nn.Module
    positions: nn.Module | None  # the decoder's learned position embedding, if it has one
    decoder_layers: int

    @property
    def encoder_layers(self) -> int:
        return len(self.attentions)


def locate_seq2seq(model: nn.Module) -> tuple[Seq2SeqPlaces, KVShape]:
    """The places of an encoder-decoder model and its cache shape (one probe forward)."""
    name = type(model).__name__
    check_transformers_version(_compat.transformers_version(), "prefix-tuning")
    parts = _compat.encoder_decoder_parts(model)
    if parts is None:
        raise UnsupportedModelError(f"prefix-tuning: {name} is not an encoder-decoder model")
    encoder, decoder = parts
    params = signature_of(decoder)
    if (
        not any(n in params for n in _compat.CACHE_ARGUMENTS)
        or "encoder_hidden_states" not in params
    ):
        raise UnsupportedModelError(
            f"prefix-tuning cannot handle {name}: its decoder {type(decoder).__name__} takes no KV "
            "cache together with encoder_hidden_states"
        )
    if "encoder_attention_mask" not in params or "attention_mask" not in params:
        raise UnsupportedModelError(
            f"prefix-tuning cannot handle {name}: its decoder {type(decoder).__name__} takes no "
            "encoder_attention_mask (Whisper's decoder masks by its own rules), so the masks cannot "
            "be extended over a prefix. Use LoRA or adapters"
        )
    attentions = _cache_taking(encoder)
    if not attentions:
        raise UnsupportedModelError(
            f"prefix-tuning cannot handle {name}: no attention module of its encoder "
            f"{type(encoder).__name__} takes a cache argument, so there is no place for a prefix"
        )
    check_transformers_version(
        _compat.transformers_version(),
        f"prefix-tuning on an encoder-decoder model ({name})",
        _compat.SEQ2SEQ_PREFIX_MIN,
    )
    places = Seq2SeqPlaces(encoder, attentions, decoder, _compat.learned_positions(decoder), 0)
    return places, _probe(model, places)


def signature_of(module: nn.Module) -> dict[str, inspect.Parameter]:
    try:
        return dict(inspect.signature(module.forward).parameters)
    except (TypeError, ValueError):
        return {}


def _cache_taking(encoder: nn.Module) -> list[nn.Module]:
    """The innermost modules inside ``encoder`` whose forward takes a cache argument."""
    found = [
        m
        for m in encoder.modules()
        if m is not encoder and any(n in signature_of(m) for n in _compat.CACHE_ARGUMENTS)
    ]
    return [m for m in found if not any(o is not m and o in set(m.modules()) for o in found)]


def _probe(model: nn.Module, places: Seq2SeqPlaces) -> KVShape:
    """Run one forward with recording caches: every encoder attention must call ``update`` once,
    and the decoder must fill both halves of an ``EncoderDecoderCache``."""
    name = type(model).__name__
    inputs = _probe_inputs(model)
    recorders = [_compat.PrependingCache(None, None) for _ in places.attentions]
    handles = [
        attn.register_forward_pre_hook(
            _passing(rec, _compat.cache_argument(attn)), with_kwargs=True
        )
        for attn, rec in zip(places.attentions, recorders, strict=True)
    ]
    cache = _compat.new_encoder_decoder_cache(places.decoder.config)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(**inputs, **{_compat.cache_argument(model): cache}, use_cache=True)
    except (ValueError, TypeError, IndexError) as err:  # a RuntimeError (meta kernels) passes
        raise UnsupportedModelError(
            f"prefix-tuning cannot handle {name}: one forward with an EncoderDecoderCache and a "
            f"cache for each encoder attention failed ({type(err).__name__}: {err})"
        ) from None
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    if any(len(r.calls) != 1 for r in recorders):
        raise UnsupportedModelError(
            f"prefix-tuning cannot handle {name}: its encoder attention modules did not each put "
            "their keys and values through the cache they were given"
        )
    own = _compat.cached_keys_values(cache.self_attention_cache)
    cross = _compat.cached_keys_values(cache.cross_attention_cache)
    if not own or len(own) != len(cross):
        raise UnsupportedModelError(
            f"prefix-tuning cannot handle {name}: its decoder filled {len(own)} self-attention and "
            f"{len(cross)} cross-attention cache layers"
        )
    places.decoder_layers = len(own)
    shapes = {(c[1], c[3]) for c in [r.calls[0] for r in recorders]}
    shapes |= {(int(k.shape[1]), int(k.shape[3])) for k, _ in own + cross}
    if len(shapes) != 1:
        raise UnsupportedModelError(
            f"prefix-tuning cannot handle {name}: its attention layers hold keys of different "
            f"shapes (heads, head_dim) {sorted(shapes)}; a prefix table holds one shape"
        )
    heads, head_dim = shapes.pop()
    width = getattr(model.config, "d_model", None) or getattr(model.config, "hidden_size", None)
    layers = places.encoder_layers + 2 * places.decoder_layers
    return KVShape(layers, heads, head_dim, int(width or heads * head_dim))


def _probe_inputs(model: nn.Module) -> dict[str, Any]:
    device = next(model.parameters()).device
    start = getattr(model.config, "decoder_start_token_id", None) or 0
    return {
        "input_ids": torch.zeros(1, 2, dtype=torch.long, device=device),
        "decoder_input_ids": torch.full((1, 1), int(start), device=device),
    }


def _passing(cache: Any, argument: str) -> Any:
    def hook(
        module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        for other in _compat.CACHE_ARGUMENTS:
            kwargs.pop(other, None)
        return args, {**kwargs, argument: cache}

    return hook
