"""Composition: several methods and named adapters on one model.

    compose(model, {"attn": LoraConfig(targets=["q_proj", "v_proj"]),
                    "ffn": AdapterConfig(form="pfeiffer"),
                    "bias": FullConfig(biases_only=True)})
    combine_lora(model, {"a": 0.7, "b": 0.3}, "ab")            # exact weighted sum of LoRA updates
    combine_lora(model, {"a": 0.7, "b": 0.3}, "ab8", rank=8)   # its best rank-8 approximation
    ensemble(model, ["a", "b"], inputs)                        # mean of the adapters' logits

Stacking, switching, deleting, saving and merging several adapters are the model-level operations of
``peftkit.core`` and ``peftkit.checkpoint``; this module adds what needs more than one adapter at once.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .config import MethodConfig
from .core import active_adapters, adapters, apply, attach, detach, set_active, unwrap_model
from .layers import SavedModule
from .methods.lora import Lora, LoraConfig, LoraLayer
from .methods.lora_torch import LoraMultiheadAttention
from .registry import spec_for_config


def compose(
    model: nn.Module, configs: Mapping[str, MethodConfig] | Sequence[tuple[str, MethodConfig]]
) -> nn.Module:
    """Apply several adapters in order, ``{name: config}``; all of them or, on an error, none.

    The trainable set is the union of theirs; all are active. Returns ``model``.
    """
    items = list(configs.items()) if isinstance(configs, Mapping) else list(configs)
    if not items:
        raise ValueError("compose needs at least one (name, config) pair")
    applied: list[str] = []
    try:
        for name, config in items:
            if not isinstance(config, MethodConfig):
                raise TypeError(f"compose: {name!r} needs a method config, got {config!r}")
            attach(model, spec_for_config(config).method_cls(config, name))
            applied.append(name)
    except BaseException:
        for name in reversed(applied):
            detach(model, name)
        raise
    return model


# -- weighted combination of LoRA adapters ----------------------------------------------------------
Factors = tuple[torch.Tensor, torch.Tensor]  # (B: (out, r), A: (r, in...)) with scale folded into B


def combine_lora(
    model: nn.Module,
    weights: Mapping[str, float],
    new_name: str,
    *,
    rank: int | None = None,
    activate: bool = True,
) -> nn.Module:
    """Add LoRA adapter ``new_name`` whose update is Σ wᵢ·ΔWᵢ over the LoRA adapters in ``weights``.

    rank None: exact, by concatenating the factors (Bᵢ scaled by wᵢ·sᵢ; rank = Σ rᵢ per module).
    rank k: the best rank-k approximation of that sum in Frobenius norm (Eckart–Young), computed
    from the factors by two thin QR decompositions and an SVD of an (Σ rᵢ)² matrix; the dense
    update is never formed. With ``activate`` the new adapter replaces its sources among the active
    adapters; without, the active set stays as it was (the new adapter inactive). The sources are
    left in the model. Returns ``model``.
    """
    sources = _lora_sources(model, weights)
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0):
        raise ValueError(f"rank must be a positive integer or None (exact), got {rank!r}")
    per_path: dict[str, list[tuple[float, LoraLayer]]] = {}
    for method, weight in sources:
        for layer in method.layers:
            if isinstance(layer, LoraLayer):
                per_path.setdefault(layer.path, []).append((weight, layer))
    factors = {path: _combine(terms, rank) for path, terms in per_path.items()}
    was_active = active_adapters(model)
    apply(model, _config_for({p: b.shape[1] for p, (b, _) in factors.items()}), new_name)
    _load_factors(adapters(model)[new_name], factors)
    keep = [n for n in was_active if n not in weights]
    set_active(model, [*keep, new_name] if activate else was_active)
    return model


def _lora_sources(model: nn.Module, weights: Mapping[str, float]) -> list[tuple[Lora, float]]:
    if not weights:
        raise ValueError("weights is empty: pass {adapter name: weight}, e.g. {'a': 0.5, 'b': 0.5}")
    present = adapters(model)
    out = []
    for name, weight in weights.items():
        if name not in present:
            raise KeyError(f"no adapter named {name!r}; the model has {list(present)}")
        method = present[name]
        if type(method) is not Lora:  # a subclass (AdaLoRA) may compute its update differently
            raise TypeError(f"combine_lora combines LoRA adapters; {name!r} is {method.name!r}")
        if method.config.dora:  # its weight is renormalised: no sum of B A terms describes it
            raise TypeError(
                f"combine_lora combines plain LoRA adapters; {name!r} is DoRA (dora=True), whose "
                "update is not a sum of low-rank products"
            )
        saved = [layer.path for layer in method.layers if isinstance(layer, SavedModule)]
        if saved:
            raise ValueError(
                f"combine_lora: {name!r} trains {saved} in full (modules_to_save, or the task head "
                "by train_head), which are not low-rank; combine adapters applied with "
                "train_head=False and without modules_to_save"
            )
        attention = [
            layer.path for layer in method.layers if isinstance(layer, LoraMultiheadAttention)
        ]
        if attention:
            raise ValueError(
                f"combine_lora: {name!r} adapts nn.MultiheadAttention {attention}, whose two "
                "updates (in- and out-projection) it does not combine; apply that adapter with "
                "those modules in exclude to combine it"
            )
        if isinstance(weight, bool) or not isinstance(weight, (int, float)):
            raise ValueError(f"weight of {name!r} must be a number, got {weight!r}")
        if not math.isfinite(weight):
            raise ValueError(f"weight of {name!r} must be finite, got {weight!r}")
        out.append((method, float(weight)))
    return out


def _combine(terms: list[tuple[float, LoraLayer]], rank: int | None) -> Factors:
    """B, A (2-D; A flattened past its first axis) with B A = Σ w s B_i A_i (or its rank-k best)."""
    shapes = {(type(layer), layer.lora_A.shape[1:]) for _, layer in terms}
    if len(shapes) > 1:
        raise ValueError(f"combine_lora: adapters at {terms[0][1].path!r} differ in layer type")
    # In float64 on the CPU: the factors are thin, and every backend has float64 QR and SVD there.
    b = torch.cat([_exact(layer.lora_B) * (w * layer.scaling) for w, layer in terms], 1)
    a = torch.cat([_exact(layer.lora_A) for _, layer in terms], 0)
    if rank is None:
        return b, a
    qb, rb = torch.linalg.qr(b)  # b = qb rb: (out, q) (q, R)
    qa, ra = torch.linalg.qr(a.t())  # aᵀ = qa ra: (in, p) (p, R)
    u, s, vh = torch.linalg.svd(rb @ ra.t())  # b a = qb (u s vh) qaᵀ
    k = min(rank, s.shape[0])
    root = s[:k].sqrt()
    return (qb @ u[:, :k]) * root, (root[:, None] * vh[:k]) @ qa.t()


def _exact(factor: torch.Tensor) -> torch.Tensor:
    return factor.detach().flatten(1).to("cpu", torch.float64)


def _config_for(ranks: dict[str, int]) -> LoraConfig:
    """A LoRA config with exactly these modules and per-module ranks, and scale 1 everywhere."""
    common = Counter(ranks.values()).most_common(1)[0][0]
    odd = {path: r for path, r in ranks.items() if r != common}
    return LoraConfig(
        targets=list(ranks),
        r=common,
        alpha=float(common),
        rank_pattern=odd,
        alpha_pattern={path: float(r) for path, r in odd.items()},
    )


def _load_factors(method: Any, factors: dict[str, Factors]) -> None:
    with torch.no_grad():
        for layer in method.layers:
            b, a = factors[layer.path]
            layer.lora_B.copy_(b.reshape(layer.lora_B.shape))
            layer.lora_A.copy_(a.reshape(layer.lora_A.shape))


# -- ensembles --------------------------------------------------------------------------------------
def ensemble(
    model: nn.Module,
    adapter_names: Sequence[str | Sequence[str]],
    inputs: Mapping[str, Any] | torch.Tensor,
    *,
    weights: Sequence[float] | None = None,
) -> torch.Tensor:
    """Mean (or ``weights``-weighted sum) of the logits the model gives with each adapter active.

    Each member is an adapter name, or a list of names active together. One frozen base serves
    every member, one forward pass each. The active adapters are restored afterwards. Gradients
    flow as usual: wrap the call in ``torch.no_grad()`` for inference.
    """
    members = [[m] if isinstance(m, str) else list(m) for m in adapter_names]
    if not members:
        raise ValueError("ensemble needs at least one adapter name")
    if weights is None:
        weights = [1.0 / len(members)] * len(members)
    if len(weights) != len(members):
        raise ValueError(f"got {len(weights)} weights for {len(members)} ensemble members")
    before = active_adapters(model)
    total: torch.Tensor | None = None
    try:
        for member, weight in zip(members, weights, strict=True):
            set_active(model, member)
            out = _logits(model(**inputs) if isinstance(inputs, Mapping) else model(inputs))
            total = out * weight if total is None else total + out * weight
    finally:
        set_active(unwrap_model(model), before)
    assert total is not None
    return total


def _logits(output: Any) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(f"ensemble: cannot find logits in a {type(output).__name__} model output")
