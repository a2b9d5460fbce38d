"""Quantize a bundle's fp32 graphs to fp16, int8 (dynamic or static) and int4, keeping LoRA pairs float.

For each precision, every fp32 graph of the bundle gets a sibling
``onnx/<form>[.<adapter>].<precision>.onnx`` and a manifest record whose
``source`` names the fp32 graph. A graph is first fused for where it will run
(:mod:`lora_edge.export.prepare`, each rewrite verified), then quantized by the
precision's quantizer (:data:`lora_edge.quantize.methods.QUANTIZERS`). In branched
and hot-swap graphs the LoRA MatMuls, and weights fed at run time, stay float
(:mod:`lora_edge.quantize.lora`), so ``.onnx_adapter`` files keep working with
the quantized base graph.

All-or-nothing: graphs are written into a temporary directory inside the bundle
and moved into place, and the manifest updated, only when every graph succeeded.
"""

from __future__ import annotations

import dataclasses
import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

from lora_edge.core.bundle import (MANIFEST_FILE, ONNX_DIR, atomic_file, bundle_lock, load_graph, parse_choices, require_bundle, staging_directory)
from lora_edge.core.choices import Precision
from lora_edge.core.console import stderr_lines
from lora_edge.core.errors import ConfigError, LoraEdgeError, QuantizationError, first_line
from lora_edge.core.manifest import GraphRecord, Manifest, add_graphs
from lora_edge.core.choices import Task
# The settings of this stage (defined with the other stage configs; imported from here too).
from lora_edge.core.recipe import QuantizeOptions

if TYPE_CHECKING:
    import numpy as np
    import onnx

    from lora_edge.export.prepare import FusionPlan

Feeds = list[dict[str, "np.ndarray"]]
# Keys of a fp32 record's "extra" that describe the quantized graph too.
SHARED_EXTRA = ("opset", "inputs", "outputs", "adapter_files", "adapter_inputs")


@dataclass
class QuantizeResult:
    """One quantized graph: where it is and what was done to it."""

    path: Path
    precision: Precision
    details: dict
    fusion: dict
    linears: dict
    seconds: float
    extra: dict = field(default_factory=dict)
    staged_adapters: list = field(default_factory=list)  # (staged file, its path in the bundle): moved with the graph

    def to_extra(self) -> dict:
        """The manifest ``extra`` of the graph's record."""
        return {**self.extra, "quantization": self.details, "fusion": self.fusion, "linears": self.linears,
                "size_bytes": self.path.stat().st_size, "quantize_seconds": round(self.seconds, 2)}



def _node_in_message(message: str) -> str | None:
    import re

    match = (re.search(r"Name:'([^']+)'", message) or re.search(r"Node \(([^)]+)\)", message)
             or re.search(r"node name: ([^)\s]+)", message))
    return match.group(1) if match else None


def _quantizer_failure(src: Path, precision: Precision, exc: BaseException) -> QuantizationError:
    """A QuantizationError naming the node: from the quantizer's message, else from running the source graph."""
    from lora_edge.runtime.feeds import sample_encoder_feeds
    from lora_edge.runtime.session import graph_outputs

    node = _node_in_message(str(exc))
    if node is None:  # the quantizer rarely names nodes; ORT does when the source graph itself is broken
        try:
            import onnx

            feeds = sample_encoder_feeds(onnx.load(str(src), load_external_data=False))
            graph_outputs(src, feeds if "input_ids" in feeds else None)
        except Exception as source_exc:
            node = _node_in_message(str(source_exc))
            if node:
                return QuantizationError(f"the fp32 graph fails at node '{node}' ({first_line(source_exc, 300)})", src,
                                         "re-export the graph (lora-edge export --force)")
    return QuantizationError(f"{precision.value} quantization failed" + (f" at node '{node}'" if node else "")
                             + f" ({first_line(exc, 300)})", src,
                             "choose another precision for this graph, or report the node")


