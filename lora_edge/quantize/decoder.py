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

import functools
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from lora_edge.core.decoder_io import CHUNKED_BATCH_KEY, SHARED_BUFFER, SHARED_CACHE_KEY
from lora_edge.core.errors import first_line
from lora_edge.core.onnx_io import (has_references, load_by_reference, session_file, tensor_value,
                                    transposed_reference, weightless_twin)
from lora_edge.export.cpu_fusion import share_lora_inputs
from lora_edge.quantize.lora import is_lora_name
from lora_edge.runtime.feeds import decoder_check_feeds
from lora_edge.runtime.packed_lora import (PACKED_LORA_KEY, PACKED_SUFFIX, PackedLora, PackedMember, member_names,
                                           model_packs, pack_tensors, packs_to_metadata)
from lora_edge.runtime.session import outputs_on, relative_difference, release_freed_memory, remembered_outputs

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
    group_query_attention: int = 0  # attention blocks run as one com.microsoft GroupQueryAttention
    attention: int = 0  # attention blocks fused either way (what `lora-edge quantize` prints)
    packed_qkv: int = 0  # of those, q, k and v projections packed into one MatMul
    lora_shared: int = 0  # branched LoRA pairs whose A factors were merged with a sibling's (same input)
    packed_lora: int = 0  # attention blocks whose q/k/v LoRA pairs are one packed A and B (hot-swap: two inputs)
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
    from onnxruntime.transformers.fusion_skiplayernorm import FusionSkipLayerNormalization
    from onnxruntime.transformers.onnx_model import OnnxModel

    loggers = [logging.getLogger(name) for name in ("onnxruntime.transformers", "fusion_base", "onnx_model",
                                                    "onnxruntime.tools.symbolic_shape_infer", "symbolic_shape_infer")]
    levels = [log.level for log in loggers]
    for log in loggers:
        log.setLevel(logging.ERROR)
    try:
        wrapped = _indexed_onnx_model(model)
        FusionSimplifiedLayerNormalization(wrapped).apply()
        # The skip fusion reads shapes of the model it is built with (ORT's symbolic shape inference copies
        # that model twice: +1 GB for SmolLM2-135M): it is built on a twin without weight data (same
        # nodes, names and shapes), then fuses the real graph.
        twin = weightless_twin(wrapped.model)
        shapes = DeclaredShapes(twin)
        if shapes.knows(_skip_norm_inputs(twin)):
            skip = FusionSkipLayerNormalization(OnnxModel(twin), "SkipSimplifiedLayerNormalization",
                                                "SimplifiedLayerNormalization", shape_infer=False)
            skip.shape_infer_helper = shapes  # (what FusionSkipSimplifiedLayerNormalization is, with these shapes)
        else:
            skip = FusionSkipSimplifiedLayerNormalization(OnnxModel(twin))
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


def _indexed_onnx_model(model: "onnx.ModelProto"):
    """ORT's ``OnnxModel`` over ``model``, answering the lookups of a fusion's search from indexes.

    ORT's fusions rebuild the name -> node maps, scan every node for a Constant
    and search the graph for a node's subgraph at each candidate (1.2 s of
    SmolLM2-135M's two norm fusions). While a fusion searches the graph does not
    change: it applies what it found at the end, through ``remove_nodes``,
    ``add_node(s)``, ``update_graph`` or ``prune_graph``, which drop the indexes. Same
    answers, same graph (tested byte for byte against the plain ``OnnxModel``).
    A graph with subgraphs, or nodes without unique names, gets the plain model.
    """
    from onnxruntime.transformers.onnx_model import OnnxModel

    names = [node.name for node in model.graph.node]
    if any(a.type in (a.GRAPH, a.GRAPHS) for node in model.graph.node for a in node.attribute) or \
            not all(names) or len(set(names)) != len(names):
        return OnnxModel(model)
    return _indexed_class()(model)


@functools.cache
def _indexed_class() -> type:
    """The OnnxModel subclass of :func:`_indexed_onnx_model` (made on first use: onnxruntime.transformers is
    imported only when a decoder is fused)."""
    from onnxruntime.transformers.onnx_model import OnnxModel

    changing = {name: _dropping_indexes(name) for name in ("add_node", "add_nodes", "update_graph", "prune_graph")}
    return type("IndexedOnnxModel", (OnnxModel,), {
        "_index": None, "_indexes": _indexes, "get_graph_by_node": lambda self, node: self.model.graph,
        "output_name_to_node": lambda self, exclude_subgraphs=False: dict(self._indexes()[0]),
        "input_name_to_nodes": lambda self, exclude_subgraphs=False: {
            name: list(nodes) for name, nodes in self._indexes()[1].items()},
        "get_initializer": lambda self, name: self._indexes()[3].get(name),
        "get_constant_value": _indexed_constant_value, "remove_nodes": _remove_nodes_by_name,
        "remove_node": lambda self, node: _remove_nodes_by_name(self, [node]),
        "topological_sort": _indexed_topological_sort, **changing})


def _indexes(self) -> tuple[dict, dict, dict, dict]:
    """(output -> producer, input -> consumers, output -> Constant node, name -> initializer), built once."""
    if self._index is None:
        producers, consumers, constants = {}, {}, {}
        for node in self.model.graph.node:
            for name in node.input:
                if name:
                    consumers.setdefault(name, []).append(node)
            for name in node.output:
                if name:
                    producers[name] = node
            if node.op_type == "Constant":
                constants.setdefault(node.output[0], node)
        self._index = (producers, consumers, constants,
                       {tensor.name: tensor for tensor in reversed(self.model.graph.initializer)})
    return self._index


