"""Rank sweep: one adapter per LoRA rank, compared in a table (Markdown + JSON) and a chart.

``OUT/`` is written atomically::

    r1/ r2/ r4/ ...      one adapter directory per rank (as written by train_adapter)
    sweep.json           {"task", "settings", "columns", "rows"}
    sweep.md             the same table in Markdown
    sweep.png            validation score and adapter size against rank

Later stages add columns (e.g. latency per precision) with
:meth:`SweepTable.add_column` and :meth:`SweepTable.save` it again.
Alpha stays as given for every rank, so the update scale alpha/r shrinks as the
rank grows; ``rslora`` (alpha/sqrt(r)) makes ranks more comparable.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable, Iterator

from lora_edge.core.bundle import atomic_directory, atomic_file, write_json
from lora_edge.profile.compare import base_flops_per_item, bundle_adapter_flops, comparison_rows
from lora_edge.core.data import DataFiles
from lora_edge.profile.devices import DeviceTarget, load_device
from lora_edge.core.errors import BundleError, ConfigError, env_int
from lora_edge.core.choices import Task
from lora_edge.core.manifest import Manifest
from lora_edge.profile.profiler import profile_bundle
from lora_edge.core.recipe import LoraSpec, MeasureSpec, TrainSpec
from lora_edge.core.report import markdown_table, png_figure

SWEEP_JSON = "sweep.json"
SWEEP_MARKDOWN = "sweep.md"
SWEEP_PLOT = "sweep.png"

# The table's columns per task: (row key, header). Later stages append theirs with add_column.
SWEEP_COLUMNS = {
    Task.SEQ_CLS: [("rank", "rank"), ("trainable_params", "trainable params"), ("adapter_bytes", "adapter bytes"),
                   ("validation_accuracy", "validation accuracy"), ("validation_macro_f1", "validation macro-F1"),
                   ("test_accuracy", "test accuracy"), ("train_seconds", "train s")],
    Task.CAUSAL_LM: [("rank", "rank"), ("trainable_params", "trainable params"), ("adapter_bytes", "adapter bytes"),
                     ("validation_loss", "validation loss"), ("validation_perplexity", "validation perplexity"),
                     ("test_perplexity", "test perplexity"), ("train_seconds", "train s")],
}


@dataclass
class SweepRow:
    """One rank of a sweep. ``extra`` holds columns added by later stages (e.g. latency in ms)."""

    rank: int
    adapter: str  # the adapter directory, relative to the sweep directory
    trainable_params: int
    adapter_bytes: int
    train_seconds: float
    validation_accuracy: float | None = None
    validation_macro_f1: float | None = None
    test_accuracy: float | None = None
    validation_loss: float | None = None
    validation_perplexity: float | None = None
    test_perplexity: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict:
        """Flat JSON object: the fixed fields, then the extra columns."""
        record = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"}
        return {**record, **self.extra}

    @classmethod
    def from_json(cls, record: dict) -> "SweepRow":
        """Inverse of :meth:`to_json`: unknown keys go to ``extra``."""
        known = {f.name for f in fields(cls)} - {"extra"}
        return cls(**{k: v for k, v in record.items() if k in known},
                   extra={k: v for k, v in record.items() if k not in known})

    def get(self, key: str) -> Any:
        """A column's value, fixed field or extra."""
        return self.extra.get(key) if key in self.extra else getattr(self, key, None)


@dataclass
class SweepTable:
    """A sweep's rows and the columns shown, plus the settings every rank shared."""

    task: Task
    rows: list[SweepRow]
    columns: list[tuple[str, str]]
    settings: dict = field(default_factory=dict)

    def add_column(self, key: str, header: str, values: dict[int, Any]) -> None:
        """Add (or replace) a column: ``values`` maps rank -> value; ranks without one show a dash."""
        self.columns = [c for c in self.columns if c[0] != key] + [(key, header)]
        for row in self.rows:
            row.extra[key] = values.get(row.rank)

    def to_json(self) -> dict:
        """sweep.json content."""
        return {"task": self.task.value, "settings": self.settings,
                "columns": [{"key": key, "header": header} for key, header in self.columns],
                "rows": [row.to_json() for row in self.rows]}

    def markdown(self) -> str:
        """sweep.md content: a heading and the table."""
        keys, headers = zip(*self.columns)
        rows = [{key: row.get(key) for key in keys} for row in self.rows]
        return f"# LoRA rank sweep ({self.task.value})\n\n" + markdown_table(rows, keys, headers)

    def save(self, directory: Path) -> None:
        """Write sweep.json, sweep.md and sweep.png into ``directory`` (each atomically)."""
        directory = Path(directory)
        write_json(directory / SWEEP_JSON, self.to_json())
        with atomic_file(directory / SWEEP_MARKDOWN) as staging:
            staging.write_text(self.markdown())
        plot_sweep(self, directory / SWEEP_PLOT)

    @classmethod
    def load(cls, directory: Path) -> "SweepTable":
        """Read a sweep directory's sweep.json."""
        path = Path(directory) / SWEEP_JSON
        if not path.is_file():
            raise BundleError(f"no {SWEEP_JSON} in '{directory}'", directory,
                              "point at a directory written by lora-edge sweep")
        record = json.loads(path.read_text())
        return cls(Task(record["task"]), [SweepRow.from_json(r) for r in record["rows"]],
                   [(c["key"], c["header"]) for c in record["columns"]], record.get("settings", {}))


