"""A graph file's "mapped twin": its weights left in the file, for ONNX Runtime to memory-map.

An ``.onnx`` file with its weights inline is parsed into memory whole, then
ONNX Runtime copies every initializer into its own buffers and, for the int4
MatMulNBits weights, into prepacked ones. The twin is the same protobuf with
each large ``raw_data`` field replaced by an external-data reference to that
field's bytes *inside the original file* (``location`` = the file, ``offset``
and ``length`` = where the bytes already are). Loaded from memory with the
file's folder as the external-data folder, ONNX Runtime maps those byte ranges
instead of copying them: the originals a kernel prepacked are unmapped, and
pages it only read while loading are clean file pages that
``session.drop_clean_mapped_pages`` takes out of the RSS (read again from the
file if a kernel needs them). Nothing is written to disk; the twin (~0.6 MB
for SmolLM2-135M int4) is built from the current file on every load, so it
cannot go stale.

The walk reads only the protobuf structure (seeking over the weights): the
fields of ModelProto -> GraphProto -> TensorProto that hold initializers.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

# ONNX protobuf field numbers (onnx.proto3): ModelProto.graph, GraphProto.initializer, TensorProto.raw_data,
# TensorProto.external_data, TensorProto.data_location; StringStringEntryProto key and value; EXTERNAL.
MODEL_GRAPH = 7
GRAPH_INITIALIZER = 5
TENSOR_RAW_DATA = 9
TENSOR_EXTERNAL_DATA = 13
TENSOR_DATA_LOCATION = 14
ENTRY_KEY, ENTRY_VALUE = 1, 2
LOCATION_EXTERNAL = 1
VARINT, FIXED64, LENGTH_DELIMITED, FIXED32 = 0, 1, 2, 5
# raw_data fields smaller than this stay inline (shape constants: a map would cost more than it saves)
MIN_MAPPED_BYTES = 4096


class MalformedGraph(ValueError):
    """The file is not a protobuf message this walk can read (the caller loads it the ordinary way)."""


def mapped_twin(graph: str | Path) -> bytes:
    """The serialized twin of ``graph``: large initializers as references into the file itself.

    Load it with ``session.model_external_initializers_file_folder_path`` set to
    the file's folder. Raises MalformedGraph when the file is not a readable
    protobuf (a truncated or foreign file).
    """
    path = Path(graph)
    location = path.name
    with open(path, "rb", buffering=1 << 16) as file:
        size = file.seek(0, io.SEEK_END)
        file.seek(0)
        return _message(file, 0, size, {MODEL_GRAPH: lambda s, n: _graph(file, s, n, location)})


def _graph(file: BinaryIO, start: int, length: int, location: str) -> bytes:
    return _message(file, start, start + length, {GRAPH_INITIALIZER: lambda s, n: _tensor(file, s, n, location)})


def _tensor(file: BinaryIO, start: int, length: int, location: str) -> bytes:
    """The TensorProto at ``start`` with its raw_data (when large) turned into an external-data reference."""
    out, mapped = bytearray(), None
    file.seek(start)
    for field, wire, value_start, value in _fields(file, start + length):
        if field == TENSOR_RAW_DATA and wire == LENGTH_DELIMITED and value >= MIN_MAPPED_BYTES:
            mapped = (value_start, value)
        else:  # a tensor with raw_data has no external data: nothing else to rewrite
            out += _copy(file, field, wire, value_start, value)
    if mapped is None:
        return bytes(out)
    for key, text in (("location", location), ("offset", str(mapped[0])), ("length", str(mapped[1]))):
        entry = _delimited(ENTRY_KEY, key.encode()) + _delimited(ENTRY_VALUE, text.encode())
        out += _delimited(TENSOR_EXTERNAL_DATA, entry)
    out += _varint(TENSOR_DATA_LOCATION << 3 | VARINT) + _varint(LOCATION_EXTERNAL)
    return bytes(out)


def _message(file: BinaryIO, start: int, end: int, rewrites: dict) -> bytes:
    """The message between ``start`` and ``end``, each length-delimited field in ``rewrites`` replaced by
    ``rewrites[field](value start, value length)``, every other field copied as it is."""
    out = bytearray()
    file.seek(start)
    for field, wire, value_start, value in _fields(file, end):
        if field in rewrites and wire == LENGTH_DELIMITED:
            out += _delimited(field, rewrites[field](value_start, value))
            file.seek(value_start + value)
        else:
            out += _copy(file, field, wire, value_start, value)
    return bytes(out)


def _fields(file: BinaryIO, end: int) -> Iterator[tuple[int, int, int, int]]:
    """(field number, wire type, where its value starts, the varint value or the byte length) up to ``end``;
    the file is left after each field's value."""
    while file.tell() < end:
        tag = _read_varint(file)
        field, wire = tag >> 3, tag & 7
        start = file.tell()
        if wire == VARINT:
            yield field, wire, start, _read_varint(file)
            continue
        if wire == LENGTH_DELIMITED:
            length = _read_varint(file)
            start = file.tell()
        elif wire in (FIXED64, FIXED32):
            length = 8 if wire == FIXED64 else 4
        else:
            raise MalformedGraph(f"protobuf wire type {wire} at byte {start}")
        if field == 0 or start + length > end:
            raise MalformedGraph(f"field {field} at byte {start} runs past its message")
        yield field, wire, start, length
        file.seek(start + length)
    if file.tell() != end:
        raise MalformedGraph(f"a message ends at byte {file.tell()}, not {end}")


def _copy(file: BinaryIO, field: int, wire: int, start: int, value: int) -> bytes:
    """One field as it is in the file (``value``: the varint, or the byte length)."""
    if wire == VARINT:
        return _varint(field << 3 | VARINT) + _varint(value)
    here = file.tell()
    file.seek(start)
    payload = file.read(value)
    file.seek(here)
    return _delimited(field, payload) if wire == LENGTH_DELIMITED else _varint(field << 3 | wire) + payload


def _delimited(field: int, payload: bytes) -> bytes:
    return _varint(field << 3 | LENGTH_DELIMITED) + _varint(len(payload)) + payload



def _varint(value: int) -> bytes:
    """A protobuf base-128 varint (this module imports nothing of lora-edge, as the runtime's loader)."""
    out = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        out.append(low | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _read_varint(file: BinaryIO) -> int:
    value = shift = 0
    while shift < 64:
        byte = file.read(1)
        if not byte:
            raise MalformedGraph("the file ends inside a field")
        value |= (byte[0] & 0x7F) << shift
        if not byte[0] & 0x80:
            return value
        shift += 7
    raise MalformedGraph("a varint longer than 10 bytes")
