"""Merged vs unmerged: latency per form and precision, the branch overhead beside its theoretical FLOPs.

``compare_bundle(bundle, device)`` takes the bundle's profile on that device
(re-using ``reports/profile.json`` when it was made for the same device and
inputs, else profiling) and writes one table and one chart:
``reports/compare.json``, ``reports/compare.md`` and ``reports/latency.png``.

For each graph: p50 latency, the overhead of the branched and hot-swap forms
over the merged graph of the same precision (in %: the median ratio of
each run to the merged graph's run timed beside it, the forms of a precision
taking turns one run at a time in every interleaved round, with a bootstrap
interval over rounds, whether that interval reached the profile's target width, and a
verdict: faster, slower, equivalent within the margin, or not distinguishable
at this noise, see :mod:`lora_edge.runtime.interleave`), the extra FLOPs of the
adapter's low-rank pairs over the base model (in %, from its ranks and layer
shapes: see :mod:`lora_edge.core.flops`), the memory the session adds and the size
on disk, and the speed-up over the eager PyTorch model (adapter merged).

On a causal-LM bundle the p50 and overhead above are the prefill's (time to
first token); each decoder row also has the decode step's p50 and tokens/s
and the decode overhead of the branched and hot-swap forms over merged (the
same within-round ratio, interval and verdict, from the decode step's rounds),
with the adapter's extra FLOPs per token beside it (absolute and in % of the
base model's FLOPs per token: the prefill's per item over ``seq``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from lora_edge.core.bundle import REPORTS_DIR, require_bundle, write_json
from lora_edge.profile.devices import DeviceTarget, load_device
from lora_edge.runtime.interleave import (VERDICT_MARGIN_PCT, RatioStats, half_width_pct, paired_ratio_stats,
                                          ratio_stats, verdict)
from lora_edge.core.manifest import Manifest
from lora_edge.profile.eager import eager_baselines
from lora_edge.profile.profiler import profile_bundle
from lora_edge.profile.report import (BRANCH_FORMS, COLUMNS, DECODER_COLUMNS, DECODER_HEADERS, HEADERS,
                                      GraphProfile, ProfileReport, merged_peer, read_profile)
from lora_edge.core.recipe import MeasureSpec

COMPARE_JSON, COMPARE_MD, LATENCY_PNG = "compare.json", "compare.md", "latency.png"
EAGER_MERGED = "merged"  # the eager baseline every graph's speed-up is measured against
# Bar positions in a group: the eager unmerged model sits where the branched graph does.
FORM_SLOTS = {"merged": 0, "branched": 1, "unmerged": 1, "hotswap": 2}


@dataclass
class Comparison:
    """The comparison table of one bundle on one device."""

    bundle: str
    device: str
    note: str
    seq: int
    base_flops_per_item: float | None
    rows: list[dict] = field(default_factory=list)
    load_average: dict = field(default_factory=dict)  # before and after the timed rounds
    rounds: int | None = None
    target_interval_pct: float | None = None  # rounds were added until every interval was within +- this
    stopped: str | None = None  # why the rounds stopped (fixed runs, intervals within target, time budget, run cap)
    timing_s: float | None = None  # wall time of the timed rounds

    def to_json(self) -> dict:
        """JSON form written to ``compare.json``."""
        return asdict(self)


def overhead_percent(latency_ms: float | None, merged_ms: float | None) -> float | None:
    """How much slower a form is than the merged graph, in percent (negative: faster)."""
    if latency_ms is None or not merged_ms:
        return None
    return 100.0 * (latency_ms - merged_ms) / merged_ms


def extra_flops_percent(adapter_flops_per_token: int, seq: int, base_flops_per_item: float | None) -> float | None:
    """The adapter branches' FLOPs over the base model's, in percent, for one item of ``seq`` tokens."""
    if not base_flops_per_item:
        return None
    return 100.0 * adapter_flops_per_token * seq / base_flops_per_item


NO_OVERHEAD = {"overhead_pct": None, "overhead_interval_pct": None, "overhead_iqr_pct": None, "verdict": None,
               "converged": None}


def pair_overhead(graph: GraphProfile, peer: GraphProfile, decode: bool = False,
                  target_pct: float | None = None) -> dict:
    """Overhead of ``graph`` over ``peer`` from their paired runs: %, interval, IQR, verdict, converged.

    ``converged``: whether the interval is within +-``target_pct`` points
    (None without a target).

    ``decode``: of the decoders' decode steps (else of the graphs' main timing,
    a decoder's prefill). Runs that took turns give one ratio per pair of runs
    (:func:`~lora_edge.runtime.interleave.paired_ratio_stats`); a profile
    written before runs alternated gives one per round; one without rounds
    falls back to the ratio of p50s (no interval, no verdict). All None when
    either side has no timing.
    """
    p50, peer_p50 = _p50(graph, decode), _p50(peer, decode)
    if p50 is None or peer_p50 is None:
        return dict(NO_OVERHEAD)
    stats = _pair_stats(graph, peer, decode)
    if stats is None:
        return {**NO_OVERHEAD, "overhead_pct": overhead_percent(p50, peer_p50)}
    return {"overhead_pct": stats.overhead_pct, "overhead_interval_pct": list(stats.interval_pct),
            "overhead_iqr_pct": [100.0 * (q - 1.0) for q in stats.iqr], "verdict": verdict(stats),
            "converged": half_width_pct(stats) <= target_pct if target_pct else None}


def _pair_stats(graph: GraphProfile, peer: GraphProfile, decode: bool) -> RatioStats | None:
    """Paired-run statistics when both sides kept their runs per round, else per-round ones, else None."""
    visits, peer_visits = ((graph.decode_visits_ms, peer.decode_visits_ms) if decode
                           else (graph.visits_ms, peer.visits_ms))
    if visits and len(visits) == len(peer_visits):
        return paired_ratio_stats(visits, peer_visits)
    rounds, peer_rounds = ((graph.decode_rounds_ms, peer.decode_rounds_ms) if decode
                           else (graph.rounds_ms, peer.rounds_ms))
    if rounds and len(rounds) == len(peer_rounds):
        return ratio_stats(rounds, peer_rounds)
    return None


def _p50(graph: GraphProfile, decode: bool = False) -> float | None:
    latency = graph.decode_latency_ms if decode else graph.latency_ms
    return latency["p50"] if graph.measured and latency else None


def decoder_fields(graph: GraphProfile, peer: GraphProfile | None, adapter_flops: int | None,
                   target_pct: float | None = None) -> dict:
    """A decoder row's decode-step speed, its overhead over ``peer`` (merged) and the adapter's FLOPs per token."""
    speed = graph.decoder_speed()
    overhead = pair_overhead(graph, peer, decode=True, target_pct=target_pct) if peer else dict(NO_OVERHEAD)
    return {**speed, **{f"decode_{key}": value for key, value in overhead.items()},
            "adapter_flops_per_token": adapter_flops}


def comparison_rows(graphs: list[GraphProfile], eager: list[GraphProfile], seq: int,
                    adapter_flops: dict[str, int], base_flops_per_item: float | None,
                    target_pct: float | None = None) -> list[dict]:
    """One row per graph and eager baseline: latency, overhead over merged, extra FLOPs, memory, size.

    ``adapter_flops`` maps an adapter name to its branches' FLOPs per token;
    ``target_pct`` the interval half-width a converged overhead stays within.
    Pure arithmetic on the measured numbers: no timing happens here.
    """
    merged_graphs = [g for g in graphs if g.form == "merged" and g.measured]
    eager_merged = {g.adapter: g for g in eager if g.form == EAGER_MERGED and g.measured}
    single_adapter = next(iter(adapter_flops.values())) if len(adapter_flops) == 1 else None
    rows = []
    for graph in graphs + eager:
        peer = None
        if graph.kind == "pytorch":
            peer = eager_merged.get(graph.adapter) if graph.form != EAGER_MERGED else None
        elif graph.form in BRANCH_FORMS:
            peer = merged_peer(graph, merged_graphs)
        branches = graph.form in BRANCH_FORMS or graph.form == "unmerged"
        flops = adapter_flops.get(graph.adapter, single_adapter) if branches else 0
        eager_peer = eager_merged.get(graph.adapter) or next(iter(eager_merged.values()), None)
        size = graph.size or {}
        overhead = pair_overhead(graph, peer, target_pct=target_pct) if peer else dict(NO_OVERHEAD)
        decoder = decoder_fields(graph, peer, flops, target_pct) if graph.decoder else {}
        rows.append({
            "graph": graph.name, "kind": graph.kind, "form": graph.form, "precision": graph.precision,
            "adapter": graph.adapter, "status": graph.status if graph.measured else f"{graph.status}: {graph.reason}",
            "p50_ms": _p50(graph), "p90_ms": graph.latency_ms["p90"] if _p50(graph) is not None else None,
            "vs_merged": peer.name if peer else None,
            **overhead,
            "extra_flops_pct": None if flops is None else extra_flops_percent(flops, seq, base_flops_per_item),
            "speedup_vs_eager": (_p50(eager_peer) / _p50(graph) if eager_peer and _p50(graph) else None),
            "rss_mb": graph.memory.get("rss_added_mb"), "gpu_mb": graph.memory.get("gpu_added_mb"),
            "size_mb": (size.get("total_mb", 0.0) + size.get("adapter_mb", 0.0)) if size else None,
            **decoder,
        })
    return rows


def bundle_adapter_flops(bundle: Path, manifest: Manifest) -> dict[str, int]:
    """Extra FLOPs per token of each bundled adapter's branches, from its safetensors shapes."""
    from lora_edge.core.adapters import ADAPTER_WEIGHTS
    from lora_edge.core.flops import adapter_flops_per_token

    result = {}
    for entry in manifest.adapters:
        weights = Path(bundle) / entry.bundle_dir / ADAPTER_WEIGHTS
        if weights.is_file():
            result[entry.name] = adapter_flops_per_token(weights)
    return result


