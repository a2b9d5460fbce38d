"""Prepare a float graph for its target before quantizing: fusions, each checked against the source graph.

:func:`fuse_graph` runs onnxruntime.transformers' optimizer where the
architecture has fusions (not on hot-swap graphs: it folds their overridable
initializers as constants), then lora-edge's own rewrites
(:mod:`lora_edge.export.cpu_fusion`), and keeps the first candidate whose outputs
match the source graph's on a padded batch; otherwise the graph stays as exported.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from lora_edge.core.errors import first_line
from lora_edge.runtime.feeds import sample_encoder_feeds
from lora_edge.export.cpu_fusion import (FIRST_TOKEN_PREFIX, MASK_ALL_ONES, compute_first_token_only, fuse_attention,
                                       keep_layernorm_unfused, restore_for_gpu, share_lora_inputs, trim_padding)
from lora_edge.runtime.session import SessionSettings, create_session, relative_difference, run

if TYPE_CHECKING:
    import onnx


# Hugging Face model_type -> the onnxruntime.transformers optimizer's model type (encoders it fuses).
ORT_OPTIMIZER_TYPES = {"bert": "bert", "roberta": "bert", "xlm-roberta": "bert", "distilbert": "bert",
                       "electra": "bert", "camembert": "bert", "mpnet": "bert"}


@dataclass
class FusionPlan:
    """Which fusions to run for a graph, from its model config and where it will run."""

    model_type: str | None = None
    num_heads: int | None = None
    hidden_size: int | None = None
    for_gpu: bool = False  # fp16 graphs: keep ORT's SkipLayerNormalization (fast on CUDA)

    @classmethod
    def from_config(cls, config: dict, for_gpu: bool = False) -> "FusionPlan":
        """Read model type, heads and width from a transformers ``config.json`` dict."""
        heads = config.get("num_attention_heads") or config.get("n_heads") or config.get("n_head")
        hidden = config.get("hidden_size") or config.get("dim") or config.get("n_embd")
        return cls(config.get("model_type"), heads, hidden, for_gpu)


@dataclass
class FusionReport:
    """What :func:`fuse_graph` did, for the manifest."""

    ort_fusions: dict = field(default_factory=dict)
    attention: int = 0
    layernorm_unfused: int = 0
    lora_shared: int = 0  # LoRA pairs whose A factors were merged with a sibling's (same input)
    first_token_only: int = 0  # tensors sliced so the last layer computes the pooled first token only
    padding_trimmed: int = 0  # sequence inputs cut to the last attended column (CPU targets)
    restored_for_gpu: int = 0  # CPU-only rewrites of an already fused graph undone for a GPU target
    max_abs_diff: float | None = None
    dropped: str | None = None  # why a rewrite was not kept
    from_export: bool = False  # the source graph was fused at export (checked against PyTorch there), used as is

    def to_json(self) -> dict:
        """JSON form (only non-empty fields)."""
        return {key: value for key, value in self.__dict__.items() if value not in (None, {}, 0)}

    @classmethod
    def of_export(cls, summary: dict) -> "FusionReport":
        """The report of a graph fused at export (its record's ``fusion``), for a graph derived from it."""
        known = {key: value for key, value in summary.items() if key in cls.__dataclass_fields__}
        return cls(**{**known, "from_export": True})


def _ort_transformer_fusions(model: "onnx.ModelProto", plan: FusionPlan, report: FusionReport) -> "onnx.ModelProto":
    """Run onnxruntime.transformers' fusions (python-only, opt_level 0) where the architecture has them."""
    import contextlib
    import io
    import logging

    from onnxruntime.transformers import optimizer
    from onnxruntime.transformers.fusion_options import FusionOptions

    ort_type = ORT_OPTIMIZER_TYPES.get(plan.model_type or "")
    if ort_type is None:
        return model
    options = FusionOptions(ort_type)
    if not plan.for_gpu:
        # Measured on ORT 1.32's CPU provider: SkipLayerNormalization is 5-7x slower than
        # Add + LayerNormalization at encoder shapes, EmbedLayerNormalization gains nothing, and
        # BiasGelu is slower than Gelu after an int8 MatMul that adds the bias itself.
        options.enable_skip_layer_norm = False
        options.enable_bias_skip_layer_norm = False
        options.enable_embed_layer_norm = False
        options.enable_bias_gelu = False
        # ORT fuses the exported erf-Gelu itself when a session loads; fused here, as a contrib op its output
        # has no type for the static quantizer's calibration, so the next MatMul kept float activations.
        options.enable_gelu = False
    loggers = [logging.getLogger(name) for name in ("onnxruntime.transformers", "fusion_base", "onnx_model")]
    levels = [log.level for log in loggers]
    for log in loggers:
        log.setLevel(logging.ERROR)
    try:
        # its symbolic shape inference prints "failed in shape inference" on graphs with If subgraphs: harmless
        with contextlib.redirect_stdout(io.StringIO()):
            optimized = optimizer.optimize_model(model, model_type=ort_type, num_heads=plan.num_heads or 0,
                                                 hidden_size=plan.hidden_size or 0, optimization_options=options,
                                                 opt_level=0, use_gpu=plan.for_gpu)
    except Exception as exc:  # an optimizer failure only costs speed: keep the graph as it was
        report.dropped = f"onnxruntime transformer optimizer failed ({exc.__class__.__name__}: {exc})"[:300]
        return model
    finally:
        for log, level in zip(loggers, levels):
            log.setLevel(level)
    report.ort_fusions = {op: n for op, n in optimized.get_fused_operator_statistics().items() if n}
    return optimized.model


def _ort_fusions_on_twin(model: "onnx.ModelProto", plan: FusionPlan, report: FusionReport) -> "onnx.ModelProto":
    """:func:`_ort_transformer_fusions` of ``model`` (left as it is), run on its weightless twin, weights put back.

    ORT's optimizer runs symbolic shape inference three times, each on a fresh copy
    of the model it is given (two thirds of its time on MiniLM-L6, and its memory
    peak); on the twin those copies hold no weights. Where the twin does not do
    (a fusion read a weight's values), it runs on a copy of ``model``, as before.
    """
    import copy

    attempt = FusionReport()
    fused = _ort_transformer_fusions(_restore_for_gpu(weightless_twin(model), plan, report), plan, attempt)
    if attempt.dropped is None:
        try:
            fused = _with_weights(fused, model)
            report.ort_fusions = attempt.ort_fusions
            return fused
        except ValueError:
            pass
    return _ort_transformer_fusions(_restore_for_gpu(copy.deepcopy(model), plan, report), plan, report)


def _with_weights(twin: "onnx.ModelProto", model: "onnx.ModelProto") -> "onnx.ModelProto":
    """Fill the data-less initializers of ``twin`` from ``model``'s (ValueError if one is not there as it was)."""
    real = {tensor.name: tensor for tensor in model.graph.initializer}
    for tensor in twin.graph.initializer:
        if _is_stub(tensor):
            source = real.get(tensor.name)
            if source is None or list(source.dims) != list(tensor.dims) or source.data_type != tensor.data_type:
                raise ValueError(f"initializer {tensor.name} was changed without its data")
            tensor.CopyFrom(source)
    return twin


def _is_stub(tensor) -> bool:
    """True for a :func:`weightless_twin` initializer: elements, but no data anywhere."""
    import math

    return (math.prod(tensor.dims) > 0 and not tensor.raw_data and not tensor.float_data and not tensor.int32_data
            and not tensor.double_data and not tensor.external_data)


def _lora_edge_rewrites(model: "onnx.ModelProto", plan: FusionPlan, report: FusionReport) -> "onnx.ModelProto":
    if plan.num_heads:
        # a source graph fused at export already has its attention blocks: count those
        report.attention = fuse_attention(model, int(plan.num_heads), mask_switch=not plan.for_gpu) \
            or sum(node.op_type == "If" and MASK_ALL_ONES in node.input or node.op_type == "MultiHeadAttention"
                   for node in model.graph.node)
    report.lora_shared = share_lora_inputs(model)
    # a source graph fused at export has its last layer cut already: count those
    report.first_token_only = compute_first_token_only(model) or sum(
        node.name.startswith(FIRST_TOKEN_PREFIX) for node in model.graph.node)
    if not plan.for_gpu:
        report.layernorm_unfused = keep_layernorm_unfused(model)
        report.padding_trimmed = trim_padding(model)
    return model


def _restore_for_gpu(model: "onnx.ModelProto", plan: FusionPlan, report: FusionReport) -> "onnx.ModelProto":
    if plan.for_gpu:
        report.restored_for_gpu = restore_for_gpu(model)
    return model


def release_freed_memory() -> None:
    """Hand freed heap back to the OS: glibc keeps it, and protobuf copies, ORT's optimizer and sessions
    leave holes that the next graph does not fit in (measured: an export + quantize of MiniLM-L6's three
    forms peaked 1.6 GB without this, 1.06 GB with a trim at each step)."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        out.append(low | (0x80 if value else 0))
        if not value:
            return bytes(out)


# Protobuf keys (field number << 3 | length-delimited) of ModelProto.graph and GraphProto.initializer.
_GRAPH_KEY, _INITIALIZER_KEY = bytes([7 << 3 | 2]), bytes([5 << 3 | 2])


def save_streamed(model: "onnx.ModelProto", path: str | Path) -> None:
    """Write ``model`` one initializer at a time, for a session to read: no whole-model bytes in memory.

    ``onnx.save`` serializes the whole model first (twice its size at the peak:
    protobuf's buffer and the bytes object). Protobuf parsers merge a message
    field that occurs more than once, so the file is the model without its
    initializers followed by one ``graph { initializer }`` record per
    initializer: every reader parses it to the same model (for scratch files:
    the bytes differ from ``onnx.save``'s).
    """
    shell = _without_initializers(model)
    with open(path, "wb") as out:
        out.write(shell.SerializeToString())
        for tensor in model.graph.initializer:
            record = tensor.SerializeToString()
            record = _INITIALIZER_KEY + _varint(len(record)) + record
            out.write(_GRAPH_KEY + _varint(len(record)) + record)


def weightless_twin(model: "onnx.ModelProto", min_elements: int = 4096) -> "onnx.ModelProto":
    """A copy of ``model`` whose float initializers of ``min_elements`` or more carry no data.

    Same nodes, names, types and shapes: enough for shape inference (which reads
    the values of small integer tensors only) at a fraction of the memory.
    """
    import math

    from onnx import TensorProto

    twin = _without_initializers(model)
    floats = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE}
    for tensor in model.graph.initializer:
        if tensor.data_type in floats and math.prod(tensor.dims) >= min_elements:
            twin.graph.initializer.add(name=tensor.name, data_type=tensor.data_type, dims=tensor.dims)
        else:
            twin.graph.initializer.append(tensor)
    return twin


def _without_initializers(model: "onnx.ModelProto") -> "onnx.ModelProto":
    import onnx

    shell = onnx.ModelProto()
    for descriptor, value in model.ListFields():
        if descriptor.name != "graph":
            _copy_field(shell, descriptor, value)
    for descriptor, value in model.graph.ListFields():
        if descriptor.name != "initializer":
            _copy_field(shell.graph, descriptor, value)
    return shell


def _copy_field(target, descriptor, value) -> None:
    if hasattr(value, "CopyFrom"):  # a message
        getattr(target, descriptor.name).CopyFrom(value)
    elif isinstance(value, (str, bytes, int, float)):
        setattr(target, descriptor.name, value)
    else:  # a repeated field
        getattr(target, descriptor.name).extend(value)


def outputs_on(graph: str | bytes, feed_sets: list[dict]) -> list[list]:
    """The outputs of ``graph`` (a file or a serialized model) on each feed dict, from ONE session.

    A session costs far more than a run (0.3-0.7 s for MiniLM-L6 on 2 cores, 2 s for SmolLM2-135M), and
    holds a copy of the weights; without prepacked GEMM weights (a second copy, needed for speed only)
    a check session of SmolLM2-135M peaks 190 MB lower and opens 35% faster.
    """
    session = create_session(graph, SessionSettings(config_entries={"session.disable_prepacking": "1"}))
    return [run(session, feeds) for feeds in feed_sets]


def fuse_graph(model: "onnx.ModelProto", plan: FusionPlan, source: str | bytes,
               tolerance: float = 1e-4) -> tuple["onnx.ModelProto", FusionReport]:
    """Fuse ``model`` (loaded from ``source``) for its target; every rewrite is checked against ``source``.

    Tried in order, the first whose outputs match the source's within
    ``tolerance`` (relative to the output scale) on a padded sample batch wins:
    ORT's transformer fusions followed by :func:`fuse_attention` (for the blocks
    they did not take: the torch.export pattern) and, for CPU targets,
    :func:`keep_layernorm_unfused` and :func:`trim_padding` (for GPU targets, a
    graph already fused for the CPU is first restored: :func:`restore_for_gpu`);
    the lora-edge rewrites alone; the source
    graph unchanged. ORT's optimizer is skipped for graphs with overridable
    initializers (hot-swap inputs): it folds them as constants.
    """
    import copy

    report = FusionReport()
    # Padded, unpadded and end-padded batches: rewrites take other paths for each (the mask switch and the
    # padding trim do).
    feed_sets = [sample_encoder_feeds(model), sample_encoder_feeds(model, padded=False),
                 sample_encoder_feeds(model, padded=False, trailing=True)]
    try:
        expected = outputs_on(source, feed_sets) if "input_ids" in feed_sets[0] else None
    except Exception:  # inputs beyond an encoder's: nothing here can check a rewrite
        expected = None
    if expected is None:
        return model, report
    overridable = {value.name for value in model.graph.input} & {init.name for init in model.graph.initializer}
    # Each builder leaves ``model`` as it is (the graph returned when no candidate matches).
    builders = [] if overridable else [lambda m, r: _lora_edge_rewrites(_ort_fusions_on_twin(m, plan, r), plan, r)]
    builders.append(lambda m, r: _lora_edge_rewrites(_restore_for_gpu(copy.deepcopy(m), plan, r), plan, r))
    for build in builders:
        attempt = FusionReport(dropped=report.dropped)
        release_freed_memory()
        candidate = build(model, attempt)
        release_freed_memory()
        try:
            attempt.max_abs_diff = max(relative_difference(reference, actual) for reference, actual
                                       in zip(expected, outputs_on(candidate.SerializeToString(), feed_sets)))
        except Exception as exc:  # a rewrite ORT cannot load is a rewrite not to ship
            report.dropped = f"fused graph does not load ({exc.__class__.__name__}: {first_line(exc)})"
            continue
        if attempt.max_abs_diff <= tolerance:
            return candidate, attempt
        report.dropped = f"fusions changed the outputs (relative max abs diff {attempt.max_abs_diff:.2e})"
    return model, report
