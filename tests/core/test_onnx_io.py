"""Graphs loaded with their large weights left in the file (lora_edge.core.onnx_io.load_by_reference)."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from lora_edge.core.onnx_io import (has_references, load_by_reference, resolve_references, save_streamed,
                                    session_file, tensor_value)


def _model():
    """y = relu(x @ W1 + b) @ W2: two weights of 16 KB, a 256-byte bias."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((64, 64)).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.standard_normal(64).astype(np.float32), "b"),
             numpy_helper.from_array(rng.standard_normal((64, 64)).astype(np.float32), "w2")]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="first"),
             helper.make_node("Add", ["h", "b"], ["hb"], name="bias"),
             helper.make_node("Relu", ["hb"], ["r"], name="relu"),
             helper.make_node("MatMul", ["r", "w2"], ["y"], name="second")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 64])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.metadata_props.add(key="k", value="v")
    return model


@pytest.mark.parametrize("writer", ["onnx.save", "save_streamed"])
def test_a_graph_by_reference_resolves_to_what_onnx_load_reads(writer, tmp_path):
    """Stubs for the weights only; their values are the file's; resolved, the model is onnx.load's, byte for byte."""
    import onnx
    from onnx import numpy_helper

    path = tmp_path / "model.onnx"
    onnx.save(_model(), path) if writer == "onnx.save" else save_streamed(_model(), path)
    loaded = onnx.load(path)
    model = load_by_reference(path, min_bytes=1024)
    assert has_references(model)
    stubs = [t.name for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    assert stubs == ["w1", "w2"]  # the bias is small: kept in the model
    for tensor, want in zip(model.graph.initializer, loaded.graph.initializer):
        np.testing.assert_array_equal(tensor_value(tensor), numpy_helper.to_array(want))
    assert resolve_references(model) == 2 and not has_references(model)
    assert model.SerializeToString() == loaded.SerializeToString()


def test_a_session_of_a_graph_by_reference_maps_the_weights_and_computes_the_same(tmp_path):
    """session_file writes the nodes and small tensors only; ONNX Runtime reads the weights from a hard link."""
    import onnx

    from lora_edge.runtime.session import outputs_on

    path = tmp_path / "model.onnx"
    onnx.save(_model(), path)
    feeds = [{"x": np.random.default_rng(1).standard_normal((3, 64)).astype(np.float32)}]
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    written = session_file(load_by_reference(path, min_bytes=1024), scratch)
    assert written.stat().st_size < 2 * 64 * 64 * 4 / 4
    np.testing.assert_array_equal(outputs_on(str(written), feeds)[0][0], outputs_on(str(path), feeds)[0][0])


def test_a_file_that_is_not_a_graph_is_refused(tmp_path):
    path = tmp_path / "model.onnx"
    path.write_bytes(b"\x0f\xff\xff not a protobuf")
    with pytest.raises((ValueError, OSError)):
        load_by_reference(path)


def test_a_graph_with_external_data_is_read_by_reference_too(tmp_path):
    """Its external tensors become stubs of the data file: resolved, the model is onnx.load's; a session reads it."""
    import onnx

    from lora_edge.runtime.session import outputs_on

    path = tmp_path / "model.onnx"
    onnx.save(_model(), path, save_as_external_data=True, location="model.data", size_threshold=1024)
    model = load_by_reference(path, min_bytes=1024)
    assert has_references(model)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    feeds = [{"x": np.ones((2, 64), np.float32)}]
    np.testing.assert_array_equal(outputs_on(str(session_file(model, scratch)), feeds)[0][0],
                                  outputs_on(str(path), feeds)[0][0])
    shutil.rmtree(scratch)  # (onnx.load refuses a data file with other hard links)
    resolve_references(model)
    assert model.SerializeToString() == onnx.load(path).SerializeToString()


def test_a_column_reader_gives_every_band_of_every_kind_of_tensor(tmp_path):
    """Plain and transposed stubs and tensors in memory: each band is the same columns of tensor_value."""
    import onnx
    from onnx import numpy_helper

    from lora_edge.core.onnx_io import ColumnReader, transposed_reference

    path = tmp_path / "model.onnx"
    onnx.save(_model(), path)
    model = load_by_reference(path, min_bytes=1024)
    stubs = {t.name: t for t in model.graph.initializer}
    rng = np.random.default_rng(2)
    tensors = [stubs["w1"], transposed_reference(stubs["w2"], "w2_t"),
               numpy_helper.from_array(rng.standard_normal((24, 40)).astype(np.float32), "in_memory")]
    with ColumnReader() as reader:
        for tensor in tensors * 2:  # (again: nothing is left over from the tensor read before)
            want = tensor_value(tensor)
            for start, stop in [(0, want.shape[1]), (0, 7), (7, 20), (20, want.shape[1])]:
                out = np.full((want.shape[0], stop - start), np.nan, np.float32)
                reader.read_columns(tensor, start, stop, out)
                np.testing.assert_array_equal(out, want[:, start:stop])


def test_a_streamed_save_writes_onnx_save_s_bytes(tmp_path):
    """save_streamed splices each initializer into the graph record: the very bytes of onnx.save, with the
    graph's fields after the initializers (inputs, outputs, value_info) and the model's after the graph."""
    import onnx

    model = _model()
    model.graph.doc_string = "after the initializers"
    model.graph.value_info.add(name="h")
    for way, target in (("onnx", tmp_path / "a.onnx"), ("streamed", tmp_path / "b.onnx")):
        onnx.save(model, target) if way == "onnx" else save_streamed(model, target)
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()
    del model.graph.initializer[:]
    save_streamed(model, tmp_path / "c.onnx")
    assert (tmp_path / "c.onnx").read_bytes() == model.SerializeToString()
