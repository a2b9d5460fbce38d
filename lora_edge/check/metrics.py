"""The accuracy gate's measures: logits against the reference, task metrics, and threshold verdicts.

Everything here is plain numpy on arrays the gate has already computed, so the
arithmetic is tested on fixed inputs (``tests/check/test_check.py``) apart from any
model. Logits are compared row by row: one row per example for classifiers,
one row per real token position for causal LMs.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np

from lora_edge.core.metrics import accuracy, macro_f1
from lora_edge.core.recipe import Thresholds

PASSED, FAILED, SKIPPED = "passed", "failed", "skipped"

# Which gated metrics apply to which task; the others are not listed at all.
LOGIT_METRICS = ("max_abs_diff", "mean_abs_diff", "cosine", "top1_agreement")
TASK_METRICS = {"seq-cls": ("accuracy_drop", "macro_f1_drop"),
                "causal-lm": ("perplexity_increase", "greedy_agreement", "exact_match_drop")}


def gated_metrics(task: str) -> tuple[str, ...]:
    """The metrics the gate reports for a task, in report order."""
    return LOGIT_METRICS + TASK_METRICS[task]


class LogitComparison:
    """Running comparison of a graph's logit rows with the reference's, batch by batch.

    Kept as running sums (not stored rows) so that a causal LM's
    [tokens x vocabulary] logits never have to be held for a whole data set.
    """

    def __init__(self):
        self.max_abs = 0.0
        self.sum_abs = 0.0
        self.values = 0
        self.min_cosine = 1.0
        self.sum_cosine = 0.0
        self.agree = 0
        self.rows = 0
        self.non_finite = 0

    def update(self, graph_rows: np.ndarray, reference_rows: np.ndarray) -> None:
        """Add ``[rows, outputs]`` logits of the graph and of the reference."""
        graph = np.asarray(graph_rows, dtype=np.float64).reshape(-1, reference_rows.shape[-1])
        reference = np.asarray(reference_rows, dtype=np.float64).reshape(graph.shape)
        if graph.size == 0:
            return
        finite = np.isfinite(graph).all(axis=1)
        self.non_finite += int((~finite).sum())
        diff = np.abs(graph - reference)
        self.max_abs = max(self.max_abs, float(diff.max()) if finite.all() else math.inf)
        self.sum_abs += float(diff[finite].sum())
        self.values += int(finite.sum()) * graph.shape[1]
        norms = np.linalg.norm(graph, axis=1) * np.linalg.norm(reference, axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            cosine = np.where(norms > 0, (graph * reference).sum(axis=1) / np.where(norms > 0, norms, 1.0),
                              np.where(np.linalg.norm(graph, axis=1) == np.linalg.norm(reference, axis=1), 1.0, 0.0))
        cosine = np.where(finite, cosine, -1.0)
        self.min_cosine = min(self.min_cosine, float(cosine.min()))
        self.sum_cosine += float(cosine.sum())
        self.agree += int((graph.argmax(axis=1) == reference.argmax(axis=1)).sum())
        self.rows += graph.shape[0]

    def results(self) -> dict[str, float]:
        """max_abs_diff, mean_abs_diff, cosine (mean over rows), top1_agreement, and cosine_min (informative).

        The gate holds the mean cosine: the worst row's cosine swings on rows whose
        logits are all near zero, where max_abs_diff already bounds the worst case.
        """
        if not self.rows:
            return {}
        return {"max_abs_diff": self.max_abs,
                "mean_abs_diff": self.sum_abs / self.values if self.values else math.inf,
                "cosine": self.sum_cosine / self.rows, "top1_agreement": self.agree / self.rows,
                "cosine_min": self.min_cosine}


def classification_scores(graph_logits: np.ndarray, reference_logits: np.ndarray, labels: list[int],
                          n_classes: int) -> dict[str, float]:
    """Accuracy and macro-F1 of the graph and of the reference on labeled data, and the drops in points."""
    graph_pred, reference_pred = graph_logits.argmax(axis=1), reference_logits.argmax(axis=1)
    scores = {"accuracy": accuracy(labels, graph_pred), "reference_accuracy": accuracy(labels, reference_pred),
              "macro_f1": macro_f1(labels, graph_pred, n_classes),
              "reference_macro_f1": macro_f1(labels, reference_pred, n_classes)}
    scores["accuracy_drop"] = 100.0 * (scores["reference_accuracy"] - scores["accuracy"])
    scores["macro_f1_drop"] = 100.0 * (scores["reference_macro_f1"] - scores["macro_f1"])
    return scores


@dataclass
class MetricResult:
    """One gated metric of one graph: its value, its threshold and the verdict."""

    metric: str
    status: str
    value: float | None = None
    threshold: float | None = None
    bound: str = "max"
    reason: str = ""

    def message(self, target: str, precision: str) -> str:
        """One line for reports and JUnit: names the graph, metric, value and threshold."""
        if self.status == SKIPPED:
            return f"{target}: {self.metric} skipped: {self.reason}"
        if self.value is None:
            return f"{target}: {self.metric} {self.status}" + (f": {self.reason}" if self.reason else "")
        relation = "at most" if self.bound == "max" else "at least"
        verdict = "ok" if self.status == PASSED else "FAILED"
        return (f"{target}: {self.metric} = {format_value(self.value)}, threshold for {precision}: "
                f"{relation} {format_value(self.threshold)} ({verdict})")

    def to_json(self) -> dict:
        """JSON form (NaN/inf as strings, so the file stays valid JSON)."""
        record = asdict(self)
        if self.value is not None and not math.isfinite(self.value):
            record["value"] = str(self.value)
        return record


def format_value(value: float | None) -> str:
    """A metric value for messages: 4 significant digits, scientific when tiny."""
    if value is None:
        return "—"
    if 0.99 < value < 1:  # cosines and agreements: show how far from 1 they are
        return f"{value:.7g}"
    if value != 0 and abs(value) < 1e-3:
        return f"{value:.2e}"
    return f"{value:.4g}"


def judge(metric: str, value: float | None, thresholds: Thresholds, skip_reason: str = "",
          threshold_where: str = "") -> MetricResult:
    """The verdict for one metric: skipped (with the reason), or passed/failed against its threshold.

    A metric without a value is skipped when ``skip_reason`` says why; a value
    that is NaN fails whatever the threshold (a graph that produces NaN is broken).
    """
    bound = Thresholds.bound(metric)
    threshold = getattr(thresholds, metric)
    if value is None:
        return MetricResult(metric, SKIPPED, None, threshold, bound, skip_reason or "not measured")
    if threshold is None:
        where = f" in {threshold_where}" if threshold_where else ""
        return MetricResult(metric, SKIPPED, value, None, bound, f"not gated: threshold turned off{where}")
    if math.isnan(value):
        return MetricResult(metric, FAILED, value, threshold, bound, "the graph produced NaN")
    ok = value <= threshold if bound == "max" else value >= threshold
    return MetricResult(metric, PASSED if ok else FAILED, value, threshold, bound)


@dataclass
class TargetResult:
    """Everything the gate found about one graph target (a graph, and for hot-swap one adapter)."""

    target: str
    graph: str
    file: str
    form: str
    precision: str
    adapter: str | None
    task: str
    thresholds: dict = field(default_factory=dict)
    metrics: list[MetricResult] = field(default_factory=list)
    scores: dict = field(default_factory=dict)
    examples: int = 0
    data: str = ""
    providers: list[str] = field(default_factory=list)
    error: str = ""
    seconds: float = 0.0

    @property
    def status(self) -> str:
        """failed if any metric failed; skipped if none ran; else passed."""
        statuses = {m.status for m in self.metrics}
        if FAILED in statuses:
            return FAILED
        return PASSED if PASSED in statuses else SKIPPED

    def to_json(self) -> dict:
        """JSON form for check.json."""
        record = {k: v for k, v in asdict(self).items() if k != "metrics"}
        record["status"] = self.status
        record["metrics"] = {m.metric: m.to_json() for m in self.metrics}
        return record
