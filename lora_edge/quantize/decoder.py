"""Rewrites that make ``causal-lm`` graphs fast on a CPU, each checked against the source graph.

A decoder step at batch 1 runs ~100 small ONNX nodes per layer on tensors of a
few kilobytes, so at SmolLM2's size the per-node cost, not the arithmetic,
sets the decode speed. :func:`fuse_decoder` folds the exported patterns into
ONNX Runtime's CPU contrib ops:

* RMSNorm (``Pow -> ReduceMean -> Add -> Sqrt -> Reciprocal -> Mul -> Mul``)
  -> ``SimplifiedLayerNormalization``, and the residual ``Add`` before it ->
  ``SkipSimplifiedLayerNormalization`` (onnxruntime.transformers' own fusions);
* rotary position embedding (``x * cos + cat(-x2, x1) * sin`` on
  ``[batch, heads, sequence, head_dim]``) -> ``RotaryEmbedding`` with cos/sin
  caches computed from the graph's own ``inv_freq`` for every position of the
  context, fed the graph's ``position_ids`` (left padding keeps working);
* branched LoRA pairs reading the same input share one ``x·[A_1 | A_2]``
  MatMul (:func:`lora_edge.export.cpu_fusion.share_lora_inputs`).

The graph I/O does not change. The rewritten graph must match the source on a
left-padded prefill and a decode step after a random past (relative to the
output scale), else the source graph is kept and the reason recorded.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from lora_edge.core.errors import first_line
from lora_edge.runtime.feeds import sample_decoder_feeds
from lora_edge.export.cpu_fusion import share_lora_inputs
from lora_edge.core.onnx_io import save_streamed, weightless_twin
from lora_edge.runtime.session import outputs_on, release_freed_memory
from lora_edge.runtime.session import relative_difference

if TYPE_CHECKING:
    import numpy as np
    import onnx

# Fused vs unfused fp32 graph on the same inputs: rounding of a reordered sum only.
FUSION_TOLERANCE = 1e-4
MICROSOFT = "com.microsoft"


@dataclass
class DecoderFusionReport:
    """What :func:`fuse_decoder` did, for the manifest."""

    rms_norm: int = 0
    skip_rms_norm: int = 0
    rotary: int = 0
    grouped_attention: int = 0
    lora_shared: int = 0  # branched LoRA pairs whose A factors were merged with a sibling's (same input)
    nodes_before: int = 0
    nodes_after: int = 0
    max_abs_diff: float | None = None
    dropped: str | None = None  # why the rewrites were not kept

    def to_json(self) -> dict:
        """JSON form (only non-empty fields)."""
        return {key: value for key, value in self.__dict__.items() if value not in (None, 0)}


def fuse_rms_norms(model: "onnx.ModelProto", report: DecoderFusionReport) -> "onnx.ModelProto":
    """RMSNorm -> SimplifiedLayerNormalization, residual Add + it -> SkipSimplifiedLayerNormalization."""
    import logging

    from onnxruntime.transformers.fusion_simplified_layernorm import (
        FusionSimplifiedLayerNormalization,
        FusionSkipSimplifiedLayerNormalization,
    )
    from onnxruntime.transformers.onnx_model import OnnxModel

    loggers = [logging.getLogger(name) for name in ("onnxruntime.transformers", "fusion_base", "onnx_model",
                                                    "onnxruntime.tools.symbolic_shape_infer", "symbolic_shape_infer")]
    levels = [log.level for log in loggers]
    for log in loggers:
        log.setLevel(logging.ERROR)
    try:
        wrapped = OnnxModel(model)
        FusionSimplifiedLayerNormalization(wrapped).apply()
        # The skip fusion runs ORT's symbolic shape inference on the model it is built with, which copies
        # that model twice (+1 GB for SmolLM2-135M): it is built on a twin without weight data (same
        # nodes, names and shapes), then fuses the real graph.
        skip = FusionSkipSimplifiedLayerNormalization(OnnxModel(weightless_twin(wrapped.model)))
        skip.model = wrapped
        skip.apply()
        wrapped.prune_graph()
        wrapped.topological_sort()
    finally:
        for log, level in zip(loggers, levels):
            log.setLevel(level)
    ops = [node.op_type for node in wrapped.model.graph.node]
    report.rms_norm = ops.count("SimplifiedLayerNormalization")
    report.skip_rms_norm = ops.count("SkipSimplifiedLayerNormalization")
    return expand_plain_rms_norms(wrapped.model)


def expand_plain_rms_norms(model: "onnx.ModelProto") -> "onnx.ModelProto":
    """Write each plain SimplifiedLayerNormalization back in standard ONNX ops.

    ONNX Runtime registers that op in the default ONNX domain, where the ONNX
    checker (which every graph lora-edge writes must pass) knows no such op. Only
    norms without a residual before them stay plain (the first of a decoder), so
    computing them as x * 1/sqrt(mean(x^2) + eps) * scale costs nothing measurable;
    the residual norms stay fused as com.microsoft SkipSimplifiedLayerNormalization.
    """
    import numpy as np
    from onnx import helper, numpy_helper

    nodes = []
    for node in model.graph.node:
        if node.op_type != "SimplifiedLayerNormalization" or node.domain not in ("", "ai.onnx"):
            nodes.append(node)
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        x, scale, p = node.input[0], node.input[1], node.name or node.output[0]
        model.graph.initializer.extend([
            numpy_helper.from_array(np.array([int(attrs.get("axis", -1))], dtype=np.int64), f"{p}_axes"),
            numpy_helper.from_array(np.array(float(attrs.get("epsilon", 1e-5)), dtype=np.float32), f"{p}_eps")])
        nodes += [helper.make_node("Mul", [x, x], [f"{p}_sq"], name=f"{p}_sq"),
                  helper.make_node("ReduceMean", [f"{p}_sq", f"{p}_axes"], [f"{p}_mean"], name=f"{p}_mean",
                                   keepdims=1),
                  helper.make_node("Add", [f"{p}_mean", f"{p}_eps"], [f"{p}_var"], name=f"{p}_var"),
                  helper.make_node("Sqrt", [f"{p}_var"], [f"{p}_std"], name=f"{p}_std"),
                  helper.make_node("Reciprocal", [f"{p}_std"], [f"{p}_inv"], name=f"{p}_inv"),
                  helper.make_node("Mul", [x, f"{p}_inv"], [f"{p}_normed"], name=f"{p}_normed"),
                  helper.make_node("Mul", [f"{p}_normed", scale], [node.output[0]], name=f"{p}_scaled")]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return model


class _Constants(Mapping):
    """Initializer and Constant values by name, converted to numpy when read (the rewrites read a few small ones;
    converting every weight up front cost a copy of the model)."""

    def __init__(self, tensors: dict):
        self._tensors, self._values = tensors, {}

    def __getitem__(self, name: str) -> "np.ndarray":
        if name not in self._values:
            from onnx import numpy_helper

            self._values[name] = numpy_helper.to_array(self._tensors[name])
        return self._values[name]

    def __contains__(self, name) -> bool:
        return name in self._tensors

    def __iter__(self):
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)


@dataclass
class _Graph:
    """Producer/consumer maps and initializer values of a graph (rebuilt per rewrite pass)."""

    model: "onnx.ModelProto"
    producer: dict = field(default_factory=dict)
    consumers: dict = field(default_factory=dict)
    constants: Mapping = field(default_factory=dict)

    def __post_init__(self):
        tensors = {}
        for node in self.model.graph.node:
            for name in node.output:
                self.producer[name] = node
            for name in node.input:
                self.consumers.setdefault(name, []).append(node)
            if node.op_type == "Constant":
                tensors[node.output[0]] = node.attribute[0].t
        for init in self.model.graph.initializer:
            tensors[init.name] = init
        self.constants = _Constants(tensors)

    def parent(self, node, index: int, op_type: str):
        """The node producing ``node.input[index]`` when it is an ``op_type``, else None."""
        if index >= len(node.input):
            return None
        parent = self.producer.get(node.input[index])
        return parent if parent is not None and parent.op_type == op_type else None


def _rotary_parts(graph: _Graph, add) -> tuple | None:
    """(x, cos, sin, half) when ``add`` is ``x * cos + cat(-x[..., half:], x[..., :half]) * sin``, else None."""
    for first in (0, 1):
        mul_cos, mul_sin = graph.parent(add, first, "Mul"), graph.parent(add, 1 - first, "Mul")
        if mul_cos is None or mul_sin is None:
            continue
        for cat_index in (0, 1):
            cat = graph.parent(mul_sin, cat_index, "Concat")
            if cat is None or len(cat.input) != 2:
                continue
            neg, low = graph.parent(cat, 0, "Neg"), graph.parent(cat, 1, "Slice")
            high = graph.parent(neg, 0, "Slice") if neg is not None else None
            if low is None or high is None or low.input[0] != high.input[0]:
                continue
            x = low.input[0]
            if x not in mul_cos.input:
                continue
            cos, sin = mul_cos.input[1 - list(mul_cos.input).index(x)], mul_sin.input[1 - cat_index]
            half = _slice_start(graph, high)
            if half is not None:
                return x, cos, sin, half
    return None


def _slice_start(graph: _Graph, node) -> int | None:
    """The constant start of a one-axis Slice on the last axis, else None."""
    values = [graph.constants.get(name) for name in node.input[1:4]]
    if any(value is None for value in values[:2]) or len(node.input) < 4:
        return None
    starts, axes = values[0], graph.constants.get(node.input[3])
    if axes is None or starts.size != 1 or int(axes.reshape(-1)[0]) not in (-1, 3):
        return None
    return int(starts.reshape(-1)[0])


def _inv_freq(graph: _Graph, cos: str) -> "np.ndarray | None":
    """The rotary ``inv_freq`` behind a cos input: ``Unsqueeze(Cos(Concat(p * f, p * f)))`` with constant f."""
    node = graph.producer.get(cos)
    while node is not None and node.op_type in ("Unsqueeze", "Cast"):
        node = graph.producer.get(node.input[0])
    if node is None or node.op_type != "Cos":
        return None
    cat = graph.parent(node, 0, "Concat")
    if cat is None or len(cat.input) != 2 or cat.input[0] != cat.input[1]:
        return None
    mul = graph.parent(cat, 0, "Mul")
    if mul is None:
        return None
    for name in mul.input:
        if name in graph.constants and graph.constants[name].ndim == 1:
            return graph.constants[name]
    return None


def fuse_rotary(model: "onnx.ModelProto", max_positions: int, report: DecoderFusionReport) -> "onnx.ModelProto":
    """Rotary patterns on ``[batch, heads, sequence, head_dim]`` -> com.microsoft ``RotaryEmbedding``.

    The cos/sin caches ``[max_positions, head_dim / 2]`` are computed from the
    graph's ``inv_freq`` exactly as it does (fp32 position * inv_freq); the op
    reads the rows at ``position_ids``.
    """
    import numpy as np
    from onnx import helper, numpy_helper

    graph = _Graph(model)
    caches: dict[bytes, tuple[str, str]] = {}
    replaced: dict[str, "onnx.NodeProto"] = {}
    for node in model.graph.node:
        if node.op_type != "Add":
            continue
        parts = _rotary_parts(graph, node)
        inv_freq = _inv_freq(graph, parts[1]) if parts is not None else None
        if parts is None or inv_freq is None or parts[3] != inv_freq.size:
            continue
        key = inv_freq.astype(np.float32).tobytes()
        if key not in caches:
            angles = np.arange(max_positions, dtype=np.float32)[:, None] * inv_freq.astype(np.float32)[None, :]
            names = (f"rotary_cos_cache_{len(caches)}", f"rotary_sin_cache_{len(caches)}")
            model.graph.initializer.extend([numpy_helper.from_array(np.cos(angles).astype(np.float32), names[0]),
                                            numpy_helper.from_array(np.sin(angles).astype(np.float32), names[1])])
            caches[key] = names
        cos_cache, sin_cache = caches[key]
        replaced[node.name] = helper.make_node("RotaryEmbedding", [parts[0], "position_ids", cos_cache, sin_cache],
                                               [node.output[0]], name=f"{node.name}_rotary", domain=MICROSOFT,
                                               interleaved=0)
    if not replaced:
        return model
    nodes = [replaced.get(node.name, node) for node in model.graph.node]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    _ensure_opset(model)
    report.rotary = len(replaced)
    return _prune(model)


def _walk_up(graph: _Graph, name: str, through: tuple[str, ...]) -> str:
    """Follow ``name`` up through nodes of the given types (first input) to where it comes from."""
    node = graph.producer.get(name)
    while node is not None and node.op_type in through:
        name = node.input[0]
        node = graph.producer.get(name)
    return name


def _scalar(graph: _Graph, node) -> tuple[str, float] | None:
    """(other input, constant) of a Mul by a scalar constant, else None."""
    for index in (0, 1):
        value = graph.constants.get(node.input[index])
        if value is not None and value.size == 1:
            return node.input[1 - index], float(value.reshape(-1)[0])
    return None


@dataclass
class _RepeatedKV:
    """One attention block that repeats the cache's K/V heads: the nodes the grouped rewrite replaces or reads."""

    softmax: "onnx.NodeProto"
    isnan: "onnx.NodeProto"
    guard: "onnx.NodeProto"  # Where(IsNaN(probs), 0, probs)
    weighted: "onnx.NodeProto"  # probs x V
    query: str  # the query before its scale
    alpha: float  # the product of the query's and the key's scales
    key: str  # present.<i>.key: the cache, not its repeated copy
    value: str
    mask: str


