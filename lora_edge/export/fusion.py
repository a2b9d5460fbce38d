"""Fuse the exported fp32 encoder graphs for the CPU, and keep a fused graph only where it matches PyTorch.

Right after export, each fp32 sequence-classification graph of a bundle gets
the rewrites of :func:`lora_edge.export.prepare.fuse_graph` (attention as one
MultiHeadAttention per layer with the unmasked kernel for unpadded batches,
residual sums kept out of ORT's slow CPU SkipLayerNormalization, LoRA pairs on
one input sharing their A MatMul, the last layer computed for the pooled first
token only, padding trimmed to the last attended column).
They took merged fp32 from 1.00x to 0.77x of the dynamo-exported peer's fp32
graph, and a short request padded to 128 runs at the cost of its real tokens
(benchmarks/README.md). The fused graph is then run on the exporter's verify
batches, and on the same batches padded to the export length, and compared with
the PyTorch reference of each adapter; one that drifts beyond the export
tolerance is not kept (the graph stays as exported, and the manifest says why).
``export --no-fuse`` skips the step.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import TYPE_CHECKING

from lora_edge.core.console import Progress

if TYPE_CHECKING:
    import torch

    from lora_edge.export.exporter import ExportContext, GraphIO
    from lora_edge.core.manifest import GraphRecord


def padded_inputs(io: "GraphIO", length: int, pad_id: int) -> list[tuple["torch.Tensor", ...]]:
    """``io.verify_inputs`` padded at the end to ``length`` columns (ids: ``pad_id``, masks and types: 0)."""
    import torch

    padded = []
    for inputs in io.verify_inputs:
        batch = []
        for name, tensor in zip(io.input_names, inputs):
            extra = length - tensor.shape[1]
            value = pad_id if name == "input_ids" else 0
            batch.append(torch.cat([tensor, torch.full((tensor.shape[0], max(0, extra)), value,
                                                       dtype=tensor.dtype)], dim=1))
        padded.append(tuple(batch))
    return padded


def _checks_against_pytorch(record: "GraphRecord", staging: Path, references: dict) -> list[tuple[object, Path | None]]:
    """(PyTorch reference, hot-swap adapter file or None) pairs a graph must match."""
    if record.adapters:  # hot-swap: every adapter, each with its file active
        files = record.extra.get("adapter_files", {})
        return [(references[name], staging / files[name]) for name in record.adapters if name in files]
    return [(references[record.adapter], None)]


def verify_fused(path: Path, record: "GraphRecord", staging: Path, references: dict, context: "ExportContext",
                 tolerance: float, expected: dict | None = None) -> float:
    """Max abs diff of the graph at ``path`` against PyTorch (verify batches, as is and padded); raises ExportError.

    ``expected`` caches (verify I/O, PyTorch outputs) per reference between the
    graphs of one bundle: every form of an adapter is checked on the same batches.
    """
    from lora_edge.export.exporter import check_agreement, run_verify_inputs
    from lora_edge.runtime.session import create_session, load_lora_adapter

    expected = {} if expected is None else expected
    session = create_session(path)
    worst = 0.0
    for reference, adapter_file in _checks_against_pytorch(record, staging, references):
        if id(reference) not in expected:
            expected[id(reference)] = _pytorch_outputs(reference, context)
        io, outputs = expected[id(reference)]
        adapter = load_lora_adapter(adapter_file) if adapter_file is not None else None
        worst = max(worst, check_agreement(record.name, outputs, run_verify_inputs(session, io, adapter), tolerance))
    return worst


def _pytorch_outputs(reference, context: "ExportContext") -> tuple["GraphIO", list]:
    """(verify I/O with the padded batches added, the PyTorch outputs of ``reference`` on them)."""
    from lora_edge.export.exporter import graph_io_for, reference_outputs

    io = graph_io_for(context.task)(reference, context)
    pad_id = getattr(context.tokenizer, "pad_token_id", None) or 0
    length = min(context.max_length, getattr(context.config, "max_position_embeddings", 512) - 2)
    io = dataclasses.replace(io, verify_inputs=io.verify_inputs + padded_inputs(io, length, pad_id))
    return io, reference_outputs(io)


def fuse_exported_graph(record: "GraphRecord", staging: Path, references: dict, context: "ExportContext",
                        tolerance: float, expected: dict | None = None) -> dict:
    """Fuse one fp32 graph in place when the fused graph matches PyTorch; return what was done (for the manifest).

    ``expected``: PyTorch outputs shared between the graphs of a bundle (:func:`verify_fused`).
    """
    import onnx

    from lora_edge.core.errors import ExportError
    from lora_edge.export.cpu_fusion import name_all_nodes
    from lora_edge.export.prepare import FusionPlan, fuse_graph

    path = staging / record.file
    model = onnx.load(str(path), load_external_data=False)
    if any(init.data_location == onnx.TensorProto.EXTERNAL for init in model.graph.initializer):
        return {"dropped": "graph has external data (over 1.8 GB): not fused"}
    name_all_nodes(model)
    plan = FusionPlan.from_config(context.config.to_dict())
    fused, report = fuse_graph(model, plan, str(path))
    summary = report.to_json()
    if fused is model:  # nothing matched, or the rewrites did not match the exported graph
        return summary
    del model  # one copy of the weights at a time: the session below loads its own
    staged = path.with_name(f".{path.name}.fused")
    onnx.save(fused, str(staged))
    del fused
    try:
        summary["max_abs_diff_vs_pytorch"] = verify_fused(staged, record, staging, references, context, tolerance,
                                                          expected)
    except ExportError as exc:
        staged.unlink()
        return {**summary, "dropped": f"fused graph drifts from PyTorch ({exc.what})"}
    os.replace(staged, path)
    return summary


def fuse_exported_graphs(records: list["GraphRecord"], staging: Path, references: dict, context: "ExportContext",
                         tolerance: float, progress: Progress) -> None:
    """Fuse every fp32 sequence-classification graph of a staged bundle; outcome in ``record.extra['fusion']``."""
    from lora_edge.core.choices import Precision
    from lora_edge.core.choices import Task

    if context.task is not Task.SEQ_CLS:
        return
    from lora_edge.runtime.session import release_freed_memory

    expected = {}  # PyTorch outputs, computed once per reference
    for record in records:
        if record.precision is not Precision.FP32:
            continue
        release_freed_memory()
        record.extra["fusion"] = fuse_exported_graph(record, staging, references, context, tolerance, expected)
        fusion = record.extra["fusion"]
        if fusion.get("dropped"):
            progress(f"  {record.name}: kept as exported ({fusion['dropped']})")
        else:
            progress(f"  {record.name}: fused for the CPU ({fusion.get('attention', 0)} attention blocks, padding "
                     f"trimmed: {'yes' if fusion.get('padding_trimmed') else 'no'}, last layer for the first token "
                     f"only: {'yes' if fusion.get('first_token_only') else 'no'}), max abs diff vs PyTorch "
                     f"{fusion.get('max_abs_diff_vs_pytorch', float('nan')):.2g}")
