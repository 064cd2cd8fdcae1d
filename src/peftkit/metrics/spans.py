"""Entity-level scores for BIO-tagged sequences (named-entity recognition).

An entity counts as found only if its type, first and last token all match. Spans are read the way
the CoNLL evaluation script (and seqeval's default mode) reads them, leniently:

- ``B-X`` starts an entity of type X; ``I-X`` continues it;
- ``I-X`` after ``O`` or after an entity of another type starts a new entity (it is not dropped);
- an entity ends before ``O``, ``B-*``, or a tag of another type.

IOBES tags (``E-X`` ends, ``S-X`` is a single-token entity) are read too.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..losses.functional import IGNORE_INDEX
from .classification import Scores, scores

Span = tuple[str, int, int]  # (type, first token, last token)


def _split(tag: str) -> tuple[str, str]:
    """("B", "PER") from "B-PER"; ("O", "") from "O"; a bare "B" has the empty type."""
    if tag in ("O", ""):
        return "O", ""
    prefix, _, kind = tag.partition("-")
    return prefix[:1].upper(), kind


def _ends(prev: str, prev_kind: str, tag: str, kind: str) -> bool:
    """Whether an entity open at the previous token ends before this one."""
    if prev in ("E", "S"):
        return True
    if prev not in ("B", "I"):
        return False
    return tag in ("O", "B", "S") or kind != prev_kind


def _starts(prev: str, prev_kind: str, tag: str, kind: str) -> bool:
    """Whether an entity starts at this token."""
    if tag in ("B", "S"):
        return True
    if tag not in ("I", "E"):
        return False
    return prev in ("O", "E", "S") or kind != prev_kind


def bio_spans(tags: Sequence[str]) -> list[Span]:
    """The entities of one tagged sequence, as (type, first, last) with inclusive token indices."""
    spans: list[Span] = []
    prev, prev_kind, begin = "O", "", 0
    for i, raw in enumerate([*tags, "O"]):
        tag, kind = _split(raw)
        if _ends(prev, prev_kind, tag, kind):
            spans.append((prev_kind, begin, i - 1))
        if _starts(prev, prev_kind, tag, kind):
            begin = i
        prev, prev_kind = tag, kind
    return spans


@dataclass(frozen=True)
class SpanScores:
    """Micro-averaged entity scores over all types, and scores per entity type."""

    overall: Scores
    per_type: dict[str, Scores]

    @property
    def f1(self) -> float:
        return self.overall.f1


def span_scores(
    true_tags: Iterable[Sequence[str]], pred_tags: Iterable[Sequence[str]]
) -> SpanScores:
    """Entity-level precision, recall and F1 over sentences (lists of tags, one list per sentence)."""
    true_set: set[tuple[int, str, int, int]] = set()
    pred_set: set[tuple[int, str, int, int]] = set()
    for n, (t, p) in enumerate(zip(true_tags, pred_tags, strict=True)):
        if len(t) != len(p):
            raise ValueError(f"sentence {n}: {len(t)} true tags but {len(p)} predicted")
        true_set.update((n, *s) for s in bio_spans(t))
        pred_set.update((n, *s) for s in bio_spans(p))
    hit = true_set & pred_set
    kinds = sorted({s[1] for s in true_set | pred_set})
    per_type = {}
    for kind in kinds:
        tp = sum(1 for s in hit if s[1] == kind)
        n_pred = sum(1 for s in pred_set if s[1] == kind)
        n_true = sum(1 for s in true_set if s[1] == kind)
        per_type[kind] = scores(tp, n_pred - tp, n_true - tp)
    overall = scores(len(hit), len(pred_set) - len(hit), len(true_set) - len(hit))
    return SpanScores(overall, per_type)


def ids_to_tags(
    preds: Any, labels: Any, id2label: Mapping[int, str] | Sequence[str]
) -> tuple[list[list[str]], list[list[str]]]:
    """(true, predicted) tag lists per sentence from id tensors (N, T), skipping label -100."""
    p_rows, y_rows = torch.as_tensor(preds).tolist(), torch.as_tensor(labels).tolist()
    names = dict(enumerate(id2label)) if not isinstance(id2label, Mapping) else id2label
    true, pred = [], []
    for p_row, y_row in zip(p_rows, y_rows, strict=True):
        kept = [(p, y) for p, y in zip(p_row, y_row, strict=True) if y != IGNORE_INDEX]
        true.append([names[y] for _, y in kept])
        pred.append([names.get(p, "O") for p, _ in kept])
    return true, pred


def span_metrics(
    id2label: Mapping[int, str] | Sequence[str],
) -> Callable[[Any, Any], dict[str, float]]:
    """Trainer-ready ``compute_metrics`` for token classification: entity precision, recall, F1
    and token accuracy, from predicted and true tag ids (N, T) padded with -100."""

    def compute(preds: Any, labels: Any) -> dict[str, float]:
        true, pred = ids_to_tags(preds, labels, id2label)
        result = span_scores(true, pred)
        correct = sum(
            a == b for t, p in zip(true, pred, strict=True) for a, b in zip(t, p, strict=True)
        )
        total = sum(len(t) for t in true)
        return {
            "precision": result.overall.precision,
            "recall": result.overall.recall,
            "f1": result.overall.f1,
            "token_accuracy": correct / total if total else 0.0,
        }

    return compute
