"""peftkit.metrics on hand-worked cases."""

from __future__ import annotations

import pytest
import torch

from peftkit import metrics

# preds/labels of a 3-class problem, worked by hand:
#   class 0: tp 2, fp 1, fn 0 -> P 2/3, R 1,   F1 0.8,   support 2
#   class 1: tp 1, fp 0, fn 1 -> P 1,   R 1/2, F1 2/3,   support 2
#   class 2: tp 1, fp 1, fn 1 -> P 1/2, R 1/2, F1 1/2,   support 2
PREDS = [0, 0, 1, 0, 2, 2]
LABELS = [0, 0, 1, 2, 2, 1]


def test_accuracy_ignores_minus_100() -> None:
    assert metrics.accuracy([1, 2, 3], [1, 0, 3]) == pytest.approx(2 / 3)
    assert metrics.accuracy(
        torch.tensor([[1, 2], [3, 4]]), torch.tensor([[1, -100], [0, 4]])
    ) == pytest.approx(2 / 3)


def test_precision_recall_f1_per_class_macro_micro_weighted() -> None:
    result = metrics.precision_recall_f1(PREDS, LABELS)
    c0, c1, c2 = (result.per_class[c] for c in (0, 1, 2))
    assert (c0.precision, c0.recall, c0.f1, c0.support) == pytest.approx((2 / 3, 1.0, 0.8, 2))
    assert (c1.precision, c1.recall, c1.f1, c1.support) == pytest.approx((1.0, 0.5, 2 / 3, 2))
    assert (c2.precision, c2.recall, c2.f1, c2.support) == pytest.approx((0.5, 0.5, 0.5, 2))
    assert result.macro.precision == pytest.approx((2 / 3 + 1 + 0.5) / 3)
    assert result.macro.f1 == pytest.approx((0.8 + 2 / 3 + 0.5) / 3)
    assert result.weighted.f1 == pytest.approx(result.macro.f1)  # equal supports
    # single-label micro P = R = F1 = accuracy
    assert result.micro.f1 == pytest.approx(4 / 6) and result.accuracy == pytest.approx(4 / 6)


def test_class_never_predicted_scores_zero_and_restricting_classes() -> None:
    result = metrics.precision_recall_f1([0, 0, 0], [0, 1, 1])
    assert result.per_class[1].precision == 0.0 and result.per_class[1].f1 == 0.0
    only_one = metrics.precision_recall_f1([0, 0, 0], [0, 1, 1], classes=[1])
    assert list(only_one.per_class) == [1]
    assert only_one.micro.recall == 0.0 and only_one.micro.support == 2


def test_classification_report_prints_rows_and_averages() -> None:
    text = metrics.classification_report(PREDS, LABELS, names=["neg", "neu", "pos"], digits=2)
    lines = text.splitlines()
    assert lines[0].split() == ["precision", "recall", "f1-score", "support"]
    assert lines[2].split() == ["neg", "0.67", "1.00", "0.80", "2"]
    assert lines[4].split() == ["pos", "0.50", "0.50", "0.50", "2"]
    assert lines[6].split() == ["accuracy", "0.67", "6"]
    assert lines[7].split()[:2] == ["macro", "avg"] and lines[8].split()[:2] == ["weighted", "avg"]


def test_bio_spans_read_as_conlleval_does() -> None:
    assert metrics.bio_spans(["B-PER", "I-PER", "O", "B-LOC"]) == [("PER", 0, 1), ("LOC", 3, 3)]
    # I- after O starts an entity; a type change splits; B- after B- splits
    assert metrics.bio_spans(["O", "I-PER", "I-PER"]) == [("PER", 1, 2)]
    assert metrics.bio_spans(["B-PER", "I-LOC"]) == [("PER", 0, 0), ("LOC", 1, 1)]
    assert metrics.bio_spans(["B-PER", "B-PER", "I-PER"]) == [("PER", 0, 0), ("PER", 1, 2)]
    assert metrics.bio_spans(["B-MISC"]) == [("MISC", 0, 0)]
    # IOBES
    assert metrics.bio_spans(["S-PER", "B-LOC", "E-LOC", "I-LOC"]) == [
        ("PER", 0, 0),
        ("LOC", 1, 2),
        ("LOC", 3, 3),
    ]


def test_span_scores_entity_level_by_hand() -> None:
    true = [["B-PER", "I-PER", "O", "B-LOC"], ["B-ORG", "O"]]
    pred = [["B-PER", "O", "O", "I-LOC"], ["B-ORG", "B-PER"]]
    # true: PER(0,0-1), LOC(0,3), ORG(1,0); pred: PER(0,0), LOC(0,3), ORG(1,0), PER(1,1)
    result = metrics.span_scores(true, pred)
    assert result.overall.precision == pytest.approx(2 / 4)
    assert result.overall.recall == pytest.approx(2 / 3)
    assert result.f1 == pytest.approx(2 * 0.5 * (2 / 3) / (0.5 + 2 / 3))
    assert result.per_type["PER"].precision == 0.0 and result.per_type["LOC"].f1 == 1.0
    with pytest.raises(ValueError, match="sentence 0"):
        metrics.span_scores([["O"]], [["O", "O"]])


def test_span_metrics_from_padded_id_tensors() -> None:
    id2label = ["O", "B-PER", "I-PER"]
    labels = torch.tensor([[-100, 1, 2, 0, -100], [-100, 1, 0, -100, -100]])
    preds = torch.tensor([[0, 1, 2, 0, 2], [1, 1, 1, 0, 0]])
    out = metrics.span_metrics(id2label)(preds, labels)
    # kept positions: sentence 0 true [B-PER I-PER O] = pred -> PER(0-1) found;
    # sentence 1 true [B-PER O], pred [B-PER B-PER] -> PER(0-0) found, PER(1-1) spurious
    assert out["precision"] == pytest.approx(2 / 3) and out["recall"] == pytest.approx(1.0)
    assert out["token_accuracy"] == pytest.approx(4 / 5)


def test_classification_metrics_keys() -> None:
    out = metrics.classification_metrics(torch.tensor(PREDS), torch.tensor(LABELS))
    assert set(out) == {"accuracy", "macro_f1", "micro_f1", "macro_precision", "macro_recall"}
    assert out["accuracy"] == pytest.approx(4 / 6)
