"""How a prefix reaches attention in a transformers model: through the public KV-cache interface.

A forward pre-hook on the transformer body (``model.base_model``: ``GPT2Model``, ``LlamaModel``,
``BertModel``...) runs before every call and, when a prefix adapter is active,

1. puts the prefix keys/values of every layer into a ``DynamicCache`` (a new one, or the empty one
   ``generate()`` passes on its first step) with ``cache.update(k, v, layer_idx)``; attention then
   attends over ``[prefix; past; new tokens]``, and gradients flow from the cache to the prefix;
2. extends the 2-D ``attention_mask`` with ones over the prefix;
3. supplies ``position_ids`` counted *without* the prefix (from the mask when one is given, so left
   padding is right; otherwise ``past .. past + seq``), so real tokens keep the positions they have
   in the base model; adapters with ``positions_after_prefix`` shift them (given or computed) by
   the prefix length, as HF peft does.

A cache that holds a prefix is marked; passed back (decoding steps), it is recognised and not filled
again. Nothing here subclasses or patches a transformers class.
"""

from __future__ import annotations

import inspect
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ...layers import AdapterModule
from .table import KVShape, PrefixTable

SUPPORTED_MODEL_TYPES = ("gpt2", "llama", "mistral", "qwen2", "qwen3", "bert")
ENCODER_MODEL_TYPES = ("bert",)
# [low, high) on (major, minor); tested on 4.57.6, 5.0.0 and 5.23.0
TRANSFORMERS_RANGE = ((4, 57), (6, 0))
ATTR = "peftkit_prefix"
_MARK = "_peftkit_prefix"
_BODY_ARGS = ("past_key_values", "attention_mask", "position_ids")

CHECKPOINTING_ERROR = (
    "prefix-tuning feeds its prefix to attention through the KV cache, and transformers' activation "
    "(gradient) checkpointing drops the cache inside checkpointed layers during training; turn it "
    "off with model.activation_checkpointing_disable() (gradient_checkpointing_disable() on older "
    "transformers), or use LoRA or adapters with checkpointing"
)


class UnsupportedModelError(TypeError):
    """Prefix-tuning cannot be applied to this model (architecture or transformers version)."""


def supported_range() -> str:
    (lo_major, lo_minor), (hi_major, hi_minor) = TRANSFORMERS_RANGE
    return f"transformers>={lo_major}.{lo_minor},<{hi_major}.{hi_minor}"


def supported_models() -> str:
    return (
        f"decoder LMs and encoders of model_type {', '.join(SUPPORTED_MODEL_TYPES)} "
        f"with full attention, on {supported_range()}"
    )


def check_transformers_version(version: str) -> None:
    numbers = [int(n) for n in re.findall(r"\d+", version)[:2]]
    low, high = TRANSFORMERS_RANGE
    if len(numbers) < 2 or not low <= (numbers[0], numbers[1]) < high:
        raise UnsupportedModelError(
            f"prefix-tuning needs {supported_range()} (it uses that cache interface); transformers "
            f"{version} is installed. Install a supported version: pip install '{supported_range()}'"
        )


def locate(model: nn.Module) -> tuple[nn.Module, KVShape, bool]:
    """The body to hook, the per-layer cache shape, and whether the body needs an explicit mask.

    Raises ``UnsupportedModelError`` naming what is supported.
    """
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if "transformers" not in sys.modules or model_type is None:
        raise UnsupportedModelError(
            f"prefix-tuning cannot handle {type(model).__name__}: it is not a transformers model. "
            f"Supported: {supported_models()}"
        )
    if model_type not in SUPPORTED_MODEL_TYPES or getattr(config, "is_encoder_decoder", False):
        raise UnsupportedModelError(
            f"prefix-tuning cannot handle {type(model).__name__} (model_type {model_type!r}). "
            f"Supported: {supported_models()}"
        )
    if getattr(config, "add_cross_attention", False):
        raise UnsupportedModelError(
            f"prefix-tuning cannot handle {type(model).__name__} with cross-attention "
            "(add_cross_attention=True); it supports self-attention decoders and encoders"
        )
    import transformers

    check_transformers_version(transformers.__version__)
    _check_full_attention(model, config)
    body: nn.Module = getattr(model, "base_model", model)
    params = inspect.signature(body.forward).parameters
    lacking = [name for name in _BODY_ARGS if name not in params]
    if lacking:
        raise UnsupportedModelError(
            f"prefix-tuning needs {type(body).__name__}.forward to take {', '.join(_BODY_ARGS)}; "
            f"it lacks {lacking}. Supported: {supported_models()}"
        )
    encoder = model_type in ENCODER_MODEL_TYPES and not getattr(config, "is_decoder", False)
    return body, kv_shape(config), encoder


