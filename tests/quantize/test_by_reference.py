"""int4 of a decoder whose weights stay in the fp32 file until folded equals int4 of the whole graph in memory."""

from __future__ import annotations

import shutil

import pytest

from decoder_bundles import bundle_for, shared_root
from lora_edge.core.bundle import ONNX_DIR
from lora_edge.core.choices import Form
from lora_edge.core.manifest import find_graph


@pytest.fixture(scope="module")
def bundles(tmp_path_factory, tiny_model, tiny_adapter):
    root = shared_root(tmp_path_factory)
    return lambda arch, form: bundle_for(arch, form, root, tiny_model, tiny_adapter)


@pytest.mark.parametrize("form", [Form.MERGED, Form.HOTSWAP])
def test_int4_of_a_decoder_by_reference_is_byte_identical(form, bundles, tmp_path, monkeypatch):
    """The fused, checked and quantized graph is the same file whether prepare loads the weights or leaves them."""
    from lora_edge.core import onnx_io
    from lora_edge.core.bundle import load_graph
    from lora_edge.quantize import decoder, quantizer

    bundle, graph = bundles("llama", form)
    (tmp_path / "onnx").mkdir()
    source = tmp_path / "onnx" / "graph.fp32.onnx"
    shutil.copy(bundle / find_graph(bundle, graph).file, source)
    shutil.copy(bundle / ONNX_DIR / "config.json", tmp_path / "onnx" / "config.json")
    monkeypatch.setattr(onnx_io, "REFERENCE_MIN_BYTES", 256)  # the tiny model's weights are stubs too
    seen = []
    fuse = decoder.fuse_decoder
    monkeypatch.setattr(decoder, "fuse_decoder",
                        lambda model, *args: seen.append(onnx_io.has_references(model)) or fuse(model, *args))
    by_reference = quantizer.quantize_graph(source, tmp_path / "new.int4.onnx", "int4", task="causal-lm")
    monkeypatch.setattr(quantizer, "_load_decoder", load_graph)  # the whole graph in memory
    whole = quantizer.quantize_graph(source, tmp_path / "old.int4.onnx", "int4", task="causal-lm")
    assert seen == [True, False]
    assert by_reference.fusion.get("group_query_attention") and "dropped" not in by_reference.fusion
    assert by_reference.fusion == whole.fusion and by_reference.linears == whole.linears
    assert by_reference.path.read_bytes() == whole.path.read_bytes()


