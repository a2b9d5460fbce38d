"""The accuracy gate: every graph of a bundle against the PyTorch reference, with thresholds per precision.

:func:`check_bundle` runs each graph target -- every form and precision, and
for hot-swap graphs every adapter through its ``.onnx_adapter`` file (plus the
graph with no adapter against the base model) -- on an evaluation set, next to
the PyTorch reference (base + adapter, fp32, unmerged; :func:`lora_edge.core.adapters.load_reference`).

Evaluation set, first that applies: ``CheckSpec.data``; else the test split
recorded with each adapter (``manifest adapters[].data``); else generated
inputs, on which the logit metrics run and the task metric is listed as
skipped. Thresholds: the documented defaults per precision
(:data:`lora_edge.core.thresholds.DEFAULT_THRESHOLDS`), then the device's tolerances,
then the recipe's ``[check.thresholds.<precision>]``. A standalone
``lora-edge check`` uses the ``[check]`` section of the recipe recorded in the
manifest, so it applies the same gate as the ``lora-edge run`` that made the bundle.

Results go to ``reports/check.json``, a JUnit XML and ``reports/check.md``
(:mod:`lora_edge.check.report`). Anything that cannot run is listed as
skipped with the reason; the caller turns a failed report into
:class:`~lora_edge.core.errors.CheckFailedError` (exit 1).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lora_edge.core.adapters import AdapterRef, load_reference
from lora_edge.core.bundle import require_bundle, require_writable_file_path
from lora_edge.core.choices import Form, Precision
from lora_edge.check.data import eval_set
from lora_edge.check.metrics import FAILED, SKIPPED, MetricResult, TargetResult, gated_metrics, judge
from lora_edge.check.data import EvalSet
from lora_edge.check.tasks import BACKENDS, Continuations, Generation, compare_logits
from lora_edge.core.console import Progress
from lora_edge.core.errors import BundleError, ConfigError, LoraEdgeError, ProviderUnavailableError, first_line
from lora_edge.core.manifest import AdapterRecord, GraphRecord, Manifest, require_adapter_file, require_graphs
from lora_edge.core.choices import Task
from lora_edge.core.model_source import resolve_model_path
from lora_edge.core.models import load_tokenizer
from lora_edge.core.recipe import CheckSpec
from lora_edge.runtime.session import SessionSettings
from lora_edge.core.fake_quant import read_base_quantization

BASE = "base"  # the target name suffix of a hot-swap graph run with no adapter


@dataclass
class Reference:
    """The PyTorch reference's outputs on an evaluation set: logits per batch; greedy continuations (causal LM)."""

    logits: list[np.ndarray]
    continuations: Continuations | None = None


@dataclass
class GreedyPlan:
    """What a causal-LM gate continues greedily: the prompts, how, and the tokenizer that decodes the answers."""

    prompts: list[list[int]]
    generation: Generation
    tokenizer: object


@dataclass
class CheckTarget:
    """One thing the gate checks: a graph, with one adapter active (or none: the base model)."""

    name: str
    graph: GraphRecord
    adapter: str | None  # None: a hot-swap graph with no adapter, compared with the base model


@dataclass
class CheckReport:
    """The gate's findings over a bundle."""

    bundle: str
    task: str
    device: str
    created: str
    data: dict[str, str] = field(default_factory=dict)  # adapter -> where its evaluation set came from
    targets: list[TargetResult] = field(default_factory=list)
    integrity: list[TargetResult] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def results(self) -> list[TargetResult]:
        """Adapter integrity checks, then graph targets."""
        return self.integrity + self.targets

    def counts(self) -> dict[str, int]:
        """How many metric checks passed, failed and were skipped."""
        counts = {"passed": 0, "failed": 0, "skipped": 0}
        for result in self.results:
            for metric in result.metrics:
                counts[metric.status] += 1
        return counts

    @property
    def passed(self) -> bool:
        """True when no check failed."""
        return self.counts()["failed"] == 0

    def failures(self) -> list[str]:
        """One message per failed metric."""
        return [m.message(r.target, r.precision) for r in self.results for m in r.metrics if m.status == FAILED]

    def ran_anything(self) -> bool:
        """True when at least one graph produced a verdict (not every graph skipped)."""
        return any(m.status != SKIPPED for result in self.targets for m in result.metrics)

    def to_json(self) -> dict:
        """The content of reports/check.json."""
        return {"bundle": self.bundle, "task": self.task, "device": self.device, "created": self.created,
                "passed": self.passed, "summary": self.counts(), "seconds": round(self.seconds, 2),
                "data": self.data, "failures": self.failures(),
                "results": [result.to_json() for result in self.results]}


