"""Fuse the exported fp32 encoder graphs for the CPU, and keep a fused graph only where it matches PyTorch.

Right after export, each fp32 sequence-classification graph of a bundle gets
the rewrites of :func:`lora_edge.export.prepare.fuse_graph` (attention as one
MultiHeadAttention per layer with the unmasked kernel for unpadded batches,
residual sums kept out of ORT's slow CPU SkipLayerNormalization, LoRA pairs on
one input sharing their A MatMul, the last layer computed for the pooled first
token only, padding trimmed to the last attended column).
They took merged fp32 from 1.00x to 0.77x of the dynamo-exported peer's fp32
graph, and a short request padded to 128 runs at the cost of its real tokens
(benchmarks/README.md). Each candidate is run, in its one session, on the
exporter's verify batches and on the same batches padded to the export length,
and compared with the PyTorch reference of each adapter (and of the base model
with no adapter fed, for hot-swap graphs); the first within the export
tolerance is the graph written. Where none is, the graph is written as
exported, verified then, and the manifest says why. ``export --no-fuse`` skips the step.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING


if TYPE_CHECKING:
    import onnx
    import onnxruntime
    import torch

    from lora_edge.export.exporter import ExportContext, GraphIO
    from lora_edge.runtime.session import SessionSettings
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


def _checks_against_pytorch(record: "GraphRecord", staging: Path) -> list[tuple[str | None, Path | None]]:
    """(adapter name, its .onnx_adapter file) pairs a graph must match the PyTorch reference of.

    Hot-swap: every adapter with its file active, and the base model with none (name None).
    """
    if record.adapters:
        files = record.extra.get("adapter_files", {})
        return [(name, staging / files[name]) for name in record.adapters if name in files] + [(None, None)]
    return [(record.adapter, None)]


def pytorch_diffs(session: "onnxruntime.InferenceSession", record: "GraphRecord", staging: Path,
                  expected: dict) -> dict[str, float]:
    """Max abs diff of the graph open in ``session`` from PyTorch, per adapter ("base": none fed).

    ``expected`` maps each adapter name (None: the base model) to its verify I/O
    with the padded batches and the PyTorch outputs on them (:func:`pytorch_outputs`),
    computed once before the trace: every form of an adapter is checked on the same batches.
    """
    from lora_edge.export.exporter import max_abs_diff, run_verify_inputs
    from lora_edge.runtime.session import load_lora_adapter

    diffs = {}
    for name, adapter_file in _checks_against_pytorch(record, staging):
        io, outputs = expected[name]
        adapter = load_lora_adapter(adapter_file) if adapter_file is not None else None
        diffs[name or "base"] = max_abs_diff(outputs, run_verify_inputs(session, io, adapter))
    return diffs


def pytorch_outputs(reference, context: "ExportContext") -> tuple["GraphIO", list]:
    """(verify I/O with the padded batches added, the PyTorch outputs of ``reference`` on them).

    The verify batches come first, then each of them padded (as many): the first
    half of the outputs are the verify batches' own. The I/O keeps the inputs only
    (its module is dropped), so it does not hold the model.
    """
    from torch import nn

    from lora_edge.export.exporter import graph_io_for, reference_outputs

    io = graph_io_for(context.task)(reference, context)
    pad_id = getattr(context.tokenizer, "pad_token_id", None) or 0
    length = min(context.max_length, getattr(context.config, "max_position_embeddings", 512) - 2)
    io = dataclasses.replace(io, verify_inputs=io.verify_inputs + padded_inputs(io, length, pad_id))
    return dataclasses.replace(io, module=nn.Identity()), reference_outputs(io)


def fuse_for_cpu(model: "onnx.ModelProto", record: "GraphRecord", staging: Path, expected: dict,
                 context: "ExportContext", tolerance: float, path: Path) -> tuple[dict, dict | None]:
    """Fuse an exported fp32 graph into the file ``path``; (what was done, for the manifest; its diffs from PyTorch).

    Each candidate is written to ``path`` and checked in its one session (its
    weights mapped from the file) against PyTorch (``expected``:
    :func:`pytorch_diffs`; every adapter, and the base model for hot-swap graphs)
    on the verify batches as they are and padded to the export length; the first
    within ``tolerance`` is kept. None in place of the diffs: no candidate was,
    the graph stays as exported and ``path`` is the caller's to write (``model``
    itself is left as it is, nodes named).
    """
    from lora_edge.export.cpu_fusion import name_all_nodes
    from lora_edge.export.prepare import FusionPlan, fuse_graph

    name_all_nodes(model)
    plan = FusionPlan.from_config(context.config.to_dict())
    checked: dict = {}

    def against_pytorch(session) -> float:
        checked["diffs"] = pytorch_diffs(session, record, staging, expected)
        return max(checked["diffs"].values())

    def keep(session, serialized: None) -> None:
        checked["kept"] = True  # the file at ``path`` is the candidate

    fused, report = fuse_graph(model, plan, None, tolerance, check=against_pytorch, accept=keep,
                               settings=_one_thread_check(), write_to=path)
    summary = report.to_json()
    del fused  # its file is all that is kept
    if "kept" not in checked:  # no candidate matched PyTorch, or none was built
        return summary, None
    summary["max_abs_diff_vs_pytorch"] = max(checked["diffs"].values())
    return summary, checked["diffs"]


def _one_thread_check() -> "SessionSettings":
    """A check session on one thread that does not spin: a few small batches, on cores other work shares.

    (MiniLM-L6's verify and padded batches, load 5 on 2 cores: 0.22-0.26 s against
    0.43-0.45 s on ORT's default two spinning threads.)
    """
    from lora_edge.runtime.session import check_settings

    settings = check_settings()
    settings.intra_op_threads = 1
    settings.config_entries["session.intra_op.allow_spinning"] = "0"
    return settings


def describe(name: str, fusion: dict) -> str:
    """The progress line of a graph's fusion."""
    if fusion.get("dropped"):
        return f"  {name}: kept as exported ({fusion['dropped']})"
    return (f"  {name}: fused for the CPU ({fusion.get('attention', 0)} attention blocks, padding "
            f"trimmed: {'yes' if fusion.get('padding_trimmed') else 'no'}, last layer for the first token "
            f"only: {'yes' if fusion.get('first_token_only') else 'no'}), max abs diff vs PyTorch "
            f"{fusion.get('max_abs_diff_vs_pytorch', float('nan')):.2g}")
