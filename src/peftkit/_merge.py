"""What a merge may rely on: the report it returns, the context each layer answers its merge
blocker from, and the checks on the original module at the bottom of a wrapper stack.

A layer decides for itself whether it may fold into its base weight
(``AdapterLayer.merge_blocker(ctx)``); this module builds the ``MergeContext`` it decides from and
holds the rules about the original module that every method shares (tied weights, quantized or
renormalising bases, a forward that is not the layer's standard function of its weight).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn

from . import quant
from ._forward_check import forward_mismatch

if TYPE_CHECKING:
    from .layers import AdapterLayer


@dataclass
class MergeReport:
    """What a merge did: names of layers folded in, and layers left in place with the reason."""

    merged: list[str] = field(default_factory=list)
    kept: dict[str, str] = field(default_factory=dict)
    # merged layers whose base is quantized -> re-quantisation error of the merged weight,
    # ‖Q(W + ΔW) − (W + ΔW)‖_F / ‖ΔW‖_F (see peftkit.quant.QuantizedMerge)
    requantized: dict[str, float] = field(default_factory=dict)

    def extend(self, other: MergeReport) -> None:
        self.merged.extend(other.merged)
        self.kept.update(other.kept)
        self.requantized.update(other.requantized)

    def __str__(self) -> str:
        lines = [f"merged {len(self.merged)} layer(s)"]
        lines += [f"kept {name}: {why}" for name, why in self.kept.items()]
        lines += [
            f"re-quantized {name}: error {err:.3g} of the update's norm"
            for name, err in self.requantized.items()
        ]
        return "\n".join(lines)


@dataclass(frozen=True, kw_only=True)
class MergeFacts:
    """What a merge knows about the whole model, gathered once per merge.

    tied: ids of parameters the model reaches under more than one name.
    kept_originals: ids of base parameters an adapter trains in place while keeping their original
        values to put back (``Method.restored_parameters``); folding an update into one of them
        for good would be undone by that restore.
    below_folded: every enabled layer below a layer is folded into the same weight first (a plain
        state dict folds whole stacks), so a layer that transforms their output may fold too.
    unload: the merge drops the wrappers (merge-and-unload), so it is for good.
    """

    tied: frozenset[int] = frozenset()
    kept_originals: frozenset[int] = frozenset()
    below_folded: bool = False
    unload: bool = False


@dataclass(frozen=True, kw_only=True)
class MergeContext:
    """What one layer answers ``merge_blocker`` from: the model-wide ``facts`` and the stack below
    it, ``below`` (the wrappers between the layer and its original module, outermost first) and
    ``bottom`` (that original module)."""

    facts: MergeFacts
    below: tuple[AdapterLayer, ...]
    bottom: nn.Module
    folded: tuple[torch.Tensor, ...] = ()
    """The bottom module's tensors the layer's merge writes (``AdapterLayer.folded_tensors``)."""
    # built by ``AdapterLayer.merge_context(facts)``

    @property
    def below_folded(self) -> bool:
        return self.facts.below_folded

    def weight_is(self, ids: frozenset[int]) -> bool:
        """Whether a tensor the merge writes (the bottom module's weight, or an attention's packed
        projections) is one of the parameters ``ids``."""
        return any(id(t) in ids for t in self.folded)


def tied_parameter_ids(model: nn.Module) -> frozenset[int]:
    """Ids of parameters the model reaches under more than one name."""
    seen: set[int] = set()
    tied: set[int] = set()
    for _, p in model.named_parameters(remove_duplicate=False):
        (tied if id(p) in seen else seen).add(id(p))
    return frozenset(tied)


def bottom_blocker(ctx: MergeContext) -> str | None:
    """Why an update cannot be folded into the original module ``ctx.bottom``, or None when it can."""
    inner = ctx.bottom
    if ctx.weight_is(ctx.facts.tied):
        return "its base weight is tied to another module (e.g. input and output embeddings)"
    refused = quant.merge_refusal(inner)
    if refused is not None:
        return refused
    if isinstance(inner, nn.Embedding) and inner.max_norm is not None:
        return (
            "its base nn.Embedding renormalises the rows it looks up (max_norm), in place: a "
            "folded update would be renormalised too, and unmerge could not subtract it exactly"
        )
    if quant.base_kind(inner) is None:  # a quantized kind computes its own forward by design
        mismatch = forward_mismatch(inner)
        if mismatch is not None:
            return mismatch
    if ctx.facts.unload and ctx.weight_is(ctx.facts.kept_originals):
        return (
            "its base weight is trained in place by an adapter that keeps the original to restore "
            "it, which would drop this update; merge_and_unload that adapter first, or merge "
            "without unload"
        )
    return None


def merge_blocker(
    layer: AdapterLayer, tied: frozenset[int] | set[int], *, below_folded: bool = False
) -> str | None:
    """``layer.merge_blocker`` with the context of a model whose tied parameters are ``tied``."""
    facts = MergeFacts(tied=frozenset(tied), below_folded=below_folded)
    return layer.merge_blocker(layer.merge_context(facts))
