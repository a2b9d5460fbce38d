"""The profile report: what was measured per graph, its JSON form and its Markdown rendering.

Kept apart from :mod:`lora_edge.profile.profiler` (which measures) so that readers of
``reports/profile.json`` (compare, the pipeline's report) need none of the
measuring code.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from lora_edge import __version__
from lora_edge.core.bundle import REPORTS_DIR, atomic_file, write_json
from lora_edge.core.errors import ProviderUnavailableError

PROFILE_JSON, PROFILE_MD = "profile.json", "profile.md"
MEASURED, NOT_MEASURED, FAILED = "measured", "not measured", "failed"


@dataclass
class GraphProfile:
    """What was measured for one graph (or one eager PyTorch baseline)."""

    name: str
    kind: str = "onnx"  # onnx | pytorch
    form: str | None = None
    precision: str | None = None
    adapter: str | None = None
    file: str | None = None
    status: str = MEASURED
    reason: str | None = None
    decoder: bool = False
    providers_requested: list[str] = field(default_factory=list)
    providers_registered: list[str] = field(default_factory=list)  # what the session took
    providers_used: list[str] = field(default_factory=list)        # what ran nodes (profiling trace)
    fallback: str | None = None                                    # measured elsewhere than asked, and why
    cpu_fallback_ops: list[dict] = field(default_factory=list)     # GPU device: op types that ran on the CPU
    io_binding: bool = False
    latency_ms: dict | None = None  # a decoder's: its prefill (p50 = time to first token)
    rounds_ms: list[float] = field(default_factory=list)  # median of each interleaved round (same rounds per graph)
    # each round's timed runs in the order they were timed; the i-th is paired with the i-th of the same
    # precision's other forms (they took turns); empty in profiles written before runs alternated
    visits_ms: list[list[float]] = field(default_factory=list)
    decode_latency_ms: dict | None = None  # a decoder's decode step (batch x 1 token after a past of seq)
    decode_rounds_ms: list[float] = field(default_factory=list)  # its per-round medians, in the same rounds
    decode_visits_ms: list[list[float]] = field(default_factory=list)  # its runs per round, like visits_ms
    throughput: dict | None = None
    session_create_s: float | None = None
    memory: dict = field(default_factory=dict)
    size: dict | None = None
    top_ops: list[dict] = field(default_factory=list)
    within_budget: dict | None = None

    @property
    def measured(self) -> bool:
        """True when the graph was timed."""
        return self.status == MEASURED

    def decoder_speed(self) -> dict:
        """A decoder's ttft_ms (prefill p50), prefill_tokens_per_s, decode_ms (step p50), decode_tokens_per_s.

        All None for a classifier, or a graph not timed (the keys are always there).
        """
        throughput = self.throughput or {}
        timed = self.decoder and self.measured and self.latency_ms
        return {"ttft_ms": self.latency_ms["p50"] if timed else None,
                "prefill_tokens_per_s": throughput.get("prefill_tokens_per_s") if timed else None,
                "decode_ms": self.decode_latency_ms["p50"] if timed and self.decode_latency_ms else None,
                "decode_tokens_per_s": throughput.get("decode_tokens_per_s") if timed else None}


@dataclass
class ProfileReport:
    """The profile of a bundle on one device target (``reports/profile.json``)."""

    bundle: str
    device: dict
    host: dict
    settings: dict
    note: str
    host_mismatches: list[str] = field(default_factory=list)
    graphs: list[GraphProfile] = field(default_factory=list)
    eager: list[GraphProfile] = field(default_factory=list)
    model: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    created: str = ""
    lora_edge_version: str = __version__

    def not_measured(self) -> list[GraphProfile]:
        """Graphs that were not timed (missing provider, or a failure)."""
        return [graph for graph in self.graphs if not graph.measured]

    def check_measured(self) -> None:
        """Raise ProviderUnavailableError (exit 7) when a graph was not measured: its provider is missing here,
        or the device's providers could not run it (a user's choice of device and graph, never an internal error)."""
        where = Path(self.bundle) / REPORTS_DIR / PROFILE_JSON
        for graph in self.not_measured():
            if graph.status == NOT_MEASURED:
                raise ProviderUnavailableError(f"graph {graph.name} not measured: {graph.reason}", where,
                                               "run on a host with that provider (onnxruntime-gpu), or pass "
                                               "--allow-fallback to measure on this host's providers")
        for graph in self.not_measured():
            raise ProviderUnavailableError(f"graph {graph.name} failed to run: {graph.reason}", where,
                                           "check that this device's providers support the graph's operators")

    def graph(self, name: str) -> GraphProfile:
        """The profile of graph ``name`` (ONNX or eager)."""
        for graph in self.graphs + self.eager:
            if graph.name == name:
                return graph
        raise KeyError(name)

    def to_json(self) -> dict:
        """JSON form written to ``profile.json``."""
        return asdict(self)

    @classmethod
    def from_json(cls, record: dict) -> "ProfileReport":
        """Inverse of :meth:`to_json`."""
        record = dict(record)
        record["graphs"] = [GraphProfile(**item) for item in record.get("graphs", [])]
        record["eager"] = [GraphProfile(**item) for item in record.get("eager", [])]
        known = {f.name for f in fields(cls)}
        return cls(**{key: value for key, value in record.items() if key in known})


BRANCH_FORMS = ("branched", "hotswap")  # the forms whose overhead over the merged graph is reported


def merged_peer(graph: GraphProfile, candidates: list[GraphProfile]) -> GraphProfile | None:
    """The merged graph a branch form is compared with: same precision, and the same adapter where both name one."""
    for candidate in candidates:
        if candidate.form == "merged" and candidate.precision == graph.precision and (
                candidate.adapter == graph.adapter or not candidate.adapter or not graph.adapter):
            return candidate
    return None


def write_profile(bundle: Path, report: ProfileReport) -> None:
    """Write ``reports/profile.json`` and ``reports/profile.md`` atomically."""
    reports = Path(bundle) / REPORTS_DIR
    write_json(reports / PROFILE_JSON, report.to_json())
    with atomic_file(reports / PROFILE_MD) as staging:
        staging.write_text(profile_markdown(report))


def read_profile(bundle: Path) -> ProfileReport | None:
    """The bundle's last profile report, or None when there is none."""
    path = Path(bundle) / REPORTS_DIR / PROFILE_JSON
    if not path.is_file():
        return None
    return ProfileReport.from_json(json.loads(path.read_text()))


