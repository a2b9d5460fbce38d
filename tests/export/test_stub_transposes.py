"""Weights the in-memory trace hides from the optimizer are stored transposed, as a traced-with-weights graph has.

On a real LLM every linear weight is above the optimizer's size limit, so
without the fold every linear kept ``MatMul(x, Transpose(W))`` and the quantize
stage found no q|k|v weights to pack (211 MatMulNBits on SmolLM2 instead of
151). The tiny models' weights are below the limit, so these tests lower it below them.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from lora_edge.core.adapters import AdapterRef
from lora_edge.core.manifest import list_graphs
from lora_edge.export import exporter
from lora_edge.export.bundle import export_bundle
from lora_edge.quantize.quantizer import quantize_bundle


def _transposed_initializers(path) -> list[str]:
    model = onnx.load(str(path), load_external_data=False)
    inputs = {value.name for value in model.graph.input}  # hot-swap LoRA inputs (with defaults) stay as traced
    initializers = {init.name for init in model.graph.initializer} - inputs
    return [node.input[0] for node in model.graph.node if node.op_type == "Transpose" and node.input[0] in initializers]


@pytest.fixture(scope="module")
def hidden_weights_bundle(tmp_path_factory, tiny_model, tiny_adapter):
    """Tiny llama, merged + hot-swap, int4 too, traced with every weight hidden from the optimizer."""
    patch = pytest.MonkeyPatch()
    patch.setattr(exporter, "OPTIMIZER_INPUT_SIZE_LIMIT", 512)  # the linears (32x32 and up), not constants
    try:
        out = tmp_path_factory.mktemp("stub-transposes") / "bundle"
        adapter = tiny_adapter("llama", alpha=32.0)
        export_bundle(tiny_model("llama"), [AdapterRef("a", adapter)], ["merged", "hotswap"], out,
                      task="causal-lm", precisions=["fp32", "int4"], exporter="dynamo", progress=lambda m: None,
                      quantize=quantize_bundle)  # every graph verified against PyTorch (base + adapter) on the way
    finally:
        patch.undo()
    return out


def test_hidden_weights_are_stored_transposed(hidden_weights_bundle):
    """No fp32 graph reads a weight through a Transpose (a tied embedding, read twice, would keep its one)."""
    for record in list_graphs(hidden_weights_bundle):
        if record.precision.value == "fp32":
            assert _transposed_initializers(hidden_weights_bundle / record.file) == [], record.name


def test_int4_graphs_pack_qkv_after_the_fold(hidden_weights_bundle):
    """The quantize stage packs q|k|v again: one MatMulNBits per layer for it, GroupQueryAttention per layer."""
    for record in list_graphs(hidden_weights_bundle):
        if record.precision.value != "int4":
            continue
        model = onnx.load(str(hidden_weights_bundle / record.file), load_external_data=False)
        ops = [node.op_type for node in model.graph.node]
        layers = ops.count("GroupQueryAttention")
        assert layers >= 1, record.name
        # per layer: q|k|v, o, gate, up, down; plus the LM head (untied in the tiny llama) when it is quantized
        assert ops.count("MatMulNBits") in (5 * layers, 5 * layers + 1), (record.name, ops.count("MatMulNBits"))


def test_fold_keeps_a_weight_read_twice(tmp_path):
    """A weight another node reads too (a tied embedding's lookup) keeps its Transpose; the rest are folded."""
    from onnx import TensorProto, helper

    nodes = [helper.make_node("Transpose", ["W"], ["Wt"], perm=[1, 0]),
             helper.make_node("MatMul", ["x", "Wt"], ["y"]),
             helper.make_node("Transpose", ["E"], ["Et"], perm=[1, 0]),
             helper.make_node("MatMul", ["y", "Et"], ["z"]),
             helper.make_node("Gather", ["E", "ids"], ["g"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3]),
                                           helper.make_tensor_value_info("ids", TensorProto.INT64, [2])],
                              [helper.make_tensor_value_info("z", TensorProto.FLOAT, [2, 5]),
                               helper.make_tensor_value_info("g", TensorProto.FLOAT, [2, 4])])
    model = helper.make_model(graph)
    weights = {"W": np.arange(12, dtype=np.float32).reshape(4, 3), "E": np.ones((5, 4), np.float32)}
    model.graph.initializer.extend(onnx.TensorProto(name=n, data_type=TensorProto.FLOAT, dims=list(a.shape))
                                   for n, a in weights.items())
    original_w = weights["W"].copy()
    assert exporter.fold_stub_transposes(model, weights) == 1
    assert [node.op_type for node in model.graph.node] == ["MatMul", "Transpose", "MatMul", "Gather"]
    assert model.graph.node[0].input[1] == "W"
    np.testing.assert_array_equal(weights["W"], original_w.T)
    assert list(next(i for i in model.graph.initializer if i.name == "W").dims) == [3, 4]
    assert weights["E"].shape == (5, 4)
