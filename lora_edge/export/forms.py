"""Derive the merged and branched forms from ONE traced hot-swap graph by rewriting it (no second trace).

The hot-swap trace (``lora_edge/export/hotswap.py``) computes, for every targeted layer,
``Add(base(x), MatMul(MatMul(x, Transpose(A)), Transpose(sB)))`` with ``A``
``[r, in]`` and ``sB`` ``[out, r]`` graph inputs (PEFT's file keys), and every
``modules_to_save`` tensor as a graph input with the base value as its
default. From that graph, for one adapter (its ``.onnx_adapter`` tensors):

* **branched** -- each pair's Transposes become initializers holding ``Aᵀ``
  (``<module>.lora_A``) and ``(sB)ᵀ`` (``<module>.lora_B``): the names keep the
  markers ``quantize_lora`` relies on; layers the adapter does not target lose
  their branch;
* **merged** -- ``sB·A`` is added to the base layer's weight initializer (in
  the layout the base MatMul/Gemm reads it) and the branch is dropped;
* heads become plain initializers holding the adapter's values.

The base layer of a branch is the MatMul/Gemm (optionally followed by its bias
Add) that reads the same ``x`` and feeds the branch's Add: found in the graph,
never by name. A weight initializer shared with another node (tied embeddings)
is copied before it is changed.

:func:`write_model` writes a graph without building the whole serialized model
in memory: protobuf fields may come in any order, so the graph's small part is
serialized first and each initializer is appended one at a time (weights above
``external_bytes`` go to a ``<file>.data`` side file, as ONNX external data).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Union

from lora_edge.core.errors import ExportError
from lora_edge.core.onnx_io import varint

if TYPE_CHECKING:
    import numpy as np
    import onnx



@dataclass
class Lazy:
    """An initializer made on demand (a merged weight is computed only while it is written).

    Its values may be a view of a buffer that the next Lazy of the same derived
    graph reuses (:class:`_Scratch`): write or copy them before asking for another.
    """

    make: Callable[[], "np.ndarray"]
    shape: tuple[int, ...]
    dtype: str = "float32"

    def __call__(self) -> "np.ndarray":
        return self.make()


# An initializer of a derived graph: the traced model's own TensorProto, or a Lazy making its values.
Source = Union["onnx.TensorProto", Lazy]
LINEAR_OPS = ("MatMul", "Gemm")


@dataclass
class Branch:
    """Where one LoRA pair sits in the traced graph."""

    key_A: str
    key_B: str
    nodes: list  # the branch's own nodes: Transpose(A), MatMul, Transpose(B), MatMul, Add
    add_output: str  # output of Add(base, branch)
    base_output: str  # the other input of that Add
    first_matmul: "onnx.NodeProto"
    second_matmul: "onnx.NodeProto"
    base_node: "onnx.NodeProto"  # the base MatMul/Gemm
    base_weight: str  # its weight initializer
    transposed: bool  # True when the node reads the initializer as [out, in] (Transpose / Gemm transB)
    transpose_node: "onnx.NodeProto | None" = None  # Transpose between the initializer and a MatMul


@dataclass
class Derived:
    """A graph derived from the trace: its nodes and I/O (no initializers) plus where each initializer comes from."""

    graph: "onnx.GraphProto"
    initializers: dict[str, Source] = field(default_factory=dict)


class _Index:
    def __init__(self, graph):
        self.producer = {out: node for node in graph.node for out in node.output}
        self.consumers: dict[str, list] = {}
        for node in graph.node:
            for name in node.input:
                self.consumers.setdefault(name, []).append(node)
        self.initializers = {init.name: init for init in graph.initializer}

    def only_consumer(self, name: str, op_type: str):
        users = self.consumers.get(name, [])
        return users[0] if len(users) == 1 and users[0].op_type == op_type else None


def _perm(node) -> list[int]:
    from onnx import helper

    for attribute in node.attribute:
        if attribute.name == "perm":
            return list(helper.get_attribute_value(attribute))
    return []


def _attribute(node, name: str, default):
    from onnx import helper

    for attribute in node.attribute:
        if attribute.name == name:
            return helper.get_attribute_value(attribute)
    return default


def _fail(key: str, what: str) -> ExportError:
    return ExportError(f"cannot derive the other forms from the hot-swap trace: {what}", key,
                       "re-run with --debug and report the architecture")


def _factor_matmul(index: _Index, key: str):
    """(Transpose node, MatMul node) through which the LoRA input ``key`` enters the graph."""
    transpose = index.only_consumer(key, "Transpose")
    if transpose is None or _perm(transpose) not in ([1, 0], []):
        raise _fail(key, "the input does not enter through one Transpose")
    matmul = index.only_consumer(transpose.output[0], "MatMul")
    if matmul is None or matmul.input[1] != transpose.output[0]:
        raise _fail(key, "the transposed input does not feed one MatMul")
    return transpose, matmul


def _reads(index: _Index, name: str, x: str) -> bool:
    """True when ``name`` is ``x``, or ``x`` reshaped (Conv1D layers flatten their input for a Gemm)."""
    node = index.producer.get(name)
    return name == x or (node is not None and node.op_type == "Reshape" and node.input[0] == x)


def _base_linear(index: _Index, output: str, x: str, key: str):
    """The MatMul/Gemm reading ``x`` whose output (maybe after a bias Add, maybe reshaped) is ``output``."""
    node = index.producer.get(output)
    if node is not None and node.op_type == "Reshape":
        node = index.producer.get(node.input[0])
    if node is not None and node.op_type == "Add":
        candidates = [index.producer.get(name) for name in node.input if name not in index.initializers]
        node = next((c for c in candidates
                     if c is not None and c.op_type in LINEAR_OPS and _reads(index, c.input[0], x)), None)
    if node is None or node.op_type not in LINEAR_OPS or not _reads(index, node.input[0], x):
        raise _fail(key, "no base MatMul/Gemm beside the LoRA branch")
    weight, transpose = node.input[1], None
    if node.op_type == "Gemm":
        if _attribute(node, "transA", 0):
            raise _fail(key, "the base Gemm transposes its input")
        transposed = bool(_attribute(node, "transB", 0))
    else:
        transposed = False
        producer = index.producer.get(weight)
        if producer is not None and producer.op_type == "Transpose" and producer.input[0] in index.initializers:
            transpose, weight, transposed = producer, producer.input[0], True
    if weight not in index.initializers or len(index.initializers[weight].dims) != 2:
        raise _fail(key, "the base layer's weight is not a 2-D initializer")
    return node, weight, transposed, transpose


def find_branches(model: "onnx.ModelProto", pairs: list[tuple[str, str]]) -> list[Branch]:
    """Locate each (A input, B input) pair's branch and its base linear layer in the traced graph."""
    index = _Index(model.graph)
    branches = []
    for key_A, key_B in pairs:
        transpose_A, first = _factor_matmul(index, key_A)
        transpose_B, second = _factor_matmul(index, key_B)
        if second.input[0] != first.output[0]:
            raise _fail(key_B, "the B factor does not follow the A factor")
        add = index.only_consumer(second.output[0], "Add")
        if add is None:
            raise _fail(key_B, "the branch is not added to a base output")
        base_output = next(name for name in add.input if name != second.output[0])
        base_node, weight, transposed, transpose = _base_linear(index, base_output, first.input[0], key_A)
        branches.append(Branch(key_A, key_B, [transpose_A, first, transpose_B, second, add], add.output[0],
                               base_output, first, second, base_node, weight, transposed, transpose))
    return branches