def _status_text(graph: GraphProfile) -> str:
    if graph.measured:
        return "measured" + (" (fallback)" if graph.fallback else "")
    return f"{graph.status}: {graph.reason}"


def _budget_text(graph: GraphProfile) -> str | None:
    if not graph.within_budget:
        return None
    over = [name for name, ok in graph.within_budget.items() if not ok]
    return "over: " + ", ".join(over) if over else "ok"


def summary_rows(report: ProfileReport) -> list[dict]:
    """One flat row per graph and eager baseline (for tables and --json consumers)."""
    rows = []
    for graph in report.graphs + report.eager:
        latency = graph.latency_ms or {}
        throughput = graph.throughput or {}
        rows.append({"graph": graph.name, "status": _status_text(graph), "p50_ms": latency.get("p50"),
                     "p90_ms": latency.get("p90"), "p99_ms": latency.get("p99"), "mean_ms": latency.get("mean"),
                     "std_ms": latency.get("std"), "items_per_s": throughput.get("items_per_s"),
                     "tokens_per_s": throughput.get("tokens_per_s"), "create_s": graph.session_create_s,
                     "rss_mb": graph.memory.get("rss_added_mb"), "gpu_mb": graph.memory.get("gpu_added_mb"),
                     "size_mb": (graph.size or {}).get("total_mb"), "providers": ", ".join(graph.providers_used),
                     "budget": _budget_text(graph), **graph.decoder_speed()})
    return rows


DECODER_COLUMNS = ["ttft_ms", "prefill_tokens_per_s", "decode_ms", "decode_tokens_per_s"]
DECODER_HEADERS = ["TTFT ms", "prefill tok/s", "decode ms", "decode tok/s"]


def _with_decoder_columns(report: ProfileReport, columns: list[str],
                          headers: list[str] | None = None) -> tuple[list, list | None]:
    """``columns``/``headers`` with the decoder speed columns after the first two, when a graph is a decoder."""
    if not any(graph.decoder for graph in report.graphs):
        return columns, headers
    return (columns[:2] + DECODER_COLUMNS + columns[2:],
            None if headers is None else headers[:2] + DECODER_HEADERS + headers[2:])