def spec_from_manifest(manifest: Manifest) -> CheckSpec:
    """The ``[check]`` section of the recipe recorded in the manifest, or the defaults."""
    section = manifest.recipe_section("check")
    known = {f.name for f in dataclasses.fields(CheckSpec)}
    try:
        return CheckSpec(**{k: v for k, v in section.items() if k in known})
    except ConfigError as exc:
        raise ConfigError(exc.what, f"manifest.json: recipe.{exc.where}", exc.fix) from None


def plan_targets(graphs: list[GraphRecord], adapters: list[str]) -> list[CheckTarget]:
    """Every graph with each adapter it serves: merged/branched with their own, hot-swap with each and none."""
    targets = []
    for graph in graphs:
        if graph.form is Form.HOTSWAP:
            for adapter in graph.adapters or adapters:
                targets.append(CheckTarget(f"{graph.name}[{adapter}]", graph, adapter))
            targets.append(CheckTarget(f"{graph.name}[{BASE}]", graph, None))
        else:
            adapter = graph.adapter or (adapters[0] if len(adapters) == 1 else None)
            if adapter is None:
                raise BundleError(f"graph {graph.name} does not say which adapter it holds", "manifest.json: graphs",
                                  "re-export the bundle")
            targets.append(CheckTarget(graph.name, graph, adapter))
    return targets


# --- running ---------------------------------------------------------------------------------------

class SessionCache:
    """The ONNX Runtime session of the graph being checked, shared by consecutive targets of that graph.

    One session at a time: a session's memory arena keeps the buffers of its
    largest run (an LLM's logits over a batch are hundreds of MB), so keeping a
    session per graph ran the gate of an 8-graph SmolLM2 bundle out of 23 GB.
    Targets come graph by graph (a hot-swap graph's adapters, then its base),
    so each session is still created once per adapter.
    """

    def __init__(self, settings: SessionSettings):
        self.settings = settings
        self.path: Path | None = None
        self.session = None

    def get(self, path: Path):
        """The session of ``path`` (the previous graph's session is released first)."""
        from lora_edge.runtime.session import create_session

        if path != self.path:
            self.path, self.session = None, None  # free the old arena before the new session allocates
            self.session = create_session(path, self.settings)
            self.path = path
        return self.session


def _unrunnable(exc: BaseException) -> str | None:
    """The skip reason when a graph cannot run here for lack of a provider or kernel; None for a broken graph."""
    if isinstance(exc, ProviderUnavailableError):
        return exc.format_message()
    if exc.__class__.__name__ == "NotImplemented":  # onnxruntime: no kernel for an op on this provider
        return f"no kernel on this host's providers ({first_line(exc, 200)})"
    return None


def _result_for(target: CheckTarget, task: str, thresholds) -> TargetResult:
    graph = target.graph
    return TargetResult(target.name, graph.name, graph.file, graph.form.value, graph.precision.value,
                        target.adapter, task, thresholds.to_json())