def base_flops_per_item(manifest: Manifest, batch: int, seq: int) -> float | None:
    """FLOPs of one item through the base model (what the merged form costs), or None without the model."""
    import torch

    from lora_edge.core.errors import LoraEdgeError
    from lora_edge.core.flops import model_flops
    from lora_edge.core.model_source import resolve_model_path
    from lora_edge.core.models import load_base_model, load_config

    try:
        path = resolve_model_path(manifest.model.source())
        model = load_base_model(path, manifest.model.task)
    except LoraEdgeError:
        return None
    vocab = int(load_config(path).get("vocab_size", 1000))
    ids = torch.randint(5, max(6, vocab), (batch, seq), generator=torch.Generator().manual_seed(0))
    return model_flops(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}) / batch


def _reusable(report: ProfileReport | None, device: DeviceTarget, batch: int, seq: int,
              graphs: list[str] | None) -> bool:
    """True when the bundle's last profile was made on this device, with these inputs and graphs."""
    if report is None or report.device.get("name") != device.name or report.not_measured():
        return False
    if (report.settings.get("batch"), report.settings.get("seq")) != (batch, seq):
        return False
    return not graphs or set(graphs) <= {g.name for g in report.graphs}


def compare_bundle(bundle: Path, device: str | Path | DeviceTarget, graphs: list[str] | None = None,
                   measure: MeasureSpec | None = None, *, reuse: bool = True, quiet: bool = False,
                   **measure_fields) -> Comparison:
    """Compare the forms of a bundle on a device; writes compare.json, compare.md and latency.png.

    Re-uses ``reports/profile.json`` when ``reuse`` and it matches the device,
    inputs and graphs; otherwise profiles first (with the same ``measure``, or
    ``measure_fields``, as :func:`~lora_edge.profile.profiler.profile_bundle`). Raises like
    :meth:`ProfileReport.check_measured` when a graph could not be measured.
    """
    measure = measure or MeasureSpec(**measure_fields)
    batch, seq = measure.batch, measure.seq
    bundle = require_bundle(Path(bundle))
    device = load_device(device)
    report = read_profile(bundle)
    if not (reuse and _reusable(report, device, batch, seq, graphs)):
        report = profile_bundle(bundle, device, graphs, measure, baselines=eager_baselines, quiet=quiet)
    elif not quiet:
        import sys

        print(f"compare: using {bundle / REPORTS_DIR / 'profile.json'} ({report.created})", file=sys.stderr)
    report.check_measured()
    selected = [g for g in report.graphs if not graphs or g.name in graphs]
    manifest = Manifest.read(bundle)
    base = report.model.get("flops_per_item") or base_flops_per_item(manifest, batch, seq)
    settings = report.settings
    target = settings.get("target_interval_pct")
    comparison = Comparison(bundle=str(bundle), device=device.name, note=report.note, seq=seq,
                            base_flops_per_item=base, load_average=settings.get("load_average") or {},
                            rounds=settings.get("rounds"), target_interval_pct=target, stopped=settings.get("stopped"),
                            timing_s=settings.get("timing_s"),
                            rows=comparison_rows(selected, report.eager, seq, bundle_adapter_flops(bundle, manifest),
                                                 base, target))
    write_comparison(bundle, comparison)
    return comparison