# From a scores MatMul's key input up to the cache: scale, head merge, transpose, repeat (Expand of an Unsqueeze).
REPEATED_KEY_PATH = ("Mul", "Reshape", "Transpose", "Expand", "Unsqueeze")


def _match_repeated_kv(graph: "_Graph", softmax: "onnx.NodeProto", presents: set[str]) -> _RepeatedKV | None:
    """The block around ``softmax`` when it is scores(Q, repeated K) + mask -> Softmax -> NaN guard -> x repeated V."""
    add = graph.parent(softmax, 0, "Add")
    scores = next((graph.parent(add, i, "MatMul") for i in (0, 1) if graph.parent(add, i, "MatMul")), None) \
        if add is not None else None
    readers = graph.consumers.get(softmax.output[0], [])
    isnan = next((n for n in readers if n.op_type == "IsNaN"), None)
    guard = next((n for n in readers if n.op_type == "Where"), None)
    if scores is None or isnan is None or guard is None or len(readers) != 2:
        return None
    weighted = graph.consumers.get(guard.output[0], [])
    if len(weighted) != 1 or weighted[0].op_type != "MatMul" or weighted[0].input[0] != guard.output[0]:
        return None
    q_mul, k_mul = graph.producer.get(scores.input[0]), graph.producer.get(scores.input[1])
    if q_mul is None or k_mul is None or q_mul.op_type != "Mul" or k_mul.op_type != "Mul":
        return None
    q_scaled, k_scaled = _scalar(graph, q_mul), _scalar(graph, k_mul)
    key = _walk_up(graph, scores.input[1], REPEATED_KEY_PATH)
    value = _walk_up(graph, weighted[0].input[1], REPEATED_KEY_PATH[1:])
    if q_scaled is None or k_scaled is None or key not in presents or value not in presents:
        return None
    mask = add.input[1] if add.input[0] == scores.output[0] else add.input[0]
    return _RepeatedKV(softmax, isnan, guard, weighted[0], q_scaled[0], q_scaled[1] * k_scaled[1], key, value, mask)


