"""Run a recipe end to end: train -> export -> quantize -> profile -> check -> report.

:func:`run_recipe` calls each stage's public function in order, reporting
progress per stage on stderr, and returns a :class:`RunResult` holding the
gate's report; `lora-edge run` exits with the gate's code (0 pass, 1 fail).
`lora-edge demo` is the same on the shipped ``demo`` recipe.

Where things go (``<output>`` and ``<name>`` from the recipe)::

    <output>/<name>/                 the bundle (manifest, adapter copies, onnx/, reports/)
    <output>/<name>-adapters/<a>/    adapters trained by the recipe (re-used when the training block, data,
                                     model and task are unchanged; --retrain trains again)
    <output>/.models/tiny-<arch>/    tiny random models built locally for ``model = "tiny:<arch>"``

Profiles go to ``reports/devices/<device>/`` (profile.json/md, compare.json/md,
latency.png), one directory per device, because every device's profile is a
complete report of its own.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from lora_edge.core.choices import Precision
from lora_edge.core.console import Progress, silent, stderr_lines
from lora_edge.core.errors import LoraEdgeError
from lora_edge.core.data import DataFiles, resolve_data_files
from lora_edge.core.recipe import AdapterSource, Recipe, TrainingSpec, load_recipe

STAGES = ("train", "export", "quantize", "profile", "check", "report")
HOST_DEVICES = "host"  # in [profile] devices: every shipped CPU target this host can run
TRAINING_RECORD = "recipe-training.json"
DEVICE_REPORTS = ("profile.json", "profile.md", "compare.json", "compare.md", "latency.png")



@dataclass
class StageRecord:
    """One stage of a run: how long it took and what it did, in one line."""

    name: str
    seconds: float = 0.0
    summary: str = ""
    skipped: bool = False


@dataclass
class DeviceRun:
    """The profile of the bundle on one device (or why it was not measured)."""

    device: str
    report: object | None = None      # lora_edge.profile.profiler.ProfileReport
    comparison: object | None = None  # lora_edge.profile.compare.Comparison
    directory: str = ""
    error: str = ""


@dataclass
class RunResult:
    """Everything a recipe run produced."""

    recipe: Recipe
    bundle: Path
    stages: list[StageRecord] = field(default_factory=list)
    training: dict[str, dict] = field(default_factory=dict)  # adapter -> metrics.json (trained adapters)
    devices: list[DeviceRun] = field(default_factory=list)
    devices_left_out: list[str] = field(default_factory=list)  # "name (why)" for targets 'host' left out
    check: object | None = None  # lora_edge.check.gate.CheckReport
    report: Path | None = None
    seconds: float = 0.0


class StageRunner:
    """Announces each stage ("[2/6] export ..."), times it and keeps its record."""

    def __init__(self, result: RunResult, progress: Progress):
        self.result, self.progress = result, progress

    @contextlib.contextmanager
    def stage(self, name: str, what: str) -> Iterator[StageRecord]:
        """Run one stage inside the block; its record's ``summary`` may be set by the block."""
        record = StageRecord(name)
        self.progress(f"[{STAGES.index(name) + 1}/{len(STAGES)}] {name}: {what}")
        started = time.perf_counter()
        try:
            yield record
        finally:
            record.seconds = time.perf_counter() - started
            self.result.stages.append(record)
        self.progress(f"[{STAGES.index(name) + 1}/{len(STAGES)}] {name}: "
                      f"{record.summary or ('skipped' if record.skipped else 'done')} ({record.seconds:.1f} s)")


# --- stage helpers -------------------------------------------------------------------------------------


def training_data_files(training: TrainingSpec) -> DataFiles:
    """The data files a recipe's training section names, as the trainer records them."""
    return resolve_data_files(training.data, training.validation, training.test,
                              seed=training.train.seed)

