"""``trainable_summary``: how many parameters train, in total and per adapter."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from .core import adapters, unwrap_model
from .layers import SavedModule
from .methods.base import Method


@dataclass(frozen=True)
class AdapterRow:
    name: str
    method: str
    active: bool
    params: int
    details: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class TrainableSummary:
    """Counts of unique parameters (tied weights counted once). ``print()`` it for a table."""

    total: int
    trainable: int
    adapters: list[AdapterRow]

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / self.total if self.total else 0.0

    def __str__(self) -> str:
        head = f"trainable {self.trainable:,} of {self.total:,} parameters ({self.percent:.4g}%)"
        if not self.adapters:
            return head + "; no adapters applied"
        rows = [("adapter", "method", "active", "params", "% of total", "details")]
        for row in self.adapters:
            share = 100.0 * row.params / self.total if self.total else 0.0
            details = ", ".join(f"{k}={v}" for k, v in row.details.items())
            active = "yes" if row.active else "no"
            rows.append((row.name, row.method, active, f"{row.params:,}", f"{share:.4g}%", details))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = [
            "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows
        ]
        return "\n".join([head, *lines])

    __repr__ = __str__


def trainable_summary(model: nn.Module) -> TrainableSummary:
    """Total and trainable parameter counts, and one row per adapter."""
    model = unwrap_model(model)
    unique = {id(p): p for p in model.parameters()}
    rows = [
        AdapterRow(
            name=name,
            method=method.name,
            active=method.active,
            params=sum(p.numel() for p in method.parameters()),
            details=_details(method),
        )
        for name, method in adapters(model).items()
    ]
    return TrainableSummary(
        total=sum(p.numel() for p in unique.values()),
        trainable=sum(p.numel() for p in unique.values() if p.requires_grad),
        adapters=rows,
    )


def _details(method: Method) -> dict[str, Any]:
    """The method's own facts, plus the modules it trains in full (``saved``: modules_to_save and
    the task head, see ``MethodConfig.train_head``)."""
    saved = [layer.path for layer in method.layers if isinstance(layer, SavedModule)]
    return {**method.describe(), **({"saved": saved} if saved else {})}


def print_trainable_parameters(model: nn.Module) -> None:
    """Print one line: ``trainable params: 1,234 || all params: 5,678 || trainable%: 21.7328``.

    The line HF peft users know from ``model.print_trainable_parameters()``, as a function because
    peftkit does not wrap the model. The counts are ``trainable_summary``'s (unique parameters, so
    tied weights count once); ``print(trainable_summary(model))`` adds one row per adapter.
    """
    summary = trainable_summary(model)
    print(
        f"trainable params: {summary.trainable:,} || all params: {summary.total:,} || "
        f"trainable%: {summary.percent:.4f}"
    )


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A markdown table with aligned columns (the demo's and the benchmarks' output)."""
    body = [list(header), *[list(r) for r in rows]]
    widths = [max(len(row[i]) for row in body) for i in range(len(header))]
    lines = [
        "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |"
        for row in body
    ]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)
