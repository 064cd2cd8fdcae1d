"""The attention a transformers model runs, and peftkit's grouped-query SDPA registered through
transformers' public ``AttentionInterface``."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .versions import _missing

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