def run_target(target: CheckTarget, bundle: Path, backend, batches, reference: Reference,
               evalset: EvalSet, thresholds, sessions: SessionCache, threshold_where: str,
               greedy: GreedyPlan | None = None) -> TargetResult:
    """Run one target over the batches (and, for causal LMs, the greedy prompts) and judge every metric."""
    from lora_edge.runtime.session import load_lora_adapter

    result = _result_for(target, backend.task, thresholds)
    result.examples, result.data = len(evalset.texts), evalset.source
    metrics = gated_metrics(backend.task)
    started = time.perf_counter()
    try:
        session = sessions.get(bundle / target.graph.file)
        result.providers = list(session.get_providers())
        adapter = None
        if target.graph.form is Form.HOTSWAP and target.adapter is not None:
            adapter = load_lora_adapter(require_adapter_file(bundle, target.graph, target.adapter))
        outputs = [backend.graph(session, batch, adapter) for batch in batches]
        continuations = (backend.graph_continuations(session, greedy.tokenizer, greedy.prompts, greedy.generation,
                                                     adapter) if greedy and reference.continuations else None)
    except Exception as exc:  # a graph that cannot run is skipped (no provider) or failed (broken), never raised
        reason = _unrunnable(exc)
        line = exc.format_message() if isinstance(exc, LoraEdgeError) else first_line(exc, 300)
        result.error = reason or f"the graph could not run: {line}"
        status = SKIPPED if reason else FAILED
        result.metrics = [MetricResult(m, status, None, getattr(thresholds, m), thresholds.bound(m), result.error)
                          for m in metrics]
        result.seconds = time.perf_counter() - started
        return result
    values = compare_logits(backend, outputs, reference.logits, batches)
    result.scores["cosine_min"] = values.pop("cosine_min", None)
    skips = _skip_reasons(target, backend.task, evalset, continuations)
    if "perplexity_increase" not in skips and "accuracy_drop" not in skips:
        result.scores.update(backend.task_scores(outputs, reference.logits, batches, evalset))
    if continuations is not None:
        answers = evalset.answers if target.adapter is not None else None
        result.scores.update(backend.generation_scores(continuations, reference.continuations, answers))
    for metric in skips:
        values.pop(metric, None)
    values.update({m: result.scores[m] for m in metrics if m in result.scores and m not in skips})
    result.metrics = [judge(m, values.get(m), thresholds, skips.get(m, ""), threshold_where) for m in metrics]
    result.seconds = time.perf_counter() - started
    return result


def _skip_reasons(target: CheckTarget, task: str, evalset: EvalSet,
                  continuations: Continuations | None) -> dict[str, str]:
    """Metric -> why it is not judged for this target (absent: judged)."""
    skips: dict[str, str] = {}
    if task == Task.SEQ_CLS.value:
        task_skip = evalset.task_skip_reason
        if target.adapter is None:
            task_skip = "the base model has no task metric here (the task is the adapter's)"
            # A classifier's base head is untrained (random): its logits are small and near-tied, so the
            # top class and the direction of the logit vector swing at the smallest numeric change; only
            # the logit distances say whether the graph is the base model.
            for metric in ("top1_agreement", "cosine"):
                skips[metric] = "the base model's classifier head is untrained: only logit distances are gated"
        if task_skip:
            skips.update({"accuracy_drop": task_skip, "macro_f1_drop": task_skip})
        return skips
    if continuations is None:
        reason = ("check.greedy_prompts is 0" if evalset.prompts else "no prompt to continue (texts under 2 tokens)")
        skips.update({"greedy_agreement": reason, "exact_match_drop": reason})
    elif target.adapter is None:
        skips["exact_match_drop"] = "the base model is not expected to give the adapter's answers"
        # Untuned, the base model's continuations of the adapter's prompts are free text whose next
        # tokens are near ties (SmolLM2 int4: first tokens differ on 19 of 20 prompts, next-token
        # agreement 0.71 against 0.85 with the adapter); agreement there measures the ties, not the graph.
        if target.graph.precision is not Precision.FP32:
            reason = "the base model's predictions on the adapter's data are near ties: quantized, distances gate it"
            skips.update({"greedy_agreement": reason, "top1_agreement": reason})
    elif not evalset.answers:
        skips["exact_match_drop"] = 'no expected answers: exact match needs chat rows ({"messages": [...]})'
    if evalset.task_skip_reason:  # generated inputs: no text to score perplexity or answers on
        skips.update({"perplexity_increase": evalset.task_skip_reason, "exact_match_drop": evalset.task_skip_reason})
    return skips


def _adapter_sha256(directory: Path) -> str | None:
    """The sha256 export_bundle records for an adapter directory (adapter_config.json + weights), or None."""
    from lora_edge.core.cache import directory_sha256

    if not (directory / "adapter_model.safetensors").is_file():
        return None
    return directory_sha256(directory, "adapter_*")


