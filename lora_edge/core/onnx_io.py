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
    import numpy as np
    import onnx


def varint(value: int) -> bytes:
    """``value`` as a protobuf base-128 varint (the writers and readers of raw graph bytes share it)."""
    out = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        out.append(low | (0x80 if value else 0))
        if not value:
            return bytes(out)


# Protobuf keys (field number << 3 | length-delimited) of ModelProto.graph and GraphProto.initializer.
_GRAPH_KEY, _INITIALIZER_KEY = bytes([7 << 3 | 2]), bytes([5 << 3 | 2])


def save_streamed(model: "onnx.ModelProto", path: str | Path) -> None:
    """Write the bytes ``onnx.save`` writes for ``model`` (no external data), one initializer at a time.

    ``onnx.save`` serializes the whole model first (twice its size at the peak:
    protobuf's buffer and the bytes object).

    Protobuf writes a message's fields in field-number order, each record as its
    key, length and bytes, so the file is the model without its initializers
    with each initializer's record spliced into the graph after its nodes and
    name (GraphProto fields 1 and 2; initializers are field 5) and the graph's
    length grown to match. No whole-model buffer: on this VM each fresh page
    costs ~5-15 us, and an int4 SmolLM2-135M graph serialized whole was 0.26 s.
    """
    shell = _without_initializers(model)
    head = shell.SerializeToString()
    graph = next((f for f in _fields(head, 0, len(head)) if f[0] == _MODEL_GRAPH), None)
    if graph is None or not model.graph.initializer:
        with open(path, "wb") as out:
            out.write(model.SerializeToString())
        return
    _, graph_start, value_start, value_end = graph
    split = next((f[1] for f in _fields(head, value_start, value_end) if f[0] > _GRAPH_INITIALIZER), value_end)
    sizes = [tensor.ByteSize() for tensor in model.graph.initializer]
    records = sum(len(_INITIALIZER_KEY) + len(varint(size)) + size for size in sizes)
    with open(path, "wb") as out:
        out.write(head[:graph_start] + _GRAPH_KEY + varint(value_end - value_start + records))
        out.write(head[value_start:split])
        for tensor, size in zip(model.graph.initializer, sizes):
            out.write(_INITIALIZER_KEY + varint(size))
            out.write(tensor.SerializeToString())
        out.write(head[split:])


def _write_records(model: "onnx.ModelProto", path: str | Path, serialize) -> None:
    """The model without initializers, then one ``graph { initializer }`` record per initializer (``serialize``d)."""
    shell = _without_initializers(model)
    with open(path, "wb") as out:
        out.write(shell.SerializeToString())
        for tensor in model.graph.initializer:
            record = serialize(tensor)
            record = _INITIALIZER_KEY + varint(len(record)) + record
            out.write(_GRAPH_KEY + varint(len(record)) + record)


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


# --- weights by reference: a graph whose large initializers stay in the file they were read from ------------
#
# A fp32 LLM graph is hundreds of MB, and each full copy in memory (onnx.load, a scratch file for a check
# session, the session's own copy) costs its size again in fresh pages. A graph loaded *by reference* keeps
# its large initializers in the file: each is a stub (name, type, shape, and where its bytes are: ONNX
# external data with an absolute location), read from the file when a value is needed. A check session is
# given a small graph file whose stubs point at a hard link of that file: ONNX Runtime maps the weights
# instead of copying them. Rewrites add new initializers as usual and never change a stub in place, so a
# stub's bytes are always the source file's.

REFERENCE_MIN_BYTES = 64 * 1024  # initializers at least this large are left in the file
_LOCATION, _OFFSET, _LENGTH = "location", "offset", "length"
_INLINE = "lora_edge_inline"  # a stub's entry when the file holds the bytes in the tensor (not external data)
_TRANSPOSED = "lora_edge_transposed"  # a stub's entry when its value is the transpose of the 2-D bytes in the file
# Protobuf field numbers: ModelProto.graph, GraphProto.initializer, TensorProto.raw_data.
_MODEL_GRAPH, _GRAPH_INITIALIZER, _TENSOR_RAW_DATA = 7, 5, 9