def resolve_model(recipe: Recipe) -> str | Path:
    """The recipe's base model as export/train take it: 'default', a directory, or a tiny model built once."""
    from lora_edge.core.tiny import ensure_tiny_model, is_tiny_spec

    if is_tiny_spec(recipe.model):
        return ensure_tiny_model(recipe.model, Path(recipe.output) / ".models")
    return recipe.model


def training_record(recipe: Recipe, model: str | Path, source: AdapterSource) -> dict:
    """What a trained adapter depends on: model and data (with their sha256), task and training block."""
    from lora_edge.core.cache import directory_sha256, file_sha256
    from lora_edge.core.model_source import resolve_model_path

    training = recipe.to_json()["adapters"][recipe.adapters.index(source)]["training"]
    files = training_data_files(source.training).files
    data = {split: file_sha256(path) for split, path in files.items() if path and Path(path).is_file()}
    model_dir = resolve_model_path(model) if str(model) == "default" or Path(model).is_dir() else None
    return {"model": str(model), "model_sha256": directory_sha256(model_dir) if model_dir else None,
            "task": recipe.task, "training": training, "data_sha256": data}


def train_adapters(recipe: Recipe, model: str | Path, retrain: bool, progress: Progress,
                   quiet: bool = False) -> tuple[list, dict]:
    """Adapter references for export: given paths as they are, training blocks trained (or re-used)."""
    from lora_edge.core.adapters import AdapterRef
    from lora_edge.core.bundle import write_json
    from lora_edge.train.trainer import load_metrics, train_adapter

    refs, metrics = [], {}
    for source in recipe.adapters:
        if source.path:
            refs.append(AdapterRef(source.name, Path(source.path)))
            continue
        out = Path(recipe.output) / f"{recipe.name}-adapters" / source.name
        record = training_record(recipe, model, source)
        record_file = out / TRAINING_RECORD
        same = record_file.is_file() and json.loads(record_file.read_text()) == record
        if same and not retrain and (out / "adapter_model.safetensors").is_file():
            progress(f"train: re-using {out} (same model, data, task and training block; --retrain trains again)")
        else:
            training = source.training
            progress(f"train: adapter '{source.name}' on {training.data} -> {out}")
            train_adapter(model, training_data_files(training), out, recipe.task, training.lora, training.train,
                          force=True, progress=not quiet)
            write_json(record_file, record)
        refs.append(AdapterRef(source.name, out))
        metrics[source.name] = load_metrics(out)
    return refs, metrics


def host_device_problem(device, flags: set[str], cores: int) -> str | None:
    """Why this host cannot run a device target as specified (None when it can).

    It can when the device's providers exist here, none is a GPU, the CPU
    architecture and features match, and its intra-op threads fit the cores
    (more threads than cores would time oversubscription, not the device's setting).
    """
    if device.uses_gpu or device.missing_providers():
        return f"needs {', '.join(device.missing_providers()) or 'a GPU'}"
    mismatches = device.host_mismatches(host_flags=flags)
    if mismatches:
        return mismatches[0]
    if device.intra_op_threads > cores:
        return f"asks for {device.intra_op_threads} threads, this host has {cores} usable cores"
    return None


def expand_devices(names: list[str], progress: Progress | None = None) -> list[str]:
    """Device names with ``host`` replaced by every shipped CPU target this host can run as specified."""
    import os

    from lora_edge.profile.devices import list_devices, load_device
    from lora_edge.runtime.measure import cpu_info

    expanded = []
    for name in names:
        if name != HOST_DEVICES:
            expanded.append(name)
            continue
        flags, cores = cpu_info()["flags"], len(os.sched_getaffinity(0))
        for shipped in list_devices():
            problem = host_device_problem(load_device(shipped), flags, cores)
            if problem is None:
                expanded.append(shipped)
            elif progress:
                progress(f"profile: host: not {shipped} ({problem})")
    return list(dict.fromkeys(expanded))


