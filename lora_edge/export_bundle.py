"""Write an export bundle: the deployment forms of one base model with one or more adapters.

``export_bundle`` loads the PyTorch reference (base + adapter, unmerged) of every
adapter, exports the requested forms, verifies each graph against its reference
right after export, and writes (atomically: a temporary sibling renamed at the end)::

    <out>/manifest.json
    <out>/adapter/ (one adapter) or <out>/adapters/<name>/   PEFT copies
    <out>/onnx/merged[.<name>].fp32.onnx  branched[.<name>].fp32.onnx
    <out>/onnx/hotswap.fp32.onnx + onnx/adapters/<name>.onnx_adapter
    <out>/onnx/config.json, tokenizer files, label_map.json (+ label_maps/<name>.json with several adapters)
    <out>/onnx/genai_config.json (causal LM: onnxruntime-genai runs the graphs as they are)

so that ``onnx/`` can be used on its own. Precisions other than fp32 are handed
to ``lora_edge.quantize.quantize_bundle`` once the fp32 graphs exist.
"""

from __future__ import annotations

import json
import shutil
import sys
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

from lora_edge import __version__
from lora_edge.adapters import (ADAPTER_CONFIG, ADAPTER_WEIGHTS, DATA_RECORD, AdapterRef, adapter_task,
                                load_reference, read_adapter_config)
from lora_edge.bundle import (MANIFEST_FILE, ONNX_DIR, Form, GraphRecord, Precision, atomic_directory,
                              library_versions, load_graph, parse_choices, write_json)
from lora_edge.data import LABEL_MAP_FILE, LabelMap
from lora_edge.errors import ConfigError, ExportError
from lora_edge.exporter import FP32_TOLERANCE, ExportContext, export_and_verify
from lora_edge.genai_config import write_genai_config
from lora_edge.models import (DEFAULT_MODEL, Task, directory_sha256, load_base_model, load_tokenizer,
                              resolve_model_path)
from lora_edge.onnx_spec import require_valid_graph
from lora_edge.tokenizer import make_portable

if TYPE_CHECKING:
    from peft import PeftModel

# Files of an adapter directory copied into the bundle (never training checkpoints or pickles).
ADAPTER_FILES = (ADAPTER_CONFIG, ADAPTER_WEIGHTS, LABEL_MAP_FILE, DATA_RECORD, "README.md")
ADAPTER_HOTSWAP_DIR = "adapters"  # under onnx/: the .onnx_adapter files
LABEL_MAPS_DIR = "label_maps"     # under onnx/: one label map per adapter when a bundle has several
# Opsets torch's ONNX exporter writes as asked: below 18 it silently writes 18, above 23 it has no translations.
OPSET_RANGE = (18, 23)


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


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
    progress: Callable[[str], None] = _stderr
    records: list[GraphRecord] = field(default_factory=list)

    @property
    def several(self) -> bool:
        """True when the bundle has several adapters (graph names then carry the adapter's name)."""
        return len(self.references) > 1

    def graph_file(self, name: str) -> Path:
        """Absolute path of graph ``name`` inside the staging bundle."""
        return self.staging / ONNX_DIR / f"{name}.onnx"

    def relative(self, path: Path) -> str:
        """``path`` relative to the bundle, as manifests record files."""
        return Path(path).relative_to(self.staging).as_posix()


def _graph_extra(path: Path, opset: int | None = None, **values) -> dict:
    """Manifest extras of a graph file: opset, input/output names, low-rank MatMul pairs, plus ``values``.

    Raises ExportError when the graph's opset is not the ``opset`` asked for (never silently another).
    """
    from lora_edge.exporter import low_rank_pairs

    model = load_graph(path, load_external_data=False)
    initializers = {init.name for init in model.graph.initializer}
    written = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if opset and written != opset:
        raise ExportError(f"the exporter wrote opset {written}, not the {opset} asked for", "--opset",
                          f"use an opset from {OPSET_RANGE[0]} to {OPSET_RANGE[1]}, or leave --opset out")
    return {"opset": written,
            "inputs": [i.name for i in model.graph.input if i.name not in initializers],
            "outputs": [o.name for o in model.graph.output], "low_rank_pairs": len(low_rank_pairs(model)),
            **values}


def _export_per_adapter(job: ExportJob, form: Form, make: Callable[["PeftModel"], object]) -> list[GraphRecord]:
    records = []
    for adapter, reference in job.references.items():
        name = GraphRecord.graph_name(form, Precision.FP32, adapter if job.several else None)
        result = export_and_verify(make(reference), reference, job.context, job.graph_file(name), name,
                                   job.opset, job.tolerance, job.progress)
        extra = _graph_extra(result.path, job.opset, max_abs_diff=result.max_abs_diff,
                             export_seconds=round(result.seconds, 2))
        records.append(GraphRecord(name, job.relative(result.path), form, Precision.FP32, job.task.value,
                                   adapter=adapter, extra=extra))
    return records


def export_merged(job: ExportJob) -> list[GraphRecord]:
    """One merged graph per adapter (B·A folded into W)."""
    from lora_edge.merge import merge_adapter

    return _export_per_adapter(job, Form.MERGED, merge_adapter)


def export_branched(job: ExportJob) -> list[GraphRecord]:
    """One branched graph per adapter (explicit low-rank pairs named lora_A / lora_B)."""
    from lora_edge.merge import branch_adapter

    return _export_per_adapter(job, Form.BRANCHED, branch_adapter)