def reference_adapter(bundle: Path, adapter: AdapterRecord) -> tuple[TargetResult, Path | None]:
    """Check the bundle's copy of an adapter against the manifest's sha256; pick the directory to trust.

    Returns the integrity result and the adapter directory the reference is
    built from: the bundle's copy when it matches, else the recorded source
    directory when that matches, else None (no trustworthy reference).
    """
    name = adapter.name
    copy = bundle / adapter.bundle_dir
    result = TargetResult(f"adapter:{name}", f"adapter:{name}", adapter.bundle_dir, "adapter", "fp32", name, "")
    recorded = adapter.sha256
    if not recorded:
        result.metrics = [MetricResult("sha256", SKIPPED, reason="the manifest records no sha256 for this adapter")]
        return result, copy
    if _adapter_sha256(copy) == recorded:
        result.metrics = [MetricResult("sha256", "passed", reason="the bundle's adapter is the one exported")]
        return result, copy
    source = Path(adapter.source) if adapter.source else None
    trusted = source if source is not None and _adapter_sha256(source) == recorded else None
    fallback = f"; the reference is built from the source {source}" if trusted else ""
    result.metrics = [MetricResult("sha256", FAILED, reason=f"the adapter files in {copy} differ from the ones "
                                                            f"exported (sha256 in the manifest){fallback}")]
    return result, trusted


def _references(model_path: Path, adapter: AdapterRef, task: Task, backend, batches, base: bool,
                greedy: GreedyPlan | None, quantized=None) -> dict[tuple[bool, bool], Reference | None]:
    """Reference outputs keyed ``(base model alone?, on the quantized base?)``.

    ``(False, False)``: base + adapter; ``(True, False)``: the base alone (when
    ``base``). An adapter trained against a quantized base (``quantized``, a
    :class:`~lora_edge.core.fake_quant.BaseQuantization`) gets the same two again on
    the base as the int4 export holds it (fake-quantized in place, once): its
    int4 graphs hold that base, so greedy agreement there measures the graph,
    not the quantization the adapter was trained to absorb.
    """
    model = load_reference(model_path, adapter, task)

    def outputs() -> Reference:
        logits = [backend.reference(model, batch) for batch in batches]
        continuations = (backend.reference_continuations(model, greedy.tokenizer, greedy.prompts, greedy.generation)
                         if greedy else None)
        return Reference(logits, continuations)

    def both() -> dict[bool, Reference | None]:
        found = {False: outputs(), True: None}
        if base:
            with model.disable_adapter():
                found[True] = outputs()
        return found

    references = {(alone, False): value for alone, value in both().items()}
    if quantized is not None:
        from lora_edge.core.fake_quant import fake_quantize_base

        fake_quantize_base(model, quantized)
        references.update({(alone, True): value for alone, value in both().items()})
    return references


def quantized_reference_note(quantized, graphs: list[GraphRecord]) -> str:
    """What the gate tells about an adapter trained against a quantized base (empty when it was not)."""
    if quantized is None:
        return ""
    note = (f"the adapter was trained against the base quantized to {quantized.describe()}: its {quantized.precision} graphs "
            f"are measured against that base + the adapter")
    for graph in graphs:
        settings = graph.extra.get("quantization") or {} if graph.precision.value == quantized.precision else {}
        if settings and (settings.get("block_size"), bool(settings.get("symmetric"))) != \
                (quantized.block_size, quantized.symmetric):
            note += (f"; {graph.name} was quantized in blocks of {settings.get('block_size')}"
                     f"{' symmetric' if settings.get('symmetric') else ''}, not as the adapter was trained: "
                     f"quantize with --block-size {quantized.block_size} and zero points")
    if any(g.form is Form.MERGED and g.precision.value == quantized.precision for g in graphs):
        note += (f"; merged.{quantized.precision} re-quantizes W + s·B·A instead of holding the base the adapter was "
                 f"trained against, so it is only close to that reference: branched or hot-swap "
                 f"{quantized.precision} hold it exactly")
    return note