def profile_devices(recipe: Recipe, bundle: Path, progress: Progress,
                    left_out: list[str] | None = None) -> list[DeviceRun]:
    """Profile and compare the bundle on each device; each device's reports go to reports/devices/<name>/.

    ``left_out`` collects the shipped targets ``host`` did not include, with the reason.
    """
    from lora_edge.core.bundle import REPORTS_DIR
    from lora_edge.profile.compare import compare_bundle
    from lora_edge.profile.devices import load_device

    spec, runs = recipe.profile, []
    def note(message: str) -> None:
        progress(message)
        if left_out is not None:
            left_out.append(message.removeprefix("profile: host: not "))

    for name in expand_devices(spec.devices, note):
        device = load_device(name)
        run = DeviceRun(device.name, directory=f"{REPORTS_DIR}/devices/{device.name}")
        progress(f"profile: device {device.name}")
        try:
            run.comparison = compare_bundle(bundle, device, None, spec.measure_settings(), reuse=False)
        except LoraEdgeError as exc:  # a missing provider or a graph that would not run: listed in the
            run.error = exc.format_message()  # report; whether the graphs are right is the gate's call
            progress(f"profile: {device.name} not measured: {run.error}")
        from lora_edge.profile.report import read_profile

        run.report = read_profile(bundle)
        target = bundle / run.directory
        target.mkdir(parents=True, exist_ok=True)
        for file in DEVICE_REPORTS:
            if (bundle / REPORTS_DIR / file).is_file():
                shutil.move(str(bundle / REPORTS_DIR / file), str(target / file))
        runs.append(run)
    return runs


# --- the run -------------------------------------------------------------------------------------------

def _recipe_for_run(recipe: str | Path | Recipe, out: str | Path | None, force: bool) -> Recipe:
    """The recipe to run, with ``out`` as its output; BundleError if its bundle exists and ``force`` is off."""
    recipe = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
    if out is not None:
        recipe.output = str(out)
    if recipe.bundle_dir.exists() and not force:
        from lora_edge.core.errors import BundleError

        raise BundleError(f"'{recipe.bundle_dir}' already exists", recipe.source or "recipe",
                          "pass --force to replace it, or set another output")
    return recipe


def run_recipe(recipe: str | Path | Recipe, out: str | Path | None = None, force: bool = False,
               retrain: bool = False, progress: Progress = stderr_lines, quiet: bool = False) -> RunResult:
    """Run a recipe (a path, a shipped recipe's name, or a Recipe) through every stage; return the results.

    ``out`` replaces the recipe's output directory. An existing bundle is
    replaced only with ``force``. Raises the stages' errors (config, data,
    export, quantization...); a failed gate is not raised here: see
    :func:`lora_edge.check.gate.gate` on ``result.check``. ``quiet``: no progress
    at all (``progress`` is ignored, training shows no steps).
    """
    from lora_edge.check.gate import check_bundle
    from lora_edge.export.bundle import export_bundle
    from lora_edge.pipeline.report import write_run_report

    if quiet:
        progress = silent
    recipe = _recipe_for_run(recipe, out, force)
    bundle = recipe.bundle_dir
    result = RunResult(recipe, bundle)
    stages = StageRunner(result, progress)
    started = time.perf_counter()
    progress(f"recipe {recipe.name}: {recipe.description or recipe.source}")
    model = resolve_model(recipe)

    trains = any(source.training for source in recipe.adapters)
    with stages.stage("train", "training the adapters" if trains else "adapters given, nothing to train") as record:
        adapters, result.training = train_adapters(recipe, model, retrain, progress, quiet)
        record.skipped = not trains
        record.summary = _training_summary(result.training)
    with stages.stage("export", f"{', '.join(recipe.export.forms)} in fp32 -> {bundle}") as record:
        export_bundle(model, adapters, recipe.export.forms, bundle, precisions=["fp32"],
                      opset=recipe.export.opset or None, force=force, task=recipe.task, seed=recipe.seed,
                      recipe=recipe.to_json(), trust_remote_code=recipe.trust_remote_code, progress=progress)
        record.summary = f"{_graph_count(bundle)} graph(s)"
    quantized = recipe.export.quantized_precisions
    with stages.stage("quantize", ", ".join(quantized) or "fp32 only, nothing to quantize") as record:
        if quantized:
            quantize(recipe, bundle, quantized)
            record.summary = f"{_graph_count(bundle)} graph(s) in all"
        record.skipped = not quantized
    with stages.stage("profile", ", ".join(recipe.profile.devices) or "no devices") as record:
        result.devices = profile_devices(recipe, bundle, progress, result.devices_left_out)
        record.skipped = not result.devices
        record.summary = ", ".join(f"{d.device}: {'measured' if not d.error else 'not measured'}"
                                   for d in result.devices)
    with stages.stage("check", "every graph against the PyTorch reference") as record:
        result.check = check_bundle(bundle, recipe.check, progress=progress)
        counts = result.check.counts()
        record.summary = (f"{'PASSED' if result.check.passed else 'FAILED'}: {counts['passed']} passed, "
                          f"{counts['failed']} failed, {counts['skipped']} skipped")
    result.seconds = time.perf_counter() - started
    with stages.stage("report", "writing the tables and charts into reports/report.md") as record:
        result.report = write_run_report(result)
        record.summary = str(result.report)
    return result