def _interval_text(interval: list[float] | None) -> str | None:
    return f"[{interval[0]:+.1f}, {interval[1]:+.1f}]" if interval else None


def _table_rows(comparison: Comparison) -> list[dict]:
    """The rows with the overhead intervals written as text (and the adapter's FLOPs per token in MFLOP)."""
    rows = []
    for row in comparison.rows:
        flops = row.get("adapter_flops_per_token")
        rows.append({**row, "overhead_interval": _interval_text(row.get("overhead_interval_pct")),
                     "decode_overhead_interval": _interval_text(row.get("decode_overhead_interval_pct")),
                     "adapter_mflops_per_token": None if flops is None else flops / 1e6})
    return rows


def table_columns(comparison: Comparison) -> tuple[list[str], list[str]]:
    """(columns, headers) of the table: the decoder's when a row has a decode step, else the classifier's."""
    if any(row.get("decode_ms") is not None for row in comparison.rows):
        return DECODER_COLUMNS, DECODER_HEADERS
    return COLUMNS, HEADERS


def noise_line(comparison: Comparison) -> str:
    """How the overheads were measured, whether their intervals reached the target, and the load average."""
    load = comparison.load_average or {}
    rounds = f"{comparison.rounds} interleaved rounds" if comparison.rounds else "interleaved runs"
    return (f"Overhead: wall-clock latency over {rounds} (shuffled order; each precision's forms take turns one "
            f"run at a time, ORT's threads not spinning), the median ratio of each run to the merged graph's run "
            f"beside it; 95% bootstrap interval (resampling rounds); "
            f"verdict 'faster'/'slower' only when the whole interval lies beyond ±{VERDICT_MARGIN_PCT:g}%, "
            f"'equivalent' when it lies inside ±{VERDICT_MARGIN_PCT:g}%, else 'not distinguishable'."
            f"{_convergence_text(comparison)} Load average (1, 5, 15 min) {load.get('before')} before, "
            f"{load.get('after')} after.")