def _indexed_constant_value(self, output_name):
    """OnnxModel.get_constant_value: a Constant node's ``value``, else the initializer's, else None."""
    from onnx import numpy_helper

    node = self._indexes()[2].get(output_name)
    value = next((a.t for a in node.attribute if a.name == "value"), None) if node is not None else None
    if value is not None:
        return numpy_helper.to_array(value)
    initializer = self.get_initializer(output_name)
    return numpy_helper.to_array(initializer) if initializer is not None else None


def _remove_nodes_by_name(self, nodes_to_remove) -> None:
    """OnnxModel.remove_nodes in one pass (node names are unique here), the other nodes in their order."""
    self._index = None
    gone = {node.name for node in nodes_to_remove}
    graph = self.model.graph
    for position in reversed([i for i, node in enumerate(graph.node) if node.name in gone]):
        del graph.node[position]


def _indexed_topological_sort(self, is_deterministic=False, dump_model_on_failure=False):
    """OnnxModel.topological_sort: the same order (:func:`_sweep_sort`)."""
    self._index = None
    if is_deterministic:
        return super(type(self), self).topological_sort(is_deterministic, dump_model_on_failure)
    _sweep_sort(self.model.graph)


def _dropping_indexes(name: str):
    """OnnxModel's method ``name``, changing the graph: the indexes are dropped before and after."""
    def method(self, *args, **kwargs):
        self._index = None
        result = getattr(super(type(self), self), name)(*args, **kwargs)
        self._index = None
        return result
    return method


def _sweep_sort(graph: "onnx.GraphProto") -> None:
    """ORT's ``OnnxModel.graph_topological_sort``, the same order, on names read once from the protos.

    It sweeps the node list again and again, taking each node whose inputs are all
    known (a node taken feeds those after it in the same sweep), until a sweep
    takes nothing; reading each node's inputs from its proto at every sweep was
    0.18 s of a SmolLM2-135M graph.
    """
    known = {tensor.name for tensor in graph.initializer} | {value.name for value in graph.input}
    nodes = [(index, [name for name in node.input if name], [name for name in node.output if name])
             for index, node in enumerate(graph.node)]
    order: list[int] = []
    while nodes:
        waiting = []
        for index, inputs, outputs in nodes:
            if all(name in known for name in inputs):
                order.append(index)
                known.update(outputs)
            else:
                waiting.append((index, inputs, outputs))
        if len(waiting) == len(nodes):
            raise RuntimeError(f"Graph is not a DAG: {len(order)} of {len(graph.node)} nodes sorted, "
                               f"failed at node {graph.node[waiting[-1][0]].name}")
        nodes = waiting
    sorted_nodes = [graph.node[index] for index in order]
    graph.ClearField("node")
    graph.node.extend(sorted_nodes)


class DeclaredShapes:
    """A graph's tensor shapes as ONNX's own shape inference gives them, asked as ORT's fusions ask
    ``SymbolicShapeInferenceHelper`` (``get_edge_shape``).

    ORT's skip-norm fusion runs its symbolic shape inference, in Python, over the
    whole graph (1.5 s of SmolLM2-135M's two int4 graphs) to learn one thing: the
    shapes of the two inputs of each residual Add before an RMSNorm. ONNX's C++
    inference gives them from the shapes the exported graph declares, in a tenth of
    that. Only fully known shapes are given (a dimension nobody knows is not equal
    to another one); ``knows`` tells whether ORT's inference is needed after all.
    """

    def __init__(self, model: "onnx.ModelProto") -> None:
        import onnx

        self._shapes: dict[str, list] = {}
        try:
            inferred = onnx.shape_inference.infer_shapes(model).graph
        except Exception:  # (a graph ONNX's inference refuses: nothing known, ORT's inference decides)
            return
        for value in [*inferred.input, *inferred.value_info, *inferred.output]:
            tensor = value.type.tensor_type
            if value.type.HasField("tensor_type") and tensor.HasField("shape"):
                dims = [dim.dim_value if dim.HasField("dim_value") else dim.dim_param or None
                        for dim in tensor.shape.dim]
                if None not in dims:
                    self._shapes.setdefault(value.name, dims)
        for tensor in model.graph.initializer:
            self._shapes.setdefault(tensor.name, list(tensor.dims))

    def get_edge_shape(self, edge: str) -> list | None:
        """The shape of tensor ``edge`` (ints and named dimensions), None when not fully known."""
        return self._shapes.get(edge)

    def knows(self, edges: list[str]) -> bool:
        """True when every one of ``edges`` has a fully known shape."""
        return all(edge in self._shapes for edge in edges)


def _skip_norm_inputs(model: "onnx.ModelProto") -> list[str]:
    """The inputs of the Adds ORT's skip-norm fusion would look at: an Add of two computed tensors feeding an
    RMSNorm's input (the fusion asks their shapes)."""
    producers = {output: node for node in model.graph.node for output in node.output}
    initializers = {tensor.name for tensor in model.graph.initializer}
    edges = []
    for node in model.graph.node:
        add = producers.get(node.input[0]) if node.op_type == "SimplifiedLayerNormalization" and node.input else None
        if add is not None and add.op_type == "Add" and len(add.input) == 2 and \
                not any(name in initializers for name in add.input):
            edges.extend(add.input)
    return edges


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
        if name not in self._values:  # a weight left in its file is read from there (load_by_reference)
            self._values[name] = tensor_value(self._tensors[name])
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


# --- GroupQueryAttention: one node per layer's attention, the cache appended inside it ----------------------