def quantize(recipe: Recipe, bundle: Path, precisions: list[Precision]) -> None:
    """Quantize the bundle's fp32 graphs to ``precisions`` with the recipe's settings."""
    from lora_edge.quantize.quantizer import quantize_bundle

    quantize_bundle(bundle, precisions, recipe.export.quantize_options())


def _graph_count(bundle: Path) -> int:
    from lora_edge.core.manifest import list_graphs

    return len(list_graphs(bundle))


def _training_summary(training: dict[str, dict]) -> str:
    parts = []
    for name, metrics in training.items():
        test = metrics.get("test") or {}
        score = (f"test accuracy {test['accuracy']:.3f}" if "accuracy" in test
                 else f"test perplexity {test['perplexity']:.3g}" if "perplexity" in test else "trained")
        parts.append(f"{name}: {score}")
    return "; ".join(parts)


def run_summary(result: RunResult, as_json: bool = False) -> str:
    """What `lora-edge run`/`demo` print: stage times, the gate per graph, and where the reports are."""
    from lora_edge.check.report import summary_rows
    from lora_edge.core.report import markdown_table

    if as_json:
        return json.dumps({"bundle": str(result.bundle), "report": str(result.report),
                           "passed": result.check.passed if result.check else None,
                           "seconds": round(result.seconds, 1),
                           "stages": [vars(stage) for stage in result.stages],
                           "check": result.check.to_json() if result.check else None}, indent=2, default=str)
    rows = summary_rows(result.check) if result.check else []
    latency = _p50_by_graph(result)
    for row in rows:
        row["p50_ms"] = latency.get(row["graph"].split("[")[0])
    columns = ["graph", "status", "max_abs_diff", "top1", "accuracy" if result.recipe.task == "seq-cls"
               else "perplexity", "p50_ms"]
    verdict = "PASSED" if result.check and result.check.passed else "FAILED"
    device = result.devices[0].device if result.devices else None
    lines = [markdown_table(rows, columns, ["graph", "gate", "max |Δ logit|", "top-1 agree",
                                            columns[4].replace("_", " "),
                                            f"p50 ms ({device})" if device else "p50 ms"]),
             f"gate: {verdict} ({', '.join(f'{k} {v}' for k, v in result.check.counts().items())}); "
             f"{result.seconds:.0f} s in all",
             f"report: {result.report}"]
    return "\n".join(lines)


def _p50_by_graph(result: RunResult) -> dict[str, float]:
    """p50 latency of each graph on the first measured device."""
    for run in result.devices:
        if run.report is not None:
            return {g.name: (g.latency_ms or {}).get("p50") for g in run.report.graphs if g.latency_ms}
    return {}