def plot_sweep(table: SweepTable, path: Path) -> Path:
    """sweep.png: validation score (left) and adapter size (right) against rank."""
    ranks = [row.rank for row in table.rows]
    with png_figure(path, width=10.0, height=4.0) as figure:
        score_axis, size_axis = figure.subplots(1, 2)
        if table.task is Task.SEQ_CLS:
            score_axis.plot(ranks, [row.validation_accuracy for row in table.rows], "o-", label="accuracy")
            score_axis.plot(ranks, [row.validation_macro_f1 for row in table.rows], "s--", label="macro-F1")
            score_axis.set(ylabel="validation score", ylim=(0, 1.02))
        else:
            score_axis.plot(ranks, [row.validation_perplexity for row in table.rows], "o-", label="perplexity")
            score_axis.set(ylabel="validation perplexity")
        size_axis.plot(ranks, [row.adapter_bytes / 1024 for row in table.rows], "o-", label="adapter KiB")
        size_axis.set(ylabel="adapter size on disk (KiB)")
        for axis, title in ((score_axis, "Validation"), (size_axis, "Size")):
            axis.set(xlabel="LoRA rank", title=title)
            axis.set_xscale("log", base=2)
            axis.set_xticks(ranks, [str(r) for r in ranks])
            axis.legend(loc="best")
    return path


def check_ranks(ranks: list[int]) -> list[int]:
    """Refuse an empty list, non-positive or repeated ranks; return them sorted."""
    if not ranks:
        raise ConfigError("no ranks given", "--ranks", "write them like 1,2,4,8,16")
    bad = [r for r in ranks if r < 1]
    if bad or len(set(ranks)) != len(ranks):
        raise ConfigError(f"ranks must be distinct positive integers, got {ranks}", "--ranks",
                          "write them like 1,2,4,8,16")
    return sorted(ranks)


@contextlib.contextmanager
def _sweep_directory(out: Path, force: bool) -> Iterator[Path]:
    """The main process builds OUT atomically; other DDP ranks train into a throwaway directory."""
    if env_int("RANK", 0) == 0:
        with atomic_directory(out, force=force) as staging:
            yield staging
        return
    scratch = Path(tempfile.mkdtemp(prefix="lora-edge-sweep-rank-"))
    try:
        yield scratch
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _row(rank: int, result) -> SweepRow:
    """A table row from a TrainResult."""
    metrics = result.metrics
    scores = {f"{split}_{key}": metrics[split][key] for split in ("validation", "test")
              for key in ("accuracy", "macro_f1", "loss", "perplexity") if key in metrics[split]}
    known = {f.name for f in fields(SweepRow)}
    return SweepRow(rank=rank, adapter=f"r{rank}", trainable_params=result.trainable_params,
                    adapter_bytes=result.adapter_bytes, train_seconds=round(result.train_seconds, 2),
                    **{k: v for k, v in scores.items() if k in known})


def run_sweep(model: str | Path, data: DataFiles, out: Path, ranks: list[int], task: Task | str = Task.SEQ_CLS,
              lora: LoraSpec | None = None, spec: TrainSpec | None = None, force: bool = False,
              progress: bool = True) -> SweepTable:
    """Train one adapter per rank into ``out/r<rank>/`` and write the sweep table and chart.

    Every rank uses the same data, seed, alpha and schedule (``lora``/``spec``);
    only ``r`` changes. Raises ConfigError for bad ranks and BundleError when
    ``out`` exists without ``force``; training errors pass through.
    """
    from lora_edge.train.trainer import train_adapter

    task, lora, spec = Task.parse(task), lora or LoraSpec(), spec or TrainSpec()
    ranks = check_ranks(list(ranks))
    if Path(out).exists() and not force:
        raise BundleError(f"'{out}' already exists", "--out", "pass --force to replace it or choose another path")
    rows = []
    with _sweep_directory(Path(out), force) as staging:
        for rank in ranks:
            result = train_adapter(model, data, staging / f"r{rank}", task, replace(lora, rank=rank), spec,
                                   progress=progress)
            rows.append(_row(rank, result))
        table = SweepTable(task, rows, list(SWEEP_COLUMNS[task]),
                           settings={"model": str(model), "alpha": lora.alpha, "targets": lora.targets,
                                     "rslora": lora.rslora, "data": data.to_json(),
                                     "train_spec": {f.name: getattr(spec, f.name) for f in fields(spec)}})
        if env_int("RANK", 0) == 0:
            table.save(staging)
    return table


