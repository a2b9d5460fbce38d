"""Prepare a float graph for its target before quantizing: fusions, each checked against the source graph.

:func:`fuse_graph` runs onnxruntime.transformers' optimizer where the
architecture has fusions (not on hot-swap graphs: it folds their overridable
initializers as constants), then lora-edge's own rewrites
(:mod:`lora_edge.export.cpu_fusion`), and keeps the first candidate whose outputs
match the source graph's on a padded batch; otherwise the graph stays as exported.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

from lora_edge.core.errors import first_line
from lora_edge.runtime.feeds import sample_encoder_feeds
from lora_edge.export.cpu_fusion import (FIRST_TOKEN_PREFIX, MASK_ALL_ONES, compute_first_token_only, fuse_attention,
                                       keep_layernorm_unfused, restore_for_gpu, share_lora_inputs, trim_padding)
from lora_edge.core.onnx_io import weightless_twin
from lora_edge.runtime.session import (check_settings, create_session, outputs_on, relative_difference,
                                       release_freed_memory, run)

if TYPE_CHECKING:
    import contextlib
    from pathlib import Path

    import onnx
    import onnxruntime

    from lora_edge.runtime.session import SessionSettings


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
    # Never a match in these encoders (absolute positions; an fp32 graph has no QuantizeLinear), yet each walks
    # the whole graph (MiniLM-L6, load ~6: rotary 0.45 s and q-ordered MatMul 0.07 s of ORT's 1.6 s a graph).
    options.enable_rotary_embeddings = False
    options.enable_qordered_matmul = False
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


def fusion_feed_sets(model: "onnx.ModelProto") -> list[dict]:
    """The batches :func:`fuse_graph` checks a rewrite on: padded, unpadded and end-padded.

    Rewrites take another path for each (the mask switch and the padding trim
    do). Only the shapes of ``model`` are read: a weightless twin gives the same batches.
    """
    return [sample_encoder_feeds(model), sample_encoder_feeds(model, padded=False),
            sample_encoder_feeds(model, padded=False, trailing=True)]


def fuse_graph(model: "onnx.ModelProto", plan: FusionPlan, source: str | bytes | None, tolerance: float = 1e-4,
               check: "Callable[[onnxruntime.InferenceSession], float] | None" = None,
               accept: "Callable[[onnxruntime.InferenceSession, bytes | None], None] | None" = None,
               settings: "SessionSettings | None" = None,
               write_to: "Path | None" = None) -> tuple["onnx.ModelProto", FusionReport]:
    """Fuse ``model`` (loaded from ``source``) for its target; every rewrite is checked against ``source``.

    Tried in order, the first whose outputs match the source's within
    ``tolerance`` (relative to the output scale) on the :func:`fusion_feed_sets`
    batches wins: ORT's transformer fusions followed by :func:`fuse_attention`
    (for the blocks they did not take: the torch.export pattern) and, for CPU
    targets, :func:`keep_layernorm_unfused` and :func:`trim_padding` (for GPU
    targets, a graph already fused for the CPU is first restored:
    :func:`restore_for_gpu`); the lora-edge rewrites alone; the source graph
    unchanged. ORT's optimizer is skipped for graphs with overridable
    initializers (hot-swap inputs): it folds them as constants.

    ``check(session)``: the caller's own measure of a candidate, open in its
    check session (its largest difference from what the graph must compute,
    compared with ``tolerance``), in place of the comparison with ``source``
    (which is then not read and may be None): export compares each candidate
    with PyTorch. ``accept(session, serialized)`` is called with the winning
    candidate's session and bytes. ``settings``: the check sessions' (default
    :func:`lora_edge.runtime.session.check_settings`). ``write_to``: each candidate
    is written there (its ``SerializeToString`` bytes) and checked in a session that
    maps its weights from that file (:func:`_file_session`); ``accept`` then gets
    None for the bytes, the file holds them.
    """
    import copy
    import contextlib

    report = FusionReport()
    if check is None:
        check = _source_check(model, source)
        if check is None:  # inputs beyond an encoder's: nothing here can check a rewrite
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
        with contextlib.ExitStack() as scratch:
            try:
                session, serialized = _candidate_session(candidate, write_to, settings, scratch)
                attempt.max_abs_diff = check(session)
            except Exception as exc:  # a rewrite ORT cannot load is a rewrite not to ship
                report.dropped = f"fused graph does not load ({exc.__class__.__name__}: {first_line(exc)})"
                continue
            if attempt.max_abs_diff <= tolerance:
                if accept is not None:
                    accept(session, serialized)
                return candidate, attempt
            del session, serialized
        report.dropped = f"fusions changed the outputs (max abs diff {attempt.max_abs_diff:.2e} > {tolerance:g})"
    return model, report


def _candidate_session(candidate: "onnx.ModelProto", write_to: "Path | None", settings: "SessionSettings | None",
                       scratch: "contextlib.ExitStack") -> tuple["onnxruntime.InferenceSession", bytes | None]:
    """(check session, serialized bytes) of ``candidate``: from its bytes, or (``write_to``) from the file
    they are written to, the bytes then passed on rather than held here (None: freed once written)."""
    if write_to is None:
        serialized = candidate.SerializeToString()
        return create_session(serialized, settings or check_settings()), serialized
    return _file_session(candidate.SerializeToString(), write_to, settings, scratch), None


def _file_session(serialized: bytes, path: "Path", settings: "SessionSettings | None",
                  scratch: "contextlib.ExitStack") -> "onnxruntime.InferenceSession":
    """Write ``serialized`` to ``path`` and open it in a session mapping its weights from there.

    The bytes are the graph's file anyway; the session's weights are then the
    file's pages, not two more copies of them (its parse of the bytes and its
    tensors: ~55k fewer page faults per MiniLM-L6 graph). The session's scratch
    directory (hard links of ``path``) lives as long as ``scratch``.
    """
    import tempfile

    from lora_edge.core.onnx_io import load_by_reference, session_file

    path.write_bytes(serialized)
    del serialized  # the only reference: its pages are free for the session's own allocations
    directory = scratch.enter_context(tempfile.TemporaryDirectory(prefix=".check-", dir=path.parent))
    return create_session(session_file(load_by_reference(path), directory), settings or check_settings())


def _source_check(model: "onnx.ModelProto", source: str | bytes) -> "Callable | None":
    """A candidate's largest difference from ``source`` (relative to the output scale) on the sample batches."""
    feed_sets = fusion_feed_sets(model)
    if "input_ids" not in feed_sets[0]:
        return None
    try:
        expected = outputs_on(source, feed_sets)
    except Exception:  # inputs beyond an encoder's
        return None
    return lambda session: max(relative_difference(reference, run(session, feeds))
                               for reference, feeds in zip(expected, feed_sets))
