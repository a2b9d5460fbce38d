"""Profile a bundle's graphs on a device target's settings: latency, throughput, memory, size, per-op time.

``profile_bundle(bundle, device, baselines=eager_baselines)`` times the eager
PyTorch model first (adapter unmerged and merged, :mod:`lora_edge.profile.eager`,
given by the caller so that timing graphs does not import torch), then opens each selected graph with the device's
providers, threads and optimization level, times it (interleaved with the
other graphs, so their ratios hold on a busy machine), records the memory the
session and its first run add, the size on disk, the providers that really
ran nodes and the top operators from ONNX Runtime's profiling trace (taken
from a separate session so the timed runs are not slowed). It writes
``BUNDLE/reports/profile.json`` and ``profile.md``.

Timings are measured on THIS host with the device's settings: they say how
the forms compare, not what the device itself will reach.

No silent fallback: a device asking for a provider this host lacks gets its
graphs reported "not measured: <provider> is not available on this host", and
:meth:`ProfileReport.check_measured` raises; ``allow_fallback`` measures on
what is there and says so per graph. On a GPU device, operators that ran on
the CPU provider are listed per graph. Memory is measured per graph in a
fresh process (:func:`lora_edge.runtime.measure.session_memory`). The report itself (JSON and Markdown)
is :mod:`lora_edge.profile.report`.

A decoder graph (a KV-cache input) is timed as two calls inside the same
interleaved rounds: the prefill of the ``batch x seq`` prompt with an empty
past (its p50 is the time to first token; prefill tokens/s = batch x seq /
p50) and one decode step of ``batch x 1`` new tokens after a past of ``seq``
tokens (decode tokens/s = batch / step p50). Both run the way
``lora-edge generate`` runs them (IO binding, a hot-swap graph's adapter bound
as inputs: :func:`decoder_phases`), so a decoder needs
``seq + 1`` positions.
"""

from __future__ import annotations

import gc
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from lora_edge.core.bundle import ONNX_DIR, require_bundle
from lora_edge.core.choices import Form, Task
from lora_edge.profile.devices import DeviceTarget, load_device
from lora_edge.core.errors import BundleError, ConfigError, ProviderUnavailableError
from lora_edge.runtime.feeds import build_feeds, position_ids
from lora_edge.runtime.interleave import RoundTimes, intervals_narrow, split_runs, time_rounds
from lora_edge.core.manifest import GraphRecord, Manifest, find_graph, hotswap_adapter_file, require_graphs
from lora_edge.runtime.measure import (GraphRunner, cpu_info, graph_size, host_facts, is_decoder, latency_stats,
                               session_memory, trace_session, warm_up_runtime)
from lora_edge.profile.report import (BRANCH_FORMS, FAILED, NOT_MEASURED, GraphProfile, ProfileReport,
                                      merged_peer, write_profile)
from lora_edge.core.recipe import MeasureSpec

if TYPE_CHECKING:
    import onnxruntime

TRACE_RUNS = 20  # runs recorded in the profiling trace (per-op times); enough for stable shares
RUNS_PER_ROUND = 5  # timed runs per graph per interleaved round (200 runs: 40 rounds)
GAP_S = 0.02  # pause before each visit: the previous session's idle ORT threads stop spinning
MIN_ROUNDS = 10  # a time budget never ends the rounds before this many
CHECK_EVERY = 5  # rounds between two checks of the intervals (a bootstrap per pair) while adding rounds
# Timed sessions do not spin unless --spinning: at load 5-7 on 2 cores, ORT's spinning threads made MiniLM
# fp32 6x slower (137 against 21 ms) and its overheads swing 10-50 points between rounds (benchmarks/README.md).
ALLOW_SPINNING = "session.intra_op.allow_spinning"
DECODE_SUFFIX = " [decode step]"  # a decoder's second timed call in the rounds: one token after a past of seq


def _log(message: str, quiet: bool) -> None:
    if not quiet:
        print(message, file=sys.stderr, flush=True)