def greedy_plan(spec: CheckSpec, evalset: EvalSet, tokenizer, bundle: Path) -> GreedyPlan | None:
    """The greedy continuations a causal-LM gate compares (None: not asked for, or no prompts).

    Stop and padding tokens are the ones ``lora-edge generate`` uses (the bundle's config first).
    """
    from lora_edge.core.bundle import ONNX_DIR
    from lora_edge.runtime.bundle_generate import special_ids
    from lora_edge.core.models import load_config

    if not spec.greedy_prompts or not evalset.prompts:
        return None
    try:
        config = load_config(bundle / ONNX_DIR)
    except (OSError, ValueError):
        config = {}
    eos, pad = special_ids(config, tokenizer)
    eos = frozenset(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    prompts = evalset.prompts[:spec.greedy_prompts]
    budget = spec.greedy_tokens
    if evalset.answers:  # room for the longest expected answer, as training's exact match gives it
        from lora_edge.core.chat import answer_budget

        budget = max(budget, answer_budget(tokenizer, evalset.answers[:len(prompts)]))
    return GreedyPlan(prompts, Generation(budget, eos, pad), tokenizer)


def _tokenizer(bundle: Path, model_path: Path):
    graph_dir = bundle / "onnx"
    source = graph_dir if (graph_dir / "tokenizer_config.json").is_file() else model_path
    return load_tokenizer(source)


def _device(spec: CheckSpec) -> tuple[str, SessionSettings, dict, str]:
    """(device name, session settings, tolerance tables, where they come from) of the gate's device."""
    from lora_edge.profile.devices import load_device

    if not spec.device:
        return "CPUExecutionProvider (no device)", SessionSettings(), {}, ""
    device = load_device(spec.device)
    return device.name, device.session_settings(), device.tolerances, f"{device.source}: tolerances"


def _failed(target: CheckTarget, task: str, thresholds, reason: str) -> TargetResult:
    """A target whose every metric failed for one reason (e.g. no PyTorch reference could be built)."""
    result = _result_for(target, task, thresholds)
    result.error = reason
    result.metrics = [MetricResult(m, FAILED, None, getattr(thresholds, m), thresholds.bound(m), reason)
                      for m in gated_metrics(task)]
    return result


def _progress_line(target: CheckTarget, result: TargetResult) -> str:
    failed = sum(m.status == FAILED for m in result.metrics)
    skipped = sum(m.status == SKIPPED for m in result.metrics)
    return (f"check: {target.name}: {result.status}" + (f" ({failed} failed)" if failed else "")
            + (f" ({skipped} skipped)" if skipped else "") + f", {result.seconds:.1f} s")


def _quantized_base(adapter_dir: Path, task, mine: list):
    """The quantized base an adapter was trained against, when one of ``mine`` holds that base; else None."""
    quantized = read_base_quantization(adapter_dir) if task == Task.CAUSAL_LM.value else None
    if quantized is not None and all(t.graph.precision.value != quantized.precision for t in mine):
        return None  # no graph holds that base: the float reference serves every graph
    return quantized


def _check_adapter(bundle: Path, adapter: AdapterRecord, mine: list, spec: CheckSpec, tolerances: tuple,
                   model_path: Path, tokenizer, sessions: "SessionCache", report: CheckReport, say: Progress) -> None:
    """Gate the graphs ``mine`` that run ``adapter``: one evaluation set, one PyTorch reference, each graph judged.

    ``tolerances`` is the device's (table, where). A reference that cannot be
    built fails every graph of the adapter, with the reason.
    """
    task = report.task
    backend = BACKENDS[task]
    integrity, trusted = reference_adapter(bundle, adapter)
    report.integrity.append(integrity)
    evalset = eval_set(spec, adapter, task, tokenizer)
    report.data[adapter.name] = f"{evalset.source}, {len(evalset.texts)} examples"
    say(f"check: adapter {adapter.name}: evaluating on {evalset.source} ({len(evalset.texts)} examples)")
    batches = backend.batches(tokenizer, evalset, spec.batch_size, spec.max_length)
    try:
        if trusted is None:
            raise BundleError("no copy of the adapter matches the manifest's sha256",
                              bundle / adapter.bundle_dir, "re-export the bundle from the adapter")
        greedy = greedy_plan(spec, evalset, tokenizer, bundle) if task == Task.CAUSAL_LM.value else None
        quantized = _quantized_base(trusted, task, mine)
        note = quantized_reference_note(quantized, [t.graph for t in mine])
        if note:
            report.data[adapter.name] += f"; {note}"
            say(f"check: adapter {adapter.name}: {note}")
        references = _references(model_path, AdapterRef(adapter.name, trusted), task, backend, batches,
                                 any(t.adapter is None for t in mine), greedy, quantized)
    except LoraEdgeError as exc:  # no reference: every graph of this adapter fails, with the reason
        reason = f"the PyTorch reference could not be built: {exc.format_message()}"
        report.targets += [_failed(target, task, spec.thresholds_for(target.graph.precision.value, *tolerances, task),
                                   reason) for target in mine]
        say(f"check: adapter {adapter.name}: {reason}")
        return
    for target in mine:
        precision = target.graph.precision.value
        thresholds = spec.thresholds_for(precision, *tolerances, task)
        on_quantized = quantized is not None and precision == quantized.precision
        result = run_target(target, bundle, backend, batches, references[target.adapter is None, on_quantized],
                            evalset, thresholds, sessions, f"check.thresholds.{precision}", greedy)
        report.targets.append(result)
        say(_progress_line(target, result))


def check_bundle(bundle: str | Path, spec: CheckSpec | None = None, junit: str | Path | None = None,
                 progress: Progress | None = None, write: bool = True) -> CheckReport:
    """Run the accuracy gate on every graph of ``bundle``; write the reports; return the findings.

    ``spec`` defaults to the recipe recorded in the manifest. Raises
    ConfigError/BundleError/DataError/ModelError for unusable input; a failed
    threshold is not an exception here (see :attr:`CheckReport.passed`).
    """
    from datetime import datetime, timezone

    started = time.perf_counter()
    say = progress or (lambda message: None)
    bundle = require_bundle(Path(bundle))
    manifest = Manifest.read(bundle)
    spec = spec or spec_from_manifest(manifest)
    task = manifest.model.task
    device_name, settings, tolerances, tolerance_where = _device(spec)
    adapters = manifest.adapters
    if not adapters:
        raise BundleError("the bundle lists no adapters", bundle / "manifest.json", "re-export the bundle")
    graphs = require_graphs(bundle)
    report = CheckReport(str(bundle), task, device_name, datetime.now(timezone.utc).isoformat(timespec="seconds"))
    targets = plan_targets(graphs, manifest.adapter_names)
    model_path = resolve_model_path(manifest.model.source())
    tokenizer = _tokenizer(bundle, model_path)
    sessions = SessionCache(settings)
    for adapter in adapters:
        mine = [t for t in targets if t.adapter == adapter.name or (t.adapter is None and adapter is adapters[0])]
        if mine:
            _check_adapter(bundle, adapter, mine, spec, (tolerances, tolerance_where), model_path, tokenizer,
                           sessions, report, say)
        else:
            report.integrity.append(reference_adapter(bundle, adapter)[0])
    report.seconds = time.perf_counter() - started
    if write:
        from lora_edge.check.report import write_reports

        write_reports(report, bundle, junit)
    return report


def gate(report: CheckReport, where: str | Path) -> None:
    """Raise CheckFailedError when the report has a failure, ProviderUnavailableError when nothing could run."""
    from lora_edge.core.errors import CheckFailedError

    if not report.passed:
        failures = report.failures()
        more = f" (and {len(failures) - 1} more)" if len(failures) > 1 else ""
        raise CheckFailedError(f"{len(failures)} check(s) failed: {failures[0]}{more}", where,
                               "re-export the drifting graphs, or loosen [check.thresholds] if the drift is expected")
    if not report.ran_anything():
        raise ProviderUnavailableError("no graph could run on this host, so nothing was checked", where,
                                       "run the check on a host with the device's providers, or pick --device")


def check_command(bundle: str | Path, data: str | None = None, device: str | None = None,
                  max_examples: int | None = None, junit: str | Path | None = None,
                  progress: Progress | None = None) -> CheckReport:
    """`lora-edge check`: the recorded recipe's gate, with --data/--device/--max-examples replacing its values."""
    bundle = require_bundle(Path(bundle))
    if junit is not None:  # before minutes of checking, not after
        require_writable_file_path(Path(junit), "--junit")
    spec = spec_from_manifest(Manifest.read(bundle))
    overrides = {"data": data, "device": device, "max_examples": max_examples}
    spec = dataclasses.replace(spec, **{k: v for k, v in overrides.items() if v is not None})
    return check_bundle(bundle, spec, junit=junit, progress=progress)