def _grouped_attention_nodes(p: str, plan: _RepeatedKV) -> list["onnx.NodeProto"]:
    """The grouped block (names prefixed ``p``) that replaces ``plan``'s, writing its weighted output's name."""
    from onnx import helper

    return [
        helper.make_node("Reshape", [plan.query, "gqa_q_shape"], [f"{p}_q"], name=f"{p}_q_reshape"),
        helper.make_node("FusedMatMul", [f"{p}_q", plan.key], [f"{p}_scores"], name=f"{p}_scores", domain=MICROSOFT,
                         transB=1, alpha=plan.alpha),
        helper.make_node("Tile", [plan.mask, "gqa_mask_tiles"], [f"{p}_mask"], name=f"{p}_mask_tile"),
        helper.make_node("Add", [f"{p}_scores", f"{p}_mask"], [f"{p}_masked"], name=f"{p}_mask_add"),
        helper.make_node("Softmax", [f"{p}_masked"], [f"{p}_probs"], name=f"{p}_softmax", axis=-1),
        helper.make_node("IsNaN", [f"{p}_probs"], [f"{p}_nan"], name=f"{p}_isnan"),
        helper.make_node("Where", [f"{p}_nan", plan.guard.input[1], f"{p}_probs"], [f"{p}_guarded"],
                         name=f"{p}_guard"),
        helper.make_node("MatMul", [f"{p}_guarded", plan.value], [f"{p}_out"], name=f"{p}_weighted"),
        helper.make_node("Reshape", [f"{p}_out", "gqa_out_shape"], [plan.weighted.output[0]],
                         name=f"{p}_out_reshape"),
    ]


