"""Olive interop: Olive-layout .onnx_adapter files converted for our hot-swap graphs, and ours written in Olive's."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

from cli_runner import exit_code_of
from export_helpers import ADAPTER_NAME, TEST_BATCHES, feeds_for, session_inputs, tiny_bundle, torch_logits
from lora_edge.runtime.adapter_layout import (AdapterInput, canonical_name, detect_transposed, olive_name,
                                      read_adapter_file, read_onnx_adapter, to_graph_layout, write_onnx_adapter)
from lora_edge.core.adapters import AdapterRef, load_reference
from lora_edge.core.bundle import ONNX_DIR
from lora_edge.core.choices import Form
from lora_edge.core.manifest import find_graph
from lora_edge.core.errors import AdapterMismatchError, BundleError, ConfigError
from lora_edge.runtime.session import create_session, load_lora_adapter, run
from olive_reference import olive_convert_adapters

FP32 = 1e-4  # what export verifies fp32 graphs to


@pytest.fixture(scope="module")
def bert(tmp_path_factory, tiny_model, tiny_adapter):
    """(model dir, the bundle's hot-swap graph, its adapter's PEFT directory, its .onnx_adapter file)."""
    bundle = tiny_bundle(tmp_path_factory, tiny_model, tiny_adapter, "bert")
    graph = bundle / find_graph(bundle, "hotswap.fp32").file
    return tiny_model("bert"), graph, bundle / "adapter", bundle / ONNX_DIR / "adapters" / f"{ADAPTER_NAME}.onnx_adapter"


def _convert(*args) -> int:
    return exit_code_of("adapters", "convert", *map(str, args))


def _bert_outputs(model_dir: Path, graph: Path, adapter_dir: Path, adapter_file: Path):
    """[(ONNX Runtime logits with ``adapter_file`` active, PyTorch's base + adapter logits)] per test batch."""
    from lora_edge.core.models import load_tokenizer

    session = create_session(graph)
    reference = load_reference(model_dir, AdapterRef(ADAPTER_NAME, adapter_dir))
    tokenizer, adapter = load_tokenizer(model_dir), load_lora_adapter(adapter_file)
    pairs = []
    for texts in TEST_BATCHES:
        feeds = feeds_for(tokenizer, texts, session_inputs(session))
        pairs.append((run(session, feeds, adapter=adapter)[0], torch_logits(reference, feeds)))
    return pairs


def test_olive_adapter_converted_into_ours_matches_pytorch(bert, tmp_path, capsys):
    model_dir, graph, adapter_dir, ours = bert
    olive = olive_convert_adapters(adapter_dir, tmp_path / "olive.onnx_adapter")
    raw = read_onnx_adapter(olive)
    assert set(raw) == set(read_onnx_adapter(ours)), "an encoder keeps PEFT's names in Olive's file"
    with pytest.raises(Exception):  # the issue: our graph rejects Olive's transposed tensors as they are
        _bert_outputs(model_dir, graph, adapter_dir, olive)
    out = tmp_path / "converted.onnx_adapter"
    assert _convert(olive, "--graph", graph, "--out", out, "--json") == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["read_layout"], report["layout"], report["renamed"]) == ("olive", "lora-edge", 0)
    assert report["transposed"] == sum(tensor.ndim == 2 for tensor in raw.values()) > 0
    for got, want in _bert_outputs(model_dir, graph, adapter_dir, out):
        assert np.abs(got - want).max() <= FP32
    converted, expected = read_onnx_adapter(out), read_onnx_adapter(ours)
    for name, tensor in expected.items():  # Olive scales B the way export does (no rank/alpha patterns here)
        np.testing.assert_allclose(converted[name], tensor, rtol=1e-6, atol=0)


def test_ours_to_olive_is_what_olive_writes_and_round_trips_exactly(bert, tmp_path):
    model_dir, graph, adapter_dir, ours = bert
    as_olive, back = tmp_path / "as-olive.onnx_adapter", tmp_path / "back.onnx_adapter"
    assert _convert(ours, "--graph", graph.parent.parent, "--out", as_olive, "--layout", "olive") == 0
    written, olive = read_onnx_adapter(as_olive), read_onnx_adapter(olive_convert_adapters(adapter_dir, tmp_path / "o"))
    assert set(written) == set(olive)
    for name, tensor in olive.items():
        assert written[name].shape == tensor.shape and written[name].dtype == tensor.dtype
        assert np.array_equal(written[name], tensor), name  # B: s·B in fp32 either way, same rounding
    assert _convert(as_olive, "--graph", graph, "--out", back) == 0
    original, versions = read_adapter_file(ours)
    returned, returned_versions = read_adapter_file(back)
    assert set(returned) == set(original) and returned_versions == versions
    assert all(np.array_equal(returned[name], tensor) for name, tensor in original.items())


def test_decoder_olive_adapter_with_renamed_keys_matches_pytorch(tmp_path_factory, tiny_model, tiny_adapter, capsys):
    """Olive renames a decoder's base_model.model.model.* keys to model.*; converted back they drive the graph."""
    import torch

    from decoder_bundles import adapter_dirs, bundle_for, shared_root
    from lora_edge.runtime.generate import DecoderRunner

    bundle, name = bundle_for("llama", Form.HOTSWAP, shared_root(tmp_path_factory), tiny_model, tiny_adapter)
    graph, adapter_dir = bundle / find_graph(bundle, name).file, adapter_dirs("llama", tiny_adapter)["a"]
    tmp = tmp_path_factory.mktemp("olive-llama")
    olive = olive_convert_adapters(adapter_dir, tmp / "olive.onnx_adapter")
    assert all(key.startswith("model.layers.") for key in read_onnx_adapter(olive))
    out = tmp / "a.onnx_adapter"
    assert _convert(olive, "--graph", graph, "--out", out, "--json") == 0
    assert json.loads(capsys.readouterr().out)["renamed"] == len(read_onnx_adapter(olive))
    runner = DecoderRunner(create_session(graph))
    ids = np.array([[5, 17, 42, 9, 3, 77, 12]], dtype=np.int64)
    mask, positions = np.ones_like(ids), np.arange(ids.shape[1], dtype=np.int64)[None]
    logits, _ = runner.step(ids, mask, positions, runner.empty_past(1), adapter=load_lora_adapter(out))
    reference = load_reference(tiny_model("llama"), AdapterRef("a", adapter_dir))
    with torch.no_grad():
        want = reference(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits.numpy()
        base, _ = runner.step(ids, mask, positions, runner.empty_past(1))
    assert np.abs(logits - want).max() <= FP32 * max(1.0, np.abs(want).max())
    assert np.abs(base - want).max() > 1e-2, "the adapter changes the logits: a no-op conversion cannot pass"


def _corrupt(tensors: dict, kind: str) -> dict:
    """An Olive-layout adapter made wrong in one way."""
    tensors = dict(tensors)
    a_name = next(name for name in tensors if ".lora_A." in name)
    b_name = a_name.replace(".lora_A.", ".lora_B.")
    if kind == "wrong-rank":  # A of rank r, B of rank r - 1: each fits the graph's dynamic rank axis alone
        tensors[b_name] = tensors[b_name][:-1]
    elif kind == "other-base":  # another hidden size
        tensors[a_name] = np.zeros((tensors[a_name].shape[0] + 8, tensors[a_name].shape[1]), np.float32)
    elif kind == "foreign-module":  # a layer the graph was not exported with
        tensors[a_name.replace(".lora_A.", ".extra.lora_A.")] = tensors[a_name]
    elif kind == "missing-partner":
        del tensors[b_name]
    elif kind == "mixed":  # one tensor in our layout among transposed ones
        tensors[a_name] = np.ascontiguousarray(tensors[a_name].T)
    elif kind == "nan":
        tensors[a_name] = np.full_like(tensors[a_name], np.nan)
    return tensors


@pytest.mark.parametrize("kind", ["wrong-rank", "other-base", "foreign-module", "missing-partner", "mixed", "nan"])
def test_mismatched_adapters_are_refused_and_nothing_is_written(bert, tmp_path, kind, capsys):
    _, graph, adapter_dir, _ = bert
    olive = read_onnx_adapter(olive_convert_adapters(adapter_dir, tmp_path / "olive.onnx_adapter"))
    bad = write_onnx_adapter(tmp_path / "bad.onnx_adapter", _corrupt(olive, kind))
    out = tmp_path / "out" / "converted.onnx_adapter"
    assert _convert(bad, "--graph", graph, "--out", out) == AdapterMismatchError.exit_code
    message = capsys.readouterr().err
    assert message.startswith("error: ") and f"in {bad}" in message and message.count("\n") == 1, message
    assert not out.parent.exists(), "a refused conversion writes nothing, not even the output's directory"


def test_other_bad_inputs_get_their_own_exit_codes(bert, tmp_path_factory, tiny_adapter, tmp_path, capsys):
    _, graph, adapter_dir, ours = bert
    out = tmp_path / "converted.onnx_adapter"
    llama = olive_convert_adapters(tiny_adapter("llama"), tmp_path / "llama.onnx_adapter")
    int4 = olive_convert_adapters(tiny_adapter("llama"), tmp_path / "int4.onnx_adapter", quantize_int4=True,
                                  block_size=16)
    corrupt = tmp_path / "corrupt.onnx_adapter"
    corrupt.write_bytes(b"not an adapter")
    assert _convert(llama, "--graph", graph, "--out", out) == AdapterMismatchError.exit_code  # another base
    assert "has no input in the graph" in capsys.readouterr().err
    assert _convert(int4, "--graph", graph, "--out", out) == AdapterMismatchError.exit_code
    assert "--quantize_int4" in capsys.readouterr().err
    assert _convert(corrupt, "--graph", graph, "--out", out) == AdapterMismatchError.exit_code
    merged = graph.with_name("merged.fp32.onnx")
    assert _convert(ours, "--graph", merged, "--out", out) == ConfigError.exit_code  # not a hot-swap graph
    assert _convert(ours, "--graph", tmp_path / "missing.onnx", "--out", out) == BundleError.exit_code
    assert _convert(ours, "--graph", graph, "--out", out, "--layout", "onnx") == 2  # click's usage error
    assert not out.exists()
    out.write_bytes(b"keep me")
    assert _convert(ours, "--graph", graph, "--out", out) == BundleError.exit_code  # exists, no --force
    assert out.read_bytes() == b"keep me"
    assert _convert(ours, "--graph", graph, "--out", out, "--force") == 0
    assert set(read_onnx_adapter(out)) == set(read_onnx_adapter(ours))


def test_layout_is_told_by_the_tensors_that_fit_one_way_only(tmp_path):
    inputs = {"base_model.model.x.lora_A.weight": AdapterInput("base_model.model.x.lora_A.weight", (None, 4),
                                                               "float32"),
              "base_model.model.x.lora_B.weight": AdapterInput("base_model.model.x.lora_B.weight", (4, None),
                                                               "float32")}
    names = {name: name for name in inputs}
    a, b = np.arange(8, dtype=np.float32).reshape(2, 4), np.arange(8, dtype=np.float32).reshape(4, 2)
    ours = {"base_model.model.x.lora_A.weight": a, "base_model.model.x.lora_B.weight": b}
    olive = {"base_model.model.x.lora_A.weight": a.T, "base_model.model.x.lora_B.weight": b.T}
    assert detect_transposed(ours, names, inputs, tmp_path) is False
    assert detect_transposed(olive, names, inputs, tmp_path) is True
    square = {"base_model.model.x.lora_A.weight": np.ones((4, 4), np.float32) * np.arange(4, dtype=np.float32),
              "base_model.model.x.lora_B.weight": np.eye(4, dtype=np.float32)}
    with pytest.raises(AdapterMismatchError, match="--from"):  # rank = hidden: both readings fit
        detect_transposed(square, names, inputs, tmp_path)
    as_olive, transposed = to_graph_layout(square, inputs, tmp_path, source="olive")
    assert transposed
    assert np.array_equal(as_olive["base_model.model.x.lora_A.weight"], square["base_model.model.x.lora_A.weight"].T)
    half, _ = to_graph_layout({k: v.astype(np.float16) for k, v in olive.items()}, inputs, tmp_path)
    assert all(v.dtype == np.float32 for v in half.values()), "olive convert-adapters --dtype float16: cast to the input's"


def test_one_module_one_name_whoever_wrote_it():
    peft, olive = "base_model.model.model.layers.0.q_proj.lora_A.weight", "model.layers.0.q_proj.lora_A.weight"
    assert olive_name(peft) == olive
    assert canonical_name(peft) == canonical_name(olive) == canonical_name("model.layers.0.q_proj.lora_A.default.weight")
    encoder = "base_model.model.bert.encoder.layer.0.attention.self.query.lora_B.weight"
    assert olive_name(encoder) == encoder and canonical_name(encoder) == encoder.removeprefix("base_model.model.")
    assert canonical_name("base_model.model.classifier.weight") == "classifier.weight"


def _olive_built(graph: Path, out: Path) -> Path:
    """Our hot-swap graph with its adapter inputs named as Olive's ExtractAdapters names them (olive-ai 0.13.0,
    torch 2.13 dynamo export: ``model.layers.0.self_attn.q_proj.lora_A.default.weight``, PEFT's layout)."""
    import onnx

    model = onnx.load(str(graph))
    renames = {init.name: canonical_name(init.name).replace(".lora_A.", ".lora_A.default.")
               .replace(".lora_B.", ".lora_B.default.") for init in model.graph.initializer if ".lora_" in init.name}
    for value in list(model.graph.initializer) + list(model.graph.input):
        value.name = renames.get(value.name, value.name)
    for node in model.graph.node:
        node.input[:] = [renames.get(name, name) for name in node.input]
    onnx.save(model, str(out))
    return out


def test_ours_and_olive_files_convert_for_an_olive_built_graph(tmp_path_factory, tiny_model, tiny_adapter, capsys):
    """Either file, mapped onto an Olive-named graph's inputs, gives that graph PyTorch's logits."""
    import torch

    from decoder_bundles import adapter_dirs, bundle_for, shared_root
    from lora_edge.runtime.generate import DecoderRunner

    bundle, name = bundle_for("llama", Form.HOTSWAP, shared_root(tmp_path_factory), tiny_model, tiny_adapter)
    tmp = tmp_path_factory.mktemp("olive-built")
    graph = _olive_built(bundle / find_graph(bundle, name).file, tmp / "model.onnx")
    adapter_dir = adapter_dirs("llama", tiny_adapter)["a"]
    sources = {"ours": bundle / ONNX_DIR / "adapters" / "a.onnx_adapter",
               "olive": olive_convert_adapters(adapter_dir, tmp / "olive.onnx_adapter")}
    runner = DecoderRunner(create_session(graph))
    ids = np.array([[5, 17, 42, 9, 3, 77, 12]], dtype=np.int64)
    mask, positions = np.ones_like(ids), np.arange(ids.shape[1], dtype=np.int64)[None]
    reference = load_reference(tiny_model("llama"), AdapterRef("a", adapter_dir))
    with torch.no_grad():
        want = reference(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits.numpy()
    for kind, source in sources.items():
        out = tmp / f"{kind}-for-olive-graph.onnx_adapter"
        assert _convert(source, "--graph", graph, "--out", out, "--json") == 0
        report = json.loads(capsys.readouterr().out)
        assert report["read_layout"] == ("graph" if kind == "ours" else "transposed")
        assert all(".default." in key for key in read_onnx_adapter(out))
        logits, _ = runner.step(ids, mask, positions, runner.empty_past(1), adapter=load_lora_adapter(out))
        assert np.abs(logits - want).max() <= FP32 * max(1.0, np.abs(want).max()), kind
    assert _convert(sources["ours"], "--graph", graph, "--out", tmp / "x", "--layout", "olive") == \
        ConfigError.exit_code  # Olive's converter layout is checked against one of our graphs


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("LORA_EDGE_OLIVE_PYTHON"),
                    reason="set LORA_EDGE_OLIVE_PYTHON to a Python with olive-ai to check the reference against it")
def test_real_olive_writes_what_the_reference_writes(bert, tmp_path):
    """``olive convert-adapters`` itself (olive-ai 0.13.0) writes what tests/olive_reference.py writes."""
    model_dir, graph, adapter_dir, _ = bert
    out = tmp_path / "real.onnx_adapter"
    subprocess.run([os.environ["LORA_EDGE_OLIVE_PYTHON"], "-m", "olive", "convert-adapters", "-a", str(adapter_dir),
                    "-o", str(out), "--disable_telemetry"], check=True, capture_output=True, timeout=600)
    real, copy = read_onnx_adapter(out), read_onnx_adapter(olive_convert_adapters(adapter_dir, tmp_path / "copy"))
    assert set(real) == set(copy)
    assert all(real[name].dtype == copy[name].dtype and np.array_equal(real[name], copy[name]) for name in real)
    converted = tmp_path / "converted.onnx_adapter"
    assert _convert(out, "--graph", graph, "--out", converted) == 0
    for got, want in _bert_outputs(model_dir, graph, adapter_dir, converted):
        assert np.abs(got - want).max() <= FP32
