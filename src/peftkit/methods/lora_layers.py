"""The LoRA layers: one wrapper per kind of original module, all sharing ``LoraLayer``'s factors.

``LoraLinear`` covers nn.Linear, transformers' Conv1D (weight stored transposed) and the quantized
linear kinds (``peftkit.quant``); ``LoraEmbedding`` and ``LoraConv2d`` the other two. torch's
nn.Conv1d and nn.MultiheadAttention live in ``lora_torch``, DoRA's variants in ``dora``; the method
(``lora``) picks among them. This module imports none of those, so each can build on it.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..layers import AdapterLayer, autocast_on, cast_like, wide
from ..targeting import is_conv1d, linear_features

Init = Literal["kaiming", "gaussian"]


class LoraLayer(AdapterLayer):
    """Shared state of the LoRA wrappers: factors ``lora_A`` and ``lora_B``, rank, scale, dropout."""

    additive = True
    mergeable = True
    weight_independent = True  # s·BA does not read W: unmerge subtracts it, no copy kept

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
        super().__init__(base, adapter_name, path)
        self.r = r
        self.scaling = scaling
        # p=0 must not add an op: nn.Dropout(0) would still run (and on some paths save x).
        self.dropout: nn.Module = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        kw = self.factor_placement(adapter_dtype)
        a_shape, b_shape = self.factor_shapes(self.base_layer())
        self.lora_A = nn.Parameter(torch.empty(a_shape, **kw))
        self.lora_B = nn.Parameter(torch.empty(b_shape, **kw))
        self.init_factors(init)

    def factor_shapes(self, inner: nn.Module) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Shapes of A and B for the wrapped module."""
        raise NotImplementedError

    def init_factors(self, init: Init) -> None:
        """B = 0 so the layer starts as the identity; A per ``init``."""
        with torch.no_grad():
            if init == "gaussian":
                nn.init.normal_(self.lora_A, std=1.0 / self.r)
            else:
                nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, r={self.r}, scaling={self.scaling:g}"


class LoraLinear(LoraLayer):
    """y = base(x) + s * B A dropout(x);  x: (..., in), y: (..., out).  A: (r, in), B: (out, r).

    Also wraps transformers' Conv1D, whose weight is stored as (in, out): ``delta_weight`` returns
    the update in the base weight's own layout; and quantized linear layers (``peftkit.quant``),
    sized from their logical features. Factors kept in float32 on a 16-bit base are cast to x's
    dtype in forward (r·(in+out) elements), never x to float32.
    """

    def factor_shapes(self, inner: nn.Module) -> tuple[tuple[int, ...], tuple[int, ...]]:
        in_f, out_f = linear_features(inner)
        return (self.r, in_f), (out_f, self.r)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            out: torch.Tensor = self.base(x)
            return out
        # When nothing below can observe it, the base sees x as 2-D (..., in) -> (n, in): same math
        # for a linear layer, and its fresh 2-D output can take the update in place (see
        # _add_scaled). A hook below sees x and the output in the shapes the model gave them.
        flat = x.reshape(-1, x.shape[-1])
        private = self.base_output_is_private()
        y = _base_rows(self, x, flat, private)
        y = _add_scaled(
            y, F.linear(self.dropout(flat), cast_like(self.lora_A, flat)), self, private
        )
        return y if x.dim() == 2 else y.view(*x.shape[:-1], y.shape[-1])

    def delta_weight(self) -> torch.Tensor:
        delta = (wide(self.lora_B) @ wide(self.lora_A)) * self.scaling
        return delta.t() if is_conv1d(self.base_layer()) else delta


