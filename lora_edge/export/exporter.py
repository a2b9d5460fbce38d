"""torch -> ONNX: TorchScript (``torch.onnx.export(dynamo=False)``) first, the torch.export-based exporter as fallback.

The exporter knows nothing about tasks: what a graph takes and returns comes
from a :class:`GraphIO`, which a task's *graph-I/O builder* makes for a model.
Builders live in a registry (:data:`GRAPH_IO`), keyed by :class:`~lora_edge.core.models.Task`.

Protocol for a task's builder (the causal-LM one lives in ``lora_edge/export/decoder.py``)
------------------------------------------------------------------------------------
A builder is a callable ``builder(model, context) -> GraphIO``:

* ``model`` is an ``nn.Module`` with the Hugging Face forward of the task
  (``model(input_ids=..., attention_mask=..., ...)``). It is one of: the PyTorch
  reference (a ``PeftModel``, base + adapter, unmerged), the merged model, the
  branched model, or the hot-swap model (base with empty ``LoraBranch`` layers).
  The builder must not modify it, and must hold it as a submodule of
  ``GraphIO.module`` (the hot-swap form substitutes its parameters through
  ``torch.func.functional_call`` on ``GraphIO.module``, found by identity).
* ``context`` is an :class:`ExportContext`: task, tokenizer, model config and sample texts.
* The result for the same ``context`` must have the same ``input_names``,
  ``output_names`` and ``verify_inputs`` whatever the model: the exporter runs
  the builder on the reference model too, and checks the graph's outputs on
  ``verify_inputs`` against the reference's.

``GraphIO.module.forward(*inputs)`` takes the graph inputs *positionally*, in
``input_names`` order, and returns one tensor or a tuple of tensors in
``output_names`` order (flatten any cache: one tensor per key and per value).
``dynamic_axes`` names the dynamic axes of each input (same name = same dim);
example inputs must have a size >= 2 on every dynamic axis (torch.export
specializes sizes 0 and 1), while ``dim_min`` may allow 0 at run time (e.g. an
empty past). Register with::

    from lora_edge.export.exporter import register_graph_io
    register_graph_io(Task.CAUSAL_LM, causal_lm_graph_io)

at import time of the module named in :data:`GRAPH_IO_MODULES` (imported lazily
by :func:`graph_io_for`).
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import inspect
import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Protocol, Sequence

from lora_edge.core.data import DEFAULT_MAX_LENGTH
from lora_edge.core.errors import ConfigError, ExportError
from lora_edge.core.choices import Task

if TYPE_CHECKING:
    import numpy as np
    import onnx
    import onnxruntime
    import torch
    from torch import nn

# Verification tolerance for fp32 graphs against the PyTorch reference (max abs diff of outputs).
FP32_TOLERANCE = 1e-4
# Above this many bytes of weights a graph is saved with external data (protobuf's 2 GB limit).
EXTERNAL_DATA_BYTES = 1_800_000_000

# Varied utterances (short to long) on which every encoder graph is checked against PyTorch.
SAMPLE_TEXTS = (
    "turn the lights on",
    "what's the weather like in Paris tomorrow morning?",
    "hi",
    "set an alarm for 7 am and remind me to call my sister about the trip",
    "play some jazz",
    "could you please book a table for four people at the italian place near the station "
    "on friday evening, somewhere quiet, and send the confirmation to my email address",
)


@dataclass
class ExportContext:
    """What a graph-I/O builder may use besides the model: task, tokenizer, config, sample texts."""

    task: Task
    tokenizer: Any
    config: Any  # the transformers PretrainedConfig of the base model
    sample_texts: tuple[str, ...] = SAMPLE_TEXTS
    max_length: int = DEFAULT_MAX_LENGTH


@dataclass
class GraphIO:
    """Everything needed to export one model for one task and to check the graph.

    ``module`` -- forward(*inputs) in ``input_names`` order -> tensor(s) in ``output_names`` order.
    ``example_inputs`` -- tensors for tracing (size >= 2 on every dynamic axis).
    ``dynamic_axes`` -- input name -> {axis: dim name}; a shared name is a shared dim.
    ``verify_inputs`` -- input tuples (same order) on which the graph must match the reference.
    ``dim_min`` -- dim name -> smallest size allowed (torch.export's default otherwise).
    ``relative_tolerance`` -- when set, the bound on each output's diff divided by that output's
    scale (its largest |value|, at least 1), in place of the absolute tolerance: LLM logits and
    keys run to the tens, where fp32 rounding over dozens of layers alone reaches ~1e-3.
    ``edit_graph`` -- when set, a rewrite of the traced ONNX graph made once, before every form is
    derived from it (the graph then takes inputs beyond ``input_names`` only with defaults, e.g.
    the decoder's ``logits_to_keep``); it is verified on ``verify_inputs`` like the rest.
    """

    module: "nn.Module"
    example_inputs: tuple["torch.Tensor", ...]
    input_names: list[str]
    output_names: list[str]
    dynamic_axes: dict[str, dict[int, str]]
    verify_inputs: list[tuple["torch.Tensor", ...]]
    dim_min: dict[str, int] = field(default_factory=dict)
    relative_tolerance: float | None = None
    edit_graph: Callable[["onnx.ModelProto"], Any] | None = None

    def __post_init__(self):
        if len(self.example_inputs) != len(self.input_names):
            raise ValueError(f"{len(self.example_inputs)} example inputs for {len(self.input_names)} input names")
        unknown = set(self.dynamic_axes) - set(self.input_names)
        if unknown:
            raise ValueError(f"dynamic_axes names unknown inputs: {sorted(unknown)}")


class GraphIOBuilder(Protocol):
    """``builder(model, context) -> GraphIO`` (see the module docstring for the contract)."""

    def __call__(self, model: "nn.Module", context: ExportContext) -> GraphIO: ...


GRAPH_IO: dict[Task, GraphIOBuilder] = {}
# Tasks whose builder registers itself when its module is imported (kept lazy: no import cycles, fast CLI).
GRAPH_IO_MODULES: dict[Task, str] = {Task.CAUSAL_LM: "lora_edge.export.decoder"}


def register_graph_io(task: Task, builder: GraphIOBuilder) -> GraphIOBuilder:
    """Register ``builder`` as the graph-I/O builder of ``task`` (replaces any earlier one)."""
    GRAPH_IO[Task(task)] = builder
    return builder


def graph_io_for(task: Task) -> GraphIOBuilder:
    """The builder registered for ``task``, importing its module first if needed."""
    task = Task(task)
    if task not in GRAPH_IO and task in GRAPH_IO_MODULES:
        try:
            importlib.import_module(GRAPH_IO_MODULES[task])
        except ModuleNotFoundError as exc:
            if exc.name != GRAPH_IO_MODULES[task]:
                raise
    if task not in GRAPH_IO:
        raise ConfigError(f"ONNX export for task '{task.value}' is not available in this version", "--task",
                          f"use one of: {', '.join(t.value for t in GRAPH_IO) or 'none'}")
    return GRAPH_IO[task]


# --- encoders: sequence classification -------------------------------------------------------------

ENCODER_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def encoder_input_names(model: "nn.Module", tokenizer) -> list[str]:
    """input_ids and attention_mask, plus token_type_ids where both the model and the tokenizer use them."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    accepted = inspect.signature(inner.forward).parameters
    produced = set(getattr(tokenizer, "model_input_names", ENCODER_INPUTS))
    return [name for name in ENCODER_INPUTS if name in accepted and (name in produced or name != "token_type_ids")]


def _encode(tokenizer, texts: Sequence[str], names: list[str], max_length: int,
            padding: str | bool = "longest") -> tuple["torch.Tensor", ...]:
    from lora_edge.core.data import encode_texts

    encoded = encode_texts(tokenizer, texts, max_length, padding)
    return tuple(encoded[name].long() for name in names)


def sequence_classification_io(model: "nn.Module", context: ExportContext) -> GraphIO:
    """Graph-I/O builder for ``Task.SEQ_CLS``: int64 [batch, sequence] ids/mask(/token types) -> logits."""
    from torch import nn

    names = encoder_input_names(model, context.tokenizer)
    max_length = min(context.max_length, getattr(context.config, "max_position_embeddings", 512) - 2)

    class SequenceClassifier(nn.Module):
        """Positional graph inputs -> logits."""

        def __init__(self, wrapped: nn.Module):
            super().__init__()
            self.model = wrapped

        def forward(self, *inputs):
            return self.model(**dict(zip(names, inputs))).logits

    texts = context.sample_texts
    # Batches of 1, 2 and 3 with different padded lengths (the long text makes one near max_length).
    verify = [_encode(context.tokenizer, texts[i:j], names, max_length) for i, j in ((0, 1), (1, 3), (3, 6))]
    example = _encode(context.tokenizer, texts[:2], names, max_length, padding="max_length")
    example = tuple(t[:, :16] for t in example)
    axes = {name: {0: "batch", 1: "sequence"} for name in names}
    return GraphIO(SequenceClassifier(model).eval(), example, names, ["logits"], axes, verify)


register_graph_io(Task.SEQ_CLS, sequence_classification_io)


# --- export and verification -----------------------------------------------------------------------

def _dynamic_shapes(io: GraphIO) -> tuple:
    """torch.export dynamic_shapes (a tuple matching the positional inputs) from ``io.dynamic_axes``."""
    from torch.export import Dim

    dims: dict[str, Any] = {}

    def dim(name: str):
        if name not in dims:
            dims[name] = Dim(name, min=io.dim_min[name]) if name in io.dim_min else Dim(name)
        return dims[name]

    shapes = tuple({axis: dim(dim_name) for axis, dim_name in io.dynamic_axes.get(name, {}).items()} or None
                   for name in io.input_names)
    # torch.export matches dynamic_shapes to the forward's parameters: a `*inputs` forward has one (a tuple).
    parameters = list(inspect.signature(io.module.forward).parameters.values())
    if len(parameters) == 1 and parameters[0].kind is inspect.Parameter.VAR_POSITIONAL:
        return (shapes,)
    return shapes


def _error_line(exc: BaseException) -> str:
    """The informative line of an exporter error: its 'Exception summary' entry, else its first line."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    for line in lines:
        if line.startswith("<class '"):
            return line[:300]
    return (lines or [exc.__class__.__name__])[0][:300]


def _raised_by_module(exc: BaseException) -> ExportError | None:
    """An ExportError that ``io.module`` itself raised while being traced, found in the exception chain."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, ExportError):
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


@contextlib.contextmanager
def _quiet_export():
    """Hide the exporter's warnings and info logs (torchvision missing, axis renames, onnx_ir's "initializer
    without a constant value" for every weight the in-memory trace keeps out of the graph): users see one line."""
    names = ("torch.onnx", "torch._export", "torch.export", "onnxscript", "onnx_ir")
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for logger in loggers:
            logger.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for logger, level in zip(loggers, levels):
                logger.setLevel(level)


def export_onnx(io: GraphIO, path: Path, opset: int | None = None, graph_name: str | None = None,
                edit: Callable[[Any], None] | None = None) -> Path:
    """Export ``io.module`` to the ONNX file ``path`` with dynamic axes; returns ``path``.

    ``edit``, when given, receives the exported ``onnx_ir.Model`` before it is saved
    (the hot-swap form adds its default initializers there).

    Raises ExportError naming the graph (and the exporter's first error line) when
    torch.export or the ONNX translation fails.
    """
    import torch

    graph_name = graph_name or Path(path).name
    io.module.eval()
    weight_bytes = sum(p.numel() * p.element_size() for p in io.module.parameters())
    try:
        with _quiet_export(), torch.no_grad():
            program = torch.onnx.export(io.module, io.example_inputs, dynamo=True, dynamic_shapes=_dynamic_shapes(io),
                                        input_names=io.input_names, output_names=io.output_names,
                                        opset_version=opset, optimize=True, verbose=False)
    except Exception as exc:  # torch.export raises many types; all mean "this model does not export"
        own = _raised_by_module(exc)
        if own is not None:  # the task module named the failing submodule itself (e.g. the decoder wrapper)
            raise own from exc
        raise ExportError(f"torch.onnx.export failed ({_error_line(exc)})", graph_name,
                          "re-run with --debug for the trace; try another --opset or report the architecture") from exc
    if edit is not None:
        edit(program.model)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    program.save(str(path), external_data=weight_bytes > EXTERNAL_DATA_BYTES)
    return Path(path)


# The exporters a trace may use, fastest first. TorchScript (``dynamo=False``) traces a model several times
# faster than torch.export + onnxscript (docs/ARCHITECTURE.md, "Facts"); torch has deprecated it, so when it
# is missing, fails, or gives a graph that drifts, the torch.export-based exporter is used instead.
EXPORTERS = ("torchscript", "dynamo")
TORCHSCRIPT_OPSET = 18


# Per task, the exporter tried first. Decoders go through torch.export: the CPU decoder rewrites made before
# quantizing (lora_edge.quantize.decoder: RMSNorm, rotary) match its graphs, not TorchScript's, and they are
# what makes int4 decoding fast (benchmarks/README.md); the one trace still serves every form.
PREFERRED_EXPORTER: dict[Task, str] = {Task.CAUSAL_LM: "dynamo"}


def exporter_order(task: Task) -> list[str]:
    """The exporters to try for ``task``, in order: its preferred one first, TorchScript only while torch has it."""
    available = [e for e in EXPORTERS if e != "torchscript" or torchscript_available()]
    preferred = PREFERRED_EXPORTER.get(Task(task))
    return sorted(available, key=lambda e: e != preferred) if preferred else available


def torchscript_available() -> bool:
    """True while this torch still ships the TorchScript ONNX exporter (``torch.onnx.export(dynamo=False)``)."""
    import torch

    return "dynamo" in inspect.signature(torch.onnx.export).parameters and \
        importlib.util.find_spec("torch.onnx._internal.torchscript_exporter") is not None


def trace_onnx(io: GraphIO, path: Path, opset: int | None = None, graph_name: str = "graph",
               exporter: str = "torchscript") -> Path:
    """Trace ``io.module`` with ``exporter`` (see :data:`EXPORTERS`) into the ONNX file ``path``; returns it.

    The graph goes to a file rather than memory so that the caller can release the
    PyTorch model before loading it (one copy of the weights alive at a time).
    Raises ExportError naming the graph when tracing fails.
    """
    import torch

    if exporter not in EXPORTERS:
        raise ValueError(f"unknown exporter {exporter!r}")
    io.module.eval()
    weight_bytes = sum(p.numel() * p.element_size() for p in io.module.parameters())
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with _tracing(exporter, graph_name), torch.no_grad():
        if exporter == "torchscript":
            _trace_torchscript(io, opset, Path(path))
        else:
            program, hidden = _trace_dynamo(io, opset)
            for value, tensor in hidden:
                value.const_value = tensor
            program.save(str(path), external_data=weight_bytes > EXTERNAL_DATA_BYTES)
    return Path(path)


def trace_torchscript_bytes(io: GraphIO, opset: int | None = None, graph_name: str = "graph") -> bytes | None:
    """The TorchScript trace of ``io.module`` as the exporter's serialized graph, or None for a model over
    :data:`EXTERNAL_DATA_BYTES` (its weights go to external data files: :func:`trace_onnx` to a path).

    The exporter serializes the graph in memory and then writes it out; taking its
    bytes as they are saves the file and reading it back (MiniLM-L6: 91 MB written
    to new page-cache pages and mapped again; such a write took 0.05-0.6 s on this
    project's machine).
    Raises ExportError naming the graph when tracing fails.
    """
    import torch

    io.module.eval()
    if sum(p.numel() * p.element_size() for p in io.module.parameters()) > EXTERNAL_DATA_BYTES:
        return None
    sink = _BytesSink()
    with _tracing("torchscript", graph_name), torch.no_grad():
        _trace_torchscript(io, opset, sink)
    return sink.value()


class _BytesSink:
    """A write-only file object keeping what is written without copying it (the exporter writes one bytes object)."""

    def __init__(self):
        self.parts: list[bytes] = []

    def write(self, data: bytes) -> int:
        self.parts.append(data)
        return len(data)

    def flush(self) -> None:
        pass

    def value(self) -> bytes:
        return self.parts[0] if len(self.parts) == 1 else b"".join(self.parts)


@contextlib.contextmanager
def _tracing(exporter: str, graph_name: str):
    """Quiet the exporter; turn its failures into one ExportError naming the graph (or the module that failed)."""
    try:
        with _quiet_export():
            yield
    except Exception as exc:  # the tracers raise many types; all mean "this model does not export"
        own = _raised_by_module(exc)
        if own is not None:
            raise own from exc
        raise ExportError(f"torch.onnx.export ({exporter}) failed ({_error_line(exc)})", graph_name,
                          "re-run with --debug for the trace; try another --opset or report the architecture") from exc


def _trace_dynamo(io: GraphIO, opset: int | None) -> tuple[Any, list]:
    """torch.export + ONNX translation + :func:`optimize_trace`: (the ONNXProgram, its hidden weights).

    The optimizer never sees the model's own tensors: whatever it reads stays alive
    for the rest of the process, and one surviving view of a weight loaded from a
    memory-mapped safetensors file keeps the whole file resident. Weights it cannot
    fold anyway (above its input size limit) are taken out of the graph and come
    back as (ir.Value, tensor) pairs, the values' ``const_value`` left empty;
    smaller ones (norm scales, rotary frequencies) are replaced by copies.
    """
    import numpy as np
    import onnx_ir as ir
    import torch

    program = torch.onnx.export(io.module, io.example_inputs, dynamo=True, dynamic_shapes=_dynamic_shapes(io),
                                input_names=io.input_names, output_names=io.output_names, opset_version=opset,
                                optimize=False, verbose=False)
    hidden = []
    for value in program.model.graph.initializers.values():
        tensor = value.const_value
        if tensor is None:
            continue
        if tensor.size > OPTIMIZER_INPUT_SIZE_LIMIT:
            hidden.append((value, tensor))
            value.const_value = None
        else:
            value.const_value = ir.Tensor(np.array(tensor.numpy(), copy=True), dtype=tensor.dtype, name=value.name)
    optimize_trace(program.model)
    return program, hidden


# onnxscript's optimizer folds no op with an input of more elements than this (its input_size_limit default).
OPTIMIZER_INPUT_SIZE_LIMIT = 8192


# The one rewrite rule of onnxscript's default optimizer that is left out: on SmolLM2-135M's trace it took
# 45 s of the optimizer's 81 s (lean: 11 s; benchmarks/README.md, export_time.py) and fired 0 times; it turns
# Slices that tile one tensor into a Split, which traced transformer graphs do not have.
SKIPPED_REWRITE_RULES = ("slice_split_rule",)


def lean_rewrite_rules() -> tuple | None:
    """onnxscript's default rewrite rules less :data:`SKIPPED_REWRITE_RULES`; None where onnxscript no longer has them."""
    import onnxscript.rewriter as rewriter
    from onnxscript.rewriter.rules import common

    defaults = getattr(rewriter, "_DEFAULT_REWRITE_RULES", None)
    skipped = [getattr(common, name, None) for name in SKIPPED_REWRITE_RULES]
    if defaults is None or any(rule is None or rule not in defaults for rule in skipped):
        return None
    return tuple(rule for rule in defaults if not any(rule is skip for skip in skipped))


def optimize_trace(model) -> bool:
    """Run onnxscript's optimizer (what ``torch.onnx.export(optimize=True)`` runs) on an ``onnx_ir`` model, in place.

    The same passes, but with :func:`lean_rewrite_rules`; returns False when those
    are not available and the full default optimizer ran instead (same graph,
    slower; ``tests/test_export_forms.py`` fails loudly that day).
    """
    import onnxscript.optimizer
    import onnxscript.rewriter as rewriter

    rules = lean_rewrite_rules()
    if rules is None:
        onnxscript.optimizer.optimize_ir(model)
        return False
    defaults = rewriter._DEFAULT_REWRITE_RULES
    rewriter._DEFAULT_REWRITE_RULES = rules  # read by optimize_ir when it builds its passes
    try:
        onnxscript.optimizer.optimize_ir(model)
    finally:
        rewriter._DEFAULT_REWRITE_RULES = defaults
    return True


def trace_in_memory(io: GraphIO, opset: int | None = None,
                    graph_name: str = "graph") -> tuple["onnx.ModelProto", dict[str, "np.ndarray"]]:
    """Trace ``io.module`` with torch.export (optimized as ``optimize=True`` would) without copying its weights.

    Returns (model, weights): ``model`` is the ONNX graph whose large initializers
    are stubs (name, type, dims, no data) and ``weights`` maps their names to
    zero-copy arrays over the PyTorch tensors (the module's parameters), so the
    trace costs no second copy of the model, and once ``weights`` is dropped
    nothing of the trace holds the module's tensors. Raises ExportError naming
    the graph when tracing fails.
    """
    import numpy as np
    import onnx
    import onnx_ir as ir
    import torch

    io.module.eval()
    with _tracing("dynamo", graph_name), torch.no_grad():
        program, hidden = _trace_dynamo(io, opset)
    weights: dict[str, np.ndarray] = {}
    initializers = program.model.graph.initializers
    for value, tensor in hidden:
        if initializers.get(value.name) is not value:  # the optimizer dropped it (unused)
            continue
        array = tensor.numpy()
        if array.dtype.kind in "fiub" and array.dtype.name in np.sctypeDict:
            weights[value.name] = array
        else:  # e.g. bfloat16, which numpy has no name for: serialized with the graph
            value.const_value = tensor
    serde_log = logging.getLogger("onnx_ir.serde")
    level = serde_log.level
    serde_log.setLevel(logging.ERROR)  # "initializer without a constant value": the stubs are added below
    try:
        model = ir.serde.serialize_model(program.model)
    finally:
        serde_log.setLevel(level)
    model.graph.initializer.extend(
        onnx.TensorProto(name=name, data_type=onnx.helper.np_dtype_to_tensor_dtype(array.dtype),
                         dims=list(array.shape)) for name, array in weights.items())
    return model, weights


def fold_stub_transposes(model: "onnx.ModelProto", weights: dict[str, "np.ndarray"]) -> int:
    """Store ``W.T`` for each 2-D weight of ``weights`` that the graph reads only through ``Transpose``, in place.

    torch.export writes ``linear`` as ``MatMul(x, Transpose(W))``; its optimizer
    folds that Transpose for weights it sees, but the in-memory trace hides the
    large ones from it (:func:`trace_in_memory`). Left as they are, every linear
    of an LLM keeps a runtime Transpose the session folds into a second copy, and
    the CPU rewrites that pack q|k|v into one MatMul (quantize stage) find no
    initializer weights to pack. The stub keeps its name, with swapped dims, and
    its array becomes the zero-copy ``.T`` view; a weight anything else reads
    too (a tied embedding's lookup) is left alone. Returns how many were folded.
    """
    from onnx import helper

    graph = model.graph
    readers: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            readers[name] = readers.get(name, 0) + 1
    outputs = {value.name for value in graph.output} | {value.name for value in graph.input}
    stubs = {init.name: init for init in graph.initializer}
    renames, folded = {}, set()
    for position, node in enumerate(graph.node):  # positions, not id(): protobuf hands out fresh wrappers
        if node.op_type != "Transpose" or node.input[0] not in weights or node.input[0] not in stubs:
            continue
        source, array = node.input[0], weights[node.input[0]]
        perm = next((helper.get_attribute_value(a) for a in node.attribute if a.name == "perm"), None)
        if array.ndim != 2 or perm not in (None, [1, 0]) or readers.get(source) != 1 \
                or source in outputs or node.output[0] in outputs:
            continue
        weights[source] = array.T
        stubs[source].dims[:] = list(array.shape[::-1])
        renames[node.output[0]] = source
        folded.add(position)
    if not folded:
        return 0
    kept = [node for position, node in enumerate(graph.node) if position not in folded]
    for node in kept:
        for index, name in enumerate(node.input):
            if name in renames:
                node.input[index] = renames[name]
    del graph.node[:]
    graph.node.extend(kept)
    stale = [value for value in graph.value_info if value.name in renames]
    for value in stale:
        graph.value_info.remove(value)
    return len(folded)


def name_output_dims(model: "onnx.ModelProto", io: GraphIO, outputs: list[list["np.ndarray"]]) -> None:
    """Name the output axes of a traced ``model`` after the input dims they follow, in place.

    The TorchScript exporter names output axes after ops (``Wherelogits_dim_0``);
    the torch.export-based one after the input dims. ``outputs`` (the reference's
    outputs on ``io.verify_inputs``) tell which input dim each output axis equals
    on every verify input (or which sum of two, e.g. ``past_sequence + sequence``):
    that name is written; any other symbolic axis
    keeps the exporter's name (a hot-swap head's label count varies by adapter).
    """
    named: dict[str, list[int]] = {}
    for case, inputs in enumerate(io.verify_inputs):
        for name, tensor in zip(io.input_names, inputs):
            for axis, dim in io.dynamic_axes.get(name, {}).items():
                if len(named.setdefault(dim, [])) == case:
                    named[dim].append(int(tensor.shape[axis]))
    for index, value in enumerate(model.graph.output):
        dims = value.type.tensor_type.shape.dim
        for axis, dim in enumerate(dims):
            seen = [int(case[index].shape[axis]) for case in outputs if index < len(case) and axis < case[index].ndim]
            if len(seen) != len(outputs):
                continue
            if not dim.HasField("dim_param"):
                continue
            sums = [f"{a} + {b}" for i, (a, x) in enumerate(named.items()) for b, y in list(named.items())[i + 1:]
                    if [p + q for p, q in zip(x, y)] == seen]
            matches = [name for name, values in named.items() if values == seen]
            if len(sums) == 1 or len(matches) == 1:  # a sum says how the axis grows (the KV cache): preferred
                dim.dim_param = sums[0] if len(sums) == 1 else matches[0]


def _trace_torchscript(io: GraphIO, opset: int | None, target: "Path | _BytesSink") -> None:
    import torch

    torch.onnx.export(io.module, io.example_inputs, target if isinstance(target, _BytesSink) else str(target),
                      dynamo=False, input_names=io.input_names,
                      output_names=io.output_names, dynamic_axes=io.dynamic_axes,
                      opset_version=opset or TORCHSCRIPT_OPSET, do_constant_folding=True)


def reference_outputs(io: GraphIO) -> list[list["np.ndarray"]]:
    """Outputs of ``io.module`` (in PyTorch, fp32) on each of ``io.verify_inputs``."""
    import torch

    results = []
    with torch.no_grad():
        for inputs in io.verify_inputs:
            out = io.module(*inputs)
            out = out if isinstance(out, (tuple, list)) else (out,)
            results.append([t.detach().float().numpy() for t in out])
    return results


def max_abs_diff(expected: list[list["np.ndarray"]], actual: list[list["np.ndarray"]]) -> float:
    """Largest absolute difference between two lists of output lists (inf on a shape mismatch)."""
    return _diffs(expected, actual)[0]


def _diffs(expected: list[list["np.ndarray"]], actual: list[list["np.ndarray"]]) -> tuple[float, float]:
    """(largest absolute diff, largest diff relative to its output's scale); (inf, inf) on a shape mismatch."""
    import numpy as np

    worst, worst_scaled = 0.0, 0.0
    for want_outputs, got_outputs in zip(expected, actual, strict=True):
        for want, got in zip(want_outputs, got_outputs, strict=True):
            if want.shape != got.shape:
                return float("inf"), float("inf")
            diff = float(np.max(np.abs(want.astype(np.float64) - got.astype(np.float64)), initial=0.0))
            scale = max(1.0, float(np.max(np.abs(want), initial=0.0)))
            worst, worst_scaled = max(worst, diff), max(worst_scaled, diff / scale)
    return worst, worst_scaled


def run_verify_inputs(session: "onnxruntime.InferenceSession", io: GraphIO,
              adapter: "onnxruntime.LoraAdapter | None" = None) -> list[list["np.ndarray"]]:
    """Run a session on each of ``io.verify_inputs`` (optionally with a hot-swap adapter active)."""
    from lora_edge.runtime.session import run

    return [[out.astype("float32") for out in run(session, dict(zip(io.input_names, (t.numpy() for t in inputs))),
                                                  adapter=adapter, output_names=io.output_names)]
            for inputs in io.verify_inputs]


def check_agreement(graph_name: str, expected: list[list["np.ndarray"]], actual: list[list["np.ndarray"]],
                    tolerance: float = FP32_TOLERANCE, against: str = "the PyTorch reference",
                    relative: float | None = None) -> float:
    """Return the max abs diff, or raise ExportError naming the graph when it exceeds ``tolerance``.

    ``relative``: when set, the bound on diff / output scale instead (see :attr:`GraphIO.relative_tolerance`).
    """
    diff, scaled = _diffs(expected, actual)
    measured, bound = (scaled, relative) if relative is not None else (diff, tolerance)
    if not measured <= bound:
        what = (f"max abs diff {diff:.3g} ({scaled:.3g} of the output's scale) > {bound:g} of the scale"
                if relative is not None else f"max abs diff {diff:.3g} > {tolerance:g}")
        raise ExportError(f"graph {graph_name} drifts from {against}: {what}",
                          graph_name, "re-run with --debug; try another --opset or report the architecture")
    return diff


# --- structure ----------------------------------------------------------------------------------------

def low_rank_pairs(model) -> list[tuple[str, str]]:
    """(first weight, second weight) names of every low-rank MatMul pair in an ONNX model.

    A pair is ``MatMul(MatMul(x, W1), W2)`` where W1 ``[in, r]`` and W2 ``[r, out]`` are
    weights (initializers or graph inputs, possibly behind a Transpose) and the
    inner size r is symbolic (a hot-swap rank axis) or smaller than both outer
    sizes. Branched graphs have one per targeted layer, merged graphs none.
    """
    graph = model.graph
    shapes = {init.name: list(init.dims) for init in graph.initializer}
    for value in graph.input:  # graph inputs win over same-named initializers (hot-swap defaults)
        shapes[value.name] = [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]
    producers = {output: node for node in graph.node for output in node.output}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)

    def weight(name: str) -> tuple[str, list] | None:
        """(source name, effective 2-D shape) when ``name`` is a weight, else None."""
        if name in shapes and len(shapes[name]) == 2:
            return name, shapes[name]
        node = producers.get(name)
        if node is not None and node.op_type == "Transpose" and node.input[0] in shapes \
                and len(shapes[node.input[0]]) == 2:
            return node.input[0], shapes[node.input[0]][::-1]
        return None

    def low_rank(outer_in, inner, outer_out) -> bool:
        if isinstance(inner, str):
            return True
        return all(isinstance(d, int) for d in (outer_in, outer_out)) and inner < min(outer_in, outer_out)

    pairs = []
    for node in graph.node:
        if node.op_type != "MatMul" or (first := weight(node.input[1])) is None:
            continue
        for follower in consumers.get(node.output[0], []):
            if follower.op_type == "MatMul" and follower.input[0] == node.output[0] \
                    and (second := weight(follower.input[1])) is not None \
                    and low_rank(first[1][0], first[1][1], second[1][1]):
                pairs.append((first[0], second[0]))
    return pairs
