"""``reports/report.md`` of a recipe run: the stages' tables and charts in one page.

Built from what the stages returned (training metrics, the graphs in the
manifest, each device's profile and comparison, the gate's report); the
stages' own reports stay beside it and are linked.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from lora_edge.core.bundle import REPORTS_DIR, atomic_file
from lora_edge.core.manifest import list_graphs
from lora_edge.core.report import markdown_table

REPORT_MD = "report.md"


def _graph_size_mb(bundle: Path, file: str) -> float:
    """Size of a graph on disk (with its external data file, if any), in MB."""
    path = bundle / file
    total = path.stat().st_size if path.is_file() else 0
    data = path.with_name(path.name + ".data")
    total += data.stat().st_size if data.is_file() else 0
    return total / 1e6


def _training_section(result, reports: Path) -> list[str]:
    if not result.training:
        return []
    lines = ["## Training", ""]
    rows = []
    for name, metrics in result.training.items():
        test, train = metrics.get("test") or {}, metrics.get("train") or {}
        rows.append({"adapter": name, "test accuracy": test.get("accuracy"), "test macro-F1": test.get("macro_f1"),
                     "test perplexity": test.get("perplexity"), "steps": train.get("steps"),
                     "seconds": train.get("seconds"), "trainable params": train.get("trainable_params")})
        plot = Path(result.recipe.output) / f"{result.recipe.name}-adapters" / name / "training.png"
        if plot.is_file():
            shutil.copy2(plot, reports / f"training.{name}.png")
    columns = [c for c in rows[0] if any(row.get(c) is not None for row in rows)]
    lines.append(markdown_table(rows, columns))
    lines += [f"![training {name}](training.{name}.png)\n" for name in result.training
              if (reports / f"training.{name}.png").is_file()]
    return lines


def _graphs_section(bundle: Path) -> list[str]:
    rows = [{"graph": g.name, "form": g.form.value, "precision": g.precision.value,
             "adapter": g.adapter or ", ".join(g.adapters), "file": g.file, "size_mb": _graph_size_mb(bundle, g.file)}
            for g in list_graphs(bundle)]
    return ["## Graphs", "", markdown_table(rows, ["graph", "form", "precision", "adapter", "file", "size_mb"],
                                            ["graph", "form", "precision", "adapter(s)", "file", "size MB"])]


def _device_sections(result) -> list[str]:
    from lora_edge.profile.report import COLUMNS, HEADERS

    lines = []
    for run in result.devices:
        lines += [f"## Latency on {run.device}", ""]
        if run.report is not None:
            lines += [f"> {run.report.note}", ""]
            lines += [f"- {note}" for note in run.report.host_mismatches + run.report.notes]
        if run.error:
            lines += [f"Not measured: {run.error}", ""]
        if run.comparison is not None:
            lines += ["", markdown_table(run.comparison.rows, COLUMNS, HEADERS),
                      f"![latency on {run.device}](devices/{run.device}/latency.png)", ""]
        lines += [f"Full profile (per-op times, memory, host facts): [devices/{run.device}/profile.md]"
                  f"(devices/{run.device}/profile.md)", ""]
    return lines


def _check_section(result) -> list[str]:
    from lora_edge.check.report import CHECK_JUNIT, CHECK_MD, summary_rows

    report = result.check
    counts = report.counts()
    score = "accuracy" if result.recipe.task == "seq-cls" else "perplexity"
    lines = ["## Accuracy gate", "",
             f"**{'PASSED' if report.passed else 'FAILED'}**: {counts['passed']} checks passed, {counts['failed']} "
             f"failed, {counts['skipped']} skipped. Each graph against the PyTorch reference (base + adapter, fp32).",
             ""]
    lines += [f"- Evaluation data for `{adapter}`: {source}" for adapter, source in report.data.items()]
    lines += ["", markdown_table(summary_rows(report), ["graph", "status", "max_abs_diff", "top1", score],
                                 ["graph", "gate", "max abs diff", "top-1 agreement", score])]
    lines += [f"- {message}" for message in report.failures()]
    lines += ["", f"Details, thresholds and skipped checks: [{CHECK_MD}]({CHECK_MD}); JUnit XML: {CHECK_JUNIT}.", ""]
    return lines


def write_run_report(result) -> Path:
    """Write ``reports/report.md`` for a finished run and return its path."""
    recipe, bundle = result.recipe, Path(result.bundle)
    reports = bundle / REPORTS_DIR
    reports.mkdir(parents=True, exist_ok=True)
    verdict = "PASSED" if result.check is not None and result.check.passed else "FAILED"
    adapters = ", ".join(f"`{a.name}` ({'trained' if a.training else a.path})" for a in recipe.adapters)
    lines = [f"# {recipe.name}: accuracy gate {verdict}", "",
             f"{recipe.description}".strip(), "",
             f"- Model: `{recipe.model}` ({recipe.task.value}); adapters: {adapters}",
             f"- Forms: {', '.join(recipe.export.forms)}; precisions: {', '.join(recipe.export.precisions)}",
             f"- Recipe: `{recipe.source}`; bundle: `{bundle}`; {result.seconds:.0f} s in all", "",
             "## Stages", "",
             markdown_table([{"stage": s.name, "seconds": round(s.seconds, 1),
                              "result": s.summary or ("skipped" if s.skipped else "done")} for s in result.stages],
                            ["stage", "seconds", "result"])]
    lines += _training_section(result, reports)
    lines += _graphs_section(bundle)
    if result.devices_left_out:
        lines += ["Device targets not profiled on this host: " + "; ".join(result.devices_left_out) + ".", ""]
    lines += _device_sections(result)
    if result.check is not None:
        lines += _check_section(result)
    path = reports / "report.md"
    with atomic_file(path) as staging:
        staging.write_text("\n".join(lines) + "\n")
    return path