# --- the rank axis (lora-edge sweep --latency-device) -----------------------------------------

RANK_COLUMNS = [("merged_p50_ms", "merged p50 ms"), ("branched_p50_ms", "branched p50 ms"),
                ("branched_overhead_pct", "branched overhead %"), ("extra_flops_pct", "extra FLOPs %")]


def _export_ranks(model: str | Path, adapters: dict[int, Path], out: Path) -> Path:
    """Merged and branched fp32 graphs of every sweep adapter in one bundle (the default exporter of the rank axis).

    One export traces the model once (the hot-swap trace has a dynamic rank
    axis) and derives each rank's merged and branched graphs from that trace
    (docs/ARCHITECTURE.md, "The three deployment forms").
    """
    from lora_edge.core.adapters import AdapterRef
    from lora_edge.export.bundle import export_bundle

    refs = [AdapterRef(f"r{rank}", Path(adapter)) for rank, adapter in sorted(adapters.items())]
    return export_bundle(model, refs, ["merged", "branched"], out, progress=lambda message: None)


def rank_latency_rows(model: str | Path, adapters: dict[int, Path], device: str | Path | DeviceTarget,
                      measure: MeasureSpec | None = None, quiet: bool = False,
                      export: Callable[[str | Path, dict[int, Path], Path], Path] = _export_ranks) -> dict[int, dict]:
    """Latency of the merged and branched fp32 graphs for each rank's adapter, on a device's settings.

    ``adapters`` maps rank -> adapter directory. They are exported together (by
    ``export``, into a temporary directory: one bundle whose adapters are named
    ``r<rank>``) and every rank's graphs are timed in the same interleaved rounds,
    so the ranks compare under the same machine load; returns rank ->
    {merged_p50_ms, branched_p50_ms, branched_overhead_pct, extra_flops_pct}.
    Raises like :meth:`ProfileReport.check_measured` when the device cannot run here.
    """
    device, measure = load_device(device), measure or MeasureSpec()
    if not quiet:
        import sys

        print(f"sweep latency: ranks {', '.join(map(str, sorted(adapters)))} on {device.name} (one export, "
              f"every rank's merged and branched graphs in the same rounds)", file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory(prefix="lora-edge-rank-latency-") as workdir:
        bundle = export(model, {rank: Path(adapter) for rank, adapter in adapters.items()}, Path(workdir) / "ranks")
        manifest = Manifest.read(bundle)
        names = [record.name for record in manifest.graphs
                 if record.precision.value == "fp32" and record.form.value in ("merged", "branched")]
        report = profile_bundle(bundle, device, names, measure, quiet=True)
        report.check_measured()
        base = base_flops_per_item(manifest, measure.batch, measure.seq)  # every rank shares the base model
        table = {(row["form"], row["adapter"]): row
                 for row in comparison_rows(report.graphs, [], measure.seq, bundle_adapter_flops(bundle, manifest),
                                            base)}
    rows = {}
    for rank in sorted(adapters):
        merged, branched = table[("merged", f"r{rank}")], table[("branched", f"r{rank}")]
        rows[rank] = {"merged_p50_ms": merged["p50_ms"], "branched_p50_ms": branched["p50_ms"],
                      "branched_overhead_pct": branched["overhead_pct"], "extra_flops_pct": branched["extra_flops_pct"]}
    return rows


def add_sweep_latency(table: SweepTable, directory: Path, device: str | Path | DeviceTarget,
                      measure: MeasureSpec | None = None, *, quiet: bool = False,
                      export: Callable[[str | Path, dict[int, Path], Path], Path] = _export_ranks,
                      **measure_fields) -> SweepTable:
    """Add per-rank latency columns (merged and branched, on ``device``) to a sweep and save it again.

    ``measure`` (or ``measure_fields``: batch, seq, runs, warmup, ...) and the
    rest go to :func:`rank_latency_rows`.
    """
    from lora_edge.core.errors import env_int

    if env_int("RANK", 0) != 0:  # under DDP only the main process measures and writes
        return table
    device = load_device(device)
    adapters = {row.rank: Path(directory) / row.adapter for row in table.rows}
    measure = measure or MeasureSpec(**measure_fields)
    rows = rank_latency_rows(table.settings.get("model", "default"), adapters, device, measure, quiet, export)
    for key, header in RANK_COLUMNS:
        table.add_column(key, f"{header} ({device.name})" if key.endswith("_ms") else header,
                         {rank: values[key] for rank, values in rows.items()})
    table.settings["latency"] = {"device": device.name, **asdict(measure)}
    table.save(Path(directory))
    return table
