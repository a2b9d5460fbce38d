"""Logits of the last positions only: the ``logits_to_keep`` input of ``causal-lm`` graphs.

Generation needs the next-token logits of the last prompt position, yet a
decoder graph computes the LM head for every position: on SmolLM2-135M that
is ~21% of the FLOPs of each prompt token, and a ``[batch, sequence, vocab]``
float tensor (25 MB for a 128-token prompt) held in several copies at once.
:func:`add_logits_to_keep` rewrites a traced decoder so that the hidden state
entering the LM head is sliced to the last ``logits_to_keep`` positions first,
as ``transformers``' ``logits_to_keep`` argument does (0 = every position, the
default, so the gate's perplexity and every caller that does not feed it see
the graph they always saw; k = the last k positions).

The input is a graph input with a same-named initializer (its default, 0):
callers that do not know it (onnxruntime-genai, older runners) leave it out;
runners feed it when the graph has it (``lora_edge.core.decoder_io.takes_logits_to_keep``).
Graphs exported before it keep working: no runner requires it.

Found in the graph, never by name: the LM head is the MatMul nearest the
``logits`` output whose weight is not computed from the token inputs; every op
between its input and ``logits`` must work position by position (the padding
``Where``, a bias, a scale, a softcap, a cast), and any per-position tensor that
enters that region from outside (the padding mask of the ``Where``) is sliced
the same way. A graph where that does not hold is left as it is.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lora_edge.core.decoder_io import LOGITS, LOGITS_TO_KEEP, takes_logits_to_keep

if TYPE_CHECKING:
    import numpy as np
    import onnx
    import onnxruntime

# Ops that compute each position from that position alone (with weights or scalars): what may sit between the
# LM head's input and the logits. MatMul only with a weight as its second input (checked below).
POSITIONWISE_OPS = ("MatMul", "Add", "Sub", "Mul", "Div", "Where", "Tanh", "Cast", "Identity", "Softplus", "Neg")
# The logits' sequence axis once sliced (it is no longer the input's `sequence`).
KEPT_SEQUENCE = "kept_sequence"
SEQUENCE_AXIS = 1
_INT64_MAX = 2**63 - 1


def add_logits_to_keep(model: "onnx.ModelProto") -> bool:
    """Give a traced ``causal-lm`` graph the ``logits_to_keep`` input, in place; False (unchanged) when it cannot.

    False when the graph already has it, has no ``logits`` output, or its LM head
    region is not position-wise with known ranks (see the module docstring).
    """
    graph = model.graph
    if any(value.name == LOGITS_TO_KEEP for value in graph.input) or \
            not any(value.name == LOGITS for value in graph.output):
        return False
    plan = _plan(model)
    if plan is None:
        return False
    region, sliced = plan
    _insert_slices(model, region, sliced)
    return True


def _data_dependent(model: "onnx.ModelProto") -> set[str]:
    """Every tensor computed from a graph input that has no default (the token inputs and the past)."""
    graph = model.graph
    defaults = {init.name for init in graph.initializer}
    dependent = {value.name for value in graph.input if value.name not in defaults}
    for node in graph.node:  # traced graphs are in topological order
        if any(name in dependent for name in node.input):
            dependent.update(name for name in node.output if name)
    return dependent


def _shapes(model: "onnx.ModelProto", names: list[str]) -> dict[str, list]:
    """Tensor name -> its dims (dim_param or dim_value), from the graph's declared shapes or, where ``names``
    lack one (TorchScript traces declare none), from ONNX shape inference on a copy without the weights."""
    import onnx

    from lora_edge.core.onnx_io import weightless_twin

    graph = model.graph
    shapes = {}

    def read(values) -> None:
        for value in values:
            if value.type.HasField("tensor_type") and value.type.tensor_type.HasField("shape"):
                shapes[value.name] = [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]

    read(list(graph.input) + list(graph.output) + list(graph.value_info))
    if all(name in shapes for name in names):
        return shapes
    probe = weightless_twin(model, any_weight=True)  # shape constants keep their values, weights only their dims
    del probe.graph.value_info[:]  # inferred afresh
    try:
        read(onnx.shape_inference.infer_shapes(probe).graph.value_info)
    except Exception:  # no inference: the caller sees the names as shapeless and leaves the graph alone
        pass
    return shapes


def _plan(model: "onnx.ModelProto") -> tuple[list, list[str]] | None:
    """(region nodes between the LM head's input and ``logits``, tensors to slice), or None when unsafe."""
    graph = model.graph
    producer = {name: node for node in graph.node for name in node.output}
    dependent = _data_dependent(model)
    head_input = _head_input(producer, dependent)
    if head_input is None:
        return None
    upstream = _ancestors(producer, LOGITS)
    region, inside = [], {head_input}
    for node in graph.node:
        if id(node) in upstream and any(name in inside for name in node.input):
            region.append(node)
            inside.update(node.output)
    sliced = [head_input]
    for node in region:
        if node.op_type not in POSITIONWISE_OPS or node.domain not in ("", "ai.onnx"):
            return None
        if node.op_type == "MatMul" and node.input[1] in dependent and node.input[1] not in inside:
            return None  # a product of two per-position tensors (attention-like): not position-wise
        for name in node.input:
            if name in dependent and name not in inside and name not in sliced:
                sliced.append(name)
    shapes = _shapes(model, sliced)
    if any(len(shapes.get(name, [])) != 3 for name in sliced):
        return None  # the slice takes axis 1 of [batch, sequence, ...] tensors only
    return region, sliced


def _head_input(producer: dict, dependent: set[str]) -> str | None:
    """The activation input of the MatMul nearest ``logits`` whose weight is not computed from the tokens."""
    frontier, seen = [LOGITS], set()
    while frontier:
        name = frontier.pop(0)
        node = producer.get(name)
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        if node.op_type == "MatMul" and node.input[1] not in dependent and node.input[0] in dependent:
            return node.input[0]
        frontier.extend(n for n in node.input if n in dependent)
    return None


def _ancestors(producer: dict, output: str) -> set[int]:
    """ids of the nodes ``output`` depends on (itself included)."""
    stack, found = [output], set()
    while stack:
        node = producer.get(stack.pop())
        if node is None or id(node) in found:
            continue
        found.add(id(node))
        stack.extend(node.input)
    return found


def _insert_slices(model: "onnx.ModelProto", region: list, sliced: list[str]) -> None:
    """Add the input (default 0) and ``Slice(t, -logits_to_keep, end, axis 1)`` of each tensor in ``sliced``."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    from lora_edge.core.onnx_spec import topological_sort

    graph = model.graph
    prefix = "logits_to_keep"
    graph.input.append(helper.make_tensor_value_info(LOGITS_TO_KEEP, TensorProto.INT64, []))
    graph.initializer.extend([
        numpy_helper.from_array(np.array(0, dtype=np.int64), LOGITS_TO_KEEP),
        numpy_helper.from_array(np.array([0], dtype=np.int64), f"{prefix}/zero"),
        numpy_helper.from_array(np.array([_INT64_MAX], dtype=np.int64), f"{prefix}/end"),
        numpy_helper.from_array(np.array([SEQUENCE_AXIS], dtype=np.int64), f"{prefix}/axis")])
    # start = -k: Slice from -0 = 0 keeps every position, from -k the last k (all of them when k >= sequence)
    nodes = [helper.make_node("Neg", [LOGITS_TO_KEEP], [f"{prefix}/negative"], name=f"{prefix}/Neg"),
             helper.make_node("Unsqueeze", [f"{prefix}/negative", f"{prefix}/zero"], [f"{prefix}/start"],
                              name=f"{prefix}/Unsqueeze")]
    renamed = {}
    for index, name in enumerate(sliced):
        renamed[name] = f"{prefix}/kept_{index}"
        nodes.append(helper.make_node("Slice", [name, f"{prefix}/start", f"{prefix}/end", f"{prefix}/axis"],
                                      [renamed[name]], name=f"{prefix}/Slice_{index}"))
    for node in region:
        for position, name in enumerate(node.input):
            if name in renamed:
                node.input[position] = renamed[name]
    graph.node.extend(nodes)
    topological_sort(graph)
    outputs = {name for node in region for name in node.output}
    for value in list(graph.value_info) + list(graph.output):
        if value.name in outputs and len(value.type.tensor_type.shape.dim) > SEQUENCE_AXIS:
            value.type.tensor_type.shape.dim[SEQUENCE_AXIS].dim_param = KEPT_SEQUENCE


def last_row_feeds(input_names: list[str], inputs: tuple, keep: int = 1) -> dict[str, "np.ndarray"]:
    """Feeds of one verify case (torch tensors in ``input_names`` order) asking for the last ``keep`` rows."""
    import numpy as np

    feeds = {name: tensor.numpy() for name, tensor in zip(input_names, inputs)}
    feeds[LOGITS_TO_KEEP] = np.array(keep, dtype=np.int64)
    return feeds


def _batched_prefill(inputs: tuple) -> bool:
    """True for a verify case of several rows and an empty past (``inputs``: ids, mask, positions, past...)."""
    return inputs[0].shape[0] > 1 and all(past.shape[2] == 0 for past in inputs[3:])


def last_row_checks(session: "onnxruntime.InferenceSession", io, expected: list[list["np.ndarray"]],
                    adapter=None) -> tuple[list, list]:
    """(expected, actual) logits of the last position on the multi-token verify inputs, fed ``logits_to_keep=1``.

    ``io`` is the export's GraphIO (verify inputs and I/O names), ``expected`` the
    PyTorch outputs on its verify inputs. Both lists are empty when the session's
    graph has no ``logits_to_keep`` input. A batched prefill (several rows, no
    past) is left out when other cases remain: the slice it would check is the
    one the single prompt (no past) and the batched chunk (after a past) check,
    and it is the largest run (SmolLM2-135M: ~0.15 s of each verification).
    """
    from lora_edge.runtime.session import run

    if not takes_logits_to_keep(session):
        return [], []
    index = io.output_names.index(LOGITS)
    cases = [(inputs, outputs) for inputs, outputs in zip(io.verify_inputs, expected)
             if inputs[0].shape[1] >= 2]  # one new token: its only row is the last one anyway
    smaller = [(inputs, outputs) for inputs, outputs in cases if not _batched_prefill(inputs)]
    want, got = [], []
    for inputs, outputs in smaller or cases:
        feeds = last_row_feeds(io.input_names, inputs)
        got.append([run(session, feeds, adapter=adapter, output_names=[LOGITS])[0].astype("float32")])
        want.append([outputs[index][:, -1:]])
    return want, got
