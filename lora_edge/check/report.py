"""The accuracy gate's outputs: reports/check.json, a JUnit XML for CI, and reports/check.md.

JUnit: one ``<testcase>`` per graph target and metric (``classname`` = the
target, ``name`` = the metric). A failed metric carries a ``<failure>`` whose
message names the graph, the metric, the value and the threshold; a metric
that could not run carries ``<skipped>`` with the reason. CI systems (GitHub
Actions test reporters, GitLab, Jenkins) show these per test.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

from lora_edge.core.bundle import REPORTS_DIR, atomic_file, write_json
from lora_edge.check.metrics import FAILED, PASSED, SKIPPED, format_value
from lora_edge.core.report import markdown_table

CHECK_JSON = "check.json"
CHECK_JUNIT = "check.junit.xml"
CHECK_MD = "check.md"
STATUS_MARK = {PASSED: "pass", FAILED: "FAIL", SKIPPED: "skipped"}


def junit_xml(report) -> str:
    """The report as JUnit XML text (one testsuite, one testcase per target and metric)."""
    counts = report.counts()
    total = sum(counts.values())
    suites = ET.Element("testsuites", name="lora-edge check", tests=str(total), failures=str(counts["failed"]),
                        skipped=str(counts["skipped"]), errors="0", time=f"{report.seconds:.3f}")
    suite = ET.SubElement(suites, "testsuite", name=f"lora-edge check {Path(report.bundle).name}",
                          tests=str(total), failures=str(counts["failed"]), skipped=str(counts["skipped"]),
                          errors="0", time=f"{report.seconds:.3f}", timestamp=report.created)
    properties = ET.SubElement(suite, "properties")
    for name, value in (("bundle", report.bundle), ("task", report.task), ("device", report.device),
                        *((f"data.{adapter}", source) for adapter, source in report.data.items())):
        ET.SubElement(properties, "property", name=name, value=str(value))
    for result in report.results:
        share = result.seconds / max(len(result.metrics), 1)
        for metric in result.metrics:
            case = ET.SubElement(suite, "testcase", classname=result.target, name=metric.metric,
                                 time=f"{share:.3f}")
            message = metric.message(result.target, result.precision)
            if metric.status == FAILED:
                failure = ET.SubElement(case, "failure", message=message, type="threshold")
                failure.text = (f"graph file: {result.file}\ndata: {result.data}\n"
                                f"examples: {result.examples}\n{message}")
            elif metric.status == SKIPPED:
                ET.SubElement(case, "skipped", message=message)
            else:
                ET.SubElement(case, "system-out").text = message
    ET.indent(suites)
    return '<?xml version="1.0" encoding="utf-8"?>\n' + ET.tostring(suites, encoding="unicode") + "\n"


def _cell(result, metric: str) -> str:
    found = next((m for m in result.metrics if m.metric == metric), None)
    if found is None:
        return ""
    if found.status == SKIPPED and found.value is None:
        return "skipped"
    text = format_value(found.value)
    return f"**{text} ✗**" if found.status == FAILED else text


def markdown(report) -> str:
    """The report as Markdown: verdict, a table per target, failures and skips with their reasons."""
    counts = report.counts()
    verdict = "PASSED" if report.passed else "FAILED"
    lines = [f"# Accuracy gate: {verdict}", "",
             f"Bundle `{report.bundle}`, task {report.task}, run on {report.device}, {report.created}. "
             f"{counts['passed']} checks passed, {counts['failed']} failed, {counts['skipped']} skipped "
             f"({report.seconds:.1f} s).", "",
             "Every graph is compared with the PyTorch reference (base model + adapter, fp32, unmerged). "
             "Hot-swap graphs are checked with each adapter file and with none (`[base]`: against the base model).",
             ""]
    for adapter, source in report.data.items():
        lines.append(f"- Evaluation data for `{adapter}`: {source}")
    lines.append("")
    metrics = []
    for result in report.targets:
        metrics.extend(m.metric for m in result.metrics if m.metric not in metrics)
    rows = []
    for result in report.targets:
        row = {"target": f"`{result.target}`", "status": STATUS_MARK[result.status]}
        row.update({metric: _cell(result, metric) for metric in metrics})
        for score in ("accuracy", "macro_f1", "perplexity"):
            if score in result.scores:
                row[score] = format_value(result.scores[score])
        rows.append(row)
    score_columns = [s for s in ("accuracy", "macro_f1", "perplexity") if any(s in r for r in rows)]
    columns = ["target", "status", *metrics, *score_columns]
    lines.append(markdown_table(rows, columns))
    thresholds = {result.precision: result.thresholds for result in report.targets}
    if thresholds:
        lines += ["Thresholds applied (value must be at most / at least):", ""]
        threshold_rows = [{"precision": p, **{m: format_value(v) for m, v in t.items()}} for p, t in thresholds.items()]
        lines.append(markdown_table(threshold_rows, ["precision", *metrics]))
    failures = report.failures()
    if failures:
        lines += ["## Failures", ""] + [f"- {message}" for message in failures] + [""]
    skipped = sorted({m.message(r.target, r.precision) for r in report.results for m in r.metrics
                      if m.status == SKIPPED})
    if skipped:
        lines += ["## Skipped", ""] + [f"- {message}" for message in skipped] + [""]
    integrity = [m.message(r.target, r.precision) for r in report.integrity for m in r.metrics]
    if integrity:
        lines += ["## Adapter files", ""] + [f"- {r.target}: sha256 {STATUS_MARK[r.status]}"
                                             + (f" ({r.metrics[0].reason})" if r.metrics[0].reason else "")
                                             for r in report.integrity] + [""]
    return "\n".join(lines)


def summary_rows(report) -> list[dict]:
    """Short per-target rows for terminals: target, status, top-1 agreement, accuracy, worst logit diff."""
    rows = []
    for result in report.targets:
        values = {m.metric: m.value for m in result.metrics}
        rows.append({"graph": result.target, "status": STATUS_MARK[result.status],
                     "max_abs_diff": values.get("max_abs_diff"), "top1": values.get("top1_agreement"),
                     "accuracy": result.scores.get("accuracy"), "perplexity": result.scores.get("perplexity")})
    return rows


def write_reports(report, bundle: Path, junit: str | Path | None = None) -> dict[str, Path]:
    """Write check.json, the JUnit XML (``junit`` or reports/check.junit.xml) and check.md, atomically."""
    reports = Path(bundle) / REPORTS_DIR
    paths = {"json": reports / CHECK_JSON, "junit": Path(junit) if junit else reports / CHECK_JUNIT,
             "markdown": reports / CHECK_MD}
    write_json(paths["json"], report.to_json())
    for key, text in (("junit", junit_xml(report)), ("markdown", markdown(report))):
        with atomic_file(paths[key]) as staging:
            staging.write_text(text)
    return paths


def check_summary(report, as_json: bool = False, junit: str | Path | None = None) -> str:
    """What `lora-edge check` prints: a row per graph, the verdict and where the reports are (or the JSON)."""
    import json

    if as_json:
        return json.dumps(report.to_json(), indent=2, default=str)
    reports = Path(report.bundle) / REPORTS_DIR
    score = "accuracy" if report.task == "seq-cls" else "perplexity"
    counts = report.counts()
    lines = [markdown_table(summary_rows(report), ["graph", "status", "max_abs_diff", "top1", score],
                            ["graph", "gate", "max |Δ logit|", "top-1 agree", score])]
    lines += [f"FAILED {message}" for message in report.failures()]
    lines.append(f"gate: {'PASSED' if report.passed else 'FAILED'} ({counts['passed']} passed, {counts['failed']} "
                 f"failed, {counts['skipped']} skipped)")
    lines.append(f"reports: {reports / CHECK_MD}, {reports / CHECK_JSON}, {junit or reports / CHECK_JUNIT}")
    return "\n".join(lines)