def export_hotswap_form(job: ExportJob) -> list[GraphRecord]:
    """One hot-swap graph for all adapters, plus one .onnx_adapter file per adapter."""
    from lora_edge.hotswap import export_hotswap

    name = GraphRecord.graph_name(Form.HOTSWAP, Precision.FP32)
    first = next(iter(job.labels.values()))
    base = load_base_model(job.model_path, job.task, labels=first, trust_remote_code=job.trust_remote_code)
    result = export_hotswap(base, job.references, job.context, job.graph_file(name),
                            job.staging / ONNX_DIR / ADAPTER_HOTSWAP_DIR, name, job.opset, job.tolerance,
                            job.progress)
    extra = _graph_extra(result.graph, job.opset, max_abs_diff=max(result.max_abs_diff.values()),
                         max_abs_diff_by_adapter=result.max_abs_diff, export_seconds=round(result.seconds, 2),
                         adapter_files={n: job.relative(p) for n, p in result.adapter_files.items()},
                         adapter_inputs=[slot.name for slot in result.slots])
    return [GraphRecord(name, job.relative(result.graph), Form.HOTSWAP, Precision.FP32, job.task.value,
                        adapters=list(job.references), extra=extra)]


FORM_EXPORTERS: dict[Form, Callable[[ExportJob], list[GraphRecord]]] = {
    Form.MERGED: export_merged,
    Form.BRANCHED: export_branched,
    Form.HOTSWAP: export_hotswap_form,
}


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


def _adapter_record(adapter: AdapterRef, bundle_dir: str, labels: list[str] | None) -> dict:
    data_file = adapter.path / DATA_RECORD
    return {"name": adapter.name, "source": str(adapter.path.resolve()),
            "sha256": directory_sha256(adapter.path, "adapter_*"), "bundle_dir": bundle_dir,
            "lora_config": read_adapter_config(adapter.path), "labels": labels,
            "data": json.loads(data_file.read_text()) if data_file.is_file() else None}


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


def export_bundle(model: str | Path, adapters: Sequence[AdapterRef], forms: Sequence[Form | str], out: Path,
                  precisions: Sequence[Precision | str] = (Precision.FP32,), opset: int | None = None,
                  force: bool = False, task: Task | str | None = None, tolerance: float = FP32_TOLERANCE,
                  seed: int | None = None, recipe: dict | None = None, trust_remote_code: bool = False,
                  quantize_options: dict | None = None, fuse: bool = True,
                  progress: Callable[[str], None] = _stderr) -> Path:
    """Export ``forms`` of ``model`` + each adapter into a new bundle at ``out``; returns ``out``.

    Every graph is checked against its PyTorch reference right after export
    (max abs diff <= ``tolerance``, else ExportError naming the graph). With
    precisions other than fp32, ``lora_edge.quantize.quantize_bundle(bundle,
    precisions, **quantize_options)`` runs on the finished fp32 bundle before it
    is moved into place. With ``fuse`` the fp32 encoder graphs get the verified
    CPU fusions (:mod:`lora_edge.export_fusion`). Nothing is left at ``out`` when
    any step fails; an existing ``out`` is replaced only with ``force``.
    """
    forms = parse_choices(Form, [Form(f).value if isinstance(f, Form) else f for f in forms], "--forms")
    precisions = parse_choices(Precision, [Precision(p).value if isinstance(p, Precision) else p
                                           for p in precisions], "--precisions")
    adapters = list(adapters)
    _check_names(adapters)
    _require_opset(opset)
    opset = opset or None  # 0, as in recipes: the exporter's default
    model_path = resolve_model_path(model)
    task = _common_task(adapters, Task.parse(task) if task else None)
    with atomic_directory(Path(out), force) as staging:
        progress(f"loading {model_path.name} with {len(adapters)} adapter(s)")
        references = {a.name: load_reference(model_path, a, task, trust_remote_code) for a in adapters}
        first = next(iter(references.values()))
        context = ExportContext(task, load_tokenizer(model_path, trust_remote_code), first.get_base_model().config)
        job = ExportJob(model_path, task, context, references,
                        {name: _labels_of(ref, task) for name, ref in references.items()}, staging,
                        opset, tolerance, trust_remote_code, progress)
        records_dirs = {}
        for adapter in adapters:
            records_dirs[adapter.name] = "adapter" if not job.several else f"adapters/{adapter.name}"
            _copy_adapter(adapter, staging / records_dirs[adapter.name])
        _write_model_files(job, adapters)
        for form in dict.fromkeys(forms):
            job.records.extend(FORM_EXPORTERS[form](job))
        if fuse:  # CPU fusions, each fused graph checked against PyTorch (lora_edge.export_fusion)
            from lora_edge.export_fusion import fuse_exported_graphs

            fuse_exported_graphs(job.records, staging, references, context, tolerance, progress)
        for record in job.records:
            require_valid_graph(staging / record.file, record.name, ExportError)
        if task is Task.CAUSAL_LM:
            write_genai_config(staging, job.records)  # onnxruntime-genai runs the graphs as they are
        manifest = {
            "lora_edge_version": __version__,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "libraries": library_versions(),
            "seed": seed,
            "model": {"path": str(model_path), "sha256": directory_sha256(model_path), "task": task.value,
                      "default": str(model) == DEFAULT_MODEL},
            "adapters": [_adapter_record(a, records_dirs[a.name], job.labels[a.name]) for a in adapters],
            "graphs": [record.to_json() for record in job.records],
            "recipe": recipe,
        }
        write_json(staging / MANIFEST_FILE, manifest)
        quantized = [p for p in precisions if p is not Precision.FP32]
        if quantized:
            from lora_edge.quantize import quantize_bundle

            quantize_bundle(staging, quantized, progress=progress, **(quantize_options or {}))
    progress(f"wrote {out}")
    return Path(out)