def _check_full_attention(model: nn.Module, config: Any) -> None:
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    kinds = sorted({type(layer).__name__ for layer in DynamicCache(config=config).layers})
    if any(kind != DynamicLayer.__name__ for kind in kinds):
        raise UnsupportedModelError(
            f"prefix-tuning cannot handle {type(model).__name__}: its cache layers are {kinds}, and "
            "a sliding window would drop the prefix. It supports full-attention layers only (e.g. "
            "a config with sliding_window=None)"
        )


def kv_shape(config: Any) -> KVShape:
    """Heads and head size of the cached keys/values, from the model config."""
    heads = int(config.num_attention_heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    return KVShape(int(config.num_hidden_layers), kv_heads, head_dim, int(config.hidden_size))


@dataclass
class CacheMark:
    """Stored on a cache that holds a prefix: which adapters' prefixes (name, length), in order."""

    signature: tuple[tuple[str, int], ...]
    fresh: bool  # created by the hook in the current call (not passed in by the caller)

    @property
    def length(self) -> int:
        return sum(n for _, n in self.signature)


def cache_mark(cache: object) -> CacheMark | None:
    mark = getattr(cache, _MARK, None)
    return mark if isinstance(mark, CacheMark) else None


class PrefixInjector(AdapterModule):
    """Holds every prefix adapter's table on one body and feeds the active ones to attention.

    Lives on the body as ``peftkit_prefix``; several prefix adapters share it (their prefixes are
    concatenated in application order when several are active).
    """

    def __init__(self, body: nn.Module, encoder: bool) -> None:
        super().__init__()
        self.tables = nn.ModuleDict()
        self.encoder = encoder
        params = inspect.signature(body.forward).parameters.values()
        kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
        self.arg_names = [p.name for p in params if p.kind in kinds]
        self.checkpointing = [m for m in body.modules() if hasattr(m, "gradient_checkpointing")]
        self.hook_ids: tuple[int, int] = (-1, -1)

    # -- lifecycle ---------------------------------------------------------------------------
    @staticmethod
    def install(body: nn.Module, encoder: bool) -> PrefixInjector:
        """The body's injector, created (with its hooks) on first use."""
        found = body._modules.get(ATTR)
        if isinstance(found, PrefixInjector):
            return found
        if hasattr(body, ATTR):
            raise ValueError(f"{type(body).__name__} already has an attribute {ATTR!r}")
        injector = PrefixInjector(body, encoder)
        body.add_module(ATTR, injector)
        pre = body.register_forward_pre_hook(injector.before_forward, with_kwargs=True)
        post = body.register_forward_hook(
            injector.after_forward, with_kwargs=True, always_call=True
        )
        injector.hook_ids = (pre.id, post.id)
        return injector

    def uninstall(self, body: nn.Module) -> None:
        """Take the injector and its hooks off ``body``."""
        # Removed by id rather than through the RemovableHandle: a handle keeps a reference to the
        # hook dict of the model it was made on, so a deep-copied model's handle would remove the
        # original's hook.
        pre, post = self.hook_ids
        for name in ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs"):
            getattr(body, name, {}).pop(pre, None)
        for name in (
            "_forward_hooks",
            "_forward_hooks_with_kwargs",
            "_forward_hooks_always_called",
        ):
            getattr(body, name, {}).pop(post, None)
        if body._modules.get(ATTR) is self:
            delattr(body, ATTR)

    # -- the hooks ---------------------------------------------------------------------------
    def before_forward(
        self, body: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
        named = self._named(args, kwargs)
        mark = cache_mark(named.get("past_key_values"))
        active = [t for t in self.tables.values() if isinstance(t, PrefixTable) and t.active]
        if not active:
            if mark is not None:
                raise RuntimeError(
                    f"past_key_values holds the prefix of {[n for n, _ in mark.signature]}, but no "
                    "prefix adapter is active; start a new cache (past_key_values=None)"
                )
            return None
        if body.training and any(m.gradient_checkpointing for m in self.checkpointing):
            raise RuntimeError(CHECKPOINTING_ERROR)
        lead = named.get("input_ids")
        lead = named.get("inputs_embeds") if lead is None else lead
        if lead is None:
            return None  # the model itself reports the missing input
        batch, seq = int(lead.shape[0]), int(lead.shape[1])
        cache, past, prefix = self._cache(body, named.get("past_key_values"), mark, active, batch)
        mask = named.get("attention_mask")
        named["past_key_values"] = cache
        if named.get("position_ids") is None:
            named["position_ids"] = _positions(mask, past, seq, lead.device)
        shift = _position_shift(active, prefix)
        if shift:
            named["position_ids"] = named["position_ids"] + shift
        named["attention_mask"] = self._mask(mask, batch, prefix, past + seq, lead.device)
        if named.get("cache_position") is not None:  # models of 4.57 / early 5.x still take it
            named["cache_position"] = named["cache_position"] + prefix  # index into the cache
        return (), named

    def after_forward(
        self, body: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any
    ) -> Any:
        """Drop a cache the hook created from the output when the caller asked for no cache."""
        mark = cache_mark(kwargs.get("past_key_values"))
        if mark is None or not mark.fresh:
            return None
        mark.fresh = False
        use_cache = kwargs.get("use_cache")
        if use_cache is None:
            use_cache = getattr(body.config, "use_cache", False)
        if use_cache or not isinstance(output, Mapping) or output.get("past_key_values") is None:
            return None
        return type(output)(**{k: v for k, v in output.items() if k != "past_key_values"})

    # -- helpers -----------------------------------------------------------------------------
    def _named(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
        if not args:
            return dict(kwargs)
        if len(args) > len(self.arg_names):
            raise TypeError(f"too many positional arguments ({len(args)}) for the model body")
        return {**dict(zip(self.arg_names, args, strict=False)), **kwargs}

    def _cache(
        self,
        body: nn.Module,
        cache: Any,
        mark: CacheMark | None,
        active: list[PrefixTable],
        batch: int,
    ) -> tuple[Any, int, int]:
        """The cache to use (holding the prefix), the real tokens already in it, the prefix length."""
        from transformers import DynamicCache

        signature = tuple((t.adapter_name, t.length) for t in active)
        if mark is not None:
            if mark.signature != signature:
                raise RuntimeError(
                    f"past_key_values holds the prefixes {list(mark.signature)}, but the active "
                    f"prefix adapters are {list(signature)}; start a new cache (past_key_values=None)"
                )
            return cache, cache.get_seq_length() - mark.length, mark.length
        fresh = cache is None
        if fresh:
            cache = DynamicCache(config=getattr(body, "config", None))
        else:
            _check_fillable(cache)
        kv = active[0]() if len(active) == 1 else torch.cat([t() for t in active], dim=3)
        for i in range(kv.shape[0]):
            cache.update(kv[i, 0].expand(batch, -1, -1, -1), kv[i, 1].expand(batch, -1, -1, -1), i)
        setattr(cache, _MARK, CacheMark(signature, fresh))
        return cache, 0, int(kv.shape[3])

    def _mask(
        self,
        mask: torch.Tensor | None,
        batch: int,
        prefix: int,
        length: int,
        device: torch.device,
    ) -> torch.Tensor | None:
        """The 2-D mask with ones over the prefix (None stays None where the model needs none)."""
        if mask is None:
            if not self.encoder:
                return None  # causal: the cache tells the model how many keys precede the input
            return torch.ones(batch, prefix + length, dtype=torch.long, device=device)
        if mask.ndim != 2:
            raise ValueError(
                f"prefix-tuning extends a 2-D attention_mask (batch, tokens) over its prefix; got "
                f"shape {tuple(mask.shape)}. Pass the 2-D padding mask"
            )
        if mask.shape[-1] != length:
            raise ValueError(
                f"attention_mask covers {mask.shape[-1]} tokens but the cache and input hold "
                f"{length} (the mask counts tokens without the prefix). If the cache was cropped "
                "to an absolute length (assisted generation does so in older transformers), that "
                "cannot work with a prefix in the cache"
            )
        return torch.cat([mask.new_ones(mask.shape[0], prefix), mask], dim=-1)


def _position_shift(active: list[PrefixTable], prefix: int) -> int:
    """How far real tokens' positions move: the prefix length where the adapters count it."""
    after = {t.positions_after_prefix for t in active}
    if len(after) > 1:
        names = [t.adapter_name for t in active if t.positions_after_prefix]
        raise ValueError(
            f"active prefix adapters disagree on positions_after_prefix (True for {names}); "
            "activate only adapters that agree"
        )
    return prefix if after == {True} else 0


def _positions(
    mask: torch.Tensor | None, past: int, seq: int, device: torch.device
) -> torch.Tensor:
    """Positions of the new tokens without the prefix: from the padding mask when there is one."""
    if mask is None or mask.ndim != 2:
        return torch.arange(past, past + seq, device=device).unsqueeze(0)
    counted = mask.long().cumsum(-1) - 1
    return counted.masked_fill(mask == 0, 0)[:, -seq:]


def _check_fillable(cache: Any) -> None:
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    if not isinstance(cache, DynamicCache) or any(
        type(layer) is not DynamicLayer for layer in cache.layers
    ):
        raise UnsupportedModelError(
            f"prefix-tuning puts its prefix into a DynamicCache with full-attention layers "
            f"(generate()'s default); got {type(cache).__name__}. Use the default cache"
        )
    if cache.get_seq_length() != 0:
        raise RuntimeError(
            f"past_key_values holds {cache.get_seq_length()} tokens computed without this prefix; "
            "pass a cache the prefixed model returned, or start a new one (past_key_values=None)"
        )