@dataclass
class _AttentionBlock:
    """One layer's attention in the exported graph, as :func:`fuse_group_query_attention` rewrites it."""

    plan: _RepeatedKV
    q: str  # [batch, sequence, heads * head_dim], before rotary (the q projection's output)
    k: str  # [batch, sequence, kv_heads * head_dim]
    v: str
    keep: str  # bool [batch, 1, sequence, 1]: the new token is real (not padding)
    zero: str  # the constant 0 padded keys/values are replaced by
    rotary: "onnx.NodeProto"  # the query's RotaryEmbedding (position ids, cos/sin caches)
    past_key: str
    past_value: str
    merged: str  # the attention result with heads merged, [batch, sequence, heads * head_dim]


def _split_heads_source(graph: _Graph, name: str) -> str | None:
    """``x`` when ``name`` is ``Transpose(Reshape(x, [b, s, heads, d]), perm=[0, 2, 1, 3])``, else None."""
    from onnx import helper

    transpose = graph.producer.get(name)
    if transpose is None or transpose.op_type != "Transpose":
        return None
    perm = next((list(helper.get_attribute_value(a)) for a in transpose.attribute if a.name == "perm"), None)
    reshape = graph.parent(transpose, 0, "Reshape")
    return reshape.input[0] if perm == [0, 2, 1, 3] and reshape is not None else None


def _cache_append(graph: _Graph, present: str) -> tuple[str, str, str, str, "onnx.NodeProto | None"] | None:
    """(past, new tensor before zeroing, keep condition, zero, its RotaryEmbedding or None) behind a present output.

    The exported cache append is ``Concat(past, Where(keep, new, 0), axis=2)``; keys are rotated first.
    """
    concat = graph.producer.get(present)
    if concat is None or concat.op_type != "Concat" or len(concat.input) != 2:
        return None
    where = graph.parent(concat, 1, "Where")
    if where is None or not concat.input[0].startswith("past_key_values."):
        return None
    zero = graph.constants.get(where.input[2])
    if zero is None or zero.size != 1 or float(zero.reshape(-1)[0]) != 0.0:
        return None
    rotary = graph.parent(where, 1, "RotaryEmbedding")
    return concat.input[0], where.input[1], where.input[0], where.input[2], rotary


def _merged_heads(graph: _Graph, name: str) -> str | None:
    """The tensor the output projection reads: ``name`` [b, heads, s, d] followed through Transpose/Reshape."""
    seen_transpose = False
    node = None
    while True:
        readers = graph.consumers.get(name, [])
        if len(readers) != 1 or readers[0].op_type not in ("Transpose", "Reshape"):
            break
        node = readers[0]
        seen_transpose |= node.op_type == "Transpose"
        name = node.output[0]
    return name if seen_transpose and node is not None and node.op_type == "Reshape" else None


def _match_attention_block(graph: _Graph, plan: _RepeatedKV) -> _AttentionBlock | None:
    """The q/k/v projections, cache inputs, padding condition and output of ``plan``'s attention, else None."""
    key, value = _cache_append(graph, plan.key), _cache_append(graph, plan.value)
    q_rotary = graph.producer.get(plan.query)
    if key is None or value is None or key[4] is None or value[4] is not None or q_rotary is None \
            or q_rotary.op_type != "RotaryEmbedding" or key[2] != value[2]:
        return None
    if list(q_rotary.input[1:4]) != list(key[4].input[1:4]):
        return None  # query and key rotated with other positions or caches
    q, k, v = (_split_heads_source(graph, name) for name in (q_rotary.input[0], key[4].input[0], value[1]))
    merged = _merged_heads(graph, plan.weighted.output[0])
    if None in (q, k, v, merged):
        return None
    return _AttentionBlock(plan, q, k, v, key[2], key[3], q_rotary, key[0], value[0], merged)


def _base_projection(graph: _Graph, name: str, inputs: set[str]) -> tuple | None:
    """(base MatMul, added tensor or None) when ``name`` is ``x·W`` or ``x·W + delta`` with W a base initializer.

    ``delta`` is whatever the graph adds to the base product: a LoRA branch
    (hot-swap, branched) or a bias. W must be a stored 2-D weight that is neither
    a graph input nor a LoRA factor.
    """
    node = graph.producer.get(name)
    candidates = [(node, None)] if node is not None and node.op_type == "MatMul" else []
    if node is not None and node.op_type == "Add":
        candidates = [(graph.parent(node, i, "MatMul"), node.input[1 - i]) for i in (0, 1)]
    for base, delta in candidates:
        if base is None or len(graph.consumers.get(base.output[0], [])) != 1:
            continue
        weight = base.input[1]
        value = graph.constants.get(weight)
        if value is not None and value.ndim == 2 and weight not in inputs and not is_lora_name(weight):
            return base, delta
    return None


def _lora_pair(graph: _Graph, delta: str, source: str) -> tuple | None:
    """(A MatMul, B MatMul) when ``delta`` is ``(source·A)·B``, the A product read by B only; else None."""
    b_node = graph.producer.get(delta)
    a_node = graph.parent(b_node, 0, "MatMul") if b_node is not None and b_node.op_type == "MatMul" else None
    if a_node is None or a_node.input[0] != source or len(graph.consumers.get(a_node.output[0], [])) != 1:
        return None
    return a_node, b_node