def _check_runs(path: Path, model: "onnx.ModelProto", precision: Precision) -> None:
    """Load the quantized graph and run it on a sample batch; a failure names the node ORT stopped at."""
    import numpy as np

    from lora_edge.runtime.feeds import complete_feeds, sample_encoder_feeds
    from lora_edge.runtime.session import graph_outputs

    feeds = sample_encoder_feeds(model)
    try:
        feeds = complete_feeds(model, feeds) if "input_ids" in feeds else {}
    except QuantizationError:
        feeds = {}  # inputs this module cannot build: loading the graph is all that is checked
    try:
        outputs = graph_outputs(path, feeds or None)
    except Exception as exc:
        node = _node_in_message(str(exc))
        raise QuantizationError(f"the {precision.value} graph does not run" + (f" at node '{node}'" if node else "")
                                + f" ({first_line(exc, 300)})", path,
                                "choose another precision for this graph, or report the node") from None
    if not all(np.isfinite(out).all() for out in outputs if out.dtype.kind == "f"):
        raise QuantizationError(f"the {precision.value} graph outputs NaN or Inf", path,
                                "choose another precision (fp16 overflow?) or report the model")


def _fused_at_export(source_fusion: dict | None, precision: Precision) -> bool:
    """True when the source graph was fused for the CPU at export and the target runs on the CPU too.

    Fusing such a graph again gives the same graph, byte for byte (the rewrites
    find their blocks done), at the cost of ORT's optimizer and six sessions.
    """
    from lora_edge.quantize.methods import GPU_PRECISIONS

    return bool(source_fusion) and not source_fusion.get("dropped") and precision not in GPU_PRECISIONS


def _prepared(src: Path, precision: Precision, options: QuantizeOptions, task: Task, plan: "FusionPlan | None",
              source_fusion: dict | None = None):
    """(the float graph fused for where it will run, the fusion report, a tied embedding to share or None)."""
    from lora_edge.core.onnx_io import resolve_references
    from lora_edge.export.cpu_fusion import name_all_nodes
    from lora_edge.quantize.methods import GPU_PRECISIONS
    from lora_edge.export.prepare import FusionReport, fuse_graph
    from lora_edge.runtime.session import release_freed_memory

    model = _load_decoder(src) if task is Task.CAUSAL_LM else load_graph(src)
    name_all_nodes(model)
    fusion = FusionReport()
    if options.fuse and plan is not None and task is Task.SEQ_CLS:
        if _fused_at_export(source_fusion, precision):
            fusion = FusionReport.of_export(source_fusion)
        else:
            model, fusion = fuse_graph(model, dataclasses.replace(plan, for_gpu=precision in GPU_PRECISIONS),
                                       str(src))
    tied = None
    if task is Task.CAUSAL_LM:
        from lora_edge.quantize.decoder import config_beside, find_tied_embedding, fuse_decoder

        if options.fuse and precision not in GPU_PRECISIONS:
            model, fusion = fuse_decoder(model, str(src), config_beside(src))
            name_all_nodes(model)  # a graph the rewrites did not keep is the file again
        release_freed_memory()
        tied = find_tied_embedding(model) if precision is Precision.INT4 else None
        if precision is not Precision.INT4:  # (int4 reads the weights it folds from the file)
            resolve_references(model)
    return model, fusion, tied


def _load_decoder(src: Path) -> "onnx.ModelProto":
    """A decoder graph with its large weights left in the file (its fusion checks' sessions map them from there)."""
    from lora_edge.core.onnx_io import load_by_reference

    try:
        return load_by_reference(src)
    except (OSError, ValueError, IndexError, KeyError):  # not a readable graph: load_graph names the problem
        return load_graph(src)