def fuse_grouped_attention(model: "onnx.ModelProto", heads: int, kv_heads: int,
                           report: DecoderFusionReport) -> "onnx.ModelProto":
    """Grouped-query attention without repeating the cache: no Expand/Transpose copies of K and V per step.

    The exported graph repeats each key/value head for its ``heads / kv_heads``
    query heads (Unsqueeze -> Expand -> Reshape: a copy of the whole cache per
    layer and step) and transposes the repeated keys (another copy). The rewrite
    groups the query heads instead: ``Q [b, kv, g*s, d]`` times the cache
    ``K [b, kv, t, d]`` with ``FusedMatMul(transB, alpha = scale)``, the mask tiled
    over the g groups, Softmax (and the graph's own NaN guard) unchanged, times
    ``V [b, kv, t, d]``, reshaped back to ``[b, heads, s, d]``.
    """
    import numpy as np
    from onnx import numpy_helper

    if kv_heads < 1 or heads % kv_heads:
        return model
    group = heads // kv_heads
    graph = _Graph(model)
    presents = {value.name for value in model.graph.output if value.name.startswith("present.")}
    plans = [plan for softmax in model.graph.node if softmax.op_type == "Softmax"
             if (plan := _match_repeated_kv(graph, softmax, presents)) is not None]
    if not plans:
        return model
    head_dim = next(int(v.type.tensor_type.shape.dim[3].dim_value) for v in model.graph.input
                    if v.name.startswith("past_key_values."))
    shared = {"gqa_q_shape": np.array([0, kv_heads, -1, head_dim], np.int64),
              "gqa_out_shape": np.array([0, heads, -1, head_dim], np.int64),
              "gqa_mask_tiles": np.array([1, 1, group, 1], np.int64)}
    model.graph.initializer.extend(numpy_helper.from_array(v, k) for k, v in shared.items())
    new_nodes = {plan.softmax.name: _grouped_attention_nodes(f"gqa_{i}", plan) for i, plan in enumerate(plans)}
    dead = {node.name for plan in plans for node in (plan.isnan, plan.guard, plan.weighted)}
    nodes = []
    for node in model.graph.node:
        if node.name in new_nodes:
            nodes.extend(new_nodes[node.name])
        elif node.name not in dead:
            nodes.append(node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    _ensure_opset(model)
    report.grouped_attention = len(plans)
    pruned = _prune(model)
    _topological_sort(pruned)
    return pruned


def _topological_sort(model: "onnx.ModelProto") -> None:
    from onnxruntime.transformers.onnx_model import OnnxModel

    OnnxModel(model).topological_sort()


def _ensure_opset(model: "onnx.ModelProto") -> None:
    """Declare the com.microsoft domain (contrib ops) if the graph does not yet."""
    from onnx import helper

    if not any(opset.domain == MICROSOFT for opset in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MICROSOFT, 1))