def _copy_graph(graph, drop_nodes: set[int], drop_inputs: set[str], renames: dict[str, str],
                weight_inputs: dict[int, str] | None = None):
    """A GraphProto with ``graph``'s nodes and I/O (no initializers), some nodes and inputs dropped, uses renamed.

    ``weight_inputs`` points input 1 of some nodes (by id) at another tensor (a merged copy of a shared weight).
    """
    import onnx

    weight_inputs = weight_inputs or {}
    copy = onnx.GraphProto(name=graph.name, doc_string=graph.doc_string)
    for node in graph.node:
        if id(node) in drop_nodes:
            continue
        new = copy.node.add()
        new.CopyFrom(node)
        for i, name in enumerate(new.input):
            if name in renames:
                new.input[i] = renames[name]
        if id(node) in weight_inputs:
            new.input[1] = weight_inputs[id(node)]
    copy.input.extend(value for value in graph.input if value.name not in drop_inputs)
    for value in graph.output:
        copy.output.add().CopyFrom(value)
        if value.name in renames:  # an output that was a dropped Add: route through Identity
            copy.node.add().CopyFrom(_identity(renames[value.name], value.name))
    produced = {out for node in copy.node for out in node.output}
    copy.value_info.extend(v for v in graph.value_info if v.name in produced)
    return copy


