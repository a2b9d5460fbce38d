"""Write an export bundle: the deployment forms of one base model with one or more adapters.

``export_bundle`` loads the PyTorch reference (base + adapter, unmerged) of every
adapter, traces base + LoRA branches ONCE (the hot-swap graph), derives the other
forms from that trace (``lora_edge/export/forms.py``), verifies each graph against its
reference, and writes (atomically: a temporary sibling renamed at the end)::

    <out>/manifest.json
    <out>/adapter/ (one adapter) or <out>/adapters/<name>/   PEFT copies
    <out>/onnx/merged[.<name>].fp32.onnx  branched[.<name>].fp32.onnx
    <out>/onnx/hotswap.fp32.onnx + onnx/adapters/<name>.onnx_adapter
    <out>/onnx/config.json, tokenizer files, label_map.json (+ label_maps/<name>.json with several adapters)
    <out>/onnx/genai_config.json (causal LM: onnxruntime-genai runs the graphs as they are)

so that ``onnx/`` can be used on its own. Precisions other than fp32 are handed
to ``lora_edge.quantize.quantizer.quantize_bundle`` once the fp32 graphs exist;
without fp32 among the precisions those are intermediates, not kept (:func:`export_bundle`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import shutil
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

from lora_edge import __version__
from lora_edge.core.adapters import (ADAPTER_CONFIG, ADAPTER_WEIGHTS, DATA_RECORD, AdapterRef, adapter_task,
                                load_reference, read_adapter_config)
from lora_edge.core.bundle import (ONNX_DIR, atomic_directory, intermediate_directory, library_versions, load_graph,
                                   parse_choices, write_json)
from lora_edge.core.choices import Form, Precision
from lora_edge.core.console import Progress, stderr_lines
from lora_edge.core.data import LABEL_MAP_FILE, LabelMap
from lora_edge.core.errors import ConfigError, ExportError
from lora_edge.export.exporter import FP32_TOLERANCE, ExportContext
from lora_edge.export.genai_config import write_genai_config
from lora_edge.core.manifest import AdapterRecord, ExportStage, GraphRecord, Manifest, ModelRecord
from lora_edge.core.choices import Task
from lora_edge.core.cache import directory_sha256
from lora_edge.core.model_source import resolve_model_path
from lora_edge.core.cache import DEFAULT_MODEL
from lora_edge.core.models import load_tokenizer
from lora_edge.core.onnx_spec import require_valid_graph
from lora_edge.core.recipe import QuantizeOptions
from lora_edge.runtime.session import drop_mapped_pages, forget_outputs, release_freed_memory
from lora_edge.runtime.tokenizer import make_portable

if TYPE_CHECKING:
    import onnx
    from peft import PeftModel

# Files of an adapter directory copied into the bundle (never training checkpoints or pickles).
ADAPTER_FILES = (ADAPTER_CONFIG, ADAPTER_WEIGHTS, LABEL_MAP_FILE, DATA_RECORD, "README.md")
ADAPTER_HOTSWAP_DIR = "adapters"  # under onnx/: the .onnx_adapter files
LABEL_MAPS_DIR = "label_maps"     # under onnx/: one label map per adapter when a bundle has several
# Opsets torch's ONNX exporter writes as asked: below 18 it silently writes 18, above 23 it has no translations.
OPSET_RANGE = (18, 23)
TRACE_FILE = ".trace.onnx"        # under onnx/ while a model over 1.8 GB is exported: its trace, removed once loaded



@dataclass
class ExportJob:
    """What every form exporter needs: the references, where to write, and how strictly to verify."""

    model_path: Path
    task: Task
    context: ExportContext
    references: dict[str, "PeftModel"]
    labels: dict[str, list[str] | None]
    staging: Path
    opset: int | None = None
    tolerance: float = FP32_TOLERANCE
    trust_remote_code: bool = False
    progress: Progress = stderr_lines
    records: list[GraphRecord] = field(default_factory=list)
    fuse: bool = False  # the fp32 graphs get the verified CPU fusions (lora_edge.export.fusion) before written
    # Where the fp32 graphs are written when the bundle does not keep them (only quantized precisions asked):
    # the bundle links to them there until they are quantized (see :func:`export_bundle`).
    intermediate: Path | None = None
    # The graphs will be quantized: a decoder's verification session also runs the quantize stage's check feeds
    # (runtime.session.remember_outputs), which then opens no session of the fp32 graph for them.
    remember_checks: bool = False

    @property
    def several(self) -> bool:
        """True when the bundle has several adapters (graph names then carry the adapter's name)."""
        return len(self.labels) > 1

    def graph_file(self, name: str) -> Path:
        """Absolute path of graph ``name`` inside the staging bundle."""
        return self.staging / ONNX_DIR / f"{name}.onnx"

    def relative(self, path: Path) -> str:
        """``path`` relative to the bundle, as manifests record files."""
        return Path(path).relative_to(self.staging).as_posix()


def _peak_rss_mb() -> int | None:
    """The process's peak resident memory so far, in MB (None where the platform does not say)."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak / (1024 * 1024 if sys.platform == "darwin" else 1024))


class Stopwatch:
    """Seconds per stage of an export, reported as each stage ends and recorded in the manifest."""

    def __init__(self, progress: Progress):
        self.progress = progress
        self.started = time.perf_counter()
        self.stages: list[ExportStage] = []

    @contextlib.contextmanager
    def stage(self, name: str):
        """Time the block as stage ``name``; report it with the elapsed total when it ends."""
        start = time.perf_counter()
        yield
        seconds = time.perf_counter() - start
        self.stages.append(ExportStage(name, round(seconds, 2), _peak_rss_mb()))
        self.progress(f"  {name}: {seconds:.1f} s  [{time.perf_counter() - self.started:.1f} s]")

    def seconds(self, prefix: str) -> float:
        """Total seconds of the stages named ``prefix`` or ``prefix ...``."""
        return round(sum(s.seconds for s in self.stages if s.stage.split(" (")[0] == prefix), 2)


@contextlib.contextmanager
def objects_frozen():
    """Garbage collections skip the objects alive now (``gc.freeze``), meanwhile.

    ``release_freed_memory`` collects garbage between graphs and steps; with torch
    and transformers imported a full collection walks millions of long-lived
    objects (0.15-0.25 s each on 2 cores: 21 collections were 3-5 s of a MiniLM-L6
    export + quantize). Frozen objects are still freed by reference counting; only
    cycles among them wait for the end of the block. Where something else froze
    objects already, nothing is changed.
    """
    import gc

    if gc.get_freeze_count():
        yield
        return
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def _graph_extra(shell, derived, opset: int | None = None, **values) -> dict:
    """Manifest extras of a derived graph (read in memory): opset, input/output names, low-rank pairs, ``values``."""
    from lora_edge.export.exporter import low_rank_pairs
    from lora_edge.export.forms import analysis_model

    model = analysis_model(shell, derived)
    initializers = set(derived.initializers)
    written = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if opset and written != opset:  # never silently another opset than the one asked for
        raise ExportError(f"the exporter wrote opset {written}, not the {opset} asked for", "--opset",
                          f"use an opset from {OPSET_RANGE[0]} to {OPSET_RANGE[1]}, or leave --opset out")
    return {"opset": written,
            "inputs": [i.name for i in model.graph.input if i.name not in initializers],
            "outputs": [o.name for o in model.graph.output], "low_rank_pairs": len(low_rank_pairs(model)),
            **values}


@dataclass
class TracePlan:
    """What every form needs once the model is traced: slots, adapter tensors, PyTorch outputs, the verify I/O."""

    slots: list
    tensors: dict[str, dict]  # adapter name -> its hot-swap tensors (A, s·B, heads)
    expected: dict[str | None, list]  # adapter name (None: no adapter) -> PyTorch outputs on the verify inputs
    verify_io: object  # GraphIO without a model: verify inputs and I/O names
    traced: object = None  # the traced hot-swap onnx.ModelProto
    exporter: str | None = None
    weights: dict = field(default_factory=dict)  # initializer name -> array, for initializers ``traced`` holds as stubs
    stamped: bool = False  # traced through a shallow twin with the other layers stamped (lora_edge.export.stamp)
    # For the fusions (``job.fuse``): adapter name (None: the base model) -> (verify I/O with the batches padded
    # to the export length added, PyTorch outputs on them)
    fusion_expected: dict = field(default_factory=dict)


@contextlib.contextmanager
def _small_batch_threads(task: Task):
    """One PyTorch intra-op thread meanwhile for a classifier's verification forwards and trace; the caller's after.

    They run a few short batches (at most 3 x the export length): threads gain
    little there, and on shared cores OpenMP's barriers make them collapse
    (MiniLM-L6, load 5-6 on 2 cores: the verification forwards with the fused
    graphs' padded batches 6-7 s on 2 threads, 0.4-0.5 s on 1; the TorchScript
    trace 2.1-2.9 s against 1.2-1.4 s). Decoders keep the caller's threads.
    """
    import torch

    threads = torch.get_num_threads()
    if task is Task.SEQ_CLS:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _complete_trace(traced: "onnx.ModelProto", defaults: dict, slots: list, weights: dict, verify_io,
                    base_expected) -> None:
    """Finish the loaded trace in place: hot-swap defaults as initializers, stub transposes folded, output dims
    named, the task's own graph edit."""
    from lora_edge.export.exporter import fold_stub_transposes, name_output_dims
    from lora_edge.export.hotswap import add_default_initializers

    add_default_initializers(traced, defaults, slots)
    fold_stub_transposes(traced, weights)  # MatMul(x, W.T) with W.T stored, as a traced-with-weights graph has
    name_output_dims(traced, verify_io, base_expected)
    if verify_io.edit_graph is not None:
        verify_io.edit_graph(traced)


def plan_and_trace(job: ExportJob, clock: Stopwatch, exporter: str, stamp: bool = True) -> TracePlan:
    """Reference outputs and ONE trace of base + LoRA branches (the hot-swap graph), then the model is released.

    The base is a view of the first reference (no weight copy); the references are
    dropped from ``job`` once traced: every later stage works on the ONNX model.
    A torch.export trace stays in memory (its weights are the base's tensors); a
    TorchScript trace is kept as the exporter's bytes (a model over 1.8 GB: a
    file), parsed once the model is released.
    """
    import onnx
    from torch import nn

    from lora_edge.export.exporter import graph_io_for, reference_outputs, trace_onnx, trace_torchscript_bytes
    from lora_edge.export.hotswap import TENSOR, adapter_tensors, hotswap_base, hotswap_graph_io, plan_slots
    from lora_edge.export.merge import base_view

    builder = graph_io_for(job.task)
    first = next(iter(job.references.values()))
    with clock.stage("reference outputs"), _small_batch_threads(job.task):
        base = base_view(first)
        slots = plan_slots(base, job.references)
        tensors = {name: adapter_tensors(ref, slots) for name, ref in job.references.items()}
        fusion_expected = _fusion_expected(job)
        if fusion_expected:  # the verify batches come first there, each then padded: not run twice
            expected = {name: outputs[:len(outputs) // 2] for name, (_, outputs) in fusion_expected.items()}
        else:
            expected = {name: reference_outputs(builder(ref, job.context)) for name, ref in job.references.items()}
            with first.disable_adapter():
                expected[None] = reference_outputs(builder(first, job.context))
        model = hotswap_base(base, slots)
        io, task_io = hotswap_graph_io(model, slots, job.context)
    trace_file = job.staging / ONNX_DIR / TRACE_FILE
    graph_name = GraphRecord.graph_name(Form.HOTSWAP, Precision.FP32)
    weights: dict = {}
    stamped, serialized = False, None
    with clock.stage(f"trace ({exporter})"), _small_batch_threads(job.task):
        if exporter == "dynamo":  # kept in memory: its weights stay the model's own tensors (one copy)
            traced, weights, stamped = _trace_dynamo_stage(job, model, slots, io, graph_name, stamp)
        else:  # the exporter's bytes, parsed once the model is released; a model too large for them: a file
            serialized = trace_torchscript_bytes(io, job.opset, graph_name) if exporter == "torchscript" else None
            if serialized is None:
                trace_onnx(io, trace_file, job.opset, graph_name, exporter)
    verify_io = dataclasses.replace(task_io, module=nn.Identity())
    defaults = {slot.name: model.get_parameter(slot.parameter).detach().float().numpy().copy()
                for slot in slots if slot.kind == TENSOR}
    del base, model, io, task_io, first
    job.references.clear()  # the weights' arrays keep only the base tensors alive
    release_freed_memory()  # the tracer's garbage
    with clock.stage("load trace"):
        if serialized is not None:
            traced = onnx.load_model_from_string(serialized)
            del serialized
        elif not weights:
            traced = load_graph(trace_file)
            for path in trace_file.parent.glob(TRACE_FILE + "*"):
                path.unlink()
        _complete_trace(traced, defaults, slots, weights, verify_io, expected[None])
    return TracePlan(slots, tensors, expected, verify_io, traced, exporter, weights, stamped=stamped,
                     fusion_expected=fusion_expected)


def _trace_dynamo_stage(job: ExportJob, model, slots: list, io, graph_name: str, stamp: bool) -> tuple:
    """(traced, weights, stamped): a layer-stamped trace where the model allows it, else every layer traced."""
    from lora_edge.export.exporter import trace_in_memory
    from lora_edge.export.hotswap import hotswap_graph_io
    from lora_edge.export.stamp import STAMP_DEPTH, NotStampable, trace_stamped

    def shallow_io(shallow_slots, context):
        return hotswap_graph_io(model, shallow_slots, context)[0]

    if stamp and job.task is Task.CAUSAL_LM:
        try:
            traced, weights = trace_stamped(model, slots, job.context, io, shallow_io, job.opset, graph_name)
            layers = len(io.output_names) // 2  # logits, then a key and a value per layer
            job.progress(f"  traced {STAMP_DEPTH} of {layers} layers, stamped the other {layers - STAMP_DEPTH} "
                         "(docs/ARCHITECTURE.md, layer stamping)")
            return traced, weights, True
        except NotStampable as exc:
            if exc.notable:
                job.progress(f"  tracing every layer: {exc}")
    traced, weights = trace_in_memory(io, job.opset, graph_name)
    return traced, weights, False


def _fusion_expected(job: ExportJob) -> dict:
    """PyTorch outputs for the checks of the fused graphs, per adapter and for the base (None), else {}."""
    if not job.fuse:
        return {}
    from lora_edge.export.fusion import pytorch_outputs

    expected = {name: pytorch_outputs(ref, job.context) for name, ref in job.references.items()}
    first = next(iter(job.references.values()))
    with first.disable_adapter():
        expected[None] = pytorch_outputs(first, job.context)
    return expected


def _verify(job: ExportJob, plan: TracePlan, path: Path, name: str, adapters: dict[str | None, Path | None]) -> dict:
    """Check the graph at ``path`` in ONE session, once per adapter (None: no adapter); return the diffs."""
    import tempfile

    from lora_edge.core.onnx_io import load_by_reference, session_file
    from lora_edge.export.exporter import check_agreement, run_verify_inputs
    from lora_edge.export.last_logits import last_row_checks
    from lora_edge.runtime.session import check_settings, create_session, load_lora_adapter

    diffs, model = {}, load_by_reference(path)
    # beside the file itself (an intermediate graph's is elsewhere than the bundle's link): hard links work there
    with tempfile.TemporaryDirectory(prefix=".verify-", dir=path.resolve().parent) as directory:
        # a few inputs, once: no prepacked copy of the weights, and those mapped from the file just written
        # instead of read into the session (SmolLM2 fp32: 1.55 GB -> 0.65 GB for the session, 1 s less)
        session = create_session(session_file(model, directory), check_settings())
        for adapter, adapter_file in adapters.items():
            loaded = load_lora_adapter(adapter_file) if adapter_file else None
            actual = run_verify_inputs(session, plan.verify_io, adapter=loaded)
            expected = plan.expected[adapter]
            last_expected, last_actual = last_row_checks(session, plan.verify_io, expected, loaded)
            label = f"{name} + {adapter}" if adapter_file else name
            against = "the base model (no adapter fed)" if adapter is None else "the PyTorch reference"
            diffs[adapter or "base"] = check_agreement(label, expected + last_expected, actual + last_actual,
                                                       job.tolerance, against,
                                                       relative=plan.verify_io.relative_tolerance)
        if job.remember_checks:
            _remember_check_outputs(session, model, path)
        del session
    return diffs


def _remember_check_outputs(session, model, path: Path) -> None:
    """Run a decoder graph's quantize-stage check feeds in its verification ``session`` and remember the outputs."""
    from lora_edge.runtime.feeds import decoder_check_feeds
    from lora_edge.runtime.session import remember_outputs, run

    if any(value.name.startswith("past_key_values.") for value in model.graph.input):
        feeds = decoder_check_feeds(model)
        remember_outputs(path, feeds, [run(session, values) for values in feeds])


@dataclass
class _Derived:
    """One graph derived from the trace: its record, the derived graph, what to verify it on."""

    record: GraphRecord
    derived: object  # export.forms.Derived: nodes + where each initializer comes from (no copy of the weights)
    checks: dict  # adapter name (None: no adapter) -> its .onnx_adapter file (hot-swap) or None


def write_forms(job: ExportJob, plan: TracePlan, forms: Sequence[Form], clock: Stopwatch) -> list[GraphRecord]:
    """Derive, verify and write every requested form from the one trace (docs/ARCHITECTURE.md, "The three forms").

    With ``job.fuse`` each graph is fused for the CPU in memory, the fused graph
    verified against PyTorch in one session and written once; where no fusion is
    kept, the graph is written as exported and verified then. Without, every
    graph is written first, then the trace is freed and each verified.
    """
    from lora_edge.export.exporter import EXTERNAL_DATA_BYTES
    from lora_edge.export.forms import find_branches
    from lora_edge.export.hotswap import LORA_A, LORA_B, TENSOR

    slots_by_module: dict[str, dict] = {}
    for slot in plan.slots:
        slots_by_module.setdefault(slot.module, {})[slot.kind] = slot.name
    pairs = [(kinds[LORA_A], kinds[LORA_B]) for kinds in slots_by_module.values() if LORA_A in kinds]
    heads = [slot.name for slot in plan.slots if slot.kind == TENSOR]
    branches = find_branches(plan.traced, pairs)
    weight_bytes = sum(len(init.raw_data) for init in plan.traced.graph.initializer) + \
        sum(array.nbytes for array in plan.weights.values())
    external = 1024 if weight_bytes > EXTERNAL_DATA_BYTES else None
    in_memory = job.fuse and external is None  # a graph with external data (over 1.8 GB) is not fused
    records, written = [], []
    for form in forms:
        for adapter in ([None] if form is Form.HOTSWAP else list(plan.tensors)):
            graph = _derive_graph(job, plan, form, adapter, (branches, heads, external), clock, in_memory)
            records.append(graph.record)
            if in_memory:
                _verify_fuse_write(job, plan, graph, clock)
            else:
                graph.derived = None
                written.append(graph)
                if job.fuse:
                    graph.record.extra["fusion"] = {"dropped": "graph has external data (over 1.8 GB): not fused"}
    plan.traced, plan.weights = None, {}  # the ONNX Runtime sessions below hold a copy of the weights each, one at a time
    release_freed_memory()
    # every graph is derived: nothing reads the model's tensors again, yet its mapped file stays resident
    # (SmolLM2-135M: 513 MB, a native holder) until its pages are dropped
    drop_mapped_pages(sorted(job.model_path.glob("*.safetensors")))
    for graph in written:
        with clock.stage(f"verify {graph.record.name}"):
            diffs = _verify(job, plan, job.staging / graph.record.file, graph.record.name, graph.checks)
            release_freed_memory()  # the session's
        _record_diffs(job, graph.record, diffs, clock)
    return records


def _derive_graph(job: ExportJob, plan: TracePlan, form: Form, adapter: str | None, layout: tuple,
                  clock: Stopwatch, in_memory: bool) -> _Derived:
    """Derive one form (for ``adapter``) from the trace; write it unless ``in_memory`` (fused first)."""
    from lora_edge.export.forms import derive, write_model
    from lora_edge.export.hotswap import ADAPTER_SUFFIX
    from lora_edge.runtime.adapter_layout import write_onnx_adapter

    branches, heads, external = layout
    name = GraphRecord.graph_name(form, Precision.FP32, adapter if job.several else None)
    path, files = job.graph_file(name), {}
    if job.intermediate is not None and external is None:  # written there; the bundle links to it until quantized
        path.parent.mkdir(parents=True, exist_ok=True)
        path.symlink_to(job.intermediate / path.name)
    with clock.stage(f"write {name}"):
        derived = derive(plan.traced, branches, heads, form.value, plan.tensors.get(adapter), plan.weights)
        if not in_memory:
            write_model(plan.traced, derived, path, external)
        if form is Form.HOTSWAP:
            files = {n: write_onnx_adapter(job.staging / ONNX_DIR / ADAPTER_HOTSWAP_DIR / f"{n}{ADAPTER_SUFFIX}",
                                           tensors) for n, tensors in plan.tensors.items()}
    extra = _graph_extra(plan.traced, derived, job.opset, exporter=plan.exporter,
                         export_seconds=clock.seconds(f"write {name}"))
    if form is Form.HOTSWAP:
        extra.update(adapter_files={n: job.relative(p) for n, p in files.items()},
                     adapter_inputs=[slot.name for slot in plan.slots])
        record = GraphRecord(name, job.relative(path), form, Precision.FP32, job.task.value,
                             adapters=list(plan.tensors), extra=extra)
        return _Derived(record, derived, {None: None, **files})
    record = GraphRecord(name, job.relative(path), form, Precision.FP32, job.task.value, adapter=adapter, extra=extra)
    return _Derived(record, derived, {adapter: None})


def _verify_fuse_write(job: ExportJob, plan: TracePlan, graph: _Derived, clock: Stopwatch) -> None:
    """Fuse the derived ``graph`` for the CPU in memory, write each candidate, keep the first that matches PyTorch.

    The fused graph is verified in the one session that checks it (every adapter,
    the base model for hot-swap graphs, the verify batches as they are and padded),
    its weights mapped from the file just written. Where no fusion is kept, the
    graph as exported is written from the trace over it and verified then, as
    without fusions.
    """
    from lora_edge.export.forms import derived_model, write_model
    from lora_edge.export.fusion import describe, fuse_for_cpu

    record, path = graph.record, job.graph_file(graph.record.name)
    with clock.stage(f"fuse {record.name}"):
        model = derived_model(plan.traced, graph.derived)
        record.extra["fusion"], diffs = fuse_for_cpu(model, record, job.staging, plan.fusion_expected,
                                                     job.context, job.tolerance, path)
        del model
        release_freed_memory()  # the sessions' and copies' memory
    job.progress(describe(record.name, record.extra["fusion"]))
    if diffs is None:
        with clock.stage(f"verify {record.name}"):
            write_model(plan.traced, graph.derived, path)
            diffs = _verify(job, plan, path, record.name, graph.checks)
            release_freed_memory()
    graph.derived = None
    _record_diffs(job, record, diffs, clock)


def _record_diffs(job: ExportJob, record: GraphRecord, diffs: dict, clock: Stopwatch) -> None:
    """Report a graph's verification and put its figures in the record."""
    job.progress(f"  {record.name}: max abs diff vs PyTorch " + ", ".join(f"{k} {v:.2g}" for k, v in diffs.items()))
    record.extra["max_abs_diff"] = max(diffs.values())
    if record.form is Form.HOTSWAP:
        record.extra["max_abs_diff_by_adapter"] = diffs
    # a fused graph is verified in its fuse stage
    record.extra["verify_seconds"] = clock.seconds(f"verify {record.name}") or clock.seconds(f"fuse {record.name}")


def export_forms(job: ExportJob, forms: Sequence[Form], clock: Stopwatch, exporter: str | None = None,
                 reload: Callable[[], dict] | None = None) -> list[GraphRecord]:
    """Trace once and write every form; a TorchScript trace that fails or drifts is redone with torch.export.

    A layer-stamped trace (``lora_edge.export.stamp``) whose graphs fail is redone
    tracing every layer. ``reload`` loads the references again (they are released
    after the trace).
    With ``job.fuse`` the fp32 graphs get the verified CPU fusions, checked
    against the PyTorch outputs computed before the trace (no reload).
    """
    from lora_edge.core.errors import ExportError
    from lora_edge.export.exporter import exporter_order

    exporters = [exporter] if exporter else exporter_order(job.task)
    attempts = [(name, True) for name in exporters]
    while attempts:
        name, stamp = attempts.pop(0)
        plan = None
        try:
            # frozen from the trace on: the references are freed by reference counting (MiniLM-L6 + PEFT: no
            # cycle), the tracer's garbage is young, and the full collection after the trace was 0.27-0.37 s
            with objects_frozen():
                plan = plan_and_trace(job, clock, name, stamp)  # the references released, the garbage collected
                return write_forms(job, plan, forms, clock)
        except ExportError as exc:
            if plan is not None and plan.stamped and reload is not None:  # layers the shallow trace could not tell apart
                attempts.insert(0, (name, False))
                job.progress(f"  the layer-stamped graph failed ({exc.what}); tracing every layer")
            elif not attempts or reload is None:
                raise
            else:
                job.progress(f"  the {name} trace failed ({exc.what}); tracing again with {attempts[0][0]}")
            with clock.stage("reload"):
                job.references.update(reload())
    raise AssertionError("unreachable")


def _check_names(adapters: Sequence[AdapterRef]) -> None:
    seen = set()
    for adapter in adapters:
        if adapter.name in seen:
            raise ConfigError(f"two adapters are named '{adapter.name}'", "--adapter",
                              "name them apart: --adapter NAME=DIR")
        seen.add(adapter.name)
    if not adapters:
        raise ConfigError("no adapter given", "--adapter", "pass --adapter DIR (repeatable)")


def _common_task(adapters: Sequence[AdapterRef], task: Task | None) -> Task:
    tasks = {adapter.name: adapter_task(read_adapter_config(adapter.path), adapter.path / ADAPTER_CONFIG)
             for adapter in adapters}
    chosen = task or next(iter(tasks.values()))
    for name, adapter_kind in tasks.items():
        if adapter_kind is not chosen:
            raise ConfigError(f"adapter '{name}' is for task {adapter_kind.value}, the bundle for {chosen.value}",
                              "--adapter", "export adapters of one task per bundle")
    return chosen


def _require_opset(opset: int | None) -> None:
    """Refuse an opset the exporter would not honour (it would write another one without a word)."""
    low, high = OPSET_RANGE
    if opset is not None and opset != 0 and not low <= opset <= high:
        raise ConfigError(f"opset {opset} cannot be exported", "--opset",
                          f"use an opset from {low} to {high}, or leave --opset out for the exporter's default")


def _copy_adapter(adapter: AdapterRef, target: Path) -> None:
    target.mkdir(parents=True)
    for name in ADAPTER_FILES:
        if (adapter.path / name).is_file():
            shutil.copy2(adapter.path / name, target / name)


def _adapter_record(adapter: AdapterRef, bundle_dir: str, labels: list[str] | None) -> AdapterRecord:
    data_file = adapter.path / DATA_RECORD
    return AdapterRecord(adapter.name, bundle_dir, source=str(adapter.path.resolve()),
                         sha256=directory_sha256(adapter.path, "adapter_*"),
                         lora_config=read_adapter_config(adapter.path), labels=labels,
                         data=json.loads(data_file.read_text()) if data_file.is_file() else None)


def _labels_of(reference: "PeftModel", task: Task) -> list[str] | None:
    if task is not Task.SEQ_CLS:
        return None
    id2label = reference.config.id2label
    return [id2label[i] for i in range(len(id2label))]


def _write_model_files(job: ExportJob, adapters: Sequence[AdapterRef]) -> None:
    """config.json, tokenizer files and label map(s) beside the graphs, so onnx/ stands on its own."""
    onnx_dir = job.staging / ONNX_DIR
    onnx_dir.mkdir(parents=True, exist_ok=True)
    first = next(iter(job.references.values()))
    first.get_base_model().config.save_pretrained(str(onnx_dir))
    job.context.tokenizer.save_pretrained(str(onnx_dir))
    make_portable(onnx_dir, getattr(first.get_base_model().config, "max_position_embeddings", None))
    first_labels = next(iter(job.labels.values()))
    if first_labels:
        LabelMap(tuple(first_labels)).save(onnx_dir)
    if job.several:
        for adapter in adapters:
            if job.labels[adapter.name]:
                write_json(onnx_dir / LABEL_MAPS_DIR / f"{adapter.name}.json",
                           LabelMap(tuple(job.labels[adapter.name])).to_json())


def _manifest(job: "ExportJob", model: str | Path, adapters: list[AdapterRef], dirs: dict[str, str],
              seed: int | None, recipe: dict | None, clock: Stopwatch, model_sha256: "Future[str]") -> Manifest:
    """The new bundle's manifest: versions, the model, the adapters, the graphs and the seconds per stage."""
    return Manifest(lora_edge_version=__version__, created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                    libraries=library_versions(), seed=seed,
                    model=ModelRecord(str(job.model_path), model_sha256.result(), job.task,
                                      str(model) == DEFAULT_MODEL),
                    adapters=[_adapter_record(a, dirs[a.name], job.labels[a.name]) for a in adapters],
                    graphs=job.records, recipe=recipe, export_stages=clock.stages)


def _new_job(model_path: Path, task: Task, references: dict[str, "PeftModel"], staging: Path, opset: int | None,
             tolerance: float, trust_remote_code: bool, progress: Progress) -> "ExportJob":
    """The export job over the loaded references (which it takes: the caller keeps no reference to them)."""
    first = next(iter(references.values()))
    context = ExportContext(task, load_tokenizer(model_path, trust_remote_code), first.get_base_model().config)
    return ExportJob(model_path, task, context, references,
                     {name: _labels_of(ref, task) for name, ref in references.items()}, staging,
                     opset, tolerance, trust_remote_code, progress)


# (bundle, precisions, options, progress=...) -> anything: lora_edge.quantize.quantizer.quantize_bundle
Quantize = Callable[..., object]


def _quantize_staged(staging: Path, precisions: list[Precision], options: QuantizeOptions | None, clock: "Stopwatch",
                     progress: Progress, quantize: "Quantize | None") -> None:
    """Quantize the finished fp32 bundle in its staging directory with the caller's quantizer."""
    if not precisions:
        return
    with clock.stage("quantize"), objects_frozen():
        release_freed_memory()
        quantize(staging, precisions, options, progress=progress)
    dataclasses.replace(Manifest.read(staging), export_stages=clock.stages).write(staging)


def _fp32_bytes(job: ExportJob, forms: Sequence[Form]) -> int:
    """About how many bytes the fp32 graphs of ``forms`` take (each graph: the base model's weights in fp32)."""
    first = next(iter(job.references.values()))
    weights = sum(p.numel() for p in first.get_base_model().parameters()) * 4
    graphs = sum(1 if form is Form.HOTSWAP else len(job.references) for form in set(forms))
    return weights * graphs


def _drop_fp32_graphs(staging: Path, task: Task) -> None:
    """Take the intermediate fp32 graphs (links) out of the bundle; what they were verified at goes to the
    records of the graphs quantized from them (``extra["source_verified"]``)."""
    manifest = Manifest.read(staging)
    sources = {g.name: g for g in manifest.graphs if g.precision is Precision.FP32}
    kept = [g for g in manifest.graphs if g.precision is not Precision.FP32]
    for record in kept:
        source = sources.get(record.source)
        if source is not None:
            record.extra["source_verified"] = {key: source.extra[key] for key in
                                               ("max_abs_diff", "max_abs_diff_by_adapter", "verify_seconds")
                                               if key in source.extra}
    for record in sources.values():
        (staging / record.file).unlink(missing_ok=True)
    dataclasses.replace(manifest, graphs=kept).write(staging)
    if task is Task.CAUSAL_LM:
        write_genai_config(staging, kept)


def _check_written(job: ExportJob, keep_fp32: bool) -> None:
    """Every written graph passes the ONNX checker; a causal LM keeping fp32 gets its genai_config.json."""
    for record in job.records:
        require_valid_graph(job.staging / record.file, record.name, ExportError)
    if job.task is Task.CAUSAL_LM and keep_fp32:
        write_genai_config(job.staging, job.records)  # onnxruntime-genai runs the graphs as they are


def _copy_adapters(job: ExportJob, adapters: Sequence[AdapterRef], staging: Path) -> dict[str, str]:
    """Copy each adapter into the staging bundle; returns {adapter name: its directory in the bundle}."""
    records_dirs = {}
    for adapter in adapters:
        records_dirs[adapter.name] = "adapter" if not job.several else f"adapters/{adapter.name}"
        _copy_adapter(adapter, staging / records_dirs[adapter.name])
    return records_dirs


def _model_digest(scratch: contextlib.ExitStack, model_path: Path) -> "Future[str]":
    """The manifest's digest of the model's weights, computed on a second thread while this one traces the model
    (reading and hashing release the GIL; SmolLM2-135M: 0.3 s; started during the load, it slowed the load by 0.2 s)."""
    return scratch.enter_context(ThreadPoolExecutor(1)).submit(directory_sha256, model_path)


def _configure(job: ExportJob, scratch: contextlib.ExitStack, forms: Sequence[Form], fuse: bool, quantized: bool,
               keep_fp32: bool) -> None:
    """What the job does beyond tracing and verifying: CPU fusions (classifiers, each fused graph checked against
    PyTorch again), check outputs remembered for the quantize stage (decoders to be quantized), and fp32 graphs
    as intermediates when the bundle keeps no fp32 (only the quantizer's sources)."""
    job.fuse = fuse and job.task is Task.SEQ_CLS
    job.remember_checks = quantized and job.task is Task.CAUSAL_LM
    scratch.callback(forget_outputs)
    if not keep_fp32:
        job.intermediate = scratch.enter_context(intermediate_directory(_fp32_bytes(job, forms), job.staging))


def export_bundle(model: str | Path, adapters: Sequence[AdapterRef], forms: Sequence[Form | str], out: Path,
                  precisions: Sequence[Precision | str] = (Precision.FP32,), opset: int | None = None,
                  force: bool = False, task: Task | str | None = None, tolerance: float = FP32_TOLERANCE,
                  seed: int | None = None, recipe: dict | None = None, trust_remote_code: bool = False,
                  quantize_options: QuantizeOptions | None = None, fuse: bool = True,
                  progress: Progress = stderr_lines, exporter: str | None = None,
                  quantize: "Quantize | None" = None) -> Path:
    """Export ``forms`` of ``model`` + each adapter into a new bundle at ``out``; returns ``out``.

    Every graph is checked against its PyTorch reference right after export
    (max abs diff <= ``tolerance``, else ExportError naming the graph). With
    precisions other than fp32, ``lora_edge.quantize.quantizer.quantize_bundle(bundle,
    precisions, quantize_options)`` (given as ``quantize`` by the caller: export
    does not import the later quantize stage) runs on the finished fp32 bundle
    before it is moved into place; when ``precisions`` has no fp32, the fp32
    graphs are intermediates (written to :func:`lora_edge.core.bundle.intermediate_directory`,
    verified as always, quantized, then left out of the bundle; the quantized
    graphs' records keep their verification as ``source_verified``). With ``fuse`` the fp32 encoder graphs get the verified
    CPU fusions (:mod:`lora_edge.export.fusion`). Nothing is left at ``out`` when
    any step fails; an existing ``out`` is replaced only with ``force``.

    The model is traced once (``exporter``: "torchscript" or "dynamo"; default the
    first that works, see ``lora_edge.export.exporter.EXPORTERS``) and every form derived
    from that trace; ``manifest.json`` records the seconds of each stage
    (``export_stages``).
    """
    forms = parse_choices(Form, list(forms), "--forms")  # members pass through; strings (Python callers) are parsed
    precisions = parse_choices(Precision, list(precisions), "--precisions")
    if quantize is None and any(p is not Precision.FP32 for p in precisions):
        raise ConfigError("precisions other than fp32 need a quantizer", "precisions",
                          "pass quantize=lora_edge.quantize.quantizer.quantize_bundle, or quantize the bundle later")
    adapters = list(adapters)
    _check_names(adapters)
    _require_opset(opset)
    opset = opset or None  # 0, as in recipes: the exporter's default
    model_path = resolve_model_path(model)
    task = _common_task(adapters, Task.parse(task) if task else None)
    clock = Stopwatch(progress)
    quantized = [p for p in precisions if p is not Precision.FP32]
    keep_fp32 = Precision.FP32 in precisions or not quantized
    with atomic_directory(Path(out), force) as staging, contextlib.ExitStack() as scratch:
        progress(f"loading {model_path.name} with {len(adapters)} adapter(s)")

        def load() -> dict[str, "PeftModel"]:
            return {a.name: load_reference(model_path, a, task, trust_remote_code) for a in adapters}

        with clock.stage("load"):
            job = _new_job(model_path, task, load(), staging, opset, tolerance, trust_remote_code, progress)
        model_sha256 = _model_digest(scratch, model_path)
        _configure(job, scratch, forms, fuse, bool(quantized), keep_fp32)
        records_dirs = _copy_adapters(job, adapters, staging)
        _write_model_files(job, adapters)
        job.records.extend(export_forms(job, list(dict.fromkeys(forms)), clock, exporter, load))
        _check_written(job, keep_fp32)
        _manifest(job, model, adapters, records_dirs, seed, recipe, clock, model_sha256).write(staging)
        _quantize_staged(staging, quantized, quantize_options, clock, progress, quantize)
        if not keep_fp32:
            _drop_fp32_graphs(staging, task)
    progress(f"wrote {out}")
    return Path(out)
