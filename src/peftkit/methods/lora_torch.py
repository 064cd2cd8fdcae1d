"""LoRA on torch's own layers that are not plain linear maps: nn.Conv1d and nn.MultiheadAttention.

nn.MultiheadAttention never calls its projections: its forward hands ``in_proj_weight`` (q, k and v
packed, (3E, E)) and ``out_proj.weight`` to ``F.multi_head_attention_forward``. So the attention
module is wrapped whole, and the wrapper runs the module's own forward with the effective weights
W + s·B A swapped in for the call (the base parameters are never written; gradients reach A and B,
and W too where a method trains it).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from ..layers import AdapterLayer, MergeRecord, cast_like, next_merge_order, wide
from .lora_layers import Init, LoraLayer


def _conv_delta(layer: LoraLayer) -> torch.Tensor:
    """s · B A as a convolution weight (out, in, *kernel): the 1x1 conv B after the conv A."""
    flat = wide(layer.lora_B).flatten(1) @ wide(layer.lora_A).flatten(1)
    return flat.view(layer.lora_B.shape[0], *layer.lora_A.shape[1:]) * layer.scaling


class LoraConv1d(LoraLayer):
    """y = base(x) + s * conv1x1_B(conv_A(dropout(x))), conv_A with the base's kernel size, stride,
    padding and dilation.

    x: (N, in, L) or (in, L).  A: (r, in, k), B: (out, r, 1).
    """

    def factor_shapes(self, inner: nn.Module) -> tuple[tuple[int, ...], tuple[int, ...]]:
        assert isinstance(inner, nn.Conv1d)
        if inner.groups != 1 or inner.padding_mode != "zeros":
            # A grouped conv's update is block-diagonal over channel groups; a dense A would not
            # fold into that weight, and other padding modes pad before the conv, not inside it.
            raise ValueError(
                f"LoRA on Conv1d {self.path!r} needs groups=1 and padding_mode='zeros' (it has "
                f"groups={inner.groups}, padding_mode={inner.padding_mode!r}); add it to exclude"
            )
        return (self.r, inner.in_channels, inner.kernel_size[0]), (inner.out_channels, self.r, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y: torch.Tensor = self.base(x)
        if not self.enabled:
            return y
        conv = self.base_layer()
        assert isinstance(conv, nn.Conv1d)
        a, b = cast_like(self.lora_A, x), cast_like(self.lora_B, x)
        h = F.conv1d(self.dropout(x), a, None, conv.stride, conv.padding, conv.dilation)
        return y + F.conv1d(h, b) * self.scaling

    def delta_weight(self) -> torch.Tensor:
        return _conv_delta(self)


def _init_pair(a: torch.Tensor, b: torch.Tensor, init: Init, r: int) -> None:
    """As ``LoraLayer.init_factors``: B zero, A Kaiming-uniform or N(0, 1/r)."""
    with torch.no_grad():
        if init == "gaussian":
            nn.init.normal_(a, std=1.0 / r)
        else:
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        nn.init.zeros_(b)


def _no_fast_path(module: nn.Module, args: Any) -> None:
    """A forward pre-hook that changes nothing. nn.TransformerEncoderLayer's eval-mode fast path
    reads ``self_attn.in_proj_weight`` and ``self_attn.out_proj.weight`` itself, which would skip
    the adapted weights; torch takes that path only while no submodule has a forward hook."""
    return None


class LoraMultiheadAttention(LoraLayer):
    """LoRA on nn.MultiheadAttention: one low-rank update on the packed in-projection and one on
    the out-projection, with the same rank and scale (as peft adapts it).

    W_in' = W_in + s·B A, A: (r, E), B: (3E, r) (rows q, k, v as in ``in_proj_weight``);
    W_out' = W_out + s·B_o A_o, A_o: ``lora_out_A`` (r, E), B_o: ``lora_out_B`` (E, r).
    forward(query, key, value, ...) takes and returns what the module does (batch_first, masks,
    need_weights, is_causal); biases are not adapted. The attention takes weights, not a function,
    so forward forms both (E², 3E² elements) each call. No dropout: a dropped input feature would
    be dropped from the base path too. Needs kdim == vdim == embed_dim (one packed in_proj_weight).
    The layer keeps a parent nn.TransformerEncoderLayer off its fast path, see ``_no_fast_path``.
    """

    def __init__(
        self,
        base: nn.Module,
        adapter_name: str,
        path: str,
        *,
        r: int,
        scaling: float,
        dropout: float,
        init: Init = "kaiming",
        adapter_dtype: str = "auto",
    ) -> None:
        super().__init__(
            base,
            adapter_name,
            path,
            r=r,
            scaling=scaling,
            dropout=0.0,
            init=init,
            adapter_dtype=adapter_dtype,
        )
        _check_stack(self)
        embed = self.lora_A.shape[1]
        like = self.lora_A
        self.lora_out_A = nn.Parameter(like.new_empty((r, embed)))
        self.lora_out_B = nn.Parameter(like.new_empty((embed, r)))
        _init_pair(self.lora_out_A, self.lora_out_B, init, r)
        self.register_forward_pre_hook(_no_fast_path)

    def factor_shapes(self, inner: nn.Module) -> tuple[tuple[int, ...], tuple[int, ...]]:
        assert isinstance(inner, nn.MultiheadAttention)
        if not inner._qkv_same_embed_dim or inner.in_proj_weight is None:
            raise ValueError(
                f"LoRA on nn.MultiheadAttention {self.path!r} needs kdim == vdim == embed_dim "
                f"(one packed in_proj_weight); it has embed_dim={inner.embed_dim}, "
                f"kdim={inner.kdim}, vdim={inner.vdim}. Add it to exclude"
            )
        embed = int(inner.embed_dim)
        return (self.r, embed), (3 * embed, self.r)

    def forward(self, query: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if not self.enabled:
            return self.base(query, *args, **kwargs)
        w_in, w_out = self.weights()
        prefix = _prefix_to_base(self)
        swapped = {
            f"{prefix}in_proj_weight": _plus(w_in, self.lora_B, self.lora_A, self),
            f"{prefix}out_proj.weight": _plus(w_out, self.lora_out_B, self.lora_out_A, self),
        }
        return functional_call(self.base, swapped, (query, *args), kwargs)

    def delta_weight(self) -> torch.Tensor:
        """The update to ``in_proj_weight`` (3E, E); ``delta_out_weight`` has out_proj's."""
        return (wide(self.lora_B) @ wide(self.lora_A)) * self.scaling

    def delta_out_weight(self) -> torch.Tensor:
        """The update to ``out_proj.weight`` (E, E)."""
        return (wide(self.lora_out_B) @ wide(self.lora_out_A)) * self.scaling

    def weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``in_proj_weight`` and ``out_proj.weight`` as the module holds them now."""
        attn = self.base_layer()
        assert isinstance(attn, nn.MultiheadAttention)
        w_out = attn.out_proj.weight
        assert isinstance(w_out, torch.Tensor)
        return attn.in_proj_weight, w_out

    def folded_tensors(self) -> list[torch.Tensor]:
        return list(self.weights())

    def updated(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(base weight, its update) for in_proj and out_proj: what a merge adds."""
        w_in, w_out = self.weights()
        return [(w_in, self.delta_weight()), (w_out, self.delta_out_weight())]

    def merged_state(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        deltas = {"in_proj_weight": self.delta_weight, "out_proj.weight": self.delta_out_weight}
        delta = deltas.get(name)
        return tensor if delta is None else tensor + delta().to(tensor)

    def merge(self) -> None:
        """Add both updates to the weights in place; unmerge subtracts the same updates."""
        if self.merged:
            return
        with torch.no_grad():
            for weight, delta in self.updated():
                weight.add_(delta.to(device=weight.device, dtype=weight.dtype))
        self.record = MergeRecord(next_merge_order(), None, None)
        self.merged = True

    def unmerge(self) -> None:
        if not self.merged:
            return
        with torch.no_grad():
            for weight, delta in self.updated():
                weight.sub_(delta.to(device=weight.device, dtype=weight.dtype))
        self.record = None
        self.merged = False


def _plus(weight: torch.Tensor, b: torch.Tensor, a: torch.Tensor, layer: LoraLayer) -> torch.Tensor:
    """weight + s·B A in the weight's dtype (float32 factors on a 16-bit base cast themselves)."""
    return torch.addmm(weight, cast_like(b, weight), cast_like(a, weight), alpha=layer.scaling)


def _check_stack(layer: LoraMultiheadAttention) -> None:
    """Below this wrapper only other LoRA attention wrappers: each runs the attention with the
    weights it is given, so the updates add up; another kind of wrapper would not read them."""
    inner = layer.base
    while isinstance(inner, AdapterLayer):
        if not isinstance(inner, LoraMultiheadAttention):
            raise ValueError(
                f"LoRA on nn.MultiheadAttention {layer.path!r} cannot sit over "
                f"{type(inner).__name__} (adapter {inner.adapter_name!r}); apply it first, or "
                "add the module to this adapter's exclude"
            )
        inner = inner.base


def _prefix_to_base(layer: AdapterLayer) -> str:
    """The name of the original module relative to ``layer.base``: '' or 'base.' per wrapper."""
    prefix = ""
    inner = layer.base
    while isinstance(inner, AdapterLayer):
        prefix += "base."
        inner = inner.base
    return prefix
