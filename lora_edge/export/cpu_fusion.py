"""Graph rewrites that make encoder graphs fast on ONNX Runtime's CPU provider, run before quantizing.

Two things cost most of the non-GEMM time of a quantized MiniLM on the CPU
provider (measured with ORT's per-op profiler, onnxruntime 1.32, see
benchmarks/README.md):

* attention exported by ``torch.export`` is ~25 small ops per layer (head
  split Reshape/Transpose, mask built with Where over B x H x S x S, IsNaN +
  Where after Softmax for fully-masked rows). :func:`fuse_attention` replaces
  each block with one ``com.microsoft.MultiHeadAttention`` node that takes the
  Q/K/V projections as they are, so LoRA branches added to a projection stay
  outside and untouched;
* ORT fuses ``Add -> LayerNormalization`` into ``SkipLayerNormalization`` when
  a session is created, and that CPU kernel is 5-7x slower than the two
  unfused kernels at this size. :func:`keep_layernorm_unfused` writes the
  residual sum as ``Sum`` (same result) so the fusion no longer matches.

Each rewrite is checked by running the rewritten and the original graph on the
same padded batch (:func:`lora_edge.export.prepare.fuse_graph`); a rewrite
that does not match is dropped, never shipped.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from lora_edge.core.onnx_spec import GraphIndex, node_reads

if TYPE_CHECKING:
    import numpy as np
    import onnx

MS_DOMAIN = "com.microsoft"
LAYOUT_OPS = {"Reshape", "Transpose"}
SCALE_OPS = {"Mul", "Div"}
PASS_THROUGH_OPS = {"Identity", "Dropout"}
MASK_INPUT = "attention_mask"
MASK_INT32 = "lora_edge_attention_mask_int32"
MASK_ALL_ONES = "lora_edge_attention_mask_all_ones"
TRIM_LENGTH = "pad_trim_length"
# Graph inputs with a sequence axis (axis 1) that padding trimming cuts to the last real column.
SEQUENCE_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "position_ids")


def _peel_scale(index: GraphIndex, name: str) -> tuple[str, float]:
    """Walk up through Mul/Div by a scalar constant; return the unscaled tensor and the product of scales."""
    scale = 1.0
    while True:
        node = index.producer.get(name)
        if node is None:
            return name, scale
        if node.op_type in PASS_THROUGH_OPS:
            name = node.input[0]
            continue
        if node.op_type not in SCALE_OPS:
            return name, scale
        factors = [index.scalar(node.input[1]), index.scalar(node.input[0]) if node.op_type == "Mul" else None]
        if factors[0] is not None:
            scale = scale * factors[0] if node.op_type == "Mul" else scale / factors[0]
            name = node.input[0]
        elif factors[1] is not None:
            scale *= factors[1]
            name = node.input[1]
        else:
            return name, scale


def _head_split_source(index: GraphIndex, name: str) -> tuple[str, float] | None:
    """Follow a Q/K/V operand of an attention MatMul up to the [B, S, hidden] projection it was cut from.

    Walks through head-split layout ops (Reshape/Transpose) and scalar scales; None
    when no Reshape was crossed (then this is not a head split).
    """
    scale = 1.0
    crossed_reshape = False
    while True:
        name, factor = _peel_scale(index, name)
        scale *= factor
        node = index.producer.get(name)
        if node is None or node.op_type not in LAYOUT_OPS:
            return (name, scale) if crossed_reshape else None
        crossed_reshape |= node.op_type == "Reshape"
        name = node.input[0]


@dataclass
class AttentionMatch:
    """One attention block found in a graph and what replaces it."""

    query: str
    key: str
    value: str
    output: str
    scale: float
    masked: bool
    nodes: list = field(default_factory=list)  # the Softmax and the MatMuls around it, for naming


def _match_attention(index: GraphIndex, softmax: "onnx.NodeProto") -> AttentionMatch | None:
    """Recognise ``softmax(Q·Kᵀ·s + mask)·V`` around ``softmax`` in exported encoder graphs."""
    scores = softmax.input[0]
    masked = False
    add = index.producer.get(scores)
    if add is not None and add.op_type == "Add":
        for side in (0, 1):
            inner, _ = _peel_scale(index, add.input[side])
            producer = index.producer.get(inner)
            if producer is not None and producer.op_type == "MatMul":
                scores, masked = add.input[side], True
                break
        else:
            return None
    scores, score_scale = _peel_scale(index, scores)
    qk = index.producer.get(scores)
    if qk is None or qk.op_type != "MatMul":
        return None
    query = _head_split_source(index, qk.input[0])
    key = _head_split_source(index, qk.input[1])
    probs = softmax.output[0]
    readers = index.consumers.get(probs, [])
    if {reader.op_type for reader in readers} == {"IsNaN", "Where"} and len(readers) == 2:
        # torch.export's SDPA zeroes rows whose keys are all masked: Where(IsNaN(p), 0, p).
        probs = next(reader for reader in readers if reader.op_type == "Where").output[0]
    reader = index.only_consumer(probs)
    while reader is not None and reader.op_type in PASS_THROUGH_OPS:
        probs = reader.output[0]
        reader = index.only_consumer(probs)
    if reader is None or reader.op_type != "MatMul" or reader.input[0] != probs:
        return None
    value = _head_split_source(index, reader.input[1])
    context = reader.output[0]
    readers = index.consumers.get(context, [])
    if sorted(r.op_type for r in readers) == ["Reshape", "Shape"]:
        # The TorchScript exporter's SDPA reshapes its result back to the input's own shape (a no-op here).
        context = next(r for r in readers if r.op_type == "Reshape").output[0]
    merge = index.only_consumer(context)
    if merge is None or merge.op_type != "Transpose":
        return None
    reshape = index.only_consumer(merge.output[0])
    if reshape is None or reshape.op_type != "Reshape" or None in (query, key, value):
        return None
    if value[1] != 1.0:
        return None
    return AttentionMatch(query[0], key[0], value[0], reshape.output[0], query[1] * key[1] * score_scale,
                          masked, [softmax, qk, reader])


def _attention_node(match: AttentionMatch, num_heads: int, name: str, output: str, masked: bool):
    from onnx import helper

    inputs = [match.query, match.key, match.value] + (["", MASK_INT32] if masked else [])
    return helper.make_node("MultiHeadAttention", inputs, [output], domain=MS_DOMAIN, name=name,
                            num_heads=num_heads, scale=float(match.scale))


def _mask_switch(match: AttentionMatch, num_heads: int, name: str):
    """``If(mask is all ones) MHA(q, k, v) else MHA(q, k, v, mask)``.

    ORT's CPU MultiHeadAttention takes a faster kernel when it has no mask
    (measured 204 vs 259 us per MiniLM layer, 1 thread); an unpadded batch, the
    usual single-request case, needs none. The If costs under 1 us.
    """
    from onnx import helper

    branches = {}
    for label, masked in (("unmasked", False), ("masked", True)):
        out = f"{match.output}_{label}"
        node = _attention_node(match, num_heads, f"{name}/{label}", out, masked)
        branches[label] = helper.make_graph([node], f"{name}_{label}", [], [helper.make_tensor_value_info(out, 1, None)])
    return helper.make_node("If", [MASK_ALL_ONES], [match.output], name=name,
                            then_branch=branches["unmasked"], else_branch=branches["masked"])


def fuse_attention(model: "onnx.ModelProto", num_heads: int, mask_switch: bool = False) -> int:
    """Replace every recognised attention block by one MultiHeadAttention node; return how many.

    Masked blocks take ``attention_mask`` (cast to int32 once) as the key padding
    mask; a graph without that input keeps masked blocks as they are. With
    ``mask_switch`` (CPU targets) a masked block becomes :func:`_mask_switch`. The
    nodes left without readers are removed by :func:`remove_dead_nodes`.
    """
    from onnx import TensorProto, helper

    index = GraphIndex(model)
    matches = [m for m in (_match_attention(index, node) for node in model.graph.node
                           if node.op_type == "Softmax") if m is not None]
    has_mask = MASK_INPUT in index.graph_inputs
    matches = [m for m in matches if has_mask or not m.masked]
    if not matches:
        return 0
    new_nodes = []
    if any(m.masked for m in matches) and MASK_INT32 not in index.producer:
        new_nodes.append(helper.make_node("Cast", [MASK_INPUT], [MASK_INT32], name="lora_edge/mask_to_int32",
                                          to=TensorProto.INT32))
        if mask_switch:
            new_nodes += [helper.make_node("ReduceMin", [MASK_INT32], [f"{MASK_ALL_ONES}_min"], keepdims=0,
                                           name="lora_edge/mask_min"),
                          helper.make_node("Cast", [f"{MASK_ALL_ONES}_min"], [MASK_ALL_ONES], to=TensorProto.BOOL,
                                           name="lora_edge/mask_all_ones")]
    replaced = set()
    for number, match in enumerate(matches):
        name = f"lora_edge/attention_{number}"
        new_nodes.append(_mask_switch(match, num_heads, name) if match.masked and mask_switch
                         else _attention_node(match, num_heads, name, match.output, match.masked))
        replaced.add(match.output)
    kept = [node for node in model.graph.node if not set(node.output) & replaced]
    _replace_nodes(model, kept + new_nodes)
    _ensure_opset(model, MS_DOMAIN, 1)
    remove_dead_nodes(model)
    return len(matches)


def keep_layernorm_unfused(model: "onnx.ModelProto") -> int:
    """Write each residual ``Add`` that feeds a LayerNormalization as ``Sum``; return how many.

    ORT's SkipLayerNormFusion only matches ``Add``; its fused CPU kernel is several
    times slower than Add + LayerNormalization for encoder shapes (benchmarks/README.md).
    """
    index = GraphIndex(model)
    count = 0
    for node in model.graph.node:
        if node.op_type != "LayerNormalization":
            continue
        add = index.producer.get(node.input[0])
        if add is None or add.op_type != "Add" or index.only_consumer(add.output[0]) is not node:
            continue
        if any(index.constant(name) is not None for name in add.input):
            continue  # a bias add, not a residual sum
        add.op_type = "Sum"
        count += 1
    return count


def _default_opset(model: "onnx.ModelProto") -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 13)


def _reduce_max(name: str, source: str, output: str, opset: int, keepdims: int, constants: list) -> "onnx.NodeProto":
    """ReduceMax over axis 0, with ``axes`` as an input from opset 18 on, as an attribute before."""
    import numpy as np
    from onnx import helper, numpy_helper

    if opset >= 18:
        axes = f"{name}_axes"
        constants.append(numpy_helper.from_array(np.array([0], dtype=np.int64), axes))
        return helper.make_node("ReduceMax", [source, axes], [output], name=name, keepdims=keepdims)
    return helper.make_node("ReduceMax", [source], [output], name=name, axes=[0], keepdims=keepdims)


def _sequence_free_outputs(model: "onnx.ModelProto") -> bool:
    """True when no graph output can have a sequence axis: rank <= 2 and only the first (batch) dim symbolic."""
    for value in model.graph.output:
        dims = value.type.tensor_type.shape.dim
        if not value.type.tensor_type.HasField("shape") or len(dims) > 2:
            return False
        if any(not dim.HasField("dim_value") for dim in list(dims)[1:]):
            return False
    return True


def trim_padding(model: "onnx.ModelProto") -> int:
    """Cut the sequence inputs to the last column any row attends to; return how many inputs are cut.

    A batch padded to a fixed length (a short request padded to 128, say) then
    costs what its real tokens cost: columns after the last attended one are
    padding in every row, their keys are masked out, positions before them keep
    their embeddings, so outputs without a sequence axis (classification logits)
    are unchanged. An unpadded batch keeps its length. Only for graphs whose
    outputs have no sequence axis and that read the inputs at the top level.
    """
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    index = GraphIndex(model)
    inputs = [value for value in model.graph.input if value.name in SEQUENCE_INPUTS and value.name not in
              index.initializers and len(value.type.tensor_type.shape.dim) == 2]
    names = {value.name for value in inputs}
    if MASK_INPUT not in names or "input_ids" not in names or TRIM_LENGTH in index.producer:
        return 0
    if not _sequence_free_outputs(model):
        return 0
    inner_reads = {name for node in model.graph.node for name in set(node_reads(node)) - set(node.input)}
    if inner_reads & names:
        return 0  # read inside a subgraph: renaming there is not worth the risk
    prefix, opset = "pad_trim", _default_opset(model)
    constants = [numpy_helper.from_array(np.array(1, dtype=np.int64), f"{prefix}/one"),
                 numpy_helper.from_array(np.array([0], dtype=np.int64), f"{prefix}/zero_1d"),
                 numpy_helper.from_array(np.array([1], dtype=np.int64), f"{prefix}/one_1d"),
                 numpy_helper.from_array(np.array(0, dtype=np.int64), f"{prefix}/zero")]
    nodes = [helper.make_node("Cast", [MASK_INPUT], [f"{prefix}/mask"], name=f"{prefix}/mask", to=TensorProto.INT64),
             helper.make_node("Shape", [f"{prefix}/mask"], [f"{prefix}/shape"], name=f"{prefix}/shape"),
             helper.make_node("Gather", [f"{prefix}/shape", f"{prefix}/one"], [f"{prefix}/length"],
                              name=f"{prefix}/length", axis=0),
             helper.make_node("Add", [f"{prefix}/length", f"{prefix}/one"], [f"{prefix}/end"], name=f"{prefix}/end"),
             helper.make_node("Range", [f"{prefix}/one", f"{prefix}/end", f"{prefix}/one"], [f"{prefix}/positions"],
                              name=f"{prefix}/positions"),
             _reduce_max(f"{prefix}/column_max", f"{prefix}/mask", f"{prefix}/column_max", opset, 0, constants),
             helper.make_node("Greater", [f"{prefix}/column_max", f"{prefix}/zero"], [f"{prefix}/attended"],
                              name=f"{prefix}/attended"),
             helper.make_node("Where", [f"{prefix}/attended", f"{prefix}/positions", f"{prefix}/zero"],
                              [f"{prefix}/attended_positions"], name=f"{prefix}/attended_positions"),
             _reduce_max(f"{prefix}/last", f"{prefix}/attended_positions", f"{prefix}/last", opset, 1, constants),
             helper.make_node("Max", [f"{prefix}/last", f"{prefix}/one_1d"], [TRIM_LENGTH], name=f"{prefix}/keep")]
    renamed = {}
    for value in inputs:
        renamed[value.name] = f"{value.name}_trimmed"
        nodes.append(helper.make_node("Slice", [value.name, f"{prefix}/zero_1d", TRIM_LENGTH, f"{prefix}/one_1d"],
                                      [renamed[value.name]], name=f"{prefix}/{value.name}"))
    for node in model.graph.node:
        for position, name in enumerate(node.input):
            if name in renamed:
                node.input[position] = renamed[name]
    model.graph.initializer.extend(constants)
    _replace_nodes(model, nodes + list(model.graph.node))
    return len(renamed)


# Ops that compute each token on its own, whatever the leading axes.
TOKEN_UNARY_OPS = {"Gelu", "Erf", "Tanh", "Relu", "Sigmoid", "Sqrt", "Identity", "Cast", "Neg", "Abs", "Exp",
                   "Softplus", "FastGelu", "BiasGelu"}
TOKEN_BINARY_OPS = {"Add", "Sub", "Mul", "Div", "Sum", "Pow"}


def _constant_through_identity(index: GraphIndex, name: str) -> "np.ndarray | None":
    """``index.constant(name)``, also through Identity nodes (the TorchScript exporter shares equal weights so)."""
    node = index.producer.get(name)
    while node is not None and node.op_type == "Identity":
        name = node.input[0]
        node = index.producer.get(name)
    return index.constant(name)


def _static_rank(index: GraphIndex, name: str) -> int | None:
    """The rank of ``name`` when the graph itself fixes it (a constant, a declared input, a transpose of one)."""
    value = _constant_through_identity(index, name)
    if value is not None:
        return value.ndim
    if name in index.graph_inputs:
        declared = next(v for v in index.graph.input if v.name == name)
        tensor = declared.type.tensor_type
        return len(tensor.shape.dim) if tensor.HasField("shape") else None
    node = index.producer.get(name)
    if node is not None and node.op_type in {"Transpose", "Identity", "Cast"}:
        return _static_rank(index, node.input[0])
    return None


def _attribute(node: "onnx.NodeProto", name: str, default):
    from onnx import helper

    return next((helper.get_attribute_value(a) for a in node.attribute if a.name == name), default)


def _attention_nodes(node: "onnx.NodeProto") -> list:
    """The MultiHeadAttention nodes of a top-level node: itself, or both branches of a mask switch."""
    if node.op_type == "MultiHeadAttention" and node.domain == MS_DOMAIN:
        return [node]
    if node.op_type == "If" and list(node.input) == [MASK_ALL_ONES]:
        return [a.g.node[0] for a in node.attribute if a.name in ("then_branch", "else_branch")]
    return []


FIRST_TOKEN_PREFIX = "first_token"  # node and constant names (no "lora": LoRA weights are told by name)
TOKEN_SOURCE_OPS = {"LayerNormalization", "MatMul"}  # producers a first-token slice may start from


def _token_inputs(index: GraphIndex, node: "onnx.NodeProto") -> list[str] | None:
    """The inputs ``node`` computes each token from on its own (for attention: the query), or None.

    None when ``node`` is not a per-token op: then each output token may depend on other tokens.
    """
    if node.op_type == "MatMul":
        return [node.input[0]] if _static_rank(index, node.input[1]) == 2 else None
    if node.op_type in TOKEN_BINARY_OPS:
        return [name for name in node.input if name and _constant_through_identity(index, name) is None]
    if node.op_type == "LayerNormalization":
        return [node.input[0]] if _attribute(node, "axis", -1) == -1 and len(node.output) == 1 else None
    if node.op_type in TOKEN_UNARY_OPS and node.domain in ("", "ai.onnx", MS_DOMAIN):
        return [node.input[0]]
    attention = _attention_nodes(node)
    return [attention[0].input[0]] if attention and len({n.input[0] for n in attention}) == 1 else None


def _first_token_reader(index: GraphIndex, node: "onnx.NodeProto") -> bool:
    """``node`` reads only token 0 of its first input along axis 1 (``hidden[:, 0]``, as poolers do)."""
    if node.op_type != "Gather" or _attribute(node, "axis", 0) != 1:
        return False
    value = index.constant(node.input[1])
    return value is not None and value.ndim == 0 and int(value) == 0


def _first_token_region(index: GraphIndex, reader: "onnx.NodeProto") -> tuple[list, set[str]] | None:
    """The per-token nodes whose outputs only ``reader``'s token 0 needs, and the tensors the region starts from."""
    region: dict[str, "onnx.NodeProto"] = {}
    uses = {reader.name: {reader.input[0]}}  # node -> the inputs it reads per token
    for node in reversed(list(index.graph.node)):
        inputs = _token_inputs(index, node)
        if inputs is None or not node.output or set(node.output) & index.graph_outputs:
            continue
        producer = index.producer.get(node.input[0])
        if node.op_type == "MatMul" and producer is not None and producer.op_type == "MatMul":
            continue  # a low-rank pair's second factor: the pair stays whole (LoRA pairs are found as MatMul->MatMul)
        needed = True
        for output in node.output:
            readers = index.consumers.get(output, [])
            if not readers or any(output not in uses.get(r.name, ()) or _reads_elsewhere(r, output)
                                  for r in readers):
                needed = False
                break
        if needed:
            region[node.name] = node
            uses[node.name] = set(inputs)
    attention = [node for node in region.values() if _attention_nodes(node)]
    starts = {name for node in region.values() for name in uses[node.name]
              if index.producer.get(name) is None or index.producer[name].name not in region}
    if len(attention) != 1 or not starts:
        return None
    if any(index.producer.get(name) is None or index.producer[name].op_type not in TOKEN_SOURCE_OPS
           for name in starts):
        return None
    return list(region.values()), starts


