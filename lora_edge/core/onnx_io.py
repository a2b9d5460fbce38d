"""Writing and copying ONNX models without whole-model copies in memory.

A serialized model is another copy of its weights (twice their size at the
peak of ``onnx.save``), and a deep copy a third; the export and quantize
stages hold LLM-sized graphs, so they write initializer by initializer and
run shape inference on twins that carry no weight data.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import onnx


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


def weightless_twin(model: "onnx.ModelProto", min_elements: int = 4096, any_weight: bool = False) -> "onnx.ModelProto":
    """A copy of ``model`` whose float initializers of ``min_elements`` or more carry no data.

    Same nodes, names, types and shapes: enough for shape inference (which reads
    the values of small integer tensors only) at a fraction of the memory.
    ``any_weight``: quantized (8-bit, 4-bit) weights carry none either; only
    int32/int64 tensors (shapes, axes, indices) keep their values.
    """
    import math

    from onnx import TensorProto

    twin = _without_initializers(model)
    floats = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE}
    for tensor in model.graph.initializer:
        weight = tensor.data_type in floats or (any_weight and tensor.data_type not in (TensorProto.INT32,
                                                                                          TensorProto.INT64))
        if weight and math.prod(tensor.dims) >= min_elements:
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
