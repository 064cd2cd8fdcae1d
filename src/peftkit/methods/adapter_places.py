"""Where bottleneck adapters go in a model no preset names: derived from the module structure.

A transformer is a stack of repeated blocks (the elements of an ``nn.ModuleList`` that hold
attention). In each block:

- the *attention output* is the last linear layer, in registration order, inside the block's
  attention module (a submodule whose class name says ``Attention`` / ``Attn``, the outermost one)
  that maps the block's width back to itself: ``o_proj``, ``c_proj``, ``dense``, ``out_proj``,
  ``out_lin``;
- the *feed-forward output* is the last linear layer outside attention that maps a wider stream
  back to the block's width (``down_proj``, ``fc2``, ``wo``, ``output.dense``); where the experts
  of a mixture hold no linear layers (Mixtral's fused experts), the whole feed-forward module
  instead (its output is the same stream);
- the *feed-forward block* (for parallel adapters) is the module that holds both the feed-forward
  input and output layers, when it is a child of the block.

The width of a block is the output width of its attention output. A linear layer the forward does
not call (``nn.MultiheadAttention``'s ``out_proj``) is never chosen: such an attention module is
taken whole only when it returns a tensor, so torch's ``TransformerEncoderLayer`` gets feed-forward
adapters (``linear2``) and no attention adapters.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from torch import nn

from .. import _sharding
from ..layers import AdapterLayer
from ..targeting import is_linear, iter_modules

__all__ = ["Places", "derive_places"]

_ATTENTION = re.compile(r"attention|attn", re.IGNORECASE)


@dataclass
class Places:
    """Exact module names for each kind of adapter place, in model order."""

    attention: list[str] = field(default_factory=list)
    ffn: list[str] = field(default_factory=list)
    block: list[str] = field(default_factory=list)
    widths: dict[str, int] = field(default_factory=dict)  # for places without a linear layer

    def __bool__(self) -> bool:
        return bool(self.ffn)


def _inner(module: nn.Module) -> nn.Module:
    return module.base_layer() if isinstance(module, AdapterLayer) else module


def _widths(module: nn.Module) -> tuple[int, int] | None:
    """(in, out) features of a linear layer (nn.Linear or GPT-2's Conv1D), else None."""
    inner = _inner(module)
    if isinstance(inner, nn.Linear):
        return inner.in_features, inner.out_features
    if is_linear(inner):
        weight = getattr(inner, "weight")  # noqa: B009 (Conv1D stores (in, out))
        rows, cols = _sharding.weight_shape(weight)[:2]  # ZeRO-3: the full shape
        return rows, cols
    return None


def _blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The repeated blocks: elements of the innermost ``ModuleList`` s whose every element holds
    attention (ALBERT's layers inside its layer groups; not T5's sublayers, where one is a
    feed-forward layer)."""
    lists: dict[str, list[tuple[str, nn.Module]]] = {}
    for name, module in iter_modules(model):
        inner = _inner(module)
        if not isinstance(inner, nn.ModuleList):
            continue
        elements = [(f"{name}.{i}" if name else str(i), m) for i, m in enumerate(inner)]
        if elements and all(_attention_modules(path, m) for path, m in elements):
            lists[name] = elements
    inner_lists = [n for n in lists if not any(o.startswith(n + ".") for o in lists if o != n)]
    return [element for n in inner_lists for element in lists[n]]


def _attention_modules(path: str, block: nn.Module) -> list[tuple[str, nn.Module]]:
    """The outermost attention submodules of ``block`` (the block itself excluded)."""
    out: list[tuple[str, nn.Module]] = []
    for name, module in iter_modules(block, path):
        if name == path or any(name.startswith(o + ".") for o, _ in out):
            continue
        if _ATTENTION.search(type(_inner(module)).__name__):
            out.append((name, module))
    return out


def _block_places(path: str, block: nn.Module, places: Places) -> None:
    attention = _attention_modules(path, block)
    inside = [a for a, _ in attention]
    width = None
    for name, module in attention:
        linears = [(n, w) for n, m in iter_modules(module, name) if (w := _widths(m))]
        square = [(n, w) for n, w in linears if w[0] == w[1]]
        if square and type(_inner(module)) is not nn.MultiheadAttention:
            places.attention.append(square[-1][0])
            width = square[-1][1][1]
    outside = [
        (n, w)
        for n, m in iter_modules(block, path)
        if not any(n == a or n.startswith(a + ".") for a in inside) and (w := _widths(m))
    ]
    down = [(n, w) for n, w in outside if w[0] > w[1] and (width is None or w[1] == width)]
    if down:
        name, _ = down[-1]
        places.ffn.append(name)
        _add_block(path, block, name, outside, places)
        return
    mixture = _largest_child_outside(path, block, inside)
    if mixture is not None and width is not None:
        places.ffn.append(mixture)
        places.widths[mixture] = width


def _add_block(
    path: str,
    block: nn.Module,
    ffn_out: str,
    outside: list[tuple[str, tuple[int, int]]],
    places: Places,
) -> None:
    """The block's child that holds the feed-forward input and output layers, if one does."""
    child = ffn_out[len(path) + 1 :].split(".", 1)[0]
    holder = f"{path}.{child}"
    first = [n for n, w in outside if w[0] < w[1]]
    module = _inner(block)._modules.get(child)
    if module is None or isinstance(module, nn.ModuleList) or holder == ffn_out:
        return
    if first and first[-1].startswith(holder + "."):
        places.block.append(holder)


def _largest_child_outside(path: str, block: nn.Module, inside: list[str]) -> str | None:
    """The child of ``block`` (not attention) with the most parameters: a mixture of experts."""
    best, size = None, 0
    for name, child in _inner(block).named_children():
        full = f"{path}.{name}"
        if full in inside:
            continue
        count = sum(p.numel() for p in child.parameters())
        if count > size:
            best, size = full, count
    return best


def derive_places(model: nn.Module) -> Places:
    """Attention outputs, feed-forward outputs and feed-forward blocks of every repeated block."""
    places = Places()
    for path, block in _blocks(model):
        _block_places(path, block, places)
    if len(places.block) != len(places.ffn):
        places.block = []  # a parallel adapter needs a block beside every feed-forward output
    return places
