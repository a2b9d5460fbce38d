"""Weights mapped from the graph file (runtime/mapped_graph.py, SessionSettings.map_weights): same outputs,
the file really mapped, nothing stale after the file is replaced, a broken file reported."""

from __future__ import annotations

import os
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from lora_edge.core.errors import BundleError
from lora_edge.runtime.mapped_graph import MIN_MAPPED_BYTES, MalformedGraph, mapped_twin
from lora_edge.runtime.session import SessionSettings, create_session, decoder_settings, drop_clean_mapped_pages, run

LINUX = sys.platform.startswith("linux")
K, N, BLOCK = 256, 256, 32


def _int4_graph(path, seed: int) -> None:
    """x [1, K] -> MatMulNBits (4-bit, block 32, zero points: prepacked by ONNX Runtime) + bias -> Gather of a
    table shared with nothing: large initializers of several kinds, and a small one that stays inline."""
    rng = np.random.default_rng(seed)
    blocks = K // BLOCK
    packed = rng.integers(0, 256, size=(N, blocks, BLOCK // 2), dtype=np.uint8)
    scales = rng.uniform(0.01, 0.1, size=(N * blocks,)).astype(np.float32)
    zero_points = rng.integers(0, 256, size=(N * ((blocks + 1) // 2),), dtype=np.uint8)
    bias = rng.standard_normal(N).astype(np.float32)
    table = rng.standard_normal((512, N)).astype(np.float32)  # 512 KB
    index = np.array([3], dtype=np.int64)  # 8 bytes: inline
    nodes = [
        helper.make_node("MatMulNBits", ["x", "B", "scales", "zp"], ["y"], domain="com.microsoft",
                         K=K, N=N, bits=4, block_size=BLOCK, accuracy_level=4),
        helper.make_node("Add", ["y", "bias"], ["z"]),
        helper.make_node("Gather", ["table", "index"], ["row"]),
        helper.make_node("Add", ["z", "row"], ["out"]),
    ]
    initializers = [numpy_helper.from_array(value, name) for name, value in
                    (("B", packed), ("scales", scales), ("zp", zero_points), ("bias", bias), ("table", table),
                     ("index", index))]
    graph = helper.make_graph(nodes, "int4", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, K])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)], initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    temporary = path.with_suffix(".tmp")
    onnx.save(model, temporary)
    os.replace(temporary, path)  # as lora-edge writes graphs: a new file, never rewritten in place


def _outputs(session) -> np.ndarray:
    x = np.linspace(-1, 1, K, dtype=np.float32)[None]
    return run(session, {"x": x})[0]


def _mapped_regions(path) -> int:
    target = str(path.resolve())
    with open("/proc/self/maps") as maps:
        return sum(1 for line in maps if line.rstrip().endswith(target))


def test_twin_points_into_the_file_at_each_weights_bytes(tmp_path):
    path = tmp_path / "model.onnx"
    _int4_graph(path, seed=0)
    original = {t.name: t for t in onnx.load(path).graph.initializer}
    twin = onnx.load_model_from_string(mapped_twin(path))
    data = path.read_bytes()
    for tensor in twin.graph.initializer:
        raw = original[tensor.name].raw_data
        if len(raw) < MIN_MAPPED_BYTES:
            assert tensor.data_location == TensorProto.DEFAULT and tensor.raw_data == raw
            continue
        entries = {entry.key: entry.value for entry in tensor.external_data}
        assert tensor.data_location == TensorProto.EXTERNAL and not tensor.raw_data
        assert entries["location"] == "model.onnx"
        start, length = int(entries["offset"]), int(entries["length"])
        assert data[start:start + length] == raw
    assert [n.op_type for n in twin.graph.node] == ["MatMulNBits", "Add", "Gather", "Add"]


def test_mapped_session_gives_the_same_outputs_and_maps_the_file(tmp_path):
    path = tmp_path / "model.onnx"
    _int4_graph(path, seed=1)
    expected = _outputs(create_session(path))
    mapped = create_session(path, decoder_settings(1))
    np.testing.assert_array_equal(_outputs(mapped), expected)
    if LINUX:
        assert _mapped_regions(path) >= 1  # the weights are read from the file, not a copy
    np.testing.assert_array_equal(_outputs(mapped), expected)  # after the loaded pages were dropped


@pytest.mark.skipif(not LINUX, reason="symlinks, /proc/self/maps")
def test_a_link_to_the_graph_maps_the_file_it_names(tmp_path):
    (tmp_path / "store").mkdir()
    (tmp_path / "bundle").mkdir()
    target, link = tmp_path / "store" / "model-1234.onnx", tmp_path / "bundle" / "model.onnx"
    _int4_graph(target, seed=5)
    link.symlink_to(target)
    session = create_session(link, decoder_settings(1))
    np.testing.assert_array_equal(_outputs(session), _outputs(create_session(target)))
    assert _mapped_regions(target) >= 1


@pytest.mark.skipif(not LINUX, reason="/proc/self/maps: Linux only")
def test_a_replaced_graph_is_read_anew_and_a_live_session_keeps_its_own(tmp_path):
    """No cache to go stale: a new session reads the new file; the old one still maps the old file's bytes."""
    path = tmp_path / "model.onnx"
    _int4_graph(path, seed=2)
    old_session = create_session(path, decoder_settings(1))
    old = _outputs(old_session)
    _int4_graph(path, seed=3)  # same structure and size, other weights
    new = _outputs(create_session(path, decoder_settings(1)))
    np.testing.assert_array_equal(new, _outputs(create_session(path)))
    assert not np.array_equal(new, old)
    np.testing.assert_array_equal(_outputs(old_session), old)


def test_a_truncated_graph_is_a_bundle_error(tmp_path):
    path = tmp_path / "model.onnx"
    _int4_graph(path, seed=4)
    path.write_bytes(path.read_bytes()[:-5000])
    with pytest.raises(MalformedGraph):
        mapped_twin(path)
    with pytest.raises(BundleError, match="model.onnx"):
        create_session(path, SessionSettings(map_weights=True))


@pytest.mark.skipif(not LINUX, reason="/proc/self/smaps and madvise: Linux only")
def test_only_mappings_nobody_wrote_to_are_dropped(tmp_path):
    clean_path, written_path = tmp_path / "clean.bin", tmp_path / "written.bin"
    values = np.arange(1024 * 1024, dtype=np.float32)  # 4 MB each
    values.tofile(clean_path)
    values.tofile(written_path)
    clean = np.memmap(clean_path, dtype=np.float32, mode="c")
    written = np.memmap(written_path, dtype=np.float32, mode="c")
    assert float(clean.sum()) == float(written.sum())  # every page resident
    written[5] = -1.0  # a private copy of one page: dropping it would lose the write
    dropped = drop_clean_mapped_pages([clean_path, written_path])
    assert dropped >= 4 * 1024 * 1024 and dropped < 8 * 1024 * 1024
    assert written[5] == -1.0
    np.testing.assert_array_equal(clean, values)  # read back from the file