def _reads_elsewhere(node: "onnx.NodeProto", name: str) -> bool:
    """``node`` also reads ``name`` as something other than its per-token input (e.g. an attention key)."""
    attention = _attention_nodes(node)
    if attention:
        return any(name in list(n.input[1:]) for n in attention)
    if node.op_type in ("MatMul", "LayerNormalization"):
        return name in list(node.input[1:])
    return False


def compute_first_token_only(model: "onnx.ModelProto") -> int:
    """Run the last encoder layer for the first token only where the head reads nothing else; return the slices.

    A sequence classifier's pooler reads ``hidden[:, 0]`` of the last layer. In
    that layer every token's keys and values are still needed, but the query,
    the attention output, its projection, the feed-forward block and both
    LayerNormalizations only for token 0: the tensors the region starts from are
    sliced to their first token (``Slice`` on axis 1), and attention runs one
    query against all keys. The same arithmetic for token 0 (MiniLM-L6: 1/7 of
    the linear layers' work gone). Returns how many tensors were sliced (0: no
    single ``hidden[:, 0]`` reader, or no region ending in one attention block).
    """
    import numpy as np
    from onnx import helper, numpy_helper

    name_all_nodes(model)  # the region is tracked by node name
    index = GraphIndex(model)
    names = [node.name for node in model.graph.node]
    if len(set(names)) != len(names) or any(name.startswith(FIRST_TOKEN_PREFIX) for name in names):
        return 0  # names that do not identify nodes, or a graph cut already
    readers = [node for node in model.graph.node if _first_token_reader(index, node)]
    if len(readers) != 1:
        return 0
    found = _first_token_region(index, readers[0])
    if found is None:
        return 0
    region, starts = found
    constants = {"starts": [0], "ends": [1], "axes": [1]}
    for label, value in constants.items():
        model.graph.initializer.append(numpy_helper.from_array(np.array(value, dtype=np.int64),
                                                               f"{FIRST_TOKEN_PREFIX}/{label}"))
    sliced, added = {}, []
    for name in sorted(starts):
        sliced[name] = f"{name}__first_token"
        added.append(helper.make_node("Slice", [name] + [f"{FIRST_TOKEN_PREFIX}/{k}" for k in constants],
                                      [sliced[name]], name=f"{FIRST_TOKEN_PREFIX}/{name}"))
    for node in region:
        attention = _attention_nodes(node)
        for target in attention or [node]:
            positions = [0] if attention or node.op_type in ("MatMul", "LayerNormalization") \
                else range(len(target.input))
            for position in positions:
                target.input[position] = sliced.get(target.input[position], target.input[position])
    _replace_nodes(model, added + list(model.graph.node))
    return len(added)