def _identity(source: str, target: str):
    from onnx import helper

    return helper.make_node("Identity", [source], [target], name=f"{target}_identity")


def derive(model: "onnx.ModelProto", branches: list[Branch], head_keys: list[str], form: str,
           tensors: dict[str, "np.ndarray"] | None, weights: dict[str, "np.ndarray"] | None = None) -> Derived:
    """The ``form`` ("hotswap", "branched", "merged") of the traced ``model`` for one adapter's ``tensors``.

    ``tensors`` are the adapter's hot-swap tensors (A, sB in PEFT layout, head
    parameters); a branch the adapter does not target is dropped. ``hotswap``
    returns the trace as it is (``tensors`` unused). ``weights`` holds the values
    of initializers that ``model`` has as stubs (a trace kept in memory).
    """
    import numpy as np

    graph = model.graph
    weights = weights or {}
    sources: dict[str, Source] = {init.name: _array(weights[init.name]) if init.name in weights else init
                                  for init in graph.initializer}
    if form == "hotswap":
        return Derived(_copy_graph(graph, set(), set(), {}), sources)
    tensors = tensors or {}
    drop_nodes: set[int] = set()
    renames: dict[str, str] = {}
    weight_inputs: dict[int, str] = {}
    lora_keys = {key for b in branches for key in (b.key_A, b.key_B)}
    users = _Index(graph).consumers
    scratch = _Scratch()
    for branch in branches:
        targeted = branch.key_A in tensors and branch.key_B in tensors
        if form == "branched" and targeted:
            module = branch.key_A.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
            for node, key, suffix in ((branch.nodes[0], branch.key_A, "lora_A"),
                                      (branch.nodes[2], branch.key_B, "lora_B")):
                name = f"{module}.{suffix}"
                sources[name] = _array(np.ascontiguousarray(tensors[key].T))
                renames[node.output[0]] = name
                drop_nodes.add(id(node))
            continue
        drop_nodes.update(id(node) for node in branch.nodes)
        renames[branch.add_output] = branch.base_output
        if form == "merged" and targeted:
            _fold(branch, tensors, sources, weight_inputs, users, scratch)
    for key in lora_keys:
        sources.pop(key, None)
    for key in head_keys:
        if key in tensors:
            sources[key] = _array(tensors[key])
    derived = _copy_graph(graph, drop_nodes, lora_keys | set(head_keys), renames, weight_inputs)
    used = {name for node in derived.node for name in node.input} | {o.name for o in derived.output}
    return Derived(derived, {name: source for name, source in sources.items() if name in used})


def _array(value: "np.ndarray") -> Lazy:
    return Lazy(lambda: value, tuple(value.shape), str(value.dtype))