def profile_markdown(report: ProfileReport) -> str:
    """The human-readable profile (``profile.md``)."""
    from lora_edge.core.report import markdown_table

    settings, host, device = report.settings, report.host, report.device
    lines = [f"# Profile: {Path(report.bundle).name} on device '{device['name']}'", "", f"> {report.note}", ""]
    lines += [f"- {text}" for text in report.host_mismatches + report.notes]
    rounds = (f"in {settings['rounds']} interleaved rounds of {settings['runs_per_round']} (shuffled order)"
              if settings.get("rounds") else "interleaved")
    load = settings.get("load_average") or {}
    lines += [f"- Inputs: batch {settings['batch']}, sequence {settings['seq']}; {settings['warmup']} warm-up and "
              f"{settings['runs']} timed runs per graph, {rounds}; per-op times from {settings['trace_runs']} "
              f"runs of a separate profiled session. Load average (1, 5, 15 min): {load.get('before')} before, "
              f"{load.get('after')} after.",
              f"- Host: {host['cpu_model']} ({host['machine']}), {host['usable_cores']} usable cores, "
              f"{host['intra_op_threads_used']} intra-op threads; CPU flags: {', '.join(host['cpu_flags']) or 'none'}; "
              f"onnxruntime {host['onnxruntime']} ({', '.join(host['available_providers'])})", ""]
    columns = ["graph", "status", "p50_ms", "p90_ms", "p99_ms", "mean_ms", "std_ms", "items_per_s", "tokens_per_s",
               "create_s", "rss_mb", "gpu_mb", "size_mb", "providers", "budget"]
    headers = ["graph", "status", "p50 ms", "p90 ms", "p99 ms", "mean ms", "std ms", "items/s", "tokens/s",
               "session s", "RSS + MB", "GPU + MB", "size MB", "providers used", "budget"]
    columns, headers = _with_decoder_columns(report, columns, headers)
    if any(graph.decoder for graph in report.graphs):
        lines += [f"- Decoders: p50 ms and TTFT ms are the prefill of {settings['batch']} x {settings['seq']} prompt "
                  f"tokens with an empty past; decode ms is one step of {settings['batch']} x 1 token after a past "
                  f"of {settings['seq']} tokens, timed in the same rounds; both run as `lora-edge generate` runs "
                  "them (IO binding, hot-swap adapters bound as inputs).", ""]
    lines += [markdown_table(summary_rows(report), columns, headers)]
    for graph in report.graphs:
        if graph.fallback:
            lines.append(f"**{graph.name}**: {graph.fallback}.\n")
        if graph.cpu_fallback_ops:
            ops = ", ".join(f"{row['op_type']} ({row['nodes']} nodes, {row['percent']:.1f}%)"
                            for row in graph.cpu_fallback_ops)
            lines.append(f"**{graph.name}**: partial CPU fallback on a GPU device; on CPUExecutionProvider: {ops}.\n")
        if graph.top_ops:
            lines += [f"### Top operators: {graph.name}", "",
                      markdown_table(graph.top_ops, ["op_type", "provider", "nodes", "ms_per_run", "percent"],
                                     ["op type", "provider", "nodes", "ms/run", "% of node time"])]
    return "\n".join(lines) + "\n"


def profile_summary(report: ProfileReport, as_json: bool = False) -> str:
    """What `lora-edge profile` prints: the summary table and where the reports are (or the JSON)."""
    from lora_edge.core.report import markdown_table

    if as_json:
        return json.dumps(report.to_json(), indent=2, default=str)
    columns = ["graph", "status", "p50_ms", "p90_ms", "p99_ms", "items_per_s", "rss_mb", "size_mb", "providers",
               "budget"]
    columns, headers = _with_decoder_columns(report, columns)
    reports = Path(report.bundle) / REPORTS_DIR
    return (f"{report.note}\n\n{markdown_table(summary_rows(report), columns, headers)}\n"
            f"reports: {reports / PROFILE_MD}, {reports / PROFILE_JSON}")


COLUMNS = ["graph", "status", "p50_ms", "p90_ms", "overhead_pct", "overhead_interval", "verdict", "vs_merged",
           "extra_flops_pct", "speedup_vs_eager", "rss_mb", "gpu_mb", "size_mb"]
HEADERS = ["graph", "status", "p50 ms", "p90 ms", "overhead %", "95% interval", "verdict", "vs", "extra FLOPs %",
           "× eager merged", "RSS + MB", "GPU + MB", "size MB"]


# A causal-LM bundle's table: prefill (time to first token) and decode step side by side.
DECODER_COLUMNS = ["graph", "status", "p50_ms", "overhead_pct", "overhead_interval", "verdict", "decode_ms",
                   "decode_tokens_per_s", "decode_overhead_pct", "decode_overhead_interval", "decode_verdict",
                   "vs_merged", "adapter_mflops_per_token", "extra_flops_pct", "speedup_vs_eager", "rss_mb", "size_mb"]
DECODER_HEADERS = ["graph", "status", "TTFT ms", "prefill overhead %", "95% interval", "prefill verdict",
                   "decode ms", "decode tok/s", "decode overhead %", "95% interval", "decode verdict", "vs",
                   "adapter MFLOP/token", "extra FLOPs %", "× eager merged", "RSS + MB", "size MB"]