def _hotswap_lora(graph: _Graph, delta: str, source: str, inputs: set[str]) -> tuple[str, str] | None:
    """(A input, B input) when ``delta`` is a hot-swap LoRA branch ``(source·Aᵀ)·Bᵀ`` of graph inputs, else None."""
    from onnx import helper

    pair = _lora_pair(graph, delta, source)
    if pair is None:
        return None
    factors = []
    for node in pair:
        transpose = graph.parent(node, 1, "Transpose")
        perm = next((list(helper.get_attribute_value(a)) for a in transpose.attribute if a.name == "perm"), None) \
            if transpose is not None else None
        if transpose is None or perm not in (None, [1, 0]) or transpose.input[0] not in inputs \
                or not is_lora_name(transpose.input[0]):
            return None
        factors.append(transpose.input[0])
    return factors[0], factors[1]


def _branched_lora(graph: _Graph, delta: str, source: str) -> tuple["np.ndarray", "np.ndarray"] | None:
    """(Aᵀ [in, r], (s·B)ᵀ [r, out]) when ``delta`` is a branched LoRA pair ``(source·Aᵀ)·(s·B)ᵀ`` of stored
    LoRA weights, else None."""
    pair = _lora_pair(graph, delta, source)
    if pair is None:
        return None
    factors = [graph.constants.get(node.input[1]) if is_lora_name(node.input[1]) else None for node in pair]
    if any(factor is None or factor.ndim != 2 for factor in factors) or factors[0].shape[1] != factors[1].shape[0]:
        return None
    return factors[0], factors[1]


def _packed_lora_nodes(graph: _Graph, p: str, source: str, deltas: list, widths: list[int], fan_in: int,
                       packs: list) -> tuple[list, list, str] | None:
    """(nodes adding the packed LoRA of a block to ``{p}_qkv_proj``, their initializers, the sum's name), else None.

    One ``h = x·A``, one ``d = h·B`` over the whole packed output and one Add
    (runtime/packed_lora.py). Hot-swap: A and B are two graph inputs, the
    block's :class:`PackedLora` is appended to ``packs``; branched: they are
    stored (the pairs' factors side by side, B block-structured), nothing to record.
    """
    import numpy as np
    from onnx import helper, numpy_helper

    if all(delta is None for delta in deltas):
        return None
    inputs = {value.name for value in graph.model.graph.input}
    members, arrays, offset = [], [], 0
    for delta, width in zip(deltas, widths):
        if delta is not None:
            pair = _hotswap_lora(graph, delta, source, inputs)
            if pair is not None:
                members.append(PackedMember(pair[0], pair[1], offset, width))
            stored = _branched_lora(graph, delta, source) if pair is None else None
            if stored is not None:
                arrays.append((stored, offset))
            if pair is None and stored is None:
                return None
        offset += width
    if members and arrays:
        return None  # (a graph has one form)
    initializers = []
    if members:
        module = members[0].a.removeprefix("base_model.model.").rsplit(".lora_A", 1)[0].rpartition(".")[0]
        pack = PackedLora(f"{module}.qkv_proj.lora_A{PACKED_SUFFIX}", f"{module}.qkv_proj.lora_B{PACKED_SUFFIX}",
                          fan_in, offset, tuple(members))
        packs.append(pack)
        a_name, b_name = pack.a, pack.b
    else:
        a_name, b_name = f"{p}_qkv_proj.lora_A{PACKED_SUFFIX}", f"{p}_qkv_proj.lora_B{PACKED_SUFFIX}"
        a_packed = np.concatenate([a for (a, _), _ in arrays], axis=1)
        b_packed = np.zeros((a_packed.shape[1], offset), dtype=a_packed.dtype)
        row = 0
        for (a, b), column in arrays:
            b_packed[row:row + a.shape[1], column:column + b.shape[1]] = b
            row += a.shape[1]
        initializers = [numpy_helper.from_array(a_packed, a_name), numpy_helper.from_array(b_packed, b_name)]
    return [helper.make_node("MatMul", [source, a_name], [f"{p}_lora_h"], name=f"{p}_lora_h"),
            helper.make_node("MatMul", [f"{p}_lora_h", b_name], [f"{p}_lora_delta"], name=f"{p}_lora_delta"),
            helper.make_node("Add", [f"{p}_qkv_proj", f"{p}_lora_delta"], [f"{p}_qkv_sum"], name=f"{p}_qkv_sum")
            ], initializers, f"{p}_qkv_sum"