def _read_varint(buffer, position: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = buffer[position]
        position += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, position
        shift += 7


def _fields(buffer, start: int, end: int):
    """(field number, field start, value start, value end) of each protobuf field in ``buffer[start:end]``."""
    position = start
    while position < end:
        field_start = position
        key, position = _read_varint(buffer, position)
        wire_type = key & 7
        if wire_type == 0:
            _, value_end = _read_varint(buffer, position)
        elif wire_type == 2:
            length, position = _read_varint(buffer, position)
            value_end = position + length
        elif wire_type in (1, 5):
            value_end = position + (8 if wire_type == 1 else 4)
        else:
            raise ValueError(f"unsupported protobuf wire type {wire_type} at byte {field_start}")
        if value_end > end:
            raise ValueError(f"truncated protobuf field at byte {field_start}")
        yield key >> 3, field_start, position, value_end
        position = value_end


def _stub(tensor_bytes: list, path: str, offset: int, length: int):
    import onnx

    tensor = onnx.TensorProto()
    tensor.ParseFromString(b"".join(tensor_bytes))
    written = "written" if tensor.HasField("data_location") else "absent"  # (as resolve_references puts it back)
    tensor.data_location = onnx.TensorProto.EXTERNAL
    for key, value in ((_LOCATION, path), (_OFFSET, str(offset)), (_LENGTH, str(length)), (_INLINE, written)):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    return tensor


def _absolute(tensor, directory: Path):
    """``tensor``; when it is external data of the graph file's own, a stub of it (an absolute location)."""
    import os

    from onnx import TensorProto

    if tensor.data_location != TensorProto.EXTERNAL:
        return tensor
    entries = {entry.key: entry.value for entry in tensor.external_data}
    path = str((directory / entries[_LOCATION]).resolve())
    offset = int(entries.get(_OFFSET) or 0)
    length = int(entries[_LENGTH]) if entries.get(_LENGTH) else os.path.getsize(path) - offset
    del tensor.external_data[:]
    for key, value in ((_LOCATION, path), (_OFFSET, str(offset)), (_LENGTH, str(length))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    return tensor


def load_by_reference(path: str | Path, min_bytes: int | None = None) -> "onnx.ModelProto":
    """The ONNX model at ``path`` with every initializer of ``min_bytes`` (default
    :data:`REFERENCE_MIN_BYTES`) or more left in the file (a stub).

    Same nodes, inputs, outputs, metadata and initializer order as ``onnx.load``
    (a graph's own external data becomes stubs too);
    :func:`tensor_value` reads a stub's value, :func:`resolve_references` puts the
    bytes back into the model, :func:`session_file` writes it for a session. Raises
    ValueError (or OSError) on a file that is not a protobuf message.
    """
    import mmap

    import onnx

    min_bytes = REFERENCE_MIN_BYTES if min_bytes is None else min_bytes
    path = str(Path(path).resolve())
    with open(path, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as buffer:
        model_bytes, graph_bytes, initializers = [], [], []
        for number, start, value_start, end in _fields(buffer, 0, len(buffer)):
            if number != _MODEL_GRAPH:
                model_bytes.append(buffer[start:end])
                continue
            for graph_number, graph_start, tensor_start, tensor_end in _fields(buffer, value_start, end):
                if graph_number != _GRAPH_INITIALIZER:
                    graph_bytes.append(buffer[graph_start:tensor_end])
                    continue
                kept, raw = [], None
                for field, field_start, raw_start, raw_end in _fields(buffer, tensor_start, tensor_end):
                    if field == _TENSOR_RAW_DATA and raw_end - raw_start >= min_bytes:
                        raw = (raw_start, raw_end - raw_start)
                    else:
                        kept.append(buffer[field_start:raw_end])
                if raw is not None:
                    initializers.append(_stub(kept, path, *raw))
                else:
                    initializers.append(_absolute(onnx.TensorProto.FromString(b"".join(kept)), Path(path).parent))
    model = onnx.ModelProto.FromString(b"".join(model_bytes))
    model.graph.ParseFromString(b"".join(graph_bytes))
    model.graph.initializer.extend(initializers)
    return model


def _reference(tensor) -> tuple[str, int, int] | None:
    """(file, offset, length) of a stub made by :func:`load_by_reference`, else None."""
    from onnx import TensorProto

    if tensor.data_location != TensorProto.EXTERNAL:
        return None
    entries = {entry.key: entry.value for entry in tensor.external_data}
    if not Path(entries.get(_LOCATION, "")).is_absolute():
        return None  # external data of a file's own: not a stub of ours
    return entries[_LOCATION], int(entries[_OFFSET]), int(entries[_LENGTH])


def has_references(model: "onnx.ModelProto") -> bool:
    """True when ``model`` holds stubs of :func:`load_by_reference`."""
    return any(_reference(tensor) is not None for tensor in model.graph.initializer)


def _read(path: str, offset: int, length: int) -> bytes:
    import os

    descriptor = os.open(path, os.O_RDONLY)
    try:
        data = os.pread(descriptor, length, offset)
    finally:
        os.close(descriptor)
    if len(data) != length:
        raise ValueError(f"{path} is shorter than when its graph was loaded")
    return data


# Tensor types whose raw bytes are a little-endian numpy array of the tensor's shape (onnx.TensorProto values:
# float, uint8, int8, uint16, int16, int32, int64, bool, float16, double, uint32, uint64).
_PLAIN_TYPES = {1, 2, 3, 4, 5, 6, 7, 9, 10, 11, 12, 13}


def _transposed(tensor) -> bool:
    return any(entry.key == _TRANSPOSED for entry in tensor.external_data)


def tensor_value(tensor) -> "np.ndarray":
    """``numpy_helper.to_array(tensor)``; a stub's value is read from its file (no other weight is).

    The value of a :func:`transposed_reference` is a transposed (not contiguous) array.
    """
    import numpy as np
    from onnx import helper, numpy_helper

    reference = _reference(tensor)
    if reference is None:
        return numpy_helper.to_array(tensor)
    if tensor.data_type not in _PLAIN_TYPES:  # packed or special types: as onnx reads them
        whole = type(tensor)()
        whole.CopyFrom(tensor)
        _resolve(whole)
        return numpy_helper.to_array(whole)
    path, offset, length = reference
    dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tensor.data_type)).newbyteorder("<")
    values = np.fromfile(path, dtype=dtype, count=length // dtype.itemsize, offset=offset)
    if values.nbytes != length:
        raise ValueError(f"{path} is shorter than when its graph was loaded")
    if _transposed(tensor):
        return values.reshape(tuple(reversed(tensor.dims))).T
    return values.reshape(tuple(tensor.dims))


class ColumnReader:
    """Reads a 2-D initializer's value a band of columns at a time into arrays the caller reuses.

    :func:`tensor_value` gives a fresh array per weight (and a transposed stub's
    value needs a second one to be contiguous): an int4 pass over an LLM's weights
    touched a gigabyte of new memory pages, seconds of page faults on a slow VM.
    Here a stub's bytes go straight into the caller's array when they are the band
    as it is laid out, else into one reused buffer first: a band of a transposed
    stub's columns is a run of consecutive rows of its file, read and transposed
    band by band; a plain stub is read whole once, then banded. Tensors in memory
    are read once (:func:`tensor_value`). Use it as a context manager: it keeps the
    files it reads open.
    """

    def __init__(self) -> None:
        import numpy as np

        self._scratch = np.empty(0, np.uint8)
        self._files: dict[str, int] = {}
        self._whole: tuple = (None, None)  # (tensor, its value) of the last tensor read whole

    def __enter__(self) -> "ColumnReader":
        return self

    def __exit__(self, *exc) -> None:
        import os

        for descriptor in self._files.values():
            os.close(descriptor)
        self._files.clear()
        self._whole = (None, None)

    def read_columns(self, tensor, start: int, stop: int, out: "np.ndarray") -> None:
        """Write ``tensor_value(tensor)[:, start:stop]`` into ``out`` (of that shape)."""
        import numpy as np
        from onnx import helper

        reference = _reference(tensor)
        if reference is None or tensor.data_type not in _PLAIN_TYPES:
            if self._whole[0] is not tensor:
                self._whole = (tensor, tensor_value(tensor))
            np.copyto(out, self._whole[1][:, start:stop])
            return
        path, offset, length = reference
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tensor.data_type)).newbyteorder("<")
        rows, cols = tensor.dims
        if _transposed(tensor):  # the file holds the value's columns as rows
            band = self._read(path, offset + start * rows * dtype.itemsize, (stop - start) * rows * dtype.itemsize,
                              offset + length)
            np.copyto(out, band.view(dtype).reshape(stop - start, rows).T)
        elif start == 0 and stop == cols and out.flags.c_contiguous and out.dtype == dtype:
            self._read(path, offset, length, offset + length, out.reshape(-1).view(np.uint8))
        else:
            if self._whole[0] is not tensor:
                whole = self._read(path, offset, length, offset + length)
                self._whole = (tensor, whole.view(dtype).reshape(rows, cols))
            np.copyto(out, self._whole[1][:, start:stop])

    def _read(self, path: str, offset: int, length: int, end: int, into: "np.ndarray | None" = None) -> "np.ndarray":
        """``length`` bytes of ``path`` at ``offset`` (not past ``end``), into ``into`` or the reused buffer."""
        import os

        import numpy as np

        if offset + length > end:
            raise ValueError(f"a read past the end of a tensor in {path}")
        if into is None:
            self._whole = (None, None)  # (a plain stub read whole is in the buffer)
            if self._scratch.nbytes < length:
                self._scratch = np.empty(length, np.uint8)
            into = self._scratch[:length]
        if path not in self._files:
            self._files[path] = os.open(path, os.O_RDONLY)
        view, done = memoryview(into)[:length], 0
        while done < length:
            count = os.preadv(self._files[path], [view[done:]], offset + done)
            if count <= 0:
                raise ValueError(f"{path} is shorter than when its graph was loaded")
            done += count
        return into


