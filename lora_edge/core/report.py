"""Report building blocks: Markdown tables and PNG charts (matplotlib, headless).

Stages put their own tables and charts together from these pieces; the
pipeline assembles ``reports/report.md`` from what the stages wrote.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Iterator, Sequence

from lora_edge.core.bundle import atomic_file


def format_cell(value: Any) -> str:
    """Render one table cell: floats to 4 significant digits, None as an em dash."""
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace("|", "\\|")


def markdown_table(rows: Sequence[dict], columns: Sequence[str], headers: Sequence[str] | None = None) -> str:
    """A GitHub-flavoured Markdown table of ``rows`` (dicts) restricted to ``columns``."""
    headers = list(headers or columns)
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(format_cell(row.get(column)) for column in columns) + " |")
    return "\n".join(lines) + "\n"


@contextlib.contextmanager
def png_figure(path: Path, width: float = 7.0, height: float = 4.0) -> Iterator[Any]:
    """Yield a matplotlib Figure; it is saved to ``path`` (atomically) and closed when the block ends."""
    import matplotlib

    matplotlib.use("Agg")  # no display on edge build machines and CI
    import matplotlib.pyplot as plt

    figure = plt.figure(figsize=(width, height), dpi=100)
    try:
        yield figure
        figure.tight_layout()
        with atomic_file(Path(path)) as staging:
            figure.savefig(staging, format="png")
    finally:
        plt.close(figure)
