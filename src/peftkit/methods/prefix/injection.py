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
from typing import Any

import torch
from torch import nn

from ... import _compat
from ..._compat import UnsupportedModelError, check_transformers_version
from ...layers import AdapterModule
from .discovery import locate
from .marks import MARK, CacheMark, cache_mark, continue_marked, drop_created_cache, signature_of
from .seq2seq import EncoderDecoderInjector
from .table import KVShape, PrefixTable

# re-exported: UnsupportedModelError and check_transformers_version from _compat, locate
__all__ = ["UnsupportedModelError", "check_transformers_version", "locate"]

# (oldest (major, minor, patch), newest or None): the declared window, kept in _compat.
TRANSFORMERS_RANGE = (_compat.TRANSFORMERS_MIN, None)
ATTR = "peftkit_prefix"

CHECKPOINTING_ERROR = (
    "prefix-tuning feeds its prefix to attention through the KV cache, and transformers' activation "
    "(gradient) checkpointing drops the cache inside checkpointed layers during training; turn it "
    "off with model.activation_checkpointing_disable() (gradient_checkpointing_disable() on older "
    "transformers), or use LoRA or adapters with checkpointing"
)


def supported_range() -> str:
    """The transformers versions prefix-tuning supports, as a pip requirement."""
    return _compat.transformers_window()


def injector_of(
    model: nn.Module,
) -> tuple[nn.Module, PrefixInjector | EncoderDecoderInjector] | None:
    """The body that holds ``model``'s prefix injector, and the injector; None without one."""
    for module in model.modules():
        found = module._modules.get(ATTR)
        if isinstance(found, PrefixInjector | EncoderDecoderInjector):
            return module, found
    return None


def located(model: nn.Module) -> tuple[nn.Module, KVShape, bool]:
    """``locate(model)``, or, once a prefix is installed, its body and shape (no probe forward)."""
    found = injector_of(model)
    if found is None:
        return locate(model)
    body, injector = found
    tables = [t for t in injector.tables.values() if isinstance(t, PrefixTable)]
    if not tables:
        return locate(model)
    return body, tables[0].shape, injector.encoder


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
        self.cache_arg = _compat.cache_argument(body)
        self.takes_positions = "position_ids" in inspect.signature(body.forward).parameters
        self.checkpointing = _compat.checkpointing_modules(body)
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
        given = _compat.take_cache(named)  # under either name; passed on under the body's own
        mark = cache_mark(given)
        active = [t for t in self.tables.values() if isinstance(t, PrefixTable) and t.active]
        if not active:
            if mark is not None:
                raise RuntimeError(
                    f"the KV cache holds the prefix of {[n for n, _ in mark.signature]}, but no "
                    f"prefix adapter is active; start a new cache ({self.cache_arg}=None)"
                )
            return None  # the call goes on as the caller made it
        if body.training and any(m.gradient_checkpointing for m in self.checkpointing):
            raise RuntimeError(CHECKPOINTING_ERROR)
        lead = named.get("input_ids")
        lead = named.get("inputs_embeds") if lead is None else lead
        if lead is None:
            return None  # the model itself reports the missing input
        batch, seq = int(lead.shape[0]), int(lead.shape[1])
        cache, past, prefix = self._cache(body, given, mark, active, batch)
        mask = named.get("attention_mask")
        named[self.cache_arg] = cache
        if self.takes_positions:  # ALiBi models (Bloom) take none: their biases are relative
            if named.get("position_ids") is None:
                named["position_ids"] = _positions(mask, past, seq, lead.device)
            shift = _position_shift(active, prefix)
            if shift:
                named["position_ids"] = named["position_ids"] + shift
        named["attention_mask"] = self._mask(mask, batch, prefix, past + seq, lead.device)
        if named.get(_compat.CACHE_POSITION) is not None:  # models of 4.57 / early 5.x take it
            named[_compat.CACHE_POSITION] = named[_compat.CACHE_POSITION] + prefix  # cache index
        return (), named

    def after_forward(
        self, body: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any
    ) -> Any:
        """Drop a cache the hook created from the output when the caller asked for no cache."""
        mark = cache_mark(kwargs.get(self.cache_arg))
        return drop_created_cache(mark, kwargs, body.config, output)

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
        signature = signature_of(active)
        if mark is not None:
            return continue_marked(cache, mark, signature, self.cache_arg)
        fresh = cache is None
        if fresh:
            cache = _compat.new_dynamic_cache(getattr(body, "config", None))
        else:
            _check_fillable(cache)
        kv = active[0]() if len(active) == 1 else torch.cat([t() for t in active], dim=3)
        for i in range(kv.shape[0]):
            cache.update(kv[i, 0].expand(batch, -1, -1, -1), kv[i, 1].expand(batch, -1, -1, -1), i)
        setattr(cache, MARK, CacheMark(signature, fresh))
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
    if not _compat.is_fillable_dynamic(cache):
        raise UnsupportedModelError(
            f"prefix-tuning puts its prefix into a DynamicCache with full-attention or "
            f"sliding-window layers (generate()'s default); got {type(cache).__name__}. Use the "
            "default cache"
        )
    if cache.get_seq_length() != 0:
        raise RuntimeError(
            f"the KV cache holds {cache.get_seq_length()} tokens computed without this prefix; "
            "pass a cache the prefixed model returned, or start a new one (cache=None)"
        )
