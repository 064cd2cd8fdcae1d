"""DoRA: weight-decomposed low-rank adaptation (Liu et al., 2024), the ``dora=True`` form of LoRA.

W' = m ⊙ (W + s B A) / ‖W + s B A‖, the norm taken per output feature over all of its inputs
(an (out, in) weight: over ``in``; Conv2d: over (in, kh, kw); transformers' Conv1D stores (in, out),
so its norm runs over the stored rows' transpose). The magnitude m: (out,) trains with the factors
and starts at ‖W‖, so with B = 0 a fresh layer computes exactly what its base does.

The norm is treated as a constant of each step (the paper's section 4.3, as peft does): it gets no
gradient, so a step trains the same update in both libraries. It is computed from the weight's
row norms and two small products, never forming an (out, in) tensor:

    ‖W_i + s (BA)_i‖² = ‖W_i‖² + 2 s Σ_k B_ik (W Aᵀ)_ik + s² B_i (A Aᵀ) B_iᵀ

with W Aᵀ: (out, r) and A Aᵀ: (r, r). ‖W_i‖² is recomputed every call (one read of W, no copy)
rather than cached: a cache would have to notice every change of W (a merge below, a load, a
dtype or device move), and a stale norm is silent.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import quant
from ..layers import AdapterLayer, SavedModule, cast_like, wide
from ..targeting import is_conv1d
from .lora_layers import Init, LoraConv2d, LoraLayer, LoraLinear, _add_scaled, _base_rows


def dora_kind(module: nn.Module, path: str) -> type[LoraLayer]:
    """The DoRA wrapper for ``module`` (an original module, or a stack of adapter layers over one),
    or a ``ValueError`` naming the way out."""
    inner = module
    while isinstance(inner, AdapterLayer):
        if not inner.mergeable or isinstance(inner, SavedModule):  # neither has such a weight
            raise ValueError(
                f"DoRA (dora=True) at {path!r} normalises the weight the layers below compute "
                f"with, but the {type(inner).__name__} of adapter {inner.adapter_name!r} there has "
                "no such weight (it is not linear in it); apply the DoRA adapter before that one, "
                "or exclude this module"
            )
        inner = inner.base
    if isinstance(inner, (nn.Conv1d, nn.MultiheadAttention)):
        raise ValueError(
            f"DoRA (dora=True) does not adapt torch's {type(inner).__name__} at {path!r} (it adapts "
            "nn.Linear, transformers' Conv1D and nn.Conv2d): add it to exclude, or give it a "
            "plain LoRA adapter of its own (dora=False)"
        )
    if isinstance(inner, nn.Embedding):
        raise ValueError(
            f"DoRA (dora=True) does not adapt the nn.Embedding at {path!r}: add it to exclude, "
            "or give it a plain LoRA adapter of its own (dora=False)"
        )
    if quant.base_kind(inner) is not None:
        raise ValueError(
            f"DoRA (dora=True) needs the dense weight of the quantized {type(inner).__name__} at "
            f"{path!r} on every step; add it to exclude, or dequantize the base first "
            "(peftkit.quant.dequantize(model))"
        )
    return DoraConv2d if isinstance(inner, nn.Conv2d) else DoraLinear


def _wide_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def weight_rows(layer: AdapterLayer, weight: torch.Tensor) -> torch.Tensor:
    """``weight`` as (out, fan_in) rows, one per output feature (a view)."""
    if is_conv1d(layer.base_layer()):
        return weight.t()
    return weight.flatten(1)


def factor_rows(layer: LoraLayer, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """A: (r, fan_in) and B: (out, r), detached, in ``dtype``."""
    a = layer.lora_A.detach().flatten(1).to(dtype)
    b = layer.lora_B.detach().flatten(1).to(dtype)
    return a, b


def row_norms(layer: LoraLayer, weight: torch.Tensor) -> torch.Tensor:
    """‖W_i + s (BA)_i‖ for each output feature i: (out,), in float32 (float64 for a float64 W).

    No (out, in) tensor is formed: see the module docstring. No gradient flows through it."""
    with torch.no_grad():
        w = weight_rows(layer, weight.detach())
        dtype = _wide_dtype(w)
        a, b = factor_rows(layer, dtype)
        s = layer.scaling
        wa = (w @ a.to(w.dtype).t()).to(dtype)  # (out, r): the GEMM accumulates in float32
        squared: torch.Tensor = torch.linalg.vector_norm(w, dim=1, dtype=dtype).square()
        squared += (2 * s) * (b * wa).sum(1)
        squared += (s * s) * ((b @ (a @ a.t())) * b).sum(1)
        return squared.clamp_min(0).sqrt()


def bias_below(layer: AdapterLayer) -> torch.Tensor | None:
    """The bias the stack below ``layer`` computes with (every enabled layer below folded in), or
    None when the original module has none."""
    bias = getattr(layer.base_layer(), "bias", None)
    if not isinstance(bias, torch.Tensor):
        return None
    below: list[AdapterLayer] = []
    inner = layer.base
    while isinstance(inner, AdapterLayer):
        below.append(inner)
        inner = inner.base
    for other in reversed(below):
        if other.enabled:
            bias = other.merged_bias(bias)
    return bias


def rescale(layer: _Dora, z: torch.Tensor, channel_dims: int) -> torch.Tensor:
    """(m / n) ⊙ (z - b) + b for z = base(x) + s B A x, b the bias below (unscaled).

    Written as z + z ⊙ d - d ⊙ b with d = m/n - 1, cast to z's dtype: in 16 bits d keeps the
    small departures of m/n from 1 more finely than m/n would. One output-sized tensor is allocated
    (z is kept for m's gradient); the bias term is subtracted in place. ``channel_dims``: trailing dims after
    the feature axis (Conv2d: 2)."""
    d = wide(layer.lora_magnitude) / row_norms(layer, layer.weight_below()) - 1
    shape = (-1,) + (1,) * channel_dims
    y = torch.addcmul(z, z, d.to(z.dtype).view(shape))
    bias = bias_below(layer)
    if bias is None:
        return y
    return y.sub_((d * bias).to(z.dtype).view(shape))


def init_magnitude(layer: LoraLayer) -> nn.Parameter:
    """m = ‖W‖ of the weight below (B is zero), so the layer starts as the identity; placed like
    the factors."""
    norms = row_norms(layer, layer.weight_below())
    return nn.Parameter(norms.to(device=layer.lora_A.device, dtype=layer.lora_A.dtype))


def dora_merged_weight(layer: _Dora, weight: torch.Tensor) -> torch.Tensor:
    """(m / ‖W + s B A‖) ⊙ (W + s B A) in ``weight``'s layout and dtype, formed directly."""
    rows = weight_rows(layer, weight)
    dtype = _wide_dtype(rows)
    a, b = factor_rows(layer, dtype)
    updated = rows.to(dtype) + (b @ a) * layer.scaling
    norms: torch.Tensor = torch.linalg.vector_norm(updated, dim=1)
    magnitude = layer.lora_magnitude.detach().to(device=updated.device, dtype=dtype)
    updated = updated * (magnitude / norms)[:, None]
    back = updated.t() if is_conv1d(layer.base_layer()) else updated.view(weight.shape)
    return back.to(dtype=weight.dtype)


class _Dora(LoraLayer):
    """What both DoRA layers share: the magnitude m, and a merge that reads W.

    Not additive (it rescales what the stack below computes), and its merge reads W, so merging
    keeps the weight it replaces and unmerging restores it exactly."""

    additive = False
    weight_independent = False
    lora_magnitude: nn.Parameter  # m: (out,), set with the factors

    def init_factors(self, init: Init) -> None:
        super().init_factors(init)
        self.lora_magnitude = init_magnitude(self)

    def merged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        return dora_merged_weight(self, weight)

    def delta_weight(self) -> torch.Tensor:
        weight = self.weight_below()
        return self.merged_weight(weight) - weight

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, dora=True"


class DoraLinear(_Dora, LoraLinear):
    """y = (m / n) ⊙ (base(x) - b + s B A dropout(x)) + b;  x: (..., in), y: (..., out).

    n = ‖W + s B A‖ per output feature (detached), m: (out,) ``lora_magnitude``, b the base bias
    (not scaled). Dropout acts on the low-rank path only. Wraps nn.Linear and transformers' Conv1D.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            out: torch.Tensor = self.base(x)
            return out
        flat = x.reshape(-1, x.shape[-1])
        private = self.base_output_is_private()
        y = _base_rows(self, x, flat, private)
        h = F.linear(self.dropout(flat), cast_like(self.lora_A, flat))
        y = rescale(self, _add_scaled(y, h, self, private), 0)
        return y if x.dim() == 2 else y.view(*x.shape[:-1], y.shape[-1])


class DoraConv2d(_Dora, LoraConv2d):
    """y = (m / n) ⊙ (base(x) - b + s conv1x1_B(conv_A(dropout(x)))) + b, per output channel.

    x: (N, in, H, W); n = ‖W + s B A‖ over (in, kh, kw) per output channel (detached); m: (out,).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            out: torch.Tensor = self.base(x)
            return out
        return rescale(self, super().forward(x), 2)
