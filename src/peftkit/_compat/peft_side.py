"""The one piece of HF peft's behaviour peftkit reads: how often its LoRA on nn.MultiheadAttention
adds the out-projection update."""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn

from .versions import UnsupportedModelError


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