def _prune(model: "onnx.ModelProto") -> "onnx.ModelProto":
    """Drop nodes and initializers no graph output depends on."""
    from onnxruntime.transformers.onnx_model import OnnxModel

    wrapped = OnnxModel(model)
    wrapped.prune_graph()
    return wrapped.model


def _rewrite(model: "onnx.ModelProto", config: dict | None, report: DecoderFusionReport) -> "onnx.ModelProto":
    """The rewrites in order: norms, rotary (needs the context length), grouped attention (the head counts)."""
    from lora_edge.core.decoder_io import context_length

    model = fuse_rms_norms(model, report)
    max_positions = context_length(config) if config else None
    if max_positions:
        model = fuse_rotary(model, int(max_positions), report)
    text = (config or {}).get("text_config") or config or {}
    heads = text.get("num_attention_heads")
    if heads:
        model = fuse_grouped_attention(model, int(heads), int(text.get("num_key_value_heads") or heads), report)
    report.lora_shared = share_lora_inputs(model)
    return model


def fuse_decoder(model: "onnx.ModelProto", source: str | bytes, config: dict | None,
                 tolerance: float = FUSION_TOLERANCE) -> tuple["onnx.ModelProto", DecoderFusionReport]:
    """Fuse a ``causal-lm`` graph for CPUs; keep the result only when it matches ``source``.

    ``config`` (the model's config.json) gives the context length, which sizes
    the rotary caches, and the query / key-value head counts of grouped
    attention; without it only the norms are fused. Returns (graph, report); on a
    mismatch or a failure the graph comes back as ``source`` holds it, with
    ``report.dropped`` saying why. ``model`` is rewritten in place (one copy of
    the weights in memory): the caller uses the returned graph only.
    """
    report = DecoderFusionReport(nodes_before=len(model.graph.node))
    if not any(value.name.startswith("past_key_values.") for value in model.graph.input):
        return model, report
    feeds = sample_decoder_feeds(model)
    try:
        expected = outputs_on(source, feeds)  # one session for every batch: an LLM session costs seconds
        release_freed_memory()
        # Rewritten in place (no second copy of the weights); ``source`` is loaded again if it is not kept.
        candidate = _rewrite(model, config, report)
        release_freed_memory()
        report.max_abs_diff = max(relative_difference(want, got)
                                  for want, got in zip(expected, _outputs_from_file(candidate, feeds, source)))
    except Exception as exc:  # a rewrite that fails or that ORT cannot load is a rewrite not to ship
        return _load_source(source), DecoderFusionReport(
            nodes_before=report.nodes_before, dropped=f"rewrites failed ({exc.__class__.__name__}: {first_line(exc)})")
    if not report.max_abs_diff <= tolerance:
        return _load_source(source), DecoderFusionReport(
            nodes_before=report.nodes_before, max_abs_diff=report.max_abs_diff,
            dropped=f"fusions changed the outputs (relative max abs diff {report.max_abs_diff:.2e})")
    report.nodes_after = len(candidate.graph.node)
    return candidate, report