def quantize_graph(src: str | Path, dst: str | Path, precision: Precision | str,
                   options: QuantizeOptions | None = None, *, task: Task | str = Task.SEQ_CLS,
                   plan: "FusionPlan | None" = None, calibration: Feeds | Callable[[], Feeds] | None = None,
                   source_fusion: dict | None = None) -> QuantizeResult:
    """Quantize the fp32 graph ``src`` to ``precision`` and write it to ``dst`` (atomically).

    ``plan`` (heads, model type) enables the fusions; ``calibration`` gives
    int8-static its batches (feed dicts, or a callable returning them);
    ``source_fusion`` is what export recorded of fusing ``src`` (its record's
    ``fusion``): a graph fused there for the CPU is not fused again for CPU
    precisions. LoRA MatMuls and run-time-fed weights stay float. Raises
    QuantizationError naming the node when the quantizer fails or the result does not run.
    """
    from lora_edge.quantize.lora import linear_roles
    from lora_edge.quantize.methods import QUANTIZERS, QuantizeJob, quiet_quantizers
    from lora_edge.runtime.session import release_freed_memory

    started = time.perf_counter()
    precision, task = Precision(precision), Task.parse(task)
    options = options or QuantizeOptions()
    quantizer = QUANTIZERS.get(precision)
    if quantizer is None:
        raise ConfigError(f"{precision.value} is not made by quantizing", "--precisions",
                          f"use one or more of: {', '.join(p.value for p in QUANTIZERS)}")
    if precision is Precision.INT8_STATIC and calibration is None:
        raise ConfigError("int8-static needs calibration batches", "--calibration",
                          "pass --calibration FILE (JSONL/CSV with a text column)")
    src, dst = Path(src), Path(dst)
    model, fusion, tied = _prepared(src, precision, options, task, plan, source_fusion)
    roles = linear_roles(model)
    feeds_of = calibration if callable(calibration) or calibration is None else (lambda: list(calibration))
    with atomic_file(dst) as staging:
        job = QuantizeJob(model, staging, roles, options, feeds_of, tied)
        del model  # the job owns it now: a quantizer may release it before ORT loads its own copy
        try:
            with quiet_quantizers():
                details = quantizer(job)
        except LoraEdgeError:  # bad calibration data, missing files: already one line for the user
            raise
        except Exception as exc:
            raise _quantizer_failure(src, precision, exc) from None
        del job
        release_freed_memory()
        found = _checked(staging, src, dst.stem, precision, tied, details)
    return QuantizeResult(dst, precision, details, fusion.to_json(), found.to_json(),
                          time.perf_counter() - started)


def _checked(staging: Path, src: Path, name: str, precision: Precision, tied, details: dict):
    """Put the quantized graph at ``staging`` in ONNX-spec order, check it, share a tied embedding; its inventory.

    The graph is loaded once: ORT's quantizers reorder nodes and leave stale
    types, so it is conformed and rewritten, then checked (onnx.checker, full),
    then its LoRA MatMuls must be float and it must run on a sample batch.
    """
    import onnx

    from lora_edge.core.onnx_spec import conform, require_valid_graph
    from lora_edge.quantize.lora import inventory

    quantized = onnx.load(str(staging))
    if any(conform(quantized).values()):
        onnx.save(quantized, str(staging))
    require_valid_graph(staging, name, QuantizationError)
    if tied is not None and "tied_embedding" not in details:  # (int4 shares it as it quantizes)
        from lora_edge.quantize.decoder import share_tied_embedding

        if share_tied_embedding(quantized, tied):
            onnx.save(quantized, str(staging))
            details["tied_embedding"] = "shared with the quantized LM head"
    found = inventory(quantized)
    if found.quantized_lora():
        raise QuantizationError(f"a LoRA MatMul was quantized ({found.quantized_lora()[0]})", src,
                                "report this: LoRA pairs must stay float")
    _check_runs(staging, quantized, precision)
    return found


def _load_texts(bundle: Path, record: GraphRecord, manifest: Manifest, options: QuantizeOptions,
                task: Task) -> list[str]:
    """Calibration texts: --calibration, else the data recorded with the graph's adapter (or the first that has some)."""
    from lora_edge.core.data import DataFiles, read_examples

    if options.calibration is not None:
        texts = [example.text for example in read_examples(options.calibration, task)]
    else:
        wanted = [a for a in manifest.adapters if a.name == record.adapter] + list(manifest.adapters)
        data = next((DataFiles.from_json(a.data) for a in wanted if a.data), None)
        if data is None:
            raise ConfigError("int8-static needs calibration data and the bundle's adapters record none",
                              "--calibration", "pass --calibration FILE (JSONL/CSV with a text column), or export "
                                               "an adapter trained by `lora-edge train` (it records its data)")
        texts = [example.text for example in data.load(task)["train"]]
    random.Random(0).shuffle(texts)  # files are often grouped by label: draw across all of them
    return texts[:options.calib_size]