def restore_for_gpu(model: "onnx.ModelProto") -> int:
    """Undo the CPU-only rewrites of an already fused graph (residual ``Sum`` -> ``Add``, mask ``If`` -> masked MHA).

    fp16 graphs are quantized from the fp32 graph, which export fuses for the
    CPU; on CUDA, ORT's SkipLayerNormalization (which matches ``Add`` only) is
    the fast kernel and the masked MultiHeadAttention needs no switch.
    Returns how many nodes were changed.
    """
    changed, nodes = 0, []
    index = GraphIndex(model)
    for node in model.graph.node:
        if node.op_type == "Sum" and len(node.input) == 2:
            reader = index.only_consumer(node.output[0])
            if reader is not None and reader.op_type == "LayerNormalization":
                node.op_type = "Add"
                changed += 1
        if node.op_type == "If" and list(node.input) == [MASK_ALL_ONES]:
            masked = next(a.g for a in node.attribute if a.name == "else_branch")
            inner = masked.node[0]
            inner.output[0] = node.output[0]
            inner.name = node.name
            nodes.append(inner)
            changed += 1
            continue
        nodes.append(node)
    if changed:
        _replace_nodes(model, nodes)
        remove_dead_nodes(model)
    return changed


def share_lora_inputs(model: "onnx.ModelProto") -> int:
    """One ``x·[A_1 | A_2 | ...]`` MatMul for the LoRA pairs that read the same input; return how many were merged.

    In branched graphs the query and value pairs of a layer both start from the
    same hidden state. Their A factors are concatenated (one MatMul of width
    r_1 + r_2 instead of two of width r) and each B is zero-padded to read its
    own slice: the same products, exactly, one ORT node fewer per shared input
    (measured: branched int8 1.064 -> 1.050 x merged int8 on MiniLM). The
    factors stay float and keep ``lora_A`` / ``lora_B`` in their names.
    """
    import numpy as np
    from onnx import helper, numpy_helper

    index = GraphIndex(model)
    groups: dict[str, list] = defaultdict(list)
    for node in model.graph.node:
        if node.op_type == "MatMul" and "lora_A" in node.input[1] and index.constant(node.input[1]) is not None:
            readers = index.consumers.get(node.output[0], [])
            if len(readers) == 1 and readers[0].op_type == "MatMul" and "lora_B" in readers[0].input[1] \
                    and index.constant(readers[0].input[1]) is not None and readers[0].input[0] == node.output[0]:
                groups[node.input[0]].append((node, readers[0]))
    merged, drop, added = 0, set(), []
    for source, pairs in groups.items():
        if len(pairs) < 2:
            continue
        factors = [index.constant(a.input[1]) for a, _ in pairs]
        if any(f.ndim != 2 for f in factors) or len({f.shape[0] for f in factors}) != 1:
            continue
        shared_a = f"{pairs[0][0].input[1]}_shared"
        shared_out = f"{pairs[0][0].output[0]}_shared"
        model.graph.initializer.append(numpy_helper.from_array(np.concatenate(factors, axis=1), shared_a))
        added.append(helper.make_node("MatMul", [source, shared_a], [shared_out], name=f"{pairs[0][0].name}_shared"))
        offset, width = 0, sum(f.shape[1] for f in factors)
        for (a_node, b_node), factor in zip(pairs, factors):
            b = index.constant(b_node.input[1])
            padded = np.zeros((width, b.shape[1]), dtype=b.dtype)
            padded[offset:offset + factor.shape[1]] = b
            offset += factor.shape[1]
            padded_name = f"{b_node.input[1]}_padded"
            model.graph.initializer.append(numpy_helper.from_array(padded, padded_name))
            b_node.input[0], b_node.input[1] = shared_out, padded_name
            drop.add(a_node.name)
        merged += len(pairs)
    if merged:
        _replace_nodes(model, [node for node in model.graph.node if node.name not in drop] + added)
        remove_dead_nodes(model)
    return merged