def _convergence_text(comparison: Comparison) -> str:
    """Whether rounds were added to a target interval, why they stopped, and which overheads stayed wider."""
    if not comparison.target_interval_pct:
        return ""
    wide = [row["graph"] + (" (decode)" if decode else "") for row in comparison.rows
            for decode in (False, True) if row.get("decode_converged" if decode else "converged") is False]
    timing = f" after {comparison.timing_s:g} s" if comparison.timing_s is not None else ""
    return (f" Rounds were added until every interval was within ±{comparison.target_interval_pct:g} points; "
            f"stopped{timing}: {comparison.stopped or 'unknown'}."
            + (f" Wider than that (run again on a quieter machine, or with a larger --time-budget-s or --max-runs): "
               f"{', '.join(wide)}." if wide else ""))


def comparison_markdown(comparison: Comparison) -> str:
    """The comparison as Markdown: the note, the table and the chart."""
    from lora_edge.core.report import markdown_table

    base = comparison.base_flops_per_item
    flops = f"{base / 1e9:.3g} GFLOP per item" if base else "unknown (base model not available)"
    return (f"# Merged vs unmerged: {Path(comparison.bundle).name} on '{comparison.device}'\n\n> {comparison.note}\n\n"
            f"{noise_line(comparison)} Overheads are against the merged graph of the same precision. Extra "
            f"FLOPs: the adapter's low-rank pairs over the base model ({flops}, sequence {comparison.seq}); the "
            f"merged form adds none.{_decoder_note(comparison)}\n\n"
            f"{markdown_table(_table_rows(comparison), *table_columns(comparison))}\n"
            f"![latency]({LATENCY_PNG})\n")


