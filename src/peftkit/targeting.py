"""Which submodules a config selects, and how to find and replace modules by their dotted names.

Names are *canonical*: the names of the unwrapped model. Wrappers (adapter layers) are transparent:
``model.layers.0.q_proj`` names the outermost wrapper at that position, and the walk continues into the
original module below it but never into an adapter's own parameters or submodules.
"""

from __future__ import annotations

import difflib
import re
import time
from collections.abc import Iterable, Iterator, Sequence

import torch
from torch import nn

from . import _compat, _sharding, quant
from ._probe import skipped_aliases
from ._state import tree_changed
from .config import ALL_LINEAR, TargetedConfig
from .layers import AdapterLayer, AdapterModule

# Block lists we recognise when ``layers`` is given: model.layers.3, transformer.h.3, encoder.layer.3,
# encoder.block.3 (T5), blocks.3.
LAYER_LISTS = ("layers", "h", "layer", "block", "blocks")
# Longest time the patterns of one config field may take to match the model's module names.
MATCH_BUDGET_S = 10.0


class TargetError(ValueError):
    """A config selected no module, or a module the method cannot wrap."""


def iter_modules(model: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module]]:
    """Yield ``(canonical_name, module)``; adapter layers stand in for the module they wrap.

    Modules an adapter added beside the base (``AdapterModule``) are not part of the model's names.
    """
    yield prefix, model
    inner = model.base_layer() if isinstance(model, AdapterLayer) else model
    for child_name, child in inner.named_children():
        if not isinstance(child, AdapterModule):
            yield from iter_modules(child, f"{prefix}.{child_name}" if prefix else child_name)