def _outputs_from_file(model: "onnx.ModelProto", feeds: list[dict], source: str | bytes) -> list[list]:
    """:func:`outputs_on` ``model``, streamed to a scratch file beside ``source`` for the session to read.

    A session made from bytes holds them as long as it lives, and serializing
    takes twice the model's size at its peak: the weights would be in memory three
    to four times instead of twice (the proto and ORT's copy).
    """
    import tempfile

    where = None if isinstance(source, bytes) else Path(source).parent
    with tempfile.TemporaryDirectory(prefix=".fusion-check-", dir=where) as directory:
        path = Path(directory) / "candidate.onnx"
        save_streamed(model, path)
        return outputs_on(str(path), feeds)


def _load_source(source: str | bytes) -> "onnx.ModelProto":
    """The graph :func:`fuse_decoder` started from (a file, or a serialized model)."""
    import onnx

    return onnx.load_from_string(source) if isinstance(source, bytes) else onnx.load(str(source))


# --- tied embedding: one int4 copy ---------------------------------------------------------------------------

@dataclass(frozen=True)
class TiedEmbedding:
    """A token embedding ``Gather(W, input_ids)`` whose LM head is ``MatMul(x, L)`` with ``L == W.T`` exactly."""

    gather: str  # the Gather node's name
    embedding: str  # W [vocab, hidden]
    head: str  # L [hidden, vocab]


