"""Classification metrics on integer predictions and labels."""

from __future__ import annotations

from collections.abc import Sequence


def accuracy(predictions: Sequence[int], labels: Sequence[int]) -> float:
    """Fraction of predictions equal to the label (0.0 for no examples)."""
    _check_lengths(predictions, labels)
    if not labels:
        return 0.0
    return sum(int(p) == int(t) for p, t in zip(predictions, labels)) / len(labels)


def macro_f1(predictions: Sequence[int], labels: Sequence[int]) -> float:
    """Unweighted mean of per-class F1 over the classes seen in labels or predictions.

    Matches ``sklearn.metrics.f1_score(labels, predictions, average="macro")``: a class
    with no true positive scores 0.
    """
    _check_lengths(predictions, labels)
    classes = sorted({int(x) for x in labels} | {int(x) for x in predictions})
    if not classes:
        return 0.0
    scores = []
    for c in classes:
        tp = sum(int(p) == c and int(t) == c for p, t in zip(predictions, labels))
        fp = sum(int(p) == c and int(t) != c for p, t in zip(predictions, labels))
        fn = sum(int(p) != c and int(t) == c for p, t in zip(predictions, labels))
        scores.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    return sum(scores) / len(scores)


def _check_lengths(predictions: Sequence[int], labels: Sequence[int]) -> None:
    if len(predictions) != len(labels):
        raise ValueError(f"{len(predictions)} predictions for {len(labels)} labels")