def _wide_linears_graph(path):
    """x [b, 40] -> MatMul(W1 [40, 160]) -> MatMul(Transpose(W2 [130, 160])): more columns than one band holds."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(4)
    inits = [numpy_helper.from_array(rng.standard_normal((40, 160)).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.standard_normal((130, 160)).astype(np.float32), "w2")]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="first"),
             helper.make_node("Transpose", ["w2"], ["w2t"], name="transpose", perm=[1, 0]),
             helper.make_node("MatMul", ["h", "w2t"], ["y"], name="second")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 40])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 130])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def test_int4_matmuls_quantized_in_bands_of_columns_are_ort_quantizers_graph(tmp_path, monkeypatch):
    """Weights quantized 64 columns at a time (160 and 130 columns: bands of 64, 64 and the rest) give, byte for
    byte, what MatMulNBitsQuantizer's pass writes (blocks, scales and zero points are each column's own)."""
    from lora_edge.core import onnx_io
    from lora_edge.quantize import methods, quantizer

    source = _wide_linears_graph(tmp_path / "wide.fp32.onnx")
    monkeypatch.setattr(onnx_io, "REFERENCE_MIN_BYTES", 256)
    monkeypatch.setattr(methods, "INT4_BAND_BYTES", 1)  # the smallest band: 64 columns
    bands = []
    quantize = methods._quantized_blocks
    monkeypatch.setattr(methods, "_quantized_blocks", lambda weight, *args: bands.append(weight.dims[1]) or
                        quantize(weight, *args))
    banded = quantizer.quantize_graph(source, tmp_path / "banded.int4.onnx", "int4", task="causal-lm")
    assert sorted(bands) == [130, 160]
    monkeypatch.setattr(methods, "_matmuls_only", lambda *args: False)
    ort = quantizer.quantize_graph(source, tmp_path / "ort.int4.onnx", "int4", task="causal-lm")
    assert banded.linears["quantized"] == 2 and banded.path.read_bytes() == ort.path.read_bytes()


def test_skip_norms_fused_with_the_declared_shapes_are_those_of_ort_s_shape_inference(bundles, monkeypatch):
    """The skip-norm fusion given the shapes ONNX infers from the graph fuses what it fuses after ORT's own
    symbolic shape inference: the same graph, byte for byte."""
    import onnx

    from lora_edge.quantize import decoder

    bundle, graph = bundles("llama", Form.HOTSWAP)
    source = onnx.load(bundle / find_graph(bundle, graph).file)
    answered = []
    knows = decoder.DeclaredShapes.knows
    monkeypatch.setattr(decoder.DeclaredShapes, "knows", lambda self, edges: answered.append(knows(self, edges))
                        or answered[-1])
    declared_report = decoder.DecoderFusionReport()
    declared = decoder.fuse_rms_norms(onnx.ModelProto.FromString(source.SerializeToString()), declared_report)
    assert answered == [True] and declared_report.skip_rms_norm
    monkeypatch.setattr(decoder.DeclaredShapes, "knows", lambda self, edges: False)  # ORT's inference decides
    inferred_report = decoder.DecoderFusionReport()
    inferred = decoder.fuse_rms_norms(source, inferred_report)
    assert declared_report == inferred_report
    assert declared.SerializeToString() == inferred.SerializeToString()


def _tied_graph(bundle, graph, directory):
    """The tiny llama's merged graph with its LM head reading the embedding (as SmolLM2's export does)."""
    import onnx

    model = onnx.load(bundle / find_graph(bundle, graph).file)
    inits = {init.name: init for init in model.graph.initializer}
    embedding = next(node.input[0] for node in model.graph.node if node.op_type == "Gather" and node.input[0] in inits)
    vocab = inits[embedding].dims[0]
    head = next(n for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in inits
                and list(inits[n.input[1]].dims)[-1] == vocab)  # [hidden, vocab]: the export stores W.T
    model.graph.node.insert(list(model.graph.node).index(head),
                            onnx.helper.make_node("Transpose", [embedding], ["tied_head_weight"], perm=[1, 0]))
    model.graph.initializer.remove(inits[head.input[1]])
    head.input[1] = "tied_head_weight"
    (directory / "onnx").mkdir()
    shutil.copy(bundle / ONNX_DIR / "config.json", directory / "onnx" / "config.json")
    onnx.save(model, directory / "onnx" / "tied.fp32.onnx")
    return directory / "onnx" / "tied.fp32.onnx"


def test_a_tied_lookup_shared_as_it_is_quantized_gives_the_graph_of_sharing_it_after(bundles, tmp_path, monkeypatch):
    """int4 makes the tied embedding read the head's blocks before saving: the bytes of MatMulNBitsQuantizer's
    passes, and of quantizing the lookup too and sharing the saved graph; when the head's blocks do not fit, the
    lookup gets its own and the graph runs."""
    import onnx

    from lora_edge.quantize import decoder, methods, quantizer

    source = _tied_graph(*bundles("llama", Form.MERGED), tmp_path)
    shared = quantizer.quantize_graph(source, tmp_path / "shared.int4.onnx", "int4", task="causal-lm")
    assert shared.details["tied_embedding"]
    only = methods._matmuls_only
    monkeypatch.setattr(methods, "_matmuls_only", lambda *args: False)  # MatMulNBitsQuantizer's passes
    assert quantizer.quantize_graph(source, tmp_path / "ort.int4.onnx", "int4", task="causal-lm"
                                    ).path.read_bytes() == shared.path.read_bytes()
    monkeypatch.setattr(methods, "_matmuls_only", only)
    monkeypatch.setattr(methods, "_share_tied", lambda model, tied, path: False)  # lookup quantized; shared after
    after = quantizer.quantize_graph(source, tmp_path / "after.int4.onnx", "int4", task="causal-lm")
    assert after.details["tied_embedding"]
    assert shared.path.read_bytes() == after.path.read_bytes()
    monkeypatch.setattr(decoder, "share_tied_embedding", lambda model, tied: False)
    own = quantizer.quantize_graph(source, tmp_path / "own.int4.onnx", "int4", task="causal-lm")
    assert "tied_embedding" not in own.details
    lookups = [node.op_type for node in onnx.load(own.path).graph.node
               if "input_ids" in node.input and node.op_type.startswith("Gather")]
    assert lookups == ["GatherBlockQuantized"]


def _linears_graph(path):
    """x [b, 40] -> MatMul(W1 [40, 24]) -> MatMul(Transpose(W2 [16, 24])): K not a multiple of the block."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(3)
    inits = [numpy_helper.from_array(rng.standard_normal((40, 24)).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.standard_normal((16, 24)).astype(np.float32), "w2")]
    inits[0].raw_data = inits[0].raw_data[:4 * 24] + bytes(4 * 24) + inits[0].raw_data[8 * 24:]  # an all-zero row
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="first"),
             helper.make_node("Transpose", ["w2"], ["w2t"], name="transpose", perm=[1, 0]),
             helper.make_node("MatMul", ["h", "w2t"], ["y"], name="second")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 40])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 16])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


