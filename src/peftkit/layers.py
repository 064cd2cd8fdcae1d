"""Adapter layers: wrappers that hold the original module as ``self.base`` and own only their own
parameters. Several wrappers may stack on one module (one per named adapter); the innermost ``base``
is always the model's original module, untouched unless a merge folds an update into its weight.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from . import quant
from ._merge import MergeContext, MergeFacts, bottom_blocker

# torch's process-wide module hooks (nn.modules.module.register_module_forward_hook & co.).
_GLOBAL_FORWARD_HOOKS = tuple(
    getattr(torch.nn.modules.module, name, {})
    for name in ("_global_forward_hooks", "_global_forward_pre_hooks")
)


_GLOBAL_BACKWARD_HOOKS = tuple(
    getattr(torch.nn.modules.module, name, {})
    for name in ("_global_backward_hooks", "_global_backward_pre_hooks")
)


def has_forward_hooks(module: nn.Module) -> bool:
    """Whether a forward or forward-pre hook (the module's own, or a process-wide one) runs around
    ``module.forward``: such a hook may keep a reference to the module's output."""
    return bool(module._forward_hooks or module._forward_pre_hooks or any(_GLOBAL_FORWARD_HOOKS))


def has_call_hooks(module: nn.Module) -> bool:
    """Whether calling ``module`` runs any hook besides ``forward`` (forward, forward-pre, backward or
    backward-pre; its own or process-wide): code that computes the module's function itself instead
    of calling it would skip them."""
    return bool(
        has_forward_hooks(module)
        or module._backward_hooks
        or module._backward_pre_hooks
        or any(_GLOBAL_BACKWARD_HOOKS)
    )


def autocast_on(x: torch.Tensor) -> bool:
    """Whether autocast is on for x's device type; False for a type autocast does not know (the
    meta tensors of a shape-only dry run, see _dryrun), where torch would raise."""
    if x.is_meta:
        return False
    return torch.is_autocast_enabled(x.device.type)


def cast_like(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``t`` (an adapter's small parameter) in x's dtype, so float32 adapter parameters on a 16-bit
    base cast themselves, never the activations. No copy when the dtypes match; under autocast the
    op casts on its own."""
    if t.dtype == x.dtype or autocast_on(x):
        return t
    return t.to(x.dtype)


_MERGE_ORDER = itertools.count(1)


def next_merge_order() -> int:
    """The next position in the merge order, for a layer that records its own merge."""
    return next(_MERGE_ORDER)


@dataclass(frozen=True)
class MergeRecord:
    """What one layer's merge changed: its place in the merge order, and the weight and bias as
    they were before it (None where nothing was kept: the bias was left as it was, or the update
    is ``weight_independent`` and is subtracted again)."""

    order: int
    weight: torch.Tensor | None
    bias: torch.Tensor | None


def wide(t: torch.Tensor) -> torch.Tensor:
    """``t`` in at least float32 (float64 stays float64): the precision an update is formed in."""
    return t if t.dtype == torch.float64 else t.float()


class AdapterLayer(nn.Module):
    """Base of every wrapper.

    Class attributes a subclass sets:
        additive: forward is ``base(x) + f(x)`` with ``f`` independent of the base output, so an
            update further out in a stack can still be folded into the base weight.
        mergeable: ``merged_weight()`` / ``merged_bias()`` describe the whole effect of the layer.
        weight_independent: the update (``delta_weight()``) cannot depend on the base weight, so
            ``merge`` adds it in place and ``unmerge`` subtracts it again, keeping no copy of the
            weight. Leave it False for any update computed from the weight: ``merge`` then writes
            ``merged_weight(W)`` and keeps W to put back.
    """

    additive: ClassVar[bool] = False
    mergeable: ClassVar[bool] = False
    weight_independent: ClassVar[bool] = False

    def __init__(self, base: nn.Module, adapter_name: str, path: str) -> None:
        super().__init__()
        self.base = base
        self.adapter_name = adapter_name
        self.path = path  # dotted name of the wrapped module in the unwrapped model
        self.active = True
        self.merged = False
        self.requantized: quant.QuantizedMerge | None = None  # a merge into a quantized base
        self.record: MergeRecord | None = None  # what the merge changed, while merged

    def __getattr__(self, name: str) -> Any:
        # Transparent wrapper: model code that reads `self.wo.weight`, `.in_features` or `.nf` of a
        # module we wrapped finds the original module's attribute (never another adapter's).
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base" or "base" not in self.__dict__.get("_modules", {}):
                raise
            return getattr(self.base_layer(), name)

    # -- structure ---------------------------------------------------------------------------
    def base_layer(self) -> nn.Module:
        """The model's original module at the bottom of the wrapper stack."""
        inner = self.base
        while isinstance(inner, AdapterLayer):
            inner = inner.base
        return inner

    def base_output_is_private(self) -> bool:
        """Whether the tensor ``self.base(x)`` returns reaches this layer only, so that it may be
        updated in place: no hook on a module of the stack below (nor a process-wide one) could hold
        it. An inner wrapper that is disabled returns its base's output itself, hence the walk."""
        inner = self.base
        while not has_forward_hooks(inner):
            if not isinstance(inner, AdapterLayer):
                return True
            inner = inner.base
        return False

    def base_weight(self) -> torch.Tensor:
        """The original module's ``weight``."""
        weight = getattr(self.base_layer(), "weight", None)
        if not isinstance(weight, torch.Tensor):
            raise TypeError(
                f"{type(self.base_layer()).__name__} at {self.path!r} has no weight tensor"
            )
        return weight

    def weight_below(self) -> torch.Tensor:
        """The weight the stack below this layer computes with: the base weight with every enabled
        layer below folded in (merged ones are in it already). A layer whose update reads the
        weight computes it from this, so merging the layers below does not change its output."""
        below: list[AdapterLayer] = []
        inner = self.base
        while isinstance(inner, AdapterLayer):
            below.append(inner)
            inner = inner.base
        weight = self.base_weight()
        for layer in reversed(below):
            if layer.enabled:
                weight = layer.merged_weight(weight)
        return weight

    def factor_placement(self, policy: str) -> dict[str, Any]:
        """``device`` and ``dtype`` for this layer's own parameters, from the base's compute dtype
        (a quantized base's, never its packed storage dtype) and ``policy`` (see
        ``peftkit.quant.adapter_dtype``)."""
        found = quant.reference(self.base_layer())
        if found is None:
            raise TypeError(
                f"{type(self.base_layer()).__name__} at {self.path!r} has no floating tensor to "
                "take a device and dtype from"
            )
        device, dtype = found
        return {"device": device, "dtype": quant.adapter_dtype(dtype, policy)}

    def named_adapter_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Parameters and persistent buffers this layer owns; the base's are excluded by identity."""
        base_ids = {id(t) for t in self.base.parameters()} | {id(t) for t in self.base.buffers()}
        for name, p in self.named_parameters():
            if id(p) not in base_ids:
                yield name, p
        for name, b in self.named_buffers():
            if id(b) not in base_ids and self._is_persistent(name):
                yield name, b

    def adapter_parameters(self) -> Iterator[nn.Parameter]:
        base_ids = {id(p) for p in self.base.parameters()}
        return (p for p in self.parameters() if id(p) not in base_ids)

    def _is_persistent(self, dotted: str) -> bool:
        owner_name, _, leaf = dotted.rpartition(".")
        owner = self.get_submodule(owner_name) if owner_name else self
        return leaf not in owner._non_persistent_buffers_set

    # -- behaviour ---------------------------------------------------------------------------
    @property
    def enabled(self) -> bool:
        """Whether forward adds this layer's effect (active and not already folded in)."""
        return self.active and not self.merged

    def delta_weight(self) -> torch.Tensor:
        """The update this layer adds to ``base_layer().weight``, in that weight's layout."""
        raise NotImplementedError(f"{type(self).__name__} cannot be merged")

    def merged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """The base weight with this layer folded in, given the weight as it is now (inner merges
        included). Additive layers keep this default; a layer whose update depends on the weight
        (a scaling, a normalisation) overrides it and leaves ``weight_independent`` False."""
        return weight + self.delta_weight().to(device=weight.device, dtype=weight.dtype)

    def merged_bias(self, bias: torch.Tensor) -> torch.Tensor:
        """The base bias with this layer folded in; the default leaves it unchanged (same tensor)."""
        return bias

    def merge_context(self, facts: MergeFacts) -> MergeContext:
        """The context ``merge_blocker`` answers from: ``facts`` and the stack below this layer."""
        below: list[AdapterLayer] = []
        inner = self.base
        while isinstance(inner, AdapterLayer):
            below.append(inner)
            inner = inner.base
        return MergeContext(
            facts=facts, below=tuple(below), bottom=inner, folded=tuple(self.folded_tensors())
        )

    def merge_blocker(self, ctx: MergeContext) -> str | None:
        """Why this layer cannot be folded into its base weight now, or None when it can.

        The default covers any layer that declares ``mergeable`` / ``additive`` truthfully: each
        layer below may object (``blocks_outer``), a layer that transforms its base's output
        (``additive = False``) waits for every enabled layer below to be folded first, and the
        original module at the bottom must take an update (``_merge.bottom_blocker``). A method
        with a rule of its own overrides this in its own file, calling ``super()``.
        """
        if not self.mergeable:
            return f"{type(self).__name__} is not linear in the base weight; it stays as a layer"
        if not self.active:
            return "adapter is inactive; activate it to merge it"
        for inner in ctx.below:
            reason = inner.blocks_outer(self, ctx)
            if reason is not None:
                return reason
            # folded, a transform of the output would act on W only, not on what ``inner`` adds
            if not self.additive and inner.enabled and not ctx.below_folded:
                return (
                    f"it transforms the output of {type(inner).__name__} (adapter "
                    f"{inner.adapter_name!r}) below it, which is not merged; merge that adapter "
                    "first"
                )
        return bottom_blocker(ctx)

    def blocks_outer(self, outer: AdapterLayer, ctx: MergeContext) -> str | None:
        """Why ``outer``, a layer further out in this layer's stack, cannot fold into the base
        weight because of this layer, or None. By default a layer that transforms its base's
        output (not additive) and is not merged itself stands in the way."""
        # folded first (a plain state dict folds whole stacks), it leaves a weight ``outer`` adds to
        if not self.additive and not self.merged and not ctx.below_folded:
            return f"sits outside a non-linear {type(self).__name__}; merging would change outputs"
        return None

    def folded_tensors(self) -> list[torch.Tensor]:
        """The original module's tensors a merge of this layer writes: its ``weight``, if any."""
        weight = getattr(self.base_layer(), "weight", None)
        return [weight] if isinstance(weight, torch.Tensor) else []

    def merged_state(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """The original module's state-dict entry ``name`` with this layer folded in (computed, the
        module is not touched): ``merged_weight`` for "weight", ``merged_bias`` for "bias", and the
        tensor itself for an entry the layer does not change. A layer that folds into other
        entries (nn.MultiheadAttention's ``in_proj_weight``) overrides it."""
        if name == "weight":
            return self.merged_weight(tensor)
        return self.merged_bias(tensor) if name == "bias" else tensor

    def merge(self) -> None:
        """Fold this layer into the base weight (and bias) and record exactly what changed, so
        ``unmerge`` restores it; forward then skips the adapter path."""
        if self.merged:
            return
        inner = self.base_layer()
        if quant.base_kind(inner) is not None:  # dequantize, add, re-quantize
            self.requantized = quant.merge_into(inner, self.delta_weight())
            self.record = MergeRecord(next(_MERGE_ORDER), None, None)
        else:
            self.record = _fold_into(self, inner)
        self.merged = True

    def unmerge(self) -> None:
        """Restore what ``merge`` changed: the recorded weight and bias, or (for a layer whose
        update cannot depend on the weight) the weight less the same update."""
        if not self.merged:
            return
        if self.requantized is not None:  # put back the quantized weight the merge replaced
            quant.unmerge_from(self.base_layer(), self.requantized)
            self.requantized = None
        elif self.record is not None:
            _restore(self, self.record)
        self.record = None
        self.merged = False

    @property
    def merge_order(self) -> int:
        """Position of this layer's merge among all merges (0 when not merged): model-level
        unmerge undoes merges from the latest back, so each restores the weight it found."""
        return self.record.order if self.record is not None else 0

    def merged_module(self) -> nn.Module:
        """What replaces this wrapper in merge-and-unload: the base with the update folded in."""
        self.merge()
        return self.base

    def extra_repr(self) -> str:
        state = "merged" if self.merged else ("active" if self.active else "inactive")
        return f"adapter={self.adapter_name!r}, {state}"


class AdapterModule(nn.Module):
    """A module an adapter adds to the model beside the base's own, wrapping nothing (e.g. the key/value
    tables of prefix-tuning). Its parameters belong to the adapter that added it; targeting never
    selects it or walks into it, so a method applied later never adapts another adapter's internals.
    """


class SavedModule(AdapterLayer):
    """A module trained in full for one adapter (``modules_to_save``), e.g. a new task head.

    The adapter trains a copy; disabling the adapter gives the original back. Merging replaces the
    original with the trained copy.
    """

    mergeable = True

    def __init__(self, base: nn.Module, adapter_name: str, path: str) -> None:
        super().__init__(base, adapter_name, path)
        if any(isinstance(m, AdapterLayer) for m in base.modules()):
            raise ValueError(
                f"modules_to_save: {path!r} already holds adapter layers; list it in "
                "modules_to_save of the first adapter applied, or target a module inside it"
            )
        self.trained = copy.deepcopy(base)
        for p in self.trained.parameters():
            p.requires_grad_(True)

    def merge_blocker(self, ctx: MergeContext) -> str | None:
        """A trained copy replaces the module whole: only an inactive adapter keeps it."""
        return None if self.active else "adapter is inactive; activate it to merge it"

    def blocks_outer(self, outer: AdapterLayer, ctx: MergeContext) -> str | None:
        # the copy computes with its own weights, not the base weight ``outer`` would fold into
        return "sits outside a module trained in full (modules_to_save); it stays as a layer"

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.active or self.merged:
            return self.trained(*args, **kwargs)
        return self.base(*args, **kwargs)

    def merge(self) -> None:
        self.merged = True

    def unmerge(self) -> None:
        self.merged = False

    def merged_module(self) -> nn.Module:
        return self.trained


def _fold_into(layer: AdapterLayer, inner: nn.Module) -> MergeRecord:
    """Write ``layer``'s merged weight (and bias) into ``inner`` in place; the record of the old."""
    weight = layer.base_weight()
    bias = getattr(inner, "bias", None)
    with torch.no_grad():
        old_bias = None
        if isinstance(bias, torch.Tensor):
            current = bias.detach()
            folded = layer.merged_bias(current)
            if folded is not current:  # the layer changes the bias: keep the old one
                old_bias = current.clone()
                bias.copy_(folded)
        if layer.weight_independent:  # added in place; unmerge subtracts the same update
            weight.add_(layer.delta_weight().to(device=weight.device, dtype=weight.dtype))
            return MergeRecord(next(_MERGE_ORDER), None, old_bias)
        kept = weight.detach().clone()
        weight.copy_(layer.merged_weight(weight.detach()))
    return MergeRecord(next(_MERGE_ORDER), kept, old_bias)


def _restore(layer: AdapterLayer, record: MergeRecord) -> None:
    """Undo ``_fold_into`` from its record."""
    inner = layer.base_layer()
    weight = layer.base_weight()
    with torch.no_grad():
        if record.weight is not None:
            weight.copy_(record.weight)
        else:
            weight.sub_(layer.delta_weight().to(device=weight.device, dtype=weight.dtype))
        if record.bias is not None:
            bias = getattr(inner, "bias", None)
            assert isinstance(bias, torch.Tensor)
            bias.copy_(record.bias)
