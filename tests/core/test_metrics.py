"""lora_edge.core.metrics: numpy classification scores and perplexity, checked by hand and against sklearn."""

from __future__ import annotations

import math

import numpy as np
import pytest

from lora_edge.core.metrics import (accuracy, classification_report, confusion_matrix, macro_f1, perplexity,
                               precision_recall_f1)

Y_TRUE = [0, 0, 0, 1, 1, 2, 2, 2, 2, 0]
Y_PRED = [0, 1, 0, 1, 2, 2, 2, 0, 2, 0]


def test_confusion_matrix_rows_are_true_classes():
    matrix = confusion_matrix(Y_TRUE, Y_PRED, 3)
    assert matrix.tolist() == [[3, 1, 0], [0, 1, 1], [1, 0, 3]]


def test_scores_by_hand():
    assert accuracy(Y_TRUE, Y_PRED) == pytest.approx(0.7)
    precision, recall, f1, support = precision_recall_f1(confusion_matrix(Y_TRUE, Y_PRED, 3))
    np.testing.assert_allclose(precision, [3 / 4, 1 / 2, 3 / 4])
    np.testing.assert_allclose(recall, [3 / 4, 1 / 2, 3 / 4])
    assert support.tolist() == [4, 2, 4]
    assert macro_f1(Y_TRUE, Y_PRED, 3) == pytest.approx((0.75 + 0.5 + 0.75) / 3)


def test_absent_class_does_not_drag_macro_average():
    # class 3 never occurs in truth or prediction: the macro average is over classes 0..2 only
    assert macro_f1(Y_TRUE, Y_PRED, 4) == pytest.approx(macro_f1(Y_TRUE, Y_PRED, 3))
    report = classification_report(Y_TRUE, Y_PRED, ["a", "b", "c", "d"])
    assert report["per_class"]["d"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    assert report["examples"] == 10


def test_matches_sklearn_on_random_predictions():
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    y_true, y_pred = rng.integers(0, 5, 300), rng.integers(0, 5, 300)
    report = classification_report(y_true, y_pred, list("abcde"))
    assert report["accuracy"] == pytest.approx(sklearn_metrics.accuracy_score(y_true, y_pred))
    assert report["macro_f1"] == pytest.approx(sklearn_metrics.f1_score(y_true, y_pred, average="macro"))
    assert report["precision"] == pytest.approx(sklearn_metrics.precision_score(y_true, y_pred, average="macro"))
    assert report["recall"] == pytest.approx(sklearn_metrics.recall_score(y_true, y_pred, average="macro"))
    assert report["confusion_matrix"]["matrix"] == sklearn_metrics.confusion_matrix(y_true, y_pred).tolist()


def test_perplexity():
    assert perplexity(math.log(7.0)) == pytest.approx(7.0)
    assert perplexity(1e6) == math.inf