class LoraEmbedding(LoraLayer):
    """y = base(ids) + s * A[:, ids]ᵀ Bᵀ;  ids: (...), y: (..., dim).  A: (r, vocab), B: (dim, r).

    The adapter path has no dropout: dropping token ids is meaningless. As in the base, the
    ``padding_idx`` row never changes: A's column for it starts at zero and gets no gradient.
    """

    def factor_shapes(self, inner: nn.Module) -> tuple[tuple[int, ...], tuple[int, ...]]:
        assert isinstance(inner, nn.Embedding)
        return (self.r, inner.num_embeddings), (inner.embedding_dim, self.r)

    def init_factors(self, init: Init) -> None:
        super().init_factors(init)
        pad = self._padding_row()
        if pad is not None:
            with torch.no_grad():
                self.lora_A[:, pad] = 0

    def _padding_row(self) -> int | None:
        pad = getattr(self.base_layer(), "padding_idx", None)
        return None if pad is None else int(pad)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            out: torch.Tensor = self.base(ids)
            return out
        flat = ids.reshape(-1)
        private = self.base_output_is_private()  # a hook below sees ids in the model's shape
        y = _base_rows(self, ids, flat, private)
        h = F.embedding(flat, self.lora_A.t(), self._padding_row())
        y = _add_scaled(y, h, self, private)
        return y.view(*ids.shape, y.shape[-1])

    def delta_weight(self) -> torch.Tensor:
        return (wide(self.lora_B) @ wide(self.lora_A)).t() * self.scaling


class LoraConv2d(LoraLayer):
    """y = base(x) + s * conv1x1_B(conv_A(dropout(x))), conv_A with the base's kernel, stride, padding.

    x: (N, in, H, W).  A: (r, in, kh, kw), B: (out, r, 1, 1).
    """

    def factor_shapes(self, inner: nn.Module) -> tuple[tuple[int, ...], tuple[int, ...]]:
        assert isinstance(inner, nn.Conv2d)
        if inner.groups != 1 or inner.padding_mode != "zeros":
            raise ValueError(
                f"LoRA on Conv2d {self.path!r} needs groups=1 and padding_mode='zeros'; "
                "add it to exclude"
            )
        kh, kw = inner.kernel_size
        return (self.r, inner.in_channels, kh, kw), (inner.out_channels, self.r, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y: torch.Tensor = self.base(x)
        if not self.enabled:
            return y
        conv = self.base_layer()
        assert isinstance(conv, nn.Conv2d)
        a, b = cast_like(self.lora_A, x), cast_like(self.lora_B, x)
        h = F.conv2d(self.dropout(x), a, None, conv.stride, conv.padding, conv.dilation)
        return y + F.conv2d(h, b) * self.scaling

    def delta_weight(self) -> torch.Tensor:
        flat = wide(self.lora_B).flatten(1) @ wide(self.lora_A).flatten(1)
        return flat.view(self.lora_B.shape[0], *self.lora_A.shape[1:]) * self.scaling


def _base_rows(
    layer: LoraLayer, x: torch.Tensor, flat: torch.Tensor, private: bool
) -> torch.Tensor:
    """The base's output as rows (n, out): called on ``flat`` when its output is private, else on
    ``x`` as the model passed it, so a hook below sees the shapes it would see without LoRA."""
    if private:
        out: torch.Tensor = layer.base(flat)
        return out
    y: torch.Tensor = layer.base(x)
    return y.reshape(-1, y.shape[-1])


def _add_scaled(y: torch.Tensor, h: torch.Tensor, layer: LoraLayer, private: bool) -> torch.Tensor:
    """y + s · h Bᵀ as one GEMM;  y: (n, out) the base's output, h: (n, r).  B A is never formed.

    The GEMM accumulates into y's own memory when y is a fresh tensor (not a view) of h's dtype
    that no forward hook below could hold (``private``, from ``base_output_is_private``): then
    nothing else sees the wrapped layer's output and its backward does not need it, so this saves
    allocating and copying an output-sized tensor per call (the largest cost of the adapter path
    after the GEMMs themselves). Otherwise (transformers' Conv1D returns a view; mixed dtypes; a
    hook that may keep the base output) an out-of-place addmm computes the same.
    """
    b: torch.Tensor = layer.lora_B
    scale = layer.scaling
    if not autocast_on(y):
        h, b = h.to(y.dtype), b.to(y.dtype)  # float32 factors on a 16-bit base: cast the small ones
    if private and y._base is None and y.dtype == h.dtype:
        return y.addmm_(h, b.to(y.dtype).t(), alpha=scale)
    return torch.addmm(y, h, b.t(), alpha=scale)