def calibration_for(bundle: Path, record: GraphRecord, options: QuantizeOptions,
                    manifest: Manifest | None = None) -> Callable[[], Feeds]:
    """A callable building int8-static feed batches for a bundle's graph (tokenized with the bundle's tokenizer).

    Texts come from ``options.calibration``, else from the data recorded with the
    graph's adapter; the callable raises ConfigError when there are none.
    """
    manifest = manifest or Manifest.read(bundle)
    graph = bundle / record.file

    def build() -> Feeds:
        from lora_edge.core.data import calibration_batches
        from lora_edge.runtime.feeds import complete_feeds
        from lora_edge.core.models import load_tokenizer

        task = record.task
        tokenizer_dir = bundle / ONNX_DIR if (bundle / ONNX_DIR / "tokenizer_config.json").is_file() \
            else Path(manifest.model.path)
        tokenizer = load_tokenizer(tokenizer_dir)
        texts = _load_texts(bundle, record, manifest, options, task)
        model = load_graph(graph, load_external_data=False)
        return [complete_feeds(model, {k: v.numpy() for k, v in batch.items()})
                for batch in calibration_batches(tokenizer, texts, limit=options.calib_size)]

    return build


def fusion_plan_for(bundle: Path, manifest: Manifest | None = None) -> "FusionPlan | None":
    """Heads, width and model type for the fusions, from the bundle's config.json (else the model's)."""
    from lora_edge.export.prepare import FusionPlan

    manifest = manifest or Manifest.read(bundle)
    for config in (bundle / ONNX_DIR / "config.json", manifest.model.config_file()):
        if config.is_file():
            return FusionPlan.from_config(json.loads(config.read_text()))
    return None


def quantized_name(source: GraphRecord, precision: Precision) -> str:
    """``merged.intent.fp32`` -> ``merged.intent.int8-dynamic``."""
    return f"{source.name.removesuffix('.' + Precision.FP32.value)}.{precision.value}"


def quantize_bundle(bundle: str | Path, precisions: Sequence[Precision | str], options: QuantizeOptions | None = None,
                    progress: Callable[[str], None] = stderr_lines, **option_fields) -> list[GraphRecord]:
    """Quantize every fp32 graph of ``bundle`` to each of ``precisions``; return the new graph records.

    ``option_fields`` build a :class:`QuantizeOptions` when ``options`` is not
    given. Nothing in the bundle changes unless every graph succeeds.
    """
    bundle = require_bundle(Path(bundle))
    options = options or QuantizeOptions(**option_fields)
    precisions = [p for p in dict.fromkeys(parse_choices(Precision, list(precisions), "--precisions"))
                  if p is not Precision.FP32]
    if not precisions:
        raise ConfigError("fp32 graphs are made by export, not by quantize", "--precisions",
                          "use one or more of: fp16, int8-dynamic, int8-static, int4")
    with bundle_lock(bundle, option="BUNDLE"):  # one writer per bundle: a second quantize or export fails clearly
        return _quantize_locked(bundle, precisions, options, progress)


