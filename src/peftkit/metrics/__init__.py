"""Metrics: accuracy; precision / recall / F1 per class with macro, micro and weighted averages;
a printable classification report; entity-level span scores for BIO tags.

``classification_metrics`` and ``span_metrics(id2label)`` plug into ``Trainer(compute_metrics=...)``.
"""

from .classification import (
    ClassificationScores,
    Scores,
    accuracy,
    classification_metrics,
    classification_report,
    precision_recall_f1,
)
from .spans import SpanScores, bio_spans, ids_to_tags, span_metrics, span_scores

__all__ = [
    "ClassificationScores",
    "Scores",
    "SpanScores",
    "accuracy",
    "bio_spans",
    "classification_metrics",
    "classification_report",
    "ids_to_tags",
    "precision_recall_f1",
    "span_metrics",
    "span_scores",
]