def remove_dead_nodes(model: "onnx.ModelProto") -> int:
    """Drop nodes whose outputs nothing reads (and initializers no node reads); return how many nodes."""
    graph = model.graph
    needed = {value.name for value in graph.output}
    kept = []
    for node in reversed(list(graph.node)):
        if set(node.output) & needed:
            kept.append(node)
            needed.update(node_reads(node))
    removed = len(graph.node) - len(kept)
    _replace_nodes(model, list(reversed(kept)))
    inputs = {value.name for value in graph.input}
    unused = [init for init in graph.initializer if init.name not in needed and init.name not in inputs]
    for init in unused:
        graph.initializer.remove(init)
    return removed


def _replace_nodes(model: "onnx.ModelProto", nodes: list) -> None:
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    # New nodes were appended after their readers: restore a topological order.
    _topological_sort(model.graph)


def _topological_sort(graph) -> None:
    """Reorder ``graph.node`` so every node comes after the producers of its inputs."""
    available = {value.name for value in graph.input} | {init.name for init in graph.initializer} | {""}
    pending = list(graph.node)
    ordered = []
    while pending:
        progress = []
        rest = []
        for node in pending:
            if all(name in available for name in node_reads(node)):
                progress.append(node)
                available.update(node.output)
            else:
                rest.append(node)
        if not progress:  # a cycle or an outer-scope name: keep the remaining order as it was
            ordered.extend(rest)
            break
        ordered.extend(progress)
        pending = rest
    del graph.node[:]
    graph.node.extend(ordered)


def _ensure_opset(model: "onnx.ModelProto", domain: str, version: int) -> None:
    if not any(opset.domain == domain for opset in model.opset_import):
        from onnx import helper

        model.opset_import.append(helper.make_opsetid(domain, version))


def name_all_nodes(model: "onnx.ModelProto") -> int:
    """Give every unnamed node a unique name (quantizers select and exclude nodes by name); return how many."""
    taken = {node.name for node in model.graph.node if node.name}
    named = 0
    for number, node in enumerate(model.graph.node):
        if not node.name:
            candidate = f"{node.op_type}_{number}"
            while candidate in taken:
                candidate += "_"
            node.name = candidate
            taken.add(candidate)
            named += 1
    return named
