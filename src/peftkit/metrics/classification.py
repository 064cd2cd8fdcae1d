"""Classification metrics from predicted and true class ids.

Inputs are tensors, arrays or sequences of class ids of any (matching) shape; positions whose label
is ``ignore_index`` are dropped, so token-level predictions (N, T) padded with -100 work as they
are. Precision, recall and F1 of a class with no predicted (or no true) examples count as 0.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..losses.functional import IGNORE_INDEX


@dataclass(frozen=True)
class Scores:
    precision: float
    recall: float
    f1: float
    support: int


@dataclass(frozen=True)
class ClassificationScores:
    """Per-class scores (keyed by class id) and their macro, micro and support-weighted averages."""

    per_class: dict[int, Scores]
    macro: Scores
    micro: Scores
    weighted: Scores
    accuracy: float


def _flat(preds: Any, labels: Any, ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    p = torch.as_tensor(preds).reshape(-1).long()
    y = torch.as_tensor(labels).reshape(-1).long()
    if p.shape != y.shape:
        raise ValueError(f"{p.numel()} predictions but {y.numel()} labels")
    keep = y != ignore_index
    return p[keep], y[keep]


def _ratio(num: float, den: float) -> float:
    return num / den if den else 0.0


def _f1(precision: float, recall: float) -> float:
    return _ratio(2 * precision * recall, precision + recall)


def scores(tp: float, fp: float, fn: float) -> Scores:
    """Precision tp / (tp + fp), recall tp / (tp + fn), their harmonic mean; support tp + fn."""
    p, r = _ratio(tp, tp + fp), _ratio(tp, tp + fn)
    return Scores(p, r, _f1(p, r), int(tp + fn))


def accuracy(preds: Any, labels: Any, *, ignore_index: int = IGNORE_INDEX) -> float:
    """Fraction of (non-ignored) positions where the prediction equals the label."""
    p, y = _flat(preds, labels, ignore_index)
    return float((p == y).float().mean()) if y.numel() else 0.0


def precision_recall_f1(
    preds: Any,
    labels: Any,
    *,
    classes: Sequence[int] | None = None,
    ignore_index: int = IGNORE_INDEX,
) -> ClassificationScores:
    """Scores of each class in ``classes`` (default: every id seen in labels or predictions)."""
    p, y = _flat(preds, labels, ignore_index)
    ids = sorted(set(classes) if classes is not None else set(y.tolist()) | set(p.tolist()))
    per_class = {}
    for c in ids:
        tp = int(((p == c) & (y == c)).sum())
        per_class[c] = scores(tp, int((p == c).sum()) - tp, int((y == c).sum()) - tp)
    return _summarise(per_class, p, y, ids)


def _summarise(
    per_class: dict[int, Scores], p: torch.Tensor, y: torch.Tensor, ids: list[int]
) -> ClassificationScores:
    rows = list(per_class.values())
    n = len(rows) or 1
    support = sum(s.support for s in rows)
    macro = Scores(
        sum(s.precision for s in rows) / n,
        sum(s.recall for s in rows) / n,
        sum(s.f1 for s in rows) / n,
        support,
    )
    weighted = Scores(
        _ratio(sum(s.precision * s.support for s in rows), support),
        _ratio(sum(s.recall * s.support for s in rows), support),
        _ratio(sum(s.f1 * s.support for s in rows), support),
        support,
    )
    chosen = torch.isin(y, torch.tensor(ids, dtype=y.dtype))
    picked = torch.isin(p, torch.tensor(ids, dtype=p.dtype))
    tp = int(((p == y) & chosen).sum())
    micro = scores(tp, int(picked.sum()) - tp, int(chosen.sum()) - tp)
    acc = float((p == y).float().mean()) if y.numel() else 0.0
    return ClassificationScores(per_class, macro, micro, weighted, acc)


def classification_report(
    preds: Any,
    labels: Any,
    *,
    names: Mapping[int, str] | Sequence[str] | None = None,
    digits: int = 3,
    ignore_index: int = IGNORE_INDEX,
) -> str:
    """A printable table: precision, recall, F1 and support per class, then accuracy and averages."""
    result = precision_recall_f1(preds, labels, ignore_index=ignore_index)

    def name(c: int) -> str:
        if isinstance(names, Mapping):
            return str(names.get(c, c))
        return str(names[c]) if names is not None and 0 <= c < len(names) else str(c)

    rows = [(name(c), s) for c, s in result.per_class.items()]
    width = max([len(r[0]) for r in rows] + [len("weighted avg")])
    head = f"{'':>{width}}  {'precision':>9}  {'recall':>9}  {'f1-score':>9}  {'support':>9}"

    def line(label: str, s: Scores) -> str:
        nums = "  ".join(f"{v:>9.{digits}f}" for v in (s.precision, s.recall, s.f1))
        return f"{label:>{width}}  {nums}  {s.support:>9}"

    total = result.macro.support
    lines = [head, "", *(line(n, s) for n, s in rows), ""]
    lines.append(
        f"{'accuracy':>{width}}  {'':>9}  {'':>9}  {result.accuracy:>9.{digits}f}  {total:>9}"
    )
    lines += [line("macro avg", result.macro), line("weighted avg", result.weighted)]
    return "\n".join(lines)


def classification_metrics(preds: Any, labels: Any) -> dict[str, float]:
    """Trainer-ready ``compute_metrics``: accuracy, macro and micro F1, macro precision and recall."""
    result = precision_recall_f1(preds, labels)
    return {
        "accuracy": result.accuracy,
        "macro_f1": result.macro.f1,
        "micro_f1": result.micro.f1,
        "macro_precision": result.macro.precision,
        "macro_recall": result.macro.recall,
    }