def select_graphs(bundle: Path, device: DeviceTarget, names: list[str] | None = None) -> tuple[list[GraphRecord], list[str]]:
    """The graphs to profile and notes on the choice.

    Named graphs as given (unknown names raise a BundleError listing the valid
    ones); else every graph in a precision the device lists, best first; else,
    when the bundle has none of those, every graph (with a note saying so).
    """
    if names:
        return [find_graph(bundle, name) for name in names], []
    graphs = require_graphs(bundle)
    order = {precision: index for index, precision in enumerate(device.precisions)}
    preferred = [graph for graph in graphs if graph.precision in order]
    if not preferred:
        wanted = ", ".join(p.value for p in device.precisions)
        return graphs, [f"the bundle has no graph in the device's precisions ({wanted}); profiled every graph"]
    preferred.sort(key=lambda graph: (order[graph.precision], list(Form).index(graph.form)))
    return preferred, []


def _hotswap_adapter(bundle: Path, record: GraphRecord, manifest: Manifest) -> tuple[str | None, Path | None]:
    """The adapter a hot-swap graph is timed with: its first adapter's .onnx_adapter file."""
    names = record.adapters or manifest.adapter_names
    for name in names:
        path = hotswap_adapter_file(Path(bundle), record, name)
        if path.is_file():
            return name, path
    return None, None