def find_tied_embedding(model: "onnx.ModelProto") -> TiedEmbedding | None:
    """The tied embedding / LM head pair of a float decoder graph (tie_word_embeddings), else None.

    The exporter writes the head either as ``MatMul(x, Transpose(W))`` on the
    embedding's own tensor, which the int4 quantizer cannot quantize (its weight
    is not an initializer: the head would stay fp32, and ONNX Runtime would fold
    the Transpose into a second fp32 copy at load), or as its own transposed
    initializer (two int4 copies). The first is rewritten to read ``W.T`` as an
    initializer, so the head is quantized; :func:`share_tied_embedding` then makes
    the lookup read it. Tied values are compared, not names.
    """
    import numpy as np
    from onnx import numpy_helper

    initializers = {init.name: init for init in model.graph.initializer}
    gathers = [node for node in model.graph.node if node.op_type == "Gather" and node.input[0] in initializers
               and node.input[1] == "input_ids"]
    if len(gathers) != 1:
        return None
    gather = gathers[0]
    embedding = numpy_helper.to_array(initializers[gather.input[0]])
    if embedding.ndim != 2:
        return None
    producers = {output: node for node in model.graph.node for output in node.output}
    for node in model.graph.node:
        if node.op_type != "MatMul":
            continue
        transpose = producers.get(node.input[1])
        if transpose is not None and transpose.op_type == "Transpose" and transpose.input[0] == gather.input[0]:
            head = f"{gather.input[0]}_head"
            model.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(embedding.T), head))
            node.input[1] = head
            return TiedEmbedding(gather.name, gather.input[0], head)
        if node.input[1] not in initializers:
            continue
        dims = list(initializers[node.input[1]].dims)
        if dims == [embedding.shape[1], embedding.shape[0]] and \
                np.array_equal(numpy_helper.to_array(initializers[node.input[1]]), embedding.T):
            return TiedEmbedding(gather.name, gather.input[0], node.input[1])
    return None


def share_tied_embedding(model: "onnx.ModelProto", tied: TiedEmbedding) -> bool:
    """Point the embedding lookup at the int4 LM head's weights; drop the embedding's own copy.

    After MatMulNBits quantization the head's weight is ``[vocab, blocks,
    block_bytes]`` uint8 (4-bit, zero point 8) with ``[vocab, blocks]`` scales;
    ``GatherBlockQuantized`` reads rows of that same tensor, so the lookup
    returns exactly the head's dequantized rows. Returns False (graph unchanged)
    when the quantized graph does not have that shape.
    """
    import numpy as np
    from onnx import helper, numpy_helper

    head = next((node for node in model.graph.node if node.op_type == "MatMulNBits"
                 and node.input[1].startswith(tied.head)), None)
    lookup = next((node for node in model.graph.node if node.name == tied.gather
                   or (node.op_type in ("Gather", "GatherBlockQuantized") and node.input[1] == "input_ids")), None)
    if head is None or lookup is None or len(head.input) > 3 and head.input[3]:  # explicit zero points: not handled
        return False
    attrs = {a.name: helper.get_attribute_value(a) for a in head.attribute}
    weight = next((init for init in model.graph.initializer if init.name == head.input[1]), None)
    if weight is None or len(weight.dims) != 3 or attrs.get("bits") != 4:
        return False
    vocab, blocks = int(weight.dims[0]), int(weight.dims[1])
    prefix = f"{tied.head}_tied"
    model.graph.initializer.extend([numpy_helper.from_array(np.array([vocab, blocks, 1], np.int64), f"{prefix}_scale_shape"),
                                    numpy_helper.from_array(np.array([0, 0, -1], np.int64), f"{prefix}_out_shape")])
    replacement = [
        helper.make_node("Reshape", [head.input[2], f"{prefix}_scale_shape"], [f"{prefix}_scales"],
                         name=f"{prefix}_scales_reshape"),
        helper.make_node("GatherBlockQuantized", [head.input[1], "input_ids", f"{prefix}_scales"], [f"{prefix}_rows"],
                         name=f"{prefix}_gather", domain=MICROSOFT, block_size=int(attrs["block_size"]), gather_axis=0,
                         quantize_axis=2, bits=4),
        helper.make_node("Reshape", [f"{prefix}_rows", f"{prefix}_out_shape"], [lookup.output[0]],
                         name=f"{prefix}_rows_reshape"),
    ]
    nodes = []
    for node in model.graph.node:
        nodes.extend(replacement if node is lookup else [node])
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    _ensure_opset(model)
    pruned = _prune(model)  # the float embedding and any Transpose of it are dead now
    if pruned is not model:
        model.CopyFrom(pruned)
    return True


def config_beside(graph: str | Path) -> dict | None:
    """The ``config.json`` beside a bundle's graph (None when absent or unreadable)."""
    import json

    try:
        return json.loads((Path(graph).parent / "config.json").read_text())
    except (OSError, ValueError):
        return None