def _packed_projection(graph: _Graph, block: _AttentionBlock, p: str, packs: list) -> tuple[list, list, str] | None:
    """(nodes, initializers, v) computing ``{p}_qk`` and v with one ``x·[Wq | Wk | Wv]`` MatMul, else None.

    When the base products of q, k and v are MatMuls of one input with stored
    base weights: one MatMulNBits instead of three after quantization (at
    decode each costs far more than a Split). LoRA pairs on them are packed the
    same way (:func:`_packed_lora_nodes`: hot-swap, two packed inputs recorded
    in ``packs``; branched, two stored tensors); what a graph adds otherwise to
    a base product (a bias) is added back to its slice. The product is split
    into ``[q | k]`` (rotated next) and v.
    """
    import numpy as np
    from onnx import helper, numpy_helper

    opset = next((entry.version for entry in graph.model.opset_import if entry.domain in ("", "ai.onnx")), 0)
    inputs = {value.name for value in graph.model.graph.input}
    parts = [_base_projection(graph, name, inputs) for name in (block.q, block.k, block.v)]
    if opset < 13 or None in parts or len({base.input[0] for base, _ in parts}) != 1:
        return None  # (Split takes its sizes as an input from opset 13)
    values = [graph.constants[base.input[1]] for base, _ in parts]
    if len({value.shape[0] for value in values}) != 1:
        return None
    source = parts[0][0].input[0]
    packed = numpy_helper.from_array(np.concatenate(values, axis=1), f"{p}_qkv_weight")
    widths = [value.shape[1] for value in values]
    deltas = [delta for _, delta in parts]
    nodes = [helper.make_node("MatMul", [source, packed.name], [f"{p}_qkv_proj"], name=f"{p}_qkv_proj")]
    lora = _packed_lora_nodes(graph, p, source, deltas, widths, int(values[0].shape[0]), packs)
    extra = []
    if lora is not None:
        nodes += lora[0]
        extra = lora[1]
        deltas = [None] * 3
    plain = all(delta is None for delta in deltas)
    sizes = numpy_helper.from_array(np.array([widths[0] + widths[1], widths[2]] if plain else widths, np.int64),
                                    f"{p}_qkv_sizes")
    outputs = [f"{p}_qk", f"{p}_v"] if plain else [f"{p}_q_base", f"{p}_k_base", f"{p}_v_base"]
    nodes.append(helper.make_node("Split", [lora[2] if lora is not None else f"{p}_qkv_proj", sizes.name], outputs,
                                  name=f"{p}_qkv_split", axis=-1))
    if plain:
        return nodes, [packed, sizes, *extra], f"{p}_v"
    names = []
    for base_out, delta, kind in zip(outputs, deltas, "qkv"):
        names.append(base_out if delta is None else f"{p}_{kind}_sum")
        if delta is not None:
            nodes.append(helper.make_node("Add", [base_out, delta], [names[-1]], name=names[-1]))
    nodes.append(helper.make_node("Concat", names[:2], [f"{p}_qk"], name=f"{p}_qk", axis=-1))
    return nodes, [packed, sizes], names[2]


def _gqa_nodes(graph: _Graph, p: str, block: _AttentionBlock, heads: int, kv_heads: int, shared: dict,
               packs: list) -> tuple[list, list]:
    """The nodes (and initializers) that replace one attention block: rotary on [q|k], GroupQueryAttention.

    A hot-swap block whose LoRA inputs are packed appends its PackedLora to ``packs``.
    """
    from onnx import helper

    packed = _packed_projection(graph, block, p, packs)
    nodes, initializers, v = packed if packed is not None else (
        [helper.make_node("Concat", [block.q, block.k], [f"{p}_qk"], name=f"{p}_qk", axis=-1)], [], block.v)
    positions, cos, sin = block.rotary.input[1:4]
    nodes += [
        helper.make_node("RotaryEmbedding", [f"{p}_qk", positions, cos, sin], [f"{p}_qk_rot"], name=f"{p}_rotary",
                         domain=MICROSOFT, interleaved=0, num_heads=heads + kv_heads),
        helper.make_node("Concat", [f"{p}_qk_rot", v], [f"{p}_qkv"], name=f"{p}_qkv", axis=-1),
        helper.make_node("Where", [shared["keep"][block.keep], f"{p}_qkv", block.zero], [f"{p}_qkv_kept"],
                         name=f"{p}_qkv_keep"),
        helper.make_node("GroupQueryAttention",
                         [f"{p}_qkv_kept", "", "", block.past_key, block.past_value, shared["seqlens_k"],
                          shared["total_length"], "", "", "", block.plan.mask],
                         [block.merged, block.plan.key, block.plan.value], name=f"{p}_attention", domain=MICROSOFT,
                         num_heads=heads, kv_num_heads=kv_heads, scale=block.plan.alpha),
    ]
    return nodes, initializers


def _gqa_shared_nodes(blocks: list[_AttentionBlock]) -> tuple[list, list, dict]:
    """Nodes computed once per graph: GQA's ``seqlens_k`` / ``total_sequence_length`` and [b, s, 1] conditions.

    Every row is given the full length (``seqlens_k = total - 1``): left padding is
    not GroupQueryAttention's right-padding convention, so padded keys are masked by
    the graph's own additive mask (``attention_bias``) instead.
    """
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    consts = {"gqa_index_0": np.array([0], np.int64), "gqa_index_1": np.array([1], np.int64),
              "gqa_scalar_shape": np.array([], np.int64), "gqa_axis_1": np.array([1], np.int64)}
    nodes = [
        helper.make_node("Shape", ["attention_mask"], ["gqa_mask_shape"], name="gqa_mask_shape"),
        helper.make_node("Gather", ["gqa_mask_shape", "gqa_index_0"], ["gqa_batch"], name="gqa_batch", axis=0),
        helper.make_node("Gather", ["gqa_mask_shape", "gqa_index_1"], ["gqa_total"], name="gqa_total", axis=0),
        helper.make_node("Sub", ["gqa_total", "gqa_index_1"], ["gqa_last"], name="gqa_last"),
        helper.make_node("Expand", ["gqa_last", "gqa_batch"], ["gqa_seqlens_k64"], name="gqa_seqlens_k64"),
        helper.make_node("Cast", ["gqa_seqlens_k64"], ["gqa_seqlens_k"], name="gqa_seqlens_k", to=TensorProto.INT32),
        helper.make_node("Reshape", ["gqa_total", "gqa_scalar_shape"], ["gqa_total64"], name="gqa_total64"),
        helper.make_node("Cast", ["gqa_total64"], ["gqa_total_length"], name="gqa_total_length",
                         to=TensorProto.INT32),
    ]
    keep = {}
    for cond in dict.fromkeys(block.keep for block in blocks):
        keep[cond] = f"gqa_keep_{len(keep)}"
        nodes.append(helper.make_node("Squeeze", [cond, "gqa_axis_1"], [keep[cond]], name=keep[cond]))
    initializers = [numpy_helper.from_array(value, name) for name, value in consts.items()]
    return nodes, initializers, {"seqlens_k": "gqa_seqlens_k", "total_length": "gqa_total_length", "keep": keep}


