"""Every graph lora-edge writes passes onnx.checker (full check: strict shape and type inference)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from export_helpers import tiny_bundle


def _if_reading_a_later_value():
    """Graph: an If (then/else branches read outer 'late') placed before the Relu producing 'late'."""
    from onnx import TensorProto, helper

    branch = lambda name: helper.make_graph(  # noqa: E731
        [helper.make_node("Identity", ["late"], [f"{name}_out"])], name, [],
        [helper.make_tensor_value_info(f"{name}_out", TensorProto.FLOAT, [2])])
    nodes = [
        helper.make_node("If", ["cond"], ["y"], then_branch=branch("then"), else_branch=branch("else"), name="if"),
        helper.make_node("Relu", ["x"], ["late"], name="relu"),
        helper.make_node("Neg", ["y"], ["z"], name="neg"),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2]),
                                           helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
                              [helper.make_tensor_value_info("z", TensorProto.FLOAT, [2])],
                              value_info=[helper.make_tensor_value_info("late", TensorProto.FLOAT16, [2])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_conform_sorts_outer_scope_reads_and_drops_contradicting_value_info(tmp_path):
    import onnx
    import onnxruntime

    from lora_edge.core.onnx_spec import check_errors, conform

    model = _if_reading_a_later_value()
    path = tmp_path / "g.onnx"
    onnx.save(model, str(path))
    assert "topologically sorted" in check_errors(path)
    done = conform(model)
    assert done == {"moved": 2, "value_info": 1}  # relu first; 'late' is float, not the stale float16
    assert [node.name for node in model.graph.node] == ["relu", "if", "neg"]
    onnx.save(model, str(path))
    assert check_errors(path) is None
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    out = session.run(None, {"x": np.array([-1.0, 2.0], np.float32), "cond": np.array(True)})[0]
    np.testing.assert_array_equal(out, [-0.0, -2.0])


def test_export_refuses_a_graph_the_checker_rejects(tmp_path):
    import onnx

    from lora_edge.core.errors import ExportError
    from lora_edge.core.onnx_spec import require_valid_graph

    path = tmp_path / "bad.onnx"
    onnx.save(_if_reading_a_later_value(), str(path))
    with pytest.raises(ExportError, match="graph 'bad' is not valid ONNX .*topologically sorted"):
        require_valid_graph(path, "bad", ExportError)


def _assert_every_graph_valid(bundle, expected: int) -> None:
    from lora_edge.core.manifest import list_graphs
    from lora_edge.core.onnx_spec import check_errors

    records = list_graphs(bundle)
    assert len(records) == expected
    failures = {record.name: check_errors(bundle / record.file) for record in records}
    assert {name: error for name, error in failures.items() if error} == {}


def test_every_encoder_form_and_precision_passes_the_checker(tmp_path_factory, tiny_model, tiny_adapter, tmp_path):
    """3 forms x (fp32 + 4 quantized precisions) of tiny BERT: 15 graphs, 0 checker failures."""
    from lora_edge.core.data import default_intent_files
    from lora_edge.quantize.quantizer import quantize_bundle

    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle(tmp_path_factory, tiny_model, tiny_adapter, "bert"), bundle)
    quantize_bundle(bundle, ["fp16", "int8-dynamic", "int8-static", "int4"],
                    calibration=default_intent_files().validation, calib_size=8, progress=lambda m: None)
    _assert_every_graph_valid(bundle, 15)


@pytest.mark.slow
def test_every_decoder_form_and_precision_passes_the_checker(tmp_path_factory, tiny_model, tiny_adapter, tmp_path):
    """3 forms x (fp32, fp16, int8-dynamic, int4) of tiny Llama (KV-cache graphs): 0 checker failures."""
    from decoder_bundles import bundle_for, shared_root
    from lora_edge.core.choices import Form
    from lora_edge.quantize.quantizer import quantize_bundle

    root = shared_root(tmp_path_factory)
    for form, expected in ((Form.MERGED, 8), (Form.HOTSWAP, 4)):  # the llama bundles: merged+branched, hotswap
        source, _ = bundle_for("llama", form, root, tiny_model, tiny_adapter)
        bundle = tmp_path / form.value
        shutil.copytree(source, bundle)
        quantize_bundle(bundle, ["fp16", "int8-dynamic", "int4"], progress=lambda m: None)
        _assert_every_graph_valid(bundle, expected)


@pytest.mark.parametrize("inner", [256, 255])
def test_the_checker_sees_large_weights_by_reference(tmp_path, inner):
    """A graph with weights past the by-reference size is checked through a twin: shapes of the weights count
    (a MatMul whose inner dims disagree fails strict inference), and the twin file does not stay."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from lora_edge.core.onnx_spec import check_errors

    weight = numpy_helper.from_array(np.ones((inner, 128), np.float32), "w")  # 128-256 KB: read by reference
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 256])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 128])], [weight])
    path = tmp_path / "graph.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    problem = check_errors(path)
    if inner == 256:
        assert problem is None
    else:
        assert "Incompatible dimensions" in problem
    assert sorted(p.name for p in tmp_path.iterdir()) == ["graph.onnx"]


def test_a_linked_graph_is_checked_through_a_twin_beside_its_file(tmp_path, monkeypatch):
    """A bundle's link to a graph kept elsewhere (intermediate fp32 graphs): the checker reads a twin beside the
    file, not the whole model (SmolLM2-135M: +400 MB, the export's peak), and no twin stays."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from lora_edge.core.onnx_spec import check_errors

    weight = numpy_helper.from_array(np.ones((256, 128), np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 256])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 128])], [weight])
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "bundle").mkdir()
    target = tmp_path / "elsewhere" / "graph.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), target)
    link = tmp_path / "bundle" / "graph.onnx"
    link.symlink_to(target)
    checked = []
    check_model = onnx.checker.check_model
    monkeypatch.setattr(onnx.checker, "check_model", lambda model, **kw: checked.append(model) or check_model(model, **kw))
    assert check_errors(link) is None
    assert len(checked) == 1 and Path(checked[0]).name.startswith(".check-")
    assert Path(checked[0]).parent == target.parent
    assert sorted(p.name for p in (tmp_path / "elsewhere").iterdir()) == ["graph.onnx"]