def get_module(model: nn.Module, name: str) -> nn.Module:
    """The (outermost) module at canonical ``name``."""
    module = model
    for part in name.split(".") if name else []:
        inner = module.base_layer() if isinstance(module, AdapterLayer) else module
        child = inner._modules.get(part)
        if child is None:
            raise KeyError(f"model has no submodule {name!r}")
        module = child
    return module


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` at canonical ``name`` (replacing the outermost module there)."""
    if not name:
        raise ValueError("cannot replace the root module; wrap one of its submodules")
    parent_name, _, leaf = name.rpartition(".")
    parent = get_module(model, parent_name)
    inner = parent.base_layer() if isinstance(parent, AdapterLayer) else parent
    setattr(inner, leaf, new)
    tree_changed()


def remove_wrapper(model: nn.Module, layer: AdapterLayer, replacement: nn.Module) -> None:
    """Take ``layer`` out of its stack, putting ``replacement`` where it was."""
    outer = get_module(model, layer.path)
    if outer is layer:
        set_module(model, layer.path, replacement)
        return
    while isinstance(outer, AdapterLayer):
        if outer.base is layer:
            outer.base = replacement
            tree_changed()
            return
        outer = outer.base
    raise ValueError(
        f"adapter layer {layer.adapter_name!r} is no longer in the model at {layer.path!r}"
    )


def matches(name: str, pattern: str) -> bool:
    """``re:<regex>`` is a full match on the dotted name; anything else matches a name suffix."""
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    return name == pattern or name.endswith("." + pattern)


def first_match(name: str, patterns: Iterable[str]) -> str | None:
    return next((p for p in patterns if matches(name, p)), None)


def layer_index(name: str, layers_pattern: str | None = None) -> int | None:
    """Index of the block ``name`` lives in (``model.layers.3.mlp`` -> 3), or None."""
    lists = (layers_pattern,) if layers_pattern else LAYER_LISTS
    alternatives = "|".join(re.escape(n) for n in lists)
    found = re.search(rf"(?:^|\.)(?:{alternatives})\.(\d+)(?:\.|$)", name)
    return int(found.group(1)) if found else None


def is_linear(module: nn.Module) -> bool:
    """nn.Linear, transformers' GPT-2 style Conv1D (a linear layer with a transposed weight), or a
    quantized linear layer of a registered base kind (``peftkit.quant``)."""
    return isinstance(module, nn.Linear) or is_conv1d(module) or quant.is_quantized_linear(module)


def linear_features(module: nn.Module) -> tuple[int, int]:
    """``(in_features, out_features)`` of a linear layer (see ``is_linear``): the logical shape, read
    from a quantized layer's kind, never from a packed weight, nor from a ZeRO-3 partition."""
    found = quant.features(module)
    if found is not None:
        return found
    weight = module.weight
    assert isinstance(weight, torch.Tensor)
    rows, cols = _sharding.weight_shape(weight)  # ZeRO-3: the full shape, not the empty partition
    return (int(rows), int(cols)) if is_conv1d(module) else (int(cols), int(rows))


def is_conv1d(module: nn.Module) -> bool:
    return is_conv1d_class(type(module))


def is_conv1d_class(cls: type) -> bool:
    conv1d = _compat.conv1d_class()  # None unless transformers is already loaded
    return conv1d is not None and issubclass(cls, conv1d)


def output_head(model: nn.Module) -> nn.Module | None:
    """The model's output projection: HF ``get_output_embeddings()``, else its last linear layer."""
    getter = getattr(model, "get_output_embeddings", None)
    if callable(getter):
        head = getter()
        if isinstance(head, nn.Module):
            return head
    linears = [m for _, m in iter_modules(model) if is_linear(_unwrap(m))]
    return linears[-1] if linears else None


def _leave_task_heads(
    model: nn.Module, chosen: list[tuple[str, nn.Module]], config: TargetedConfig
) -> list[tuple[str, nn.Module]]:
    """Drop modules inside the task head, which trains in full (``MethodConfig.train_head``): an
    adapter there would be idle, or would stand in for training it. A target that names nothing
    but the head is an error naming ``train_head=False``."""
    heads = _compat.task_heads(model) if config.train_head is not False else []
    kept = [(n, m) for n, m in chosen if not _inside_any(n, heads)]
    if config.targets != ALL_LINEAR:
        only_head = [p for p in config.targets if not any(matches(n, p) for n, _ in kept)]
        if only_head and len(kept) < len(chosen):
            raise TargetError(
                f"targets {only_head} select only modules of the task head {heads}, which trains "
                "in full by default; pass train_head=False to adapt it with this method instead"
            )
    return kept


def _inside_any(name: str, paths: Sequence[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in paths)


def _unwrap(module: nn.Module) -> nn.Module:
    return module.base_layer() if isinstance(module, AdapterLayer) else module


def select(
    model: nn.Module,
    config: TargetedConfig,
    supported: tuple[type[nn.Module], ...] | None = None,
    method: str = "this method",
) -> list[tuple[str, nn.Module]]:
    """The ``(name, module)`` pairs ``config`` targets, in model order.

    Raises ``TargetError`` when a named target matches nothing (listing the closest names), when
    nothing at all is selected, or when a selected module's type is not in ``supported``.
    """
    candidates = [(n, m) for n, m in iter_modules(model) if n]
    if config.targets == ALL_LINEAR:
        head = output_head(model)
        chosen = [(n, m) for n, m in candidates if is_linear(_unwrap(m)) and m is not head]
    else:
        _check_each_target_matches(candidates, config.targets)
        chosen = [(n, m) for n, m in candidates if first_match(n, config.targets)]
        _check_not_saved_too(chosen, config)
    _check_each_target_matches(candidates, config.exclude, "exclude")
    chosen = _leave_task_heads(model, chosen, config)
    chosen = [(n, m) for n, m in chosen if not first_match(n, config.exclude)]
    chosen = [(n, m) for n, m in chosen if not first_match(n, config.modules_to_save)]
    chosen = _keep_layers(chosen, config)
    if not chosen:
        raise TargetError(f"{method}: the config selects no module ({_describe(config)})")
    whole = supported is not None and nn.MultiheadAttention in supported
    check_called(model, chosen, method, attention_whole=whole)
    if supported is not None:
        _check_types(chosen, supported, method)
    return chosen


def select_named(
    model: nn.Module, patterns: Sequence[str], what: str
) -> list[tuple[str, nn.Module]]:
    """Modules matching ``patterns`` (e.g. modules_to_save); every pattern must match something."""
    if not patterns:
        return []
    candidates = [(n, m) for n, m in iter_modules(model) if n]
    _check_each_target_matches(candidates, patterns, what)
    chosen = [(n, m) for n, m in candidates if first_match(n, patterns)]
    # A match inside another match (classifier and classifier.dense) keeps only the outer one.
    outer = [n for n, _ in chosen]
    return [(n, m) for n, m in chosen if not any(n.startswith(o + ".") for o in outer if o != n)]


def _bypasses_children(module: nn.Module) -> str | None:
    """Why ``module`` computes with its submodules' weights instead of calling them, or None."""
    if isinstance(module, nn.MultiheadAttention):
        return "nn.MultiheadAttention reads out_proj's weight instead of calling it"
    if isinstance(module, nn.TransformerEncoderLayer) and torch.backends.mha.get_fastpath_enabled():
        return (
            "nn.TransformerEncoderLayer's eval-mode fast path reads its submodules' weights instead "
            "of calling them (torch.backends.mha.set_fastpath_enabled(False) turns it off)"
        )
    return None


def check_called(
    model: nn.Module,
    chosen: list[tuple[str, nn.Module]],
    method: str,
    *,
    attention_whole: bool = False,
) -> None:
    """Refuse modules the model never calls: a wrapper there would be skipped without a word.

    ``attention_whole``: the method wraps nn.MultiheadAttention whole with a layer that keeps a
    parent nn.TransformerEncoderLayer off its fast path (LoRA), so ``self_attn`` may be chosen."""
    for name, aliases in skipped_aliases(list(iter_modules(model)), [n for n, _ in chosen]):
        leaf = aliases[0].rsplit(".", 1)[-1]
        raise TargetError(
            f"{method} cannot adapt {name!r}: the model's forward never calls it; "
            f"{', '.join(aliases)} hold the same weight and run in its place, so an adapter "
            f"there would be skipped. Target the modules that run instead, e.g. targets=[{leaf!r}]"
        )
    for name, module in chosen:
        parts = name.split(".")
        for depth in range(len(parts) - 1, -1, -1):
            owner = _unwrap(get_module(model, ".".join(parts[:depth])))
            why = _bypasses_children(owner)
            if not why or (attention_whole and _attention_of(owner, module)):
                continue
            hint = "add it to exclude or target other modules"
            if attention_whole and isinstance(owner, nn.MultiheadAttention):
                owner_name = ".".join(parts[:depth])
                hint = f"add it to exclude, and target the attention module {owner_name!r} itself"
            raise TargetError(
                f"{method} cannot adapt {name!r}: {why}, so an adapter there would be skipped; "
                f"{hint}"
            )


def _attention_of(owner: nn.Module, module: nn.Module) -> bool:
    """Whether ``module`` is the self-attention of the encoder layer ``owner``."""
    return isinstance(owner, nn.TransformerEncoderLayer) and owner.self_attn is module


def _check_not_saved_too(chosen: list[tuple[str, nn.Module]], config: TargetedConfig) -> None:
    """A module named by both targets and modules_to_save: it either trains in full or gets an
    adapter, and which one the user meant is theirs to say."""
    both = [n for n, _ in chosen if first_match(n, config.modules_to_save)]
    if both:
        raise TargetError(
            f"{both[0]!r} is selected by both targets and modules_to_save: a module either trains "
            "in full (modules_to_save) or gets an adapter (targets); remove it from one of them"
        )


def check_patterns_match(names: Sequence[str], patterns: Iterable[str], what: str) -> None:
    """Every pattern (e.g. a ``rank_pattern`` key) matches one of ``names``, or a ``TargetError``
    names the closest ones: a typo in a pattern must not be ignored."""
    _check_names(list(names), patterns, what)


def _check_each_target_matches(
    candidates: list[tuple[str, nn.Module]], patterns: Iterable[str], what: str = "target"
) -> None:
    _check_names([n for n, _ in candidates], patterns, what)


def _check_names(names: list[str], patterns: Iterable[str], what: str) -> None:
    start = time.monotonic()
    for pattern in patterns:
        if _any_match(names, pattern, start, what):
            continue
        leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
        close = difflib.get_close_matches(pattern.removeprefix("re:"), leaves, n=3, cutoff=0.5)
        hint = (
            f"closest names: {', '.join(close)}" if close else f"module names include: {leaves[:8]}"
        )
        raise TargetError(f"{what} {pattern!r} matched no module; {hint}")


def _any_match(names: list[str], pattern: str, start: float, what: str) -> bool:
    """Whether ``pattern`` matches one of ``names``, within ``MATCH_BUDGET_S`` from ``start``.

    Configs refuse regexes that backtrack exponentially (``peftkit._patterns``); the budget bounds
    what is left (many polynomial patterns over many names), so selection never hangs.
    """
    for name in names:
        if matches(name, pattern):
            return True
        if time.monotonic() - start > MATCH_BUDGET_S:
            raise TargetError(
                f"matching {what} {pattern[:60]!r} against the model's module names took over "
                f"{MATCH_BUDGET_S:g} s; use plainer patterns (name suffixes such as 'q_proj', or "
                "regular expressions with fewer repetitions)"
            )
    return False


def _keep_layers(
    chosen: list[tuple[str, nn.Module]], config: TargetedConfig
) -> list[tuple[str, nn.Module]]:
    if config.layers is None:
        return chosen
    indexed = [(n, m, layer_index(n, config.layers_pattern)) for n, m in chosen]
    if all(i is None for _, _, i in indexed):
        where = config.layers_pattern or "/".join(LAYER_LISTS)
        raise TargetError(
            f"layers={list(config.layers)}: no selected module sits in a block list named {where}; "
            "set layers_pattern to the name of the model's block list"
        )
    present = sorted({i for _, _, i in indexed if i is not None})
    absent = [i for i in config.layers if i not in present]
    if absent:
        raise TargetError(
            f"layers={list(config.layers)}: no selected module sits in block {absent}; the "
            f"selected modules sit in blocks {_spans(present)}. Use indices from that range"
        )
    wanted = set(config.layers)
    return [(n, m) for n, m, i in indexed if i in wanted]


def _spans(indices: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2, 5'."""
    runs: list[list[int]] = []
    for i in indices:
        if runs and i == runs[-1][-1] + 1:
            runs[-1].append(i)
        else:
            runs.append([i])
    return ", ".join(f"{r[0]}-{r[-1]}" if len(r) > 1 else str(r[0]) for r in runs)


def _check_types(
    chosen: list[tuple[str, nn.Module]], supported: tuple[type[nn.Module], ...], method: str
) -> None:
    for name, module in chosen:
        base = _unwrap(module)
        linear = is_conv1d(base) or quant.is_quantized_linear(base)
        if not isinstance(base, supported) and not (linear and nn.Linear in supported):
            kinds = ", ".join(t.__name__ for t in supported)
            raise TargetError(
                f"{method} cannot wrap {name!r} ({type(base).__name__}); it supports {kinds}. "
                "Narrow targets or add it to exclude"
            )


def _describe(config: TargetedConfig) -> str:
    parts = [f"targets={config.targets!r}"]
    if config.exclude:
        parts.append(f"exclude={list(config.exclude)}")
    if config.layers is not None:
        parts.append(f"layers={list(config.layers)}")
    return ", ".join(parts)
