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
