"""Evaluation metrics with numpy only: classification scores and perplexity.

Shared by the trainer (``metrics.json``) and the accuracy gate, so that both
report the same numbers for the same predictions. Labels are class ids
(``0..n_classes-1``); names are attached by :func:`classification_report`.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np


def _ids(values: Sequence[int] | np.ndarray) -> np.ndarray:
    return np.asarray(values, dtype=np.int64).reshape(-1)


def accuracy(y_true: Sequence[int], y_pred: Sequence[int]) -> float:
    """Share of predictions equal to the true class (0.0 for no examples)."""
    y_true, y_pred = _ids(y_true), _ids(y_pred)
    return float((y_true == y_pred).mean()) if y_true.size else 0.0


def confusion_matrix(y_true: Sequence[int], y_pred: Sequence[int], n_classes: int) -> np.ndarray:
    """``n_classes x n_classes`` counts; row = true class, column = predicted class."""
    matrix = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(matrix, (_ids(y_true), _ids(y_pred)), 1)
    return matrix


def precision_recall_f1(matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per-class precision, recall, F1 and support from a confusion matrix (0 where undefined)."""
    matrix = np.asarray(matrix, dtype=np.float64)
    true_pos = np.diag(matrix)
    predicted, support = matrix.sum(axis=0), matrix.sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.where(predicted > 0, true_pos / predicted, 0.0)
        recall = np.where(support > 0, true_pos / support, 0.0)
        f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
    return precision, recall, f1, support.astype(np.int64)


def macro_f1(y_true: Sequence[int], y_pred: Sequence[int], n_classes: int) -> float:
    """Unweighted mean F1 over the classes present in ``y_true`` or ``y_pred``."""
    matrix = confusion_matrix(y_true, y_pred, n_classes)
    _, _, f1, _ = precision_recall_f1(matrix)
    present = (matrix.sum(axis=0) + matrix.sum(axis=1)) > 0
    return float(f1[present].mean()) if present.any() else 0.0


def classification_report(y_true: Sequence[int], y_pred: Sequence[int], labels: Sequence[str]) -> dict:
    """Accuracy, macro precision/recall/F1, per-class scores and the confusion matrix, as JSON-ready data.

    Macro averages run over the classes present in ``y_true`` or ``y_pred``
    (a label never seen in this split does not drag the average to zero).
    """
    n_classes = len(labels)
    matrix = confusion_matrix(y_true, y_pred, n_classes)
    precision, recall, f1, support = precision_recall_f1(matrix)
    present = (matrix.sum(axis=0) + matrix.sum(axis=1)) > 0

    def macro(values: np.ndarray) -> float:
        return float(values[present].mean()) if present.any() else 0.0

    return {
        "examples": int(matrix.sum()),
        "accuracy": accuracy(y_true, y_pred),
        "precision": macro(precision),
        "recall": macro(recall),
        "macro_f1": macro(f1),
        "per_class": {label: {"precision": float(precision[i]), "recall": float(recall[i]),
                              "f1": float(f1[i]), "support": int(support[i])}
                      for i, label in enumerate(labels)},
        "confusion_matrix": {"labels": list(labels), "matrix": matrix.tolist()},
    }


def perplexity(mean_loss: float) -> float:
    """exp(mean token cross-entropy); inf when the loss is too large to exponentiate."""
    try:
        return float(math.exp(mean_loss))
    except OverflowError:
        return float("inf")