def fuse_group_query_attention(model: "onnx.ModelProto", heads: int, kv_heads: int,
                               report: DecoderFusionReport) -> "onnx.ModelProto":
    """Each layer's attention -> com.microsoft ``GroupQueryAttention`` (after :func:`fuse_rotary`).

    Per layer the exported graph splits heads, rotates q and k, zeroes padded new
    keys/values, appends them to the cache (``Concat``), repeats and transposes the
    cache, masks, softmaxes and merges heads: ~20 nodes. The rewrite runs
    ``[q | k]`` (q, k and v come from one packed MatMul when all are plain MatMuls of
    one input, as in a merged graph; LoRA branches stay as they are) through one ``RotaryEmbedding`` at
    the graph's ``position_ids``, zeroes padded rows of ``[q | k | v]`` and hands it
    to ``GroupQueryAttention``, which appends to the cache and attends in one
    kernel. The graph's own additive mask (causal, padding, any window) is its
    ``attention_bias`` and every row gets the full length as ``seqlens_k``, so
    left-padded batches keep their meaning. ONNX Runtime's kernel refuses one
    input the exported graph accepts: several new tokens after a past in a batch
    of more than one row (decoder_io.py, "Padding"); :func:`fuse_decoder` marks
    the graph so :class:`lora_edge.runtime.generate.DecoderRunner` says so.
    """
    if kv_heads < 1 or heads % kv_heads:
        return model
    graph = _Graph(model)
    presents = {value.name for value in model.graph.output if value.name.startswith("present.")}
    blocks = [block for softmax in model.graph.node if softmax.op_type == "Softmax"
              if (plan := _match_repeated_kv(graph, softmax, presents)) is not None
              if (block := _match_attention_block(graph, plan)) is not None]
    if not blocks:
        return model
    shared_nodes, initializers, shared = _gqa_shared_nodes(blocks)
    replaced: set[str] = set()
    new_nodes, packs = list(shared_nodes), []
    for i, block in enumerate(blocks):
        nodes, inits = _gqa_nodes(graph, f"gqa_{i}", block, heads, kv_heads, shared, packs)
        new_nodes += nodes
        initializers += inits
        replaced.update((block.merged, block.plan.key, block.plan.value))
    kept = [node for node in model.graph.node if not replaced.intersection(node.output)]
    del model.graph.node[:]
    model.graph.node.extend(kept + new_nodes)
    model.graph.initializer.extend(initializers)
    _ensure_opset(model)
    report.group_query_attention = len(blocks)
    report.packed_qkv = sum(1 for node in new_nodes if node.op_type == "Split")
    report.packed_lora = sum(1 for node in new_nodes if node.name.endswith("_lora_h"))
    _swap_packed_inputs(model, packs)
    pruned = _prune(model)
    _past_shapes_from_mask(pruned, kv_heads)
    _topological_sort(pruned)
    return pruned


def _swap_packed_inputs(model: "onnx.ModelProto", packs: list) -> None:
    """Replace the packed members' LoRA inputs (and their empty defaults) with each pack's A and B inputs.

    The defaults are empty (rank 0): with no adapter fed the graph is the base
    model. The members' own inputs go, so a per-target adapter fed to this graph
    as it is fails by name instead of being ignored; the packs are recorded in
    the graph's metadata (runtime/packed_lora.py).
    """
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    if not packs:
        return
    gone = member_names(packs)
    for container in (model.graph.input, model.graph.initializer):
        for item in [item for item in container if item.name in gone]:
            container.remove(item)
    for index, pack in enumerate(packs):
        rank = f"packed_rank_{index}"
        model.graph.input.extend([helper.make_tensor_value_info(pack.a, TensorProto.FLOAT, [pack.fan_in, rank]),
                                  helper.make_tensor_value_info(pack.b, TensorProto.FLOAT, [rank, pack.width])])
        model.graph.initializer.extend([numpy_helper.from_array(np.zeros((pack.fan_in, 0), np.float32), pack.a),
                                        numpy_helper.from_array(np.zeros((0, pack.width), np.float32), pack.b)])
    _set_metadata(model, PACKED_LORA_KEY, packs_to_metadata(packs))