@contextlib.contextmanager
def single_blas_thread():
    """numpy's BLAS on one thread meanwhile (threadpoolctl, where installed; else as it is).

    SmolLM2-135M's 210 merged weights: the rank-8 ``B·A`` products took 0.5-0.8 s
    with OpenBLAS's threads on 2 shared cores, 0.08 s on one.
    """
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        yield
        return
    with threadpool_limits(1, user_api="blas"):
        yield


class _Scratch:
    """Buffers that the merged weights of one derived graph are computed in, one weight at a time.

    A fresh array per merged weight costs its pages again (SmolLM2-135M: 425 MB
    of page faults, 2-3 s of the merged graph's write at load 6 on 2 cores): the
    buffers grow to the largest weight once and are reused.
    """

    def __init__(self):
        self.buffers: dict[str, "np.ndarray"] = {}

    def take(self, key: str, shape: tuple, dtype) -> "np.ndarray":
        """A C-ordered ``shape`` array of ``dtype`` over buffer ``key`` (its values: what was left there)."""
        import math

        import numpy as np

        dtype = np.dtype(dtype)
        size = math.prod(shape) * dtype.itemsize
        buffer = self.buffers.get(key)
        if buffer is None or buffer.size < size:
            buffer = self.buffers[key] = np.empty(size, np.uint8)
        return buffer[:size].view(dtype).reshape(shape)


def _fold(branch: Branch, tensors: dict, sources: dict, weight_inputs: dict, users: dict,
          scratch: _Scratch | None = None) -> None:
    """Add sB·A to the base weight; a weight other nodes read too (tied embeddings) gets a merged copy instead."""
    import numpy as np

    lora_A, scaled_B = tensors[branch.key_A], tensors[branch.key_B]
    original = sources[branch.base_weight]
    shared = len(users.get(branch.base_weight, [])) > 1 or (
        branch.transpose_node is not None and len(users.get(branch.transpose_node.output[0], [])) > 1)
    module = branch.key_A.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
    # Read directly by a MatMul through a Transpose, a shared weight's copy is stored as the MatMul reads it.
    transpose_copy = shared and branch.transpose_node is not None

    def merged() -> "np.ndarray":
        weight = original() if isinstance(original, Lazy) else array_of(original)
        pool = scratch or _Scratch()
        factors = scaled_B.astype(np.float32), lora_A.astype(np.float32)
        delta = np.matmul(*factors, out=pool.take("delta", (factors[0].shape[0], factors[1].shape[1]), np.float32))
        # ([out, in], fp32 like merge.merge_adapter; write_model and derived_model keep BLAS on one thread)
        if weight.dtype != np.float32:
            result = (weight.astype(np.float32) + (delta if branch.transposed else delta.T)).astype(weight.dtype)
        elif branch.transposed:  # [out, in] as delta
            result = np.add(weight, delta, out=pool.take("sum", weight.shape, np.float32))
        else:  # [in, out] (a transposed view of [out, in]): summed in delta's order, then one transposing copy
            np.add(delta, weight.T, out=delta)  # (a + b == b + a, bit for bit)
            result = pool.take("sum", weight.shape, np.float32)
            np.copyto(result, delta.T)
        if not np.isfinite(result, out=pool.take("finite", result.shape, bool)).all():
            raise ExportError(f"merged weight of '{module}' is not finite in {weight.dtype}", branch.key_A,
                              "use the branched form, or a wider dtype for the base model")
        return np.ascontiguousarray(result.T) if transpose_copy else result

    dims = tuple(original.dims) if not isinstance(original, Lazy) else original.shape
    dtype = "float32" if not isinstance(original, Lazy) else original.dtype
    if shared:
        name = f"{module}.merged_weight"
        sources[name] = Lazy(merged, dims[::-1] if transpose_copy else dims, dtype)
        weight_inputs[id(branch.base_node)] = name
    else:
        sources[branch.base_weight] = Lazy(merged, dims, dtype)


# --- writing ------------------------------------------------------------------------------------------