@pytest.mark.parametrize("options", [{}, {"int4_symmetric": True, "int4_accuracy_level": 0, "block_size": 16}])
def test_int4_matmuls_quantized_from_the_file_are_ort_quantizers_graph(options, tmp_path, monkeypatch):
    """The direct MatMulNBits pass writes, byte for byte, what MatMulNBitsQuantizer's pass writes."""
    from lora_edge.core import onnx_io
    from lora_edge.core.recipe import QuantizeOptions
    from lora_edge.quantize import methods, quantizer

    source = _linears_graph(tmp_path / "linears.fp32.onnx")
    monkeypatch.setattr(onnx_io, "REFERENCE_MIN_BYTES", 256)
    options = QuantizeOptions(**options)
    passes = []
    matmuls = methods._int4_matmuls
    monkeypatch.setattr(methods, "_int4_matmuls", lambda *args: passes.append(args) or matmuls(*args))
    direct = quantizer.quantize_graph(source, tmp_path / "direct.int4.onnx", "int4", options, task="causal-lm")
    assert len(passes) == 1
    monkeypatch.setattr(methods, "_matmuls_only", lambda *args: False)
    ort = quantizer.quantize_graph(source, tmp_path / "ort.int4.onnx", "int4", options, task="causal-lm")
    assert direct.linears["quantized"] == 2 and direct.path.read_bytes() == ort.path.read_bytes()


@pytest.mark.parametrize("form", [Form.MERGED, Form.HOTSWAP])
def test_norm_fusions_on_indexed_lookups_give_the_graph_of_ort_s_own_model(form, bundles, monkeypatch):
    """ORT's norm fusions searching through the indexed OnnxModel (maps built once, the same sweep sort) write
    the graph they write through ORT's plain OnnxModel, byte for byte, and fuse every norm."""
    import onnx

    from onnxruntime.transformers.onnx_model import OnnxModel

    from lora_edge.export.cpu_fusion import name_all_nodes
    from lora_edge.quantize import decoder

    bundle, graph = bundles("llama", form)
    source = onnx.load(bundle / find_graph(bundle, graph).file)
    name_all_nodes(source)
    fused = {}
    for way in ("indexed", "plain"):
        if way == "plain":
            monkeypatch.setattr(decoder, "_indexed_onnx_model", OnnxModel)
        report = decoder.DecoderFusionReport()
        fused[way] = decoder.fuse_rms_norms(onnx.ModelProto.FromString(source.SerializeToString()), report)
        assert report.skip_rms_norm >= 2 and report.rms_norm == 1, way
    assert fused["indexed"].SerializeToString() == fused["plain"].SerializeToString()


def test_the_sweep_sort_orders_as_ort_s_and_refuses_a_cycle():
    """:func:`_sweep_sort` gives ORT's graph_topological_sort order on a shuffled graph and raises on a cycle."""
    import random

    from onnx import TensorProto, helper
    from onnxruntime.transformers.onnx_model import OnnxModel

    from lora_edge.quantize.decoder import _sweep_sort

    nodes = [helper.make_node("Relu", ["x"], ["t0"], name="n0")]
    for i in range(1, 40):
        inputs = [f"t{random.Random(i).randrange(i)}", f"t{i - 1}"]
        nodes.append(helper.make_node("Add", inputs, [f"t{i}"], name=f"n{i}"))
    random.Random(0).shuffle(nodes)
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("t39", TensorProto.FLOAT, [1])])
    ours, theirs = graph.__deepcopy__(), graph.__deepcopy__()
    _sweep_sort(ours)
    OnnxModel.graph_topological_sort(theirs)
    assert [n.name for n in ours.node] == [n.name for n in theirs.node] != [n.name for n in graph.node]
    graph.node[0].input.append(graph.node[0].output[0])  # a node reading its own output
    with pytest.raises(RuntimeError, match="not a DAG"):
        _sweep_sort(graph)