def transposed_reference(tensor, name: str) -> "onnx.TensorProto | None":
    """A stub ``name`` whose value is the transpose of the 2-D stub ``tensor`` (nothing read); None for a tensor
    that is not a stub. It resolves to what ``numpy_helper.from_array(value.T.copy(), name)`` holds."""
    import onnx

    reference = _reference(tensor)
    if reference is None or len(tensor.dims) != 2 or tensor.data_type not in _PLAIN_TYPES:
        return None
    stub = onnx.TensorProto(name=name, data_type=tensor.data_type, dims=list(reversed(tensor.dims)),
                            data_location=onnx.TensorProto.EXTERNAL)
    path, offset, length = reference
    for key, value in ((_LOCATION, path), (_OFFSET, str(offset)), (_LENGTH, str(length)), (_INLINE, "absent"),
                       (_TRANSPOSED, "1")):
        entry = stub.external_data.add()
        entry.key, entry.value = key, value
    return stub


def resolve_references(model: "onnx.ModelProto") -> int:
    """Put every stub's bytes back into ``model`` (as ``onnx.load`` holds them); return how many."""
    return sum(_resolve(tensor) for tensor in model.graph.initializer)


def _resolve(tensor) -> bool:
    """Put a stub's bytes into it; False for a tensor that is not a stub."""
    reference = _reference(tensor)
    if reference is None:
        return False
    inline = next((entry.value for entry in tensor.external_data if entry.key == _INLINE), None)
    if _transposed(tensor):
        import numpy as np

        tensor.raw_data = np.ascontiguousarray(tensor_value(tensor)).tobytes()  # (plain types only)
    else:
        tensor.raw_data = _read(*reference)
    if inline == "absent":
        tensor.ClearField("data_location")
    else:  # as the file had it, or as onnx.load leaves a tensor it read from external data
        tensor.data_location = tensor.DEFAULT
    del tensor.external_data[:]
    return True