def _quantize_locked(bundle: Path, precisions: list[Precision], options: QuantizeOptions,
                     progress: Callable[[str], None]) -> list[GraphRecord]:
    """:func:`quantize_bundle`'s work, under the bundle's lock: graphs are staged in onnx/, then renamed."""
    manifest = Manifest.read(bundle)
    sources = [g for g in manifest.graphs if g.precision is Precision.FP32]
    if not sources:
        raise QuantizationError("the bundle has no fp32 graph to quantize", bundle / MANIFEST_FILE,
                                "export one first: lora-edge export ... --precisions fp32")
    from lora_edge.runtime.session import release_freed_memory

    plan = fusion_plan_for(bundle, manifest)
    progress(f"quantizing {len(sources)} fp32 graph(s) to {', '.join(p.value for p in precisions)}")
    records, results = [], []
    with staging_directory(bundle / ONNX_DIR / "quantize", "BUNDLE") as staging:
        for precision in precisions:
            for source in sources:
                name = quantized_name(source, precision)
                graph = bundle / source.file
                calibration = calibration_for(bundle, source, options, manifest) \
                    if precision is Precision.INT8_STATIC else None
                result = quantize_graph(graph, staging / f"{name}.onnx", precision, options, task=source.task,
                                        plan=plan, calibration=calibration, source_fusion=source.extra.get("fusion"))
                release_freed_memory()  # the next graph's copies then fit in memory the OS has back
                result.extra = {key: source.extra[key] for key in SHARED_EXTRA if key in source.extra}
                result.staged_adapters = packed_adapter_files(bundle, result, name, staging)
                weights = "fp16 weights" if precision is Precision.FP16 else \
                    f"{result.linears.get('quantized', 0)} linears quantized"
                progress(f"  {name}: {weights}, {result.linears.get('float_lora', 0)} LoRA MatMuls float, "
                         f"{result.fusion.get('attention', 0)} attention blocks fused, {result.seconds:.1f} s")
                results.append((name, result))
                records.append(GraphRecord(name, f"{ONNX_DIR}/{name}.onnx", source.form, precision, source.task,
                                           adapter=source.adapter, adapters=list(source.adapters),
                                           source=source.name, extra={}))
        for (name, result), record in zip(results, records):
            final = bundle / record.file
            result.path.replace(final)
            result.path = final
            for staged, relative in result.staged_adapters:
                staged.replace(bundle / relative)
            record.extra = result.to_extra()
        add_graphs(bundle, records)
    return records




def packed_adapter_files(bundle: Path, result: QuantizeResult, name: str, staging: Path) -> list[tuple[Path, str]]:
    """Write the bundle's adapters packed for a graph with packed LoRA inputs (runtime/packed_lora.py) into ``staging``.

    The graph's ``adapter_files`` then name these files (``onnx/adapters/<adapter>.<graph>.onnx_adapter``), so
    every run by adapter name, ONNX Runtime's own adapter API included, feeds what the graph takes; its
    ``adapter_inputs`` name the packed inputs. Returns (staged file, path in the bundle) pairs; [] for other graphs.
    """
    import onnx

    from lora_edge.runtime.adapter_layout import write_packed_adapter
    from lora_edge.runtime.packed_lora import member_names, model_packs

    if not result.extra.get("adapter_files") or not result.fusion.get("packed_lora"):
        return []
    packs = model_packs(onnx.load(str(result.path), load_external_data=False))
    if not packs:  # (a branched graph packs stored pairs: no inputs)
        return []
    staged, files = [], {}
    for adapter, relative in result.extra["adapter_files"].items():
        files[adapter] = f"{ONNX_DIR}/adapters/{adapter}.{name}.onnx_adapter"
        staged.append((write_packed_adapter(packs, bundle / relative, staging / f"{adapter}.{name}.onnx_adapter"),
                       files[adapter]))
    gone = member_names(packs)
    inputs = [name for name in result.extra.get("adapter_inputs", []) if name not in gone]
    result.extra = {**result.extra, "adapter_files": files,
                    "adapter_inputs": inputs + [name for pack in packs for name in (pack.a, pack.b)]}
    return staged


def format_records(records: list[GraphRecord], as_json: bool = False) -> str:
    """The quantized graphs as a table (name, size, linears quantized / LoRA float, fused blocks) or JSON."""
    if as_json:
        return json.dumps([record.to_json() for record in records], indent=2)
    rows = [("graph", "file", "MB", "quantized linears", "float LoRA", "fused attention")]
    for record in records:
        extra = record.extra
        rows.append((record.name, record.file, f"{extra.get('size_bytes', 0) / 1e6:.1f}",
                     str(extra.get("linears", {}).get("quantized", 0)),
                     str(extra.get("linears", {}).get("float_lora", 0)),
                     str(extra.get("fusion", {}).get("attention", 0))))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows)
