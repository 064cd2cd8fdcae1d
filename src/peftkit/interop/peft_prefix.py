"""Prefix-tuning in peft's format (``peft_type: "PREFIX_TUNING"``).

peft saves one tensor, ``prompt_embeddings`` of shape (P, L·2·H·d): row i holds virtual token i's
keys and values for every layer, ordered (layer, key/value, head, head_dim) — peftkit's table
(L, 2, H, P, d) with the token axis moved to the front. With ``prefix_projection=True`` peft
trains through an MLP but saves only the prefix it computes, the same folding peftkit does, so the
MLP never travels (either way). ``modules_to_save`` tensors are keyed ``base_model.<path>.<name>``.
The config carries the cache shape: ``num_layers`` L, ``num_attention_heads`` H (the key/value
heads under grouped-query attention), ``token_dim`` H·d.

Positions: peft gives real tokens the positions P … P+n−1, after the prefix; peftkit by default
keeps the base model's 0 … n−1. Imported adapters therefore use ``positions_after_prefix=True``
(the tensors are copied as they are and the outputs match peft's). On export, such adapters are
copied too; an adapter with base positions is exported for rotary (RoPE) models by rotating its
keys by the prefix length — a query at position p+P against a key rotated by P scores as one at p
against the unrotated key — and refused for absolute position embeddings (GPT-2, BERT), where no
prefix can undo the shift.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .. import _compat
from ..layers import SavedModule
from ..methods.base import Method
from ..methods.prefix import Prefix, PrefixConfig
from ..methods.prefix.injection import UnsupportedModelError, located
from ..methods.prefix.table import KVShape
from ..targeting import iter_modules
from .peft import (
    Converted,
    InteropError,
    PeftAdapter,
    PeftConverter,
    exact_names,
    register_peft_converter,
)
from .peft_lora import check_supported, peft_module_names, peft_saved_match, saved_tensors

PREFIX = "base_model."
EMBEDDINGS = "prompt_embeddings"
_KEY = "prefix.key_values"
# Models whose attention rotates queries and keys by position with the rotate-half RoPE.
ROTARY_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
LAYOUTS = (
    "peft lays out an encoder-decoder prefix (task_type SEQ_2_SEQ_LM) for the decoder's "
    "self-attention only (it empties the cross-attention cache and gives the encoder none), "
    "peftkit for the encoder's self-attention, the decoder's self-attention and the "
    "cross-attention; the layouts differ, so it converts neither way"
)
PREFIX_NEUTRAL = frozenset({
    "peft_type", "task_type", "base_model_name_or_path", "revision", "inference_mode",
    "auto_mapping", "peft_version", "num_virtual_tokens", "token_dim", "num_attention_heads",
    "num_layers", "num_transformer_submodules", "encoder_hidden_size", "prefix_projection",
    "init_weights", "modules_to_save",
})  # fmt: skip


@register_peft_converter
class PrefixConverter(PeftConverter):
    method = "prefix"
    peft_type = "PREFIX_TUNING"
    needs_task_type = True  # a plain PeftModel does not apply a prefix at all

    def to_peft(self, model: nn.Module, method: Method) -> PeftAdapter:
        assert isinstance(method, Prefix) and method.table is not None
        if _compat.encoder_decoder_parts(model) is not None:
            raise InteropError(f"this is an encoder-decoder prefix: {LAYOUTS}")
        config = method.config
        body, shape = _locate(model)
        kv = method.state_dict(model)[_KEY].detach()
        if not config.positions_after_prefix:
            kv = _rotate_keys(model, body, kv, config.prefix_length)
        saved = [layer for layer in method.layers if isinstance(layer, SavedModule)]
        universe = peft_module_names(model)
        to_save = exact_names(
            universe, [m.path for m in saved], peft_saved_match, "modules_to_save"
        )
        tensors = {EMBEDDINGS: kv.permute(3, 0, 1, 2, 4).reshape(config.prefix_length, -1)}
        for module in saved:
            for name, tensor in module.trained.state_dict().items():
                tensors[f"{PREFIX}{module.path}.{name}"] = tensor
        return PeftAdapter(_peft_fields(config, shape, to_save), tensors)

    def from_peft(self, model: nn.Module, adapter: PeftAdapter) -> Converted:
        cfg = adapter.config
        check_supported(cfg, PREFIX_NEUTRAL, "prefix-tuning")
        if cfg.get("num_transformer_submodules", 1) != 1:
            raise InteropError(
                f"num_transformer_submodules=2 is an encoder-decoder prefix: {LAYOUTS}"
            )
        _, shape = _locate(model)
        length = int(cfg.get("num_virtual_tokens") or 0)
        embeddings = adapter.tensors.get(EMBEDDINGS)
        if embeddings is None:
            raise InteropError(f"the adapter has no {EMBEDDINGS!r} tensor; not a prefix adapter")
        _check_shape(cfg, shape, length, tuple(embeddings.shape))
        rest = {k[len(PREFIX) :]: t for k, t in adapter.tensors.items() if k != EMBEDDINGS}
        if any(not k.startswith(PREFIX) for k in adapter.tensors if k != EMBEDDINGS):
            raise InteropError(
                f"tensor names must start with {PREFIX!r}; not a peft prefix adapter"
            )
        modules = [n for n, _ in iter_modules(model)]
        saved = saved_tensors(modules, cfg.get("modules_to_save") or [], rest)
        s = shape
        kv = embeddings.reshape(length, s.layers, 2, s.heads, s.head_dim).permute(1, 2, 3, 0, 4)
        try:
            config = PrefixConfig(
                prefix_length=length,
                positions_after_prefix=True,
                modules_to_save=exact_names(
                    [n for n in modules if n], list(saved), what="modules_to_save"
                ),
            )
        except ValueError as err:
            raise InteropError(
                f"the peft config does not make a valid PrefixConfig: {err}"
            ) from err
        tensors = {_KEY: kv.contiguous()}
        tensors.update({f"{p}.trained.{k}": t for p, own in saved.items() for k, t in own.items()})
        return Converted(config, tensors, {"folded": True})


def _peft_fields(config: PrefixConfig, shape: KVShape, to_save: list[str]) -> dict[str, Any]:
    token_dim = shape.heads * shape.head_dim
    return {
        "num_virtual_tokens": config.prefix_length,
        "num_layers": shape.layers,
        "num_attention_heads": shape.heads,
        "token_dim": token_dim,
        "encoder_hidden_size": token_dim,
        "num_transformer_submodules": 1,
        "prefix_projection": False,  # the prefix itself: an MLP, if any, is folded
        "init_weights": None,
        "modules_to_save": to_save or None,
    }


def _locate(model: nn.Module) -> tuple[nn.Module, KVShape]:
    try:
        body, shape, _ = located(model)
    except UnsupportedModelError as err:
        raise InteropError(f"peftkit's prefix-tuning does not support this model: {err}") from err
    return body, shape


def _check_shape(cfg: dict[str, Any], shape: KVShape, length: int, found: tuple[int, ...]) -> None:
    expected = {
        "num_layers": shape.layers,
        "num_attention_heads": shape.heads,
        "token_dim": shape.heads * shape.head_dim,
    }
    wrong = {k: cfg.get(k) for k, v in expected.items() if cfg.get(k) not in (None, v)}
    if wrong:
        raise InteropError(
            f"the adapter was made for a cache of {wrong}, this model caches {expected}; "
            "import it into the model it was trained on"
        )
    width = shape.layers * 2 * shape.heads * shape.head_dim
    if length < 1 or found != (length, width):
        raise InteropError(
            f"{EMBEDDINGS} has shape {found}, expected ({length}, {width}) for "
            f"num_virtual_tokens={length} on this model"
        )


def _rotate_keys(model: nn.Module, body: nn.Module, kv: torch.Tensor, length: int) -> torch.Tensor:
    """``kv`` with every key rotated by RoPE position ``length`` (peft's real tokens start there)."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    rotary = getattr(body, "rotary_emb", None)
    if model_type not in ROTARY_MODEL_TYPES or not isinstance(rotary, nn.Module):
        raise InteropError(
            f"peft gives real tokens the positions after the prefix; this {model_type} adapter was "
            "trained with the base positions, which a prefix on a model with absolute position "
            "embeddings cannot reproduce in peft. Train it with "
            "PrefixConfig(positions_after_prefix=True) to export it"
        )
    if float(getattr(rotary, "attention_scaling", 1.0)) != 1.0:
        raise InteropError(
            f"{type(rotary).__name__} scales its rotation (attention_scaling != 1); the prefix "
            "keys cannot be re-rotated exactly. Train with PrefixConfig(positions_after_prefix=True)"
        )
    keys = kv[:, 0]  # (L, H, P, d)
    with torch.no_grad():
        cos, sin = rotary(keys, torch.tensor([[length]], device=keys.device))
    cos, sin = cos.reshape(-1).to(keys), sin.reshape(-1).to(keys)
    if cos.numel() != keys.shape[-1]:
        raise InteropError("the model rotates part of each head only; export is not supported")
    half = keys.shape[-1] // 2
    turned = torch.cat([-keys[..., half:], keys[..., :half]], dim=-1)  # the quarter turn per pair
    return torch.stack([keys * cos + turned * sin, kv[:, 1]], dim=1)