def _decoder_note(comparison: Comparison) -> str:
    """What a decoder table's columns mean (empty for classifiers)."""
    if table_columns(comparison)[0] is not DECODER_COLUMNS:
        return ""
    return (f" Decoders: TTFT is the prefill of {comparison.seq} prompt tokens (its overhead is the prefill's); "
            f"decode is one step of one token per row after a past of {comparison.seq} tokens, its overhead from "
            "the decode step's rounds; the adapter's MFLOP per token is what the branched and hot-swap forms add "
            "to every decoded token, and extra FLOPs % is that over the base model's FLOPs per prompt token.")


def latency_chart(comparison: Comparison, path: Path) -> Path:
    """Bar chart of p50 latency per precision (groups) and form (bars), overheads written on the bars."""
    from lora_edge.core.report import png_figure

    rows = [row for row in comparison.rows if row["p50_ms"] is not None]
    groups = list(dict.fromkeys(("pytorch" if row["kind"] == "pytorch" else row["precision"]) for row in rows))
    forms = list(dict.fromkeys(row["form"] for row in rows))
    slots = sorted({FORM_SLOTS.get(form, len(FORM_SLOTS)) for form in forms})
    width = 0.8 / max(1, len(slots))
    with png_figure(path, width=max(6.0, 1.6 * len(groups) + 2), height=4.0) as figure:
        axes = figure.add_subplot(1, 1, 1)
        for form in forms:
            xs, heights, labels = [], [], []
            for row in rows:
                if row["form"] != form:
                    continue
                group = "pytorch" if row["kind"] == "pytorch" else row["precision"]
                slot = slots.index(FORM_SLOTS.get(form, len(FORM_SLOTS)))
                xs.append(groups.index(group) + (slot - (len(slots) - 1) / 2) * width)
                heights.append(row["p50_ms"])
                labels.append("" if row["overhead_pct"] is None else f"{row['overhead_pct']:+.1f}%")
            bars = axes.bar(xs, heights, width=width, label=form)
            axes.bar_label(bars, labels=labels, fontsize=7, padding=2)
        axes.set_xticks(range(len(groups)), groups)
        axes.set_ylabel("p50 latency (ms)")
        axes.set_title(f"{Path(comparison.bundle).name} on {comparison.device} (overhead vs merged)", fontsize=10)
        axes.legend(fontsize=8)
    return path


def write_comparison(bundle: Path, comparison: Comparison) -> None:
    """Write compare.json, compare.md and latency.png into the bundle's reports, atomically each."""
    from lora_edge.core.bundle import atomic_file

    reports = Path(bundle) / REPORTS_DIR
    write_json(reports / COMPARE_JSON, comparison.to_json())
    latency_chart(comparison, reports / LATENCY_PNG)
    with atomic_file(reports / COMPARE_MD) as staging:
        staging.write_text(comparison_markdown(comparison))


def comparison_summary(comparison: Comparison, as_json: bool = False) -> str:
    """What `lora-edge compare` prints: the table and where the reports are (or the JSON)."""
    import json

    from lora_edge.core.report import markdown_table

    if as_json:
        return json.dumps(comparison.to_json(), indent=2, default=str)
    reports = Path(comparison.bundle) / REPORTS_DIR
    return (f"{markdown_table(_table_rows(comparison), *table_columns(comparison))}\n{noise_line(comparison)}\n"
            f"reports: {reports / COMPARE_MD}, {reports / LATENCY_PNG}")
