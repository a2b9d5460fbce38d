"""Keep every graph lora-edge writes valid by the ONNX specification, not only runnable by ONNX Runtime.

ONNX Runtime tolerates two things the specification (and stricter consumers:
other runtimes, converters, ``onnx.checker``) rejects, and both happen to our
graphs after ONNX Runtime's own tools have edited them:

* nodes out of topological order: the quantizers re-emit nodes in their own
  order, so the fused attention ``If`` (whose branches read outer-scope
  values) can come before the nodes producing what it reads;
* ``value_info`` types that contradict the graph: the fp16 converter retypes
  value_info entries to float16 for tensors that stay float32 (blocked ops,
  initializers), which strict type inference reports as a conflict.

:func:`conform` repairs both (a stable topological sort, recursing into
subgraphs; stale value_info dropped: it is optional, a hint for consumers)
and :func:`require_valid_graph` runs ``onnx.checker.check_model(full_check=True)``
(which includes strict shape and type inference) where a graph is written.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING

from lora_edge.core.errors import LoraEdgeError

if TYPE_CHECKING:
    import numpy as np
    import onnx


def node_reads(node: "onnx.NodeProto") -> list[str]:
    """Every tensor a node reads: its inputs plus what its subgraphs (If/Loop bodies) take from outside."""
    names = [name for name in node.input if name]
    for attribute in node.attribute:
        for graph in [attribute.g] if attribute.HasField("g") else list(attribute.graphs):
            inner = {value.name for value in graph.input} | {init.name for init in graph.initializer}
            for inner_node in graph.node:
                names.extend(name for name in node_reads(inner_node) if name not in inner)
                inner.update(inner_node.output)
    return names


def _subgraphs(node: "onnx.NodeProto") -> list:
    return [g for attribute in node.attribute
            for g in ([attribute.g] if attribute.HasField("g") else list(attribute.graphs))]


def topological_sort(graph: "onnx.GraphProto") -> int:
    """Reorder ``graph.node`` (and every subgraph's) so each node follows the producers of what it reads.

    Stable: nodes already in order keep their relative order (Kahn's algorithm
    taking the earliest ready node). Names produced by no node of this graph
    (inputs, initializers, outer scope) count as available. Returns how many
    nodes moved; a cycle leaves the graph as it was and returns 0.
    """
    import heapq

    for node in graph.node:
        for sub in _subgraphs(node):
            topological_sort(sub)
    nodes = list(graph.node)
    producer = {name: index for index, node in enumerate(nodes) for name in node.output if name}
    waiting = [0] * len(nodes)
    readers: dict[int, list[int]] = defaultdict(list)
    for index, node in enumerate(nodes):
        for source in {producer[name] for name in node_reads(node) if name in producer} - {index}:
            waiting[index] += 1
            readers[source].append(index)
    ready = [index for index, count in enumerate(waiting) if count == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        index = heapq.heappop(ready)
        order.append(index)
        for reader in readers[index]:
            waiting[reader] -= 1
            if waiting[reader] == 0:
                heapq.heappush(ready, reader)
    if len(order) != len(nodes):  # a cycle: not ours to fix, the checker will name it
        return 0
    moved = sum(1 for position, index in enumerate(order) if position != index)
    if moved:
        del graph.node[:]
        graph.node.extend(nodes[index] for index in order)
    return moved


def drop_stale_value_info(model: "onnx.ModelProto") -> int:
    """Remove value_info entries whose element type differs from what type inference derives; return how many.

    Entries naming an initializer or a graph input are dropped too (the
    initializer or input declares the type itself).
    """
    import onnx

    from lora_edge.core.onnx_io import weightless_twin

    graph = model.graph
    declared = {init.name for init in graph.initializer} | {value.name for value in graph.input}
    # inference reads the values of small integer tensors only (shapes, axes): a twin without the weights will do
    probe = weightless_twin(model, any_weight=True)
    del probe.graph.value_info[:]
    try:
        inferred = onnx.shape_inference.infer_shapes(probe)
    except Exception:  # inference itself fails: leave the hints alone, the checker will say why
        inferred = probe
    types = {value.name: value.type.tensor_type.elem_type for value in inferred.graph.value_info}
    stale = [value for value in graph.value_info
             if value.name in declared or (value.name in types and types[value.name]
                                           and value.type.tensor_type.elem_type != types[value.name])]
    for value in stale:
        graph.value_info.remove(value)
    return len(stale)


def conform(model: "onnx.ModelProto") -> dict:
    """Repair node order and stale value_info in place; return what was done (``{"moved": n, "value_info": n}``)."""
    return {"moved": topological_sort(model.graph), "value_info": drop_stale_value_info(model)}


def conform_file(path: str | Path) -> dict:
    """:func:`conform` the graph at ``path`` (single-file graphs) and rewrite it when anything changed."""
    import onnx

    model = onnx.load(str(path))
    done = conform(model)
    if any(done.values()):
        onnx.save(model, str(path))
    return done


def check_errors(path: str | Path) -> str | None:
    """The first line of ``onnx.checker.check_model(full_check=True)``'s complaint about ``path``, or None.

    The checker reads the whole model into memory (SmolLM2-135M fp32: +1 GB,
    the export's peak). It runs instead on a twin file beside ``path`` whose
    large weights are external data inside ``path`` itself (what
    :func:`lora_edge.core.onnx_io.load_by_reference` reads): the same nodes,
    types and shapes, so the same checks, at a few MB. (Not
    ``onnx_io.session_file``'s hard links: the checker refuses data files with
    several links.) A graph the reader cannot walk is checked as it is.
    """
    import os
    import tempfile

    import onnx

    path = Path(path).resolve()  # (a link's target: the twin goes beside the data it points into)
    twin = _checkable_twin(path)
    handle, twin_path = tempfile.mkstemp(prefix=".check-", suffix=".onnx", dir=path.parent) if twin else (None, None)
    try:
        if twin is not None:
            with os.fdopen(handle, "wb") as out:
                out.write(twin.SerializeToString())
        onnx.checker.check_model(twin_path or str(path), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        lines = str(exc).strip().splitlines()
        return (lines[0] if lines else exc.__class__.__name__)[:400]
    finally:
        if twin_path:
            os.unlink(twin_path)
    return None


def _checkable_twin(path: Path) -> "onnx.ModelProto | None":
    """``path``'s graph with its large weights as external data at relative locations in its directory, or None."""
    from onnx import TensorProto

    from lora_edge.core.onnx_io import load_by_reference

    try:
        model = load_by_reference(path)
    except (OSError, ValueError, IndexError, KeyError):
        return None
    directory = path.parent.resolve()
    for init in model.graph.initializer:
        if init.data_location != TensorProto.EXTERNAL:
            continue
        for entry in init.external_data:
            if entry.key == "location" and Path(entry.value).is_absolute():
                if Path(entry.value).parent != directory:
                    return None  # data outside the graph's directory: the checker would refuse the twin
                entry.value = Path(entry.value).name
    return model


def require_valid_graph(path: str | Path, name: str, error: type[LoraEdgeError]) -> None:
    """Raise ``error`` naming graph ``name`` when ``path`` fails the ONNX checker (full check, strict inference)."""
    problem = check_errors(path)
    if problem is not None:
        raise error(f"graph '{name}' is not valid ONNX ({problem})", path,
                    "report this with the graph: lora-edge writes only graphs that pass onnx.checker")


class GraphIndex:
    """Producer/consumer maps and constant lookup over an ONNX graph (rebuilt after each rewrite)."""

    def __init__(self, model: "onnx.ModelProto"):
        self.model = model
        self.graph = model.graph
        self.producer: dict[str, "onnx.NodeProto"] = {}
        self.consumers: dict[str, list["onnx.NodeProto"]] = defaultdict(list)
        for node in self.graph.node:
            for name in node.output:
                self.producer[name] = node
            for name in node_reads(node):
                self.consumers[name].append(node)
        self.initializers = {init.name: init for init in self.graph.initializer}
        self.graph_inputs = {value.name for value in self.graph.input}
        self.graph_outputs = {value.name for value in self.graph.output}

    def constant(self, name: str) -> "np.ndarray | None":
        """The value of ``name`` when it is an initializer (not a graph input) or a Constant node's output."""
        from onnx import numpy_helper

        from lora_edge.core.onnx_io import tensor_value

        if name in self.initializers and name not in self.graph_inputs:
            return tensor_value(self.initializers[name])  # (a weight left in its file: read from there)
        node = self.producer.get(name)
        if node is not None and node.op_type == "Constant":
            for attribute in node.attribute:
                if attribute.name == "value":
                    return numpy_helper.to_array(attribute.t)
        return None

    def is_constant(self, name: str) -> bool:
        """True when :meth:`constant` has a value for ``name`` (without reading it: weights are large)."""
        if name in self.initializers and name not in self.graph_inputs:
            return True
        node = self.producer.get(name)
        return node is not None and node.op_type == "Constant" and any(a.name == "value" for a in node.attribute)

    def scalar(self, name: str) -> float | None:
        """``name``'s value when it is a one-element constant."""
        value = self.constant(name)
        if value is None or value.size != 1:
            return None
        return float(value.reshape(-1)[0])

    def only_consumer(self, name: str) -> "onnx.NodeProto | None":
        """The single node reading ``name``, or None (several readers, or a graph output)."""
        readers = self.consumers.get(name, [])
        if len(readers) != 1 or name in self.graph_outputs:
            return None
        return readers[0]