def _past_shapes_from_mask(model: "onnx.ModelProto", kv_heads: int) -> None:
    """Make ``Shape(past_key_values.*)`` reads (the exported mask's past length) come from the mask and ids.

    The past length is ``attention_mask`` columns minus ``input_ids`` columns, which
    is what a past of the contract's shape has; computed that way, nothing but
    GroupQueryAttention reads the cache tensors, so a runner may feed a longer
    preallocated buffer that the kernel appends to in place
    (``decoder_io.SHARED_CACHE_KEY``, set by :func:`fuse_decoder` when this left no
    other reader).
    """
    import numpy as np
    from onnx import helper, numpy_helper

    pasts = [value for value in model.graph.input if value.name.startswith("past_key_values.")]
    readers = [node for node in model.graph.node if node.op_type == "Shape"
               and any(name.startswith("past_key_values.") for name in node.input)]
    if not readers:
        return
    head_dim = int(pasts[0].type.tensor_type.shape.dim[3].dim_value)
    model.graph.initializer.extend([numpy_helper.from_array(np.array([kv_heads, ], np.int64), "gqa_kv_heads"),
                                    numpy_helper.from_array(np.array([head_dim], np.int64), "gqa_head_dim")])
    nodes = [helper.make_node("Shape", ["input_ids"], ["gqa_ids_shape"], name="gqa_ids_shape"),
             helper.make_node("Gather", ["gqa_ids_shape", "gqa_index_1"], ["gqa_new"], name="gqa_new", axis=0),
             helper.make_node("Sub", ["gqa_total", "gqa_new"], ["gqa_past"], name="gqa_past"),
             helper.make_node("Concat", ["gqa_batch", "gqa_kv_heads", "gqa_past", "gqa_head_dim"], ["gqa_past_shape"],
                              name="gqa_past_shape", axis=0)]
    replacements = {}
    for node in readers:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        bounds = f"{node.name or node.output[0]}_bounds"
        model.graph.initializer.extend([
            numpy_helper.from_array(np.array([attrs.get("start", 0)], np.int64), f"{bounds}_start"),
            numpy_helper.from_array(np.array([attrs.get("end", 4)], np.int64), f"{bounds}_end")])
        replacements[id(node)] = helper.make_node("Slice", ["gqa_past_shape", f"{bounds}_start", f"{bounds}_end"],
                                                  [node.output[0]], name=f"{bounds}_slice")
    rewritten = [replacements.get(id(node), node) for node in model.graph.node]
    del model.graph.node[:]
    model.graph.node.extend(nodes + rewritten)


def reads_cache_only_in_attention(model: "onnx.ModelProto") -> bool:
    """True when every reader of a ``past_key_values.*`` input is a GroupQueryAttention node."""
    return all(node.op_type == "GroupQueryAttention" for node in model.graph.node
               if any(name.startswith("past_key_values.") for name in node.input))


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
    import logging

    from onnxruntime.transformers.onnx_model import OnnxModel

    log = logging.getLogger("onnxruntime.transformers.onnx_model")  # "Removed N nodes" at INFO, on stderr
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        wrapped = OnnxModel(model)
        wrapped.prune_graph()
    finally:
        log.setLevel(level)
    return wrapped.model


def _rewrite(model: "onnx.ModelProto", config: dict | None, report: DecoderFusionReport,
             group_query: bool) -> "onnx.ModelProto":
    """The rewrites in order: norms, rotary (needs the context length), attention (the head counts).

    ``group_query``: attention becomes GroupQueryAttention where it matches; any
    block left (or all, when False) gets the grouped rewrite.
    """
    from lora_edge.core.decoder_io import context_length

    model = fuse_rms_norms(model, report)
    max_positions = context_length(config) if config else None
    if max_positions:
        model = fuse_rotary(model, int(max_positions), report)
    text = (config or {}).get("text_config") or config or {}
    heads = text.get("num_attention_heads")
    if heads:
        kv_heads = int(text.get("num_key_value_heads") or heads)
        if group_query:
            model = fuse_group_query_attention(model, int(heads), kv_heads, report)
        model = fuse_grouped_attention(model, int(heads), kv_heads, report)
    report.attention = report.group_query_attention + report.grouped_attention
    report.lora_shared = share_lora_inputs(model)
    if report.group_query_attention:
        _set_metadata(model, CHUNKED_BATCH_KEY, "1")
        if reads_cache_only_in_attention(model):
            _set_metadata(model, SHARED_CACHE_KEY, SHARED_BUFFER)
    return model


def _set_metadata(model: "onnx.ModelProto", key: str, value: str) -> None:
    """Set one ``metadata_props`` entry of the graph (what :class:`lora_edge.runtime.generate.DecoderRunner` reads)."""
    for prop in model.metadata_props:
        if prop.key == key:
            prop.value = value
            return
    entry = model.metadata_props.add()
    entry.key, entry.value = key, value


def fuse_decoder(model: "onnx.ModelProto", source: str | bytes, config: dict | None,
                 tolerance: float = FUSION_TOLERANCE) -> tuple["onnx.ModelProto", DecoderFusionReport]:
    """Fuse a ``causal-lm`` graph for CPUs; keep the result only when it matches ``source``.

    ``config`` (the model's config.json) gives the context length, which sizes
    the rotary caches, and the query / key-value head counts of grouped
    attention; without it only the norms are fused. The rewrites with
    GroupQueryAttention are tried first, then (if they fail or drift) without.
    Returns (graph, report); on a mismatch or a failure the graph comes back as
    ``source`` holds it, with ``report.dropped`` saying why. ``model`` is
    rewritten in place (one copy of the weights in memory): the caller uses the
    returned graph only.
    """
    report = DecoderFusionReport(nodes_before=len(model.graph.node))
    if not any(value.name.startswith("past_key_values.") for value in model.graph.input):
        return model, report
    feeds = decoder_check_feeds(model)
    try:  # one session for every batch: an LLM session costs seconds (none when export ran these feeds already)
        expected = None if isinstance(source, bytes) else remembered_outputs(source, feeds)
        if expected is None:
            expected = _outputs_from_file(model, feeds, source) if has_references(model) else outputs_on(source, feeds)
    except Exception as exc:
        return model, DecoderFusionReport(nodes_before=report.nodes_before,
                                          dropped=f"source graph does not run ({first_line(exc)})")
    release_freed_memory()
    for group_query in (True, False):
        model, report = _verified_rewrite(model, source, config, group_query, feeds, expected, tolerance)
        if not report.dropped:
            break
    return model, report