def session_file(model: "onnx.ModelProto", directory: str | Path) -> Path:
    """Write ``model`` into ``directory`` for an ONNX Runtime session; return the graph file.

    Stubs become external data in hard links (beside the graph file) of the files
    they were read from, so the session maps those weights instead of copying them;
    the model without its initializers is followed by one ``graph { initializer }``
    record per initializer (protobuf parsers merge repeated message fields, so every
    reader parses the model; the bytes differ from ``onnx.save``'s).
    """
    import os
    import shutil

    directory = Path(directory)
    links: dict[str, str] = {}

    def record(tensor) -> bytes:
        reference = _reference(tensor)
        if reference is not None and _transposed(tensor):  # not bytes of the file: written out
            whole = type(tensor)()
            whole.CopyFrom(tensor)
            _resolve(whole)
            return whole.SerializeToString()
        if reference is None:
            return tensor.SerializeToString()
        path, offset, length = reference
        if path not in links:
            links[path] = f"weights{len(links)}.data"
            try:
                os.link(path, directory / links[path])
            except OSError:  # another file system, or no hard links: a copy
                shutil.copyfile(path, directory / links[path])
        stub = type(tensor)()
        stub.CopyFrom(tensor)
        del stub.external_data[:]
        for key, value in ((_LOCATION, links[path]), (_OFFSET, str(offset)), (_LENGTH, str(length))):
            entry = stub.external_data.add()
            entry.key, entry.value = key, value
        return stub.SerializeToString()

    target = directory / "model.onnx"
    _write_records(model, target, record)
    return target