_GRAPH_FIELD = b"\x3a"        # ModelProto.graph = 7, length-delimited
_INITIALIZER_FIELD = b"\x2a"  # GraphProto.initializer = 5, length-delimited


def array_of(tensor) -> "np.ndarray":
    """A TensorProto's values as a read-only array over its raw bytes (no copy where it has raw data)."""
    import numpy as np
    from onnx import helper, numpy_helper

    if not tensor.raw_data or tensor.data_location == tensor.EXTERNAL:
        return numpy_helper.to_array(tensor)
    dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tensor.data_type)).newbyteorder("<")
    return np.frombuffer(tensor.raw_data, dtype=dtype).reshape(tuple(tensor.dims))


def stub_tensor(name: str, source: Source):
    """A TensorProto with ``source``'s name, type and dims but no data (for sizes and structure checks)."""
    import numpy as np
    import onnx
    from onnx import helper

    if not isinstance(source, Lazy):
        stub = onnx.TensorProto(name=name, data_type=source.data_type, dims=list(source.dims))
        return stub
    return onnx.TensorProto(name=name, data_type=helper.np_dtype_to_tensor_dtype(np.dtype(source.dtype)),
                            dims=list(source.shape))


def _data_bytes(source: Source) -> int:
    import numpy as np

    if isinstance(source, Lazy):
        return int(np.prod(source.shape, dtype=np.int64)) * np.dtype(source.dtype).itemsize
    return len(source.raw_data)


def _external(stub, location: str, offset: int, length: int):
    import onnx

    stub.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = stub.external_data.add()
        entry.key, entry.value = key, value
    return stub


def analysis_model(shell: "onnx.ModelProto", derived: Derived) -> "onnx.ModelProto":
    """``derived`` as a ModelProto whose initializers have no data: enough to read its structure."""
    import onnx

    model = onnx.ModelProto()
    model.opset_import.extend(shell.opset_import)
    model.ir_version = shell.ir_version
    model.graph.CopyFrom(derived.graph)
    model.graph.initializer.extend(stub_tensor(name, source) for name, source in derived.initializers.items())
    return model


_RAW_DATA_FIELD = b"\x4a"  # TensorProto.raw_data = 9, length-delimited


def _lazy_head(name: str, source: Lazy, length: int) -> bytes:
    """A lazy tensor's TensorProto encoding up to its raw bytes (name, type, dims, raw_data's tag and length)."""
    return stub_tensor(name, source).SerializeToString() + _RAW_DATA_FIELD + varint(length)


def _raw(source: Source, scratch: _Scratch):
    """A tensor's values as little-endian bytes: a zero-copy view of a C-ordered array, else a copy in
    ``scratch`` (valid until the next call).

    The hot-swap graph's weights are ``W.T`` views of the model's
    (:func:`lora_edge.export.exporter.fold_stub_transposes`): a fresh array for
    each copy cost its pages again (SmolLM2-135M: 540 MB of them on each write).
    """
    import numpy as np

    if not isinstance(source, Lazy):
        return source.raw_data  # only tensors with raw data are large enough to go external
    values, dtype = source(), np.dtype(source.dtype).newbyteorder("<")
    if not (values.flags.c_contiguous and values.dtype == dtype):
        target = scratch.take("raw", values.shape, dtype)
        np.copyto(target, values, casting="unsafe")
        values = target
    return memoryview(values).cast("B")


def write_model(shell: "onnx.ModelProto", derived: Derived, path: Path, external_bytes: int | None = None) -> Path:
    """Write ``shell`` (opsets, metadata; its graph ignored) with ``derived``'s graph and initializers to ``path``.

    One initializer is serialized at a time, so no copy of the whole model is
    built. With ``external_bytes``, tensors of at least that many bytes go to
    ``<path>.data`` (ONNX external data, 4 KiB aligned) instead.
    """
    path = Path(path)
    data_path = path.with_name(path.name + ".data")
    head, plan, offset = _layout(shell, derived, external_bytes, data_path.name)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as out, (open(data_path, "wb") if offset else open(os.devnull, "wb")) as data, \
            single_blas_thread():  # (the merged weights' rank-r products)
        _write(out, data, head, plan, path)
    return path