def _verified_rewrite(model: "onnx.ModelProto", source: str | bytes, config: dict | None, group_query: bool,
                      feeds: list[dict], expected: list, tolerance: float,
                      ) -> tuple["onnx.ModelProto", DecoderFusionReport]:
    """(rewritten graph, report) when it matches ``expected`` on ``feeds``; else (``source``'s graph, report with
    ``dropped``). ``model`` is rewritten in place (no second copy of the weights); ``source`` is loaded again
    when the result is not kept."""
    report = DecoderFusionReport(nodes_before=len(model.graph.node))
    by_reference = has_references(model)
    try:
        candidate = _rewrite(model, config, report, group_query)
        release_freed_memory()
        packs = model_packs(candidate)
        candidate_feeds = [pack_tensors(packs, feed) for feed in feeds] if packs else feeds
        report.max_abs_diff = max(relative_difference(want, got) for want, got in
                                  zip(expected, _outputs_from_file(candidate, candidate_feeds, source)))
    except Exception as exc:  # a rewrite that fails or that ORT cannot load is a rewrite not to ship
        return _load_source(source, by_reference), DecoderFusionReport(
            nodes_before=report.nodes_before, dropped=f"rewrites failed ({exc.__class__.__name__}: {first_line(exc)})")
    if not report.max_abs_diff <= tolerance:
        return _load_source(source, by_reference), DecoderFusionReport(
            nodes_before=report.nodes_before, max_abs_diff=report.max_abs_diff,
            dropped=f"fusions changed the outputs (relative max abs diff {report.max_abs_diff:.2e})")
    report.nodes_after = len(candidate.graph.node)
    return candidate, report


def _outputs_from_file(model: "onnx.ModelProto", feeds: list[dict], source: str | bytes) -> list[list]:
    """:func:`outputs_on` ``model``, written to a scratch directory beside ``source`` for the session to read.

    A session made from bytes holds them as long as it lives, and serializing
    takes twice the model's size at its peak: the weights would be in memory three
    to four times instead of twice (the proto and ORT's copy). Weights ``model``
    left in their file (:func:`lora_edge.core.onnx_io.load_by_reference`) are not
    written at all: the session maps them from a hard link of that file.
    """
    import tempfile

    where = None if isinstance(source, bytes) else Path(source).resolve().parent  # (a link's target: hard links)
    with tempfile.TemporaryDirectory(prefix=".fusion-check-", dir=where) as directory:
        return outputs_on(str(session_file(model, directory)), feeds)


def _load_source(source: str | bytes, by_reference: bool = False) -> "onnx.ModelProto":
    """The graph :func:`fuse_decoder` started from (a file, or a serialized model); ``by_reference``: as
    :func:`lora_edge.core.onnx_io.load_by_reference` loads it (how the caller loaded it)."""
    import onnx

    if isinstance(source, bytes):
        return onnx.load_from_string(source)
    return load_by_reference(source) if by_reference else onnx.load(str(source))


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
    stored = initializers[gather.input[0]]
    if len(stored.dims) != 2:
        return None
    embedding = None  # its value, read when a head must be compared with it
    producers = {output: node for node in model.graph.node for output in node.output}
    for node in model.graph.node:
        if node.op_type != "MatMul":
            continue
        transpose = producers.get(node.input[1])
        if transpose is not None and transpose.op_type == "Transpose" and transpose.input[0] == gather.input[0]:
            head = f"{gather.input[0]}_head"  # a weight left in the fp32 file: its transpose is read when quantized
            stub = transposed_reference(stored, head)
            model.graph.initializer.append(stub if stub is not None else numpy_helper.from_array(
                np.ascontiguousarray(tensor_value(stored).T), head))
            node.input[1] = head
            return TiedEmbedding(gather.name, gather.input[0], head)
        if node.input[1] not in initializers:
            continue
        if list(initializers[node.input[1]].dims) == [stored.dims[1], stored.dims[0]]:
            embedding = tensor_value(stored) if embedding is None else embedding
            if np.array_equal(tensor_value(initializers[node.input[1]]), embedding.T):
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
    # a hidden size that is not a whole number of blocks (SmolLM2's 576 in blocks of 128): the last block of each
    # row is padded, and the lookup keeps the row's first K values
    width = int(attrs["K"])  # (MatMulNBits' input width: a required attribute)
    padded = blocks * int(attrs["block_size"]) != width
    replacement = [
        helper.make_node("Reshape", [head.input[2], f"{prefix}_scale_shape"], [f"{prefix}_scales"],
                         name=f"{prefix}_scales_reshape"),
        helper.make_node("GatherBlockQuantized", [head.input[1], "input_ids", f"{prefix}_scales"], [f"{prefix}_rows"],
                         name=f"{prefix}_gather", domain=MICROSOFT, block_size=int(attrs["block_size"]), gather_axis=0,
                         quantize_axis=2, bits=4),
        helper.make_node("Reshape", [f"{prefix}_rows", f"{prefix}_out_shape"],
                         [f"{prefix}_padded" if padded else lookup.output[0]], name=f"{prefix}_rows_reshape"),
    ]
    if padded:
        model.graph.initializer.extend([numpy_helper.from_array(np.array([0], np.int64), f"{prefix}_start"),
                                        numpy_helper.from_array(np.array([width], np.int64), f"{prefix}_end"),
                                        numpy_helper.from_array(np.array([-1], np.int64), f"{prefix}_axis")])
        replacement.append(helper.make_node("Slice", [f"{prefix}_padded", f"{prefix}_start", f"{prefix}_end",
                                                      f"{prefix}_axis"], [lookup.output[0]], name=f"{prefix}_rows_slice"))
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