def _model_config(bundle: Path, manifest: Manifest) -> dict:
    """The graph directory's config.json, else the model's, else {} (BundleError when unreadable)."""
    import json

    for config in (Path(bundle) / ONNX_DIR / "config.json", manifest.model.config_file()):
        if config.is_file():
            try:
                loaded = json.loads(config.read_text(encoding="utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError):
                raise BundleError("config.json is not valid JSON", config, "re-run lora-edge export") from None
            return loaded if isinstance(loaded, dict) else {}
    return {}


def _vocab_size(bundle: Path, manifest: Manifest) -> int:
    """Vocabulary size for random token ids: from the model's config, else 1000."""
    value = _model_config(bundle, manifest).get("vocab_size")
    return value if isinstance(value, int) and value > 0 else 1000


def _require_seq_fits(bundle: Path, manifest: Manifest, seq: int, records: list[GraphRecord]) -> None:
    """Refuse a --seq longer than the model's positions (ORT would fail, or allocate for minutes).

    A causal-LM graph's decode step runs after a past of ``seq`` tokens, so it needs ``seq + 1``.
    """
    config = _model_config(bundle, manifest)
    limit = next((config[key] for key in ("max_position_embeddings", "n_positions")
                  if isinstance(config.get(key), int)), None)
    if limit is None:
        return
    if seq > limit:
        raise ConfigError(f"--seq {seq} is longer than the model's {limit} positions", "--seq",
                          f"give a value <= {limit}")
    if seq + 1 > limit and any(record.task is Task.CAUSAL_LM for record in records):
        raise ConfigError(f"--seq {seq} leaves no room for the decode step: it runs after a past of {seq} tokens "
                          f"and needs {seq + 1} positions, the model has {limit}", "--seq",
                          f"give a value <= {limit - 1}")


@dataclass
class DecoderPhases:
    """The two calls a causal-LM graph is timed by: a prefill and one decode step after a past of ``seq`` tokens.

    Both run the way ``lora-edge generate`` runs a graph
    (:meth:`lora_edge.runtime.generate.DecoderRunner.bound_step`): IO binding with the
    inputs and outputs in host memory, the decode step's past bound as the
    ONNX Runtime values the prefill returned (no cache copy), and a hot-swap
    graph's adapter bound as graph inputs (:class:`lora_edge.runtime.generate.BoundAdapter`;
    ONNX Runtime ignores ``RunOptions`` adapters under IO binding). So the
    timings are what a user of ``generate`` gets per prompt and per token.
    The decode step re-uses the same past every call: its cost at a context
    of ``seq`` tokens, not a growing one. On a GPU device the inputs and
    outputs stay in host memory too (as ``generate`` has them), so a decoder's
    GPU timings include those copies, unlike a classifier's.
    """

    prefill: Callable[[], object]
    decode: Callable[[], object]
    batch: int
    seq: int
    past_length: int     # tokens in the cache the decode step attends to (== seq)
    present_length: int  # tokens in the cache the decode step returns (== seq + 1)


def decoder_phases(session: "onnxruntime.InferenceSession", batch: int, seq: int, vocab_size: int = 1000,
                   adapter_file: Path | None = None, seed: int = 0) -> DecoderPhases:
    """Build (and run once each) a ``batch x seq`` prefill and a ``batch x 1`` decode step after it.

    Token ids are random below ``vocab_size`` (fixed seed), masks all ones.
    Raises what ONNX Runtime raises when the graph cannot run them (e.g. a
    context shorter than ``seq + 1`` positions).
    """
    import numpy as np

    from lora_edge.runtime.generate import BoundAdapter, DecoderRunner

    runner = DecoderRunner(session)
    adapter = BoundAdapter.load(adapter_file) if adapter_file is not None else None
    ids = np.random.default_rng(seed).integers(5, max(6, vocab_size), size=(batch, seq), dtype=np.int64)
    mask = np.ones((batch, seq), dtype=np.int64)
    positions = position_ids(mask)
    _, past = runner.bound_step(ids, mask, positions, None, adapter)  # the cache the decode step attends to
    step_ids, step_mask = ids[:, -1:].copy(), np.ones((batch, seq + 1), dtype=np.int64)
    step_positions = np.full((batch, 1), seq, dtype=np.int64)
    _, present = runner.bound_step(step_ids, step_mask, step_positions, past, adapter)

    def prefill():
        return runner.bound_step(ids, mask, positions, None, adapter)

    def decode():
        return runner.bound_step(step_ids, step_mask, step_positions, past, adapter)

    if runner.shared_cache:  # one preallocated buffer is past and present: the lengths are the mask's
        return DecoderPhases(prefill, decode, batch, seq, past_length=seq, present_length=step_mask.shape[1])
    return DecoderPhases(prefill, decode, batch, seq, past_length=int(past[0].shape()[2]),
                         present_length=int(present[0].shape()[2]))


@dataclass
class _OpenGraph:
    profile: GraphProfile
    path: Path
    runner: GraphRunner | None = None
    adapter_object: Any = None
    phases: DecoderPhases | None = None  # a decoder's prefill and decode step (timed instead of ``runner``)

    def calls(self) -> dict:
        """The timed calls of this graph, by the name its round times are kept under."""
        name = self.profile.name
        if self.phases is not None:
            return {name: self.phases.prefill, name + DECODE_SUFFIX: self.phases.decode}
        return {name: self.runner}


def _open_graph(bundle: Path, record: GraphRecord, manifest: Manifest, device: DeviceTarget, settings,
                batch: int, seq: int, gpu_id: int | None, vocab: int) -> _OpenGraph:
    """Create a graph's session (timed) and run it once; measure its memory apart; failures are recorded."""
    from lora_edge.runtime.session import create_session, load_lora_adapter

    path = Path(bundle) / record.file
    profile = GraphProfile(name=record.name, form=record.form.value, precision=record.precision.value,
                           adapter=record.adapter, file=record.file, providers_requested=device.provider_names,
                           io_binding=gpu_id is not None)
    opened = _OpenGraph(profile, path)
    if not path.is_file():
        profile.status, profile.reason = FAILED, f"graph file {record.file} is missing from the bundle"
        return opened
    profile.size = graph_size(path)
    missing = device.missing_providers()
    if missing and settings.allow_fallback:
        profile.fallback = (f"{', '.join(missing)} not available on this host; measured with the providers it has "
                            "(--allow-fallback)")
    adapter_file = None
    if record.form is Form.HOTSWAP:
        profile.adapter, adapter_file = _hotswap_adapter(bundle, record, manifest)
        if adapter_file is not None:
            profile.size["adapter_mb"] = adapter_file.stat().st_size / 2**20
    try:
        began = time.perf_counter()
        session = create_session(path, settings)
        profile.session_create_s = time.perf_counter() - began
        feeds = build_feeds(session, batch, seq, vocab_size=vocab)
        opened.adapter_object = load_lora_adapter(adapter_file) if adapter_file is not None else None
        runner = GraphRunner(session, feeds, opened.adapter_object, gpu_id)
        runner()
        if is_decoder(session):
            opened.phases = decoder_phases(session, batch, seq, vocab, adapter_file)
    except ProviderUnavailableError as exc:
        profile.status, profile.reason = NOT_MEASURED, exc.what
        return opened
    except Exception as exc:  # ORT raises plain RuntimeErrors (missing kernels, bad graphs): record them
        text = str(exc).strip().splitlines()
        profile.status, profile.reason = FAILED, (text[0] if text else exc.__class__.__name__)[:300]
        return opened
    profile.memory = session_memory(path, settings, batch, seq, vocab, adapter_file, gpu_id)
    opened.runner = runner  # only a graph that ran once is timed
    profile.providers_registered = list(session.get_providers())
    profile.decoder = is_decoder(session)
    return opened


def _finish_graph(opened: _OpenGraph, timed: RoundTimes, device: DeviceTarget, settings,
                  batch: int, seq: int, gpu_id: int | None) -> None:
    """Fill in latency, per-round medians, throughput, budgets and the per-op trace of a timed graph."""
    profile = opened.profile
    stats = latency_stats(timed.times[profile.name])
    profile.latency_ms = stats
    profile.rounds_ms = [1e3 * seconds for seconds in timed.per_round[profile.name]]
    profile.visits_ms = _visits_ms(timed, profile.name)
    seconds = stats["mean"] / 1e3
    profile.throughput = {"items_per_s": batch / seconds}
    if profile.decoder:
        profile.throughput["tokens_per_s"] = batch * seq / seconds  # prefill: every prompt token once
        profile.throughput["prefill_tokens_per_s"] = batch * seq * 1e3 / stats["p50"]
        decode_key = profile.name + DECODE_SUFFIX
        if timed.times.get(decode_key):
            profile.decode_latency_ms = latency_stats(timed.times[decode_key])
            profile.decode_rounds_ms = [1e3 * seconds for seconds in timed.per_round[decode_key]]
            profile.decode_visits_ms = _visits_ms(timed, decode_key)
            profile.throughput["decode_tokens_per_s"] = batch * 1e3 / profile.decode_latency_ms["p50"]
    trace = trace_session(opened.path, settings, opened.runner.feeds, opened.adapter_object, gpu_id,
                          runs=TRACE_RUNS)
    profile.top_ops = trace.top_ops
    profile.providers_used = trace.providers_used
    gpu_registered = any(name != "CPUExecutionProvider" for name in profile.providers_registered)
    if device.uses_gpu and gpu_registered:
        profile.cpu_fallback_ops = trace.cpu_nodes
    profile.within_budget = _budget(profile, device)


def _visits_ms(timed: RoundTimes, name: str) -> list[list[float]]:
    """A call's runs per round in ms, kept when its group's calls took turns (their runs pair by index)."""
    if not timed.alternate:
        return []
    return [[round(1e3 * seconds, 4) for seconds in visit] for visit in timed.visits[name]]


def _budget(profile: GraphProfile, device: DeviceTarget) -> dict | None:
    """Whether p90 latency and added memory stay within the device's budgets (None: no budget set)."""
    verdict = {}
    if device.latency_budget_ms:
        verdict["latency"] = profile.latency_ms["p90"] <= device.latency_budget_ms
    if device.memory_budget_mb:
        key = "gpu_added_mb" if device.uses_gpu and profile.memory.get("gpu_added_mb") is not None else "rss_added_mb"
        verdict["memory"] = profile.memory.get(key, 0.0) <= device.memory_budget_mb
    return verdict or None


def _note(device: DeviceTarget, host: dict) -> str:
    threads = device.intra_op_threads or f"ONNX Runtime's default ({host['intra_op_threads_used']})"
    return (f"Timings were measured on this host ({host['cpu_model']}, {host['usable_cores']} usable cores, "
            f"onnxruntime {host['onnxruntime']}) with the settings of device '{device.name}' (providers "
            f"{', '.join(device.provider_names)}; intra-op threads {threads}; optimization "
            f"{device.graph_optimization_level}). They compare forms and precisions; they are not "
            f"measurements of the device itself.")


def _time_live(live: dict, report: ProfileReport, device: DeviceTarget, settings, measure: MeasureSpec,
               gpu_id: int | None, quiet: bool) -> None:
    """Time the opened graphs in interleaved rounds; fill in each one's profile and the run's settings."""
    batch, seq, runs, warmup = measure.batch, measure.seq, measure.runs, measure.warmup
    rounds, per_round = split_runs(runs, RUNS_PER_ROUND)
    adding = (f"; more rounds (up to {measure.run_cap} runs) while an overhead's interval is wider than "
              f"+-{measure.target_interval_pct:g} points; at most {measure.time_budget_s:g} s"
              if measure.target_interval_pct else "")
    _log(f"profile: timing {len(live)} graph(s), {warmup} warm-up + {runs} runs each, in {rounds} interleaved "
         f"rounds of {per_round} (shuffled order; each precision's forms take turns, one run at a time){adding}", quiet)
    timed = _time_graphs(live, measure)
    report.settings.update(rounds=timed.rounds, runs_per_round=per_round, gap_s=GAP_S, round_statistic="median",
                           grouped_by_precision=True, runs_alternate=timed.alternate, spinning=measure.spinning,
                           target_interval_pct=measure.target_interval_pct,
                           max_runs=measure.run_cap, time_budget_s=measure.time_budget_s,
                           timing_s=round(timed.seconds, 1), stopped=_stop_reason(timed, live, measure),
                           load_average={"before": timed.load_before, "after": timed.load_after})
    _log(f"profile: {timed.rounds} rounds in {timed.seconds:.0f} s ({report.settings['stopped']}); load average "
         f"{timed.load_before} before, {timed.load_after} after", quiet)
    for name, item in live.items():
        if not timed.times.get(name):
            continue
        _finish_graph(item, timed, device, settings, batch, seq, gpu_id)
        decode = item.profile.decode_latency_ms
        _log(f"profile: {name}: p50 {item.profile.latency_ms['p50']:.3f} ms"
             + (f" (prefill), decode step p50 {decode['p50']:.3f} ms" if decode else ""), quiet)


def _stop_reason(timed: RoundTimes, live: dict, measure: MeasureSpec) -> str:
    """Why the rounds stopped: the fixed runs, every interval narrow enough, the time budget or the run cap."""
    pairs = timing_groups(live)[1]
    if not measure.target_interval_pct or not pairs:  # no overhead to narrow: exactly --runs
        return "fixed runs"
    if timed.rounds * RUNS_PER_ROUND < measure.runs:
        return "time budget, before --runs"
    if intervals_narrow(timed, pairs, measure.target_interval_pct):
        return "intervals within target"
    cap = max(split_runs(measure.runs, RUNS_PER_ROUND)[0], measure.run_cap // RUNS_PER_ROUND)
    return "run cap" if timed.rounds >= cap else "time budget"  # (the budget's clock also ran the warm-up)


# (bundle, manifest, device, batch, seq, runs, warmup, allow_fallback, graphs) -> (eager profiles, model facts)
Baselines = Callable[[Path, Manifest, DeviceTarget, int, int, int, int, bool, list[GraphRecord]],
                     tuple[list[GraphProfile], dict]]


def profile_bundle(bundle: Path, device: str | Path | DeviceTarget, graphs: list[str] | None = None,
                   measure: MeasureSpec | None = None, *, baselines: "Baselines | None" = None,
                   quiet: bool = False, **measure_fields) -> ProfileReport:
    """Profile a bundle's graphs (and eager PyTorch baselines) with a device target's settings.

    ``measure`` (or ``measure_fields``: batch, seq, runs, warmup,
    allow_fallback) says how. ``baselines`` times the PyTorch model before the
    graphs (:func:`lora_edge.profile.eager.eager_baselines`); None: graphs only. Writes ``reports/profile.json`` and
    ``reports/profile.md`` and returns the report. Graphs that could not be
    measured are in the report with the reason; call
    :meth:`ProfileReport.check_measured` to turn them into an error.
    """
    measure = measure or MeasureSpec(**measure_fields)
    batch, seq, runs, warmup, allow_fallback = (measure.batch, measure.seq, measure.runs, measure.warmup,
                                                measure.allow_fallback)
    bundle = require_bundle(Path(bundle))
    device = load_device(device)
    manifest = Manifest.read(bundle)
    records, notes = select_graphs(bundle, device, graphs)
    _require_seq_fits(bundle, manifest, seq, records)
    host = host_facts(device.intra_op_threads)
    report = ProfileReport(bundle=str(bundle), device=device.to_json(), host=host,
                           settings={"batch": batch, "seq": seq, "runs": runs, "warmup": warmup,
                                     "allow_fallback": allow_fallback, "trace_runs": TRACE_RUNS},
                           note=_note(device, host), notes=notes,
                           host_mismatches=device.host_mismatches(host["machine"], cpu_info()["flags"]),
                           created=datetime.now(timezone.utc).isoformat(timespec="seconds"))
    cache_dir = bundle / ".cache" / device.name
    settings = device.session_settings(allow_fallback=allow_fallback, cache_dir=cache_dir)
    if not measure.spinning:
        settings.config_entries[ALLOW_SPINNING] = "0"
    gpu_id = _gpu_device_id(device) if device.uses_gpu and not device.missing_providers() else None
    vocab = _vocab_size(bundle, manifest)
    if baselines is not None:  # first, while the heap holds little freed memory that would hide what the models add
        _log("profile: eager PyTorch baselines (adapter unmerged and merged)", quiet)
        report.eager, report.model = baselines(bundle, manifest, device, batch, seq, runs, warmup, allow_fallback,
                                               records)
        gc.collect()
    warm_up_runtime(settings)
    opened = []
    for record in records:
        _log(f"profile: opening {record.name} ({device.name})", quiet)
        opened.append(_open_graph(bundle, record, manifest, device, settings, batch, seq, gpu_id, vocab))
    live = {item.profile.name: item for item in opened if item.runner is not None}
    if live:
        _time_live(live, report, device, settings, measure, gpu_id, quiet)
    report.graphs = [item.profile for item in opened]
    write_profile(bundle, report)
    return report


def timing_groups(live: dict[str, "_OpenGraph"]) -> tuple[list[list[str]], list[tuple[str, str]]]:
    """The calls visited back to back (each precision's forms) and the (form, merged) pairs whose ratio is reported.

    A pair is a branched or hot-swap graph and its merged peer
    (:func:`lora_edge.profile.report.merged_peer`), and for decoders their
    decode steps too.
    """
    profiles = [item.profile for item in live.values()]
    groups: dict[str, list[str]] = {}
    for item in live.values():
        groups.setdefault(item.profile.precision, []).extend(item.calls())
    pairs = []
    for item in live.values():
        peer = merged_peer(item.profile, profiles) if item.profile.form in BRANCH_FORMS else None
        if peer is not None:
            pairs.extend(zip(item.calls(), live[peer.name].calls()))
    return list(groups.values()), pairs


def _time_graphs(live: dict[str, _OpenGraph], measure: MeasureSpec) -> RoundTimes:
    """Interleaved rounds over every graph; if a run fails, find the failing graphs and time the others again.

    Every precision's forms are visited back to back, taking turns one run
    at a time (their i-th runs are paired). With a target interval,
    the time budget ends the rounds (once ``MIN_ROUNDS`` are done, even before
    ``runs``); after ``runs``, rounds are added until each overhead's interval
    is that narrow (checked every ``CHECK_EVERY`` rounds) or the run cap is reached.
    """
    runs, warmup, target = measure.runs, measure.warmup, measure.target_interval_pct
    rounds, per_round = split_runs(runs, RUNS_PER_ROUND)
    groups, pairs = timing_groups(live)

    def timed(runners: dict) -> RoundTimes:
        if not target or not pairs:
            return time_rounds(runners, rounds, per_round, warmup, gap_s=GAP_S, total=runs, groups=groups,
                               alternate=True)
        deadline = time.perf_counter() + measure.time_budget_s

        def enough(result: RoundTimes) -> bool:
            if time.perf_counter() >= deadline:
                return True
            return (result.rounds >= rounds and result.rounds % CHECK_EVERY == 0
                    and intervals_narrow(result, pairs, target))

        return time_rounds(runners, min(rounds, MIN_ROUNDS), per_round, warmup, gap_s=GAP_S, groups=groups,
                           until=enough, max_rounds=max(rounds, measure.run_cap // per_round), check_every=1,
                           alternate=True)

    try:
        return timed({key: call for item in live.values() for key, call in item.calls().items()})
    except Exception:  # find which graph failed; the others are still worth their numbers
        working = {}
        for item in live.values():
            try:
                for call in item.calls().values():
                    call()
                working.update(item.calls())
            except Exception as exc:
                text = str(exc).strip().splitlines()
                item.profile.status = FAILED
                item.profile.reason = (text[0] if text else exc.__class__.__name__)[:300]
        return timed(working) if working else RoundTimes()


def _gpu_device_id(device: DeviceTarget) -> int:
    """The CUDA device the device's first provider runs on (its ``device_id`` option)."""
    return int(device.providers[0].resolved_options().get("device_id", 0))