def _model_fields(shell: "onnx.ModelProto") -> "onnx.ModelProto":
    """A ModelProto with ``shell``'s model-level fields (versions, opsets, metadata, functions) and no graph."""
    import onnx

    model = onnx.ModelProto()
    for field_name in ("ir_version", "producer_name", "producer_version", "domain", "model_version", "doc_string"):
        setattr(model, field_name, getattr(shell, field_name))
    model.opset_import.extend(shell.opset_import)
    model.metadata_props.extend(shell.metadata_props)
    model.functions.extend(shell.functions)
    return model


def derived_model(shell: "onnx.ModelProto", derived: Derived) -> "onnx.ModelProto":
    """``derived`` as a ModelProto: the model :func:`write_model`'s file reads back as, without the file.

    One copy of the weights (each initializer copied in once); for graphs that are
    rewritten and checked before anything is written.
    """
    model = _model_fields(shell)
    model.graph.CopyFrom(derived.graph)
    with single_blas_thread():
        _copy_initializers(model, derived)
    return model


def _copy_initializers(model: "onnx.ModelProto", derived: Derived) -> None:
    """Each of ``derived``'s initializers copied into ``model`` (a Lazy one computed first)."""
    import numpy as np
    from onnx import numpy_helper

    for name, source in derived.initializers.items():
        if isinstance(source, Lazy):
            values = np.ascontiguousarray(source(), dtype=np.dtype(source.dtype))
            if tuple(values.shape) != tuple(source.shape):
                raise ExportError(f"initializer '{name}' has shape {values.shape}, not {source.shape}", name,
                                  "report this: a derived weight has the wrong shape")
            model.graph.initializer.append(numpy_helper.from_array(values, name))
        else:
            model.graph.initializer.add().CopyFrom(source)


def _layout(shell: "onnx.ModelProto", derived: Derived, external_bytes: int | None, data_name: str):
    """(the model's bytes up to its first initializer, [(name, source, external stub or None, serialized size)],
    bytes of external data)."""
    head = _model_fields(shell)
    graph_bytes = derived.graph.SerializeToString()
    plan, offset = [], 0
    for name, source in derived.initializers.items():
        length = _data_bytes(source)
        if external_bytes is not None and length >= external_bytes:
            stub = _external(stub_tensor(name, source), data_name, offset, length)
            plan.append((name, source, stub, stub.ByteSize()))
            offset += -(-length // 4096) * 4096
        elif isinstance(source, Lazy):
            plan.append((name, source, None, len(_lazy_head(name, source, length)) + length))
        else:
            plan.append((name, source, None, source.ByteSize()))
    graph_size = len(graph_bytes) + sum(1 + len(varint(size)) + size for *_, size in plan)
    return head.SerializeToString() + _GRAPH_FIELD + varint(graph_size) + graph_bytes, plan, offset


def _write(out, data, head: bytes, plan: list, where) -> None:
    """Write the model ``head`` then each initializer of ``plan`` to ``out`` (external values to ``data``)."""
    out.write(head)
    scratch = _Scratch()
    for name, source, stub, size in plan:
        out.write(_INITIALIZER_FIELD + varint(size))
        if stub is not None:
            values = _raw(source, scratch)
            data.write(values)
            data.write(b"\0" * (-len(values) % 4096))
            out.write(stub.SerializeToString())
        elif isinstance(source, Lazy):
            values = _raw(source, scratch)
            if len(values) != size - len(_lazy_head(name, source, len(values))):
                raise ExportError(f"initializer '{name}' has {len(values)} bytes, its shape says otherwise",
                                  where, "report this: a derived weight has the wrong shape")
            out.write(_lazy_head(name, source, len(values)))
            out.write(values)
        else:
            out.write(source.SerializeToString())
