"""Quantization: LoRA-aware structure, numerics against PyTorch, bad input, accuracy on the intent task."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from export_helpers import ADAPTER_NAME, TEST_BATCHES, feeds_for, tiny_bundle, torch_logits
from lora_edge.core.errors import ConfigError

CPU_PRECISIONS = ("int8-dynamic", "int8-static", "int4")


def _onnx(path: Path):
    import onnx

    return onnx.load(str(path))


def _session(path: Path):
    from lora_edge.runtime.session import SessionSettings, create_session

    return create_session(path, SessionSettings(intra_op_threads=2))


def _graph_logits(path: Path, feeds: dict, adapter_file: Path | None = None) -> np.ndarray:
    from lora_edge.runtime.session import load_lora_adapter, run

    adapter = load_lora_adapter(adapter_file) if adapter_file else None
    return run(_session(path), feeds, adapter)[0]


@pytest.fixture(scope="module")
def quantized_tiny(tmp_path_factory, tiny_model, tiny_adapter):
    """A copy of the tiny BERT bundle (3 forms) quantized to int8-dynamic, int8-static and int4."""
    from lora_edge.core.data import default_intent_files
    from lora_edge.quantize.quantizer import quantize_bundle

    bundle = tmp_path_factory.mktemp("quantized") / "bundle"
    shutil.copytree(tiny_bundle(tmp_path_factory, tiny_model, tiny_adapter, "bert"), bundle)
    calibration = default_intent_files().validation
    quantize_bundle(bundle, list(CPU_PRECISIONS), calibration=calibration, calib_size=16, progress=lambda m: None)
    return bundle


@pytest.mark.parametrize("precision", CPU_PRECISIONS)
@pytest.mark.parametrize("form", ["merged", "branched", "hotswap"])
def test_lora_matmuls_stay_float_and_every_base_linear_is_quantized(quantized_tiny, form, precision):
    from lora_edge.core.manifest import find_graph
    from lora_edge.quantize.lora import inventory, linear_roles

    record = find_graph(quantized_tiny, f"{form}.{precision}")
    assert record.source == f"{form}.fp32" and record.form.value == form
    roles = linear_roles(_onnx(quantized_tiny / find_graph(quantized_tiny, f"{form}.fp32").file))
    quantized = _onnx(quantized_tiny / record.file)
    found = inventory(quantized)
    assert found.quantized_lora() == [], "a LoRA MatMul was quantized"
    assert found.float_base == [], f"base linears left in float: {found.float_base}"
    assert len(found.quantized) == len(roles.base) > 0
    # 2 layers x query/value x (A, B); the exported branched fp32 graph already shares one A MatMul per layer
    # (share_lora_inputs, among export's CPU fusions).
    assert len(roles.lora) == {"merged": 0, "branched": 6, "hotswap": 8}[form]
    assert {"merged": 0, "branched": 6, "hotswap": 8}[form] <= len(found.float_lora) <= len(roles.lora)
    lora_weights = [i for i in quantized.graph.initializer if "lora_A" in i.name or "lora_B" in i.name]
    assert all(i.data_type == 1 for i in lora_weights), "LoRA factors must stay fp32"
    # The hot-swap head (modules_to_save) is fed at run time: it must stay a float graph input.
    assert len(found.swappable) == len(roles.swappable) == (1 if form == "hotswap" else 0)


# int8 error on a tiny random model, relative to the logit scale (measured: ~1-3e-2 for int8, ~5e-2 for int4).
RELATIVE_TOLERANCE = {"int8-dynamic": 0.08, "int8-static": 0.15, "int4": 0.25}


@pytest.mark.parametrize("precision", CPU_PRECISIONS)
@pytest.mark.parametrize("form", ["merged", "branched"])
def test_quantized_graphs_follow_pytorch(quantized_tiny, form, precision):
    from lora_edge.core.adapters import AdapterRef, load_reference
    from lora_edge.core.manifest import Manifest, find_graph
    from lora_edge.core.models import load_tokenizer

    manifest = Manifest.read(quantized_tiny)
    reference = load_reference(Path(manifest.model.path), AdapterRef(ADAPTER_NAME, quantized_tiny / "adapter"))
    tokenizer = load_tokenizer(quantized_tiny / "onnx")
    record = find_graph(quantized_tiny, f"{form}.{precision}")
    for texts in TEST_BATCHES:
        feeds = feeds_for(tokenizer, list(texts), ["input_ids", "attention_mask", "token_type_ids"])
        expected = torch_logits(reference, feeds)
        actual = _graph_logits(quantized_tiny / record.file, feeds)
        scale = np.abs(expected).max()
        assert np.abs(actual - expected).max() <= RELATIVE_TOLERANCE[precision] * scale


@pytest.mark.parametrize("precision", CPU_PRECISIONS)
def test_hotswap_adapter_file_runs_on_the_quantized_graph(quantized_tiny, precision):
    from lora_edge.core.adapters import AdapterRef, load_reference
    from lora_edge.core.manifest import Manifest, find_graph
    from lora_edge.core.choices import Task
    from lora_edge.core.models import load_base_model, load_tokenizer

    manifest = Manifest.read(quantized_tiny)
    model_path = Path(manifest.model.path)
    reference = load_reference(model_path, AdapterRef(ADAPTER_NAME, quantized_tiny / "adapter"))
    base = load_base_model(model_path, Task.SEQ_CLS, labels=manifest.adapters[0].labels)
    record = find_graph(quantized_tiny, f"hotswap.{precision}")
    adapter_file = quantized_tiny / record.extra["adapter_files"][ADAPTER_NAME]
    tokenizer = load_tokenizer(quantized_tiny / "onnx")
    feeds = feeds_for(tokenizer, list(TEST_BATCHES[2]), ["input_ids", "attention_mask", "token_type_ids"])
    with_adapter = _graph_logits(quantized_tiny / record.file, feeds, adapter_file)
    without = _graph_logits(quantized_tiny / record.file, feeds)
    expected, expected_base = torch_logits(reference, feeds), torch_logits(base, feeds)
    tolerance = RELATIVE_TOLERANCE[precision] * np.abs(expected).max()
    assert np.abs(with_adapter - expected).max() <= tolerance
    assert np.abs(without - expected_base).max() <= tolerance
    # The adapter must matter more than the quantization error, or the check above proves nothing.
    assert np.abs(expected - expected_base).max() > 2 * tolerance


def test_fp16_graph_stays_close_on_cpu(tmp_path_factory, tiny_model, tiny_adapter, tmp_path):
    from lora_edge.core.manifest import find_graph
    from lora_edge.core.models import load_tokenizer
    from lora_edge.quantize.quantizer import quantize_graph
    from lora_edge.quantize.lora import inventory

    bundle = tiny_bundle(tmp_path_factory, tiny_model, tiny_adapter, "bert")
    source = bundle / find_graph(bundle, "hotswap.fp32").file
    target = tmp_path / "hotswap.fp16.onnx"
    quantize_graph(source, target, "fp16")
    model = _onnx(target)
    assert {i.name: i.type.tensor_type.elem_type for i in model.graph.input}["attention_mask"] == 7
    assert all(o.type.tensor_type.elem_type == 1 for o in model.graph.output), "outputs must stay fp32"
    assert len(inventory(model).float_lora) == 8  # hot-swap LoRA factors are inputs: never shared
    tokenizer = load_tokenizer(bundle / "onnx")
    adapter_file = bundle / "onnx" / "adapters" / f"{ADAPTER_NAME}.onnx_adapter"
    feeds = feeds_for(tokenizer, list(TEST_BATCHES[1]), ["input_ids", "attention_mask", "token_type_ids"])
    expected = _graph_logits(source, feeds, adapter_file)
    actual = _graph_logits(target, feeds, adapter_file)
    assert np.abs(actual - expected).max() <= 1e-2


_UNFUSED = {}


def _unfused_bundle(tmp_path_factory, tiny_model, tiny_adapter):
    """The tiny BERT branched graph as exported (export --no-fuse), for the fusion tests."""
    from lora_edge.core.adapters import AdapterRef
    from lora_edge.export.bundle import export_bundle

    if "bert" not in _UNFUSED:
        _UNFUSED["bert"] = export_bundle(tiny_model("bert"), [AdapterRef(ADAPTER_NAME, tiny_adapter("bert"))],
                                         ["branched"], tmp_path_factory.mktemp("unfused") / "bundle", fuse=False,
                                         progress=lambda message: None)
    return _UNFUSED["bert"]


@pytest.mark.parametrize("mask_switch", [False, True])
def test_attention_fusion_is_exact_and_replaces_every_block(tmp_path_factory, tiny_model, tiny_adapter, mask_switch):
    from lora_edge.core.manifest import find_graph
    from lora_edge.runtime.feeds import sample_encoder_feeds
    from lora_edge.export.cpu_fusion import fuse_attention, keep_layernorm_unfused
    from lora_edge.export.prepare import FusionPlan
    from lora_edge.runtime.session import graph_outputs, relative_difference

    bundle = _unfused_bundle(tmp_path_factory, tiny_model, tiny_adapter)
    source = bundle / find_graph(bundle, "branched.fp32").file
    model = _onnx(source)
    plan = FusionPlan.from_config(json.loads((bundle / "onnx" / "config.json").read_text()))
    assert fuse_attention(model, plan.num_heads, mask_switch=mask_switch) == 2  # one per layer
    assert keep_layernorm_unfused(model) == 5  # embeddings + 2 per layer
    ops = [node.op_type for node in model.graph.node]
    assert ops.count("If" if mask_switch else "MultiHeadAttention") == 2
    assert "Softmax" not in ops and "Where" not in ops and "SkipLayerNormalization" not in ops
    fused = model.SerializeToString()
    for padded in (True, False):  # the switch takes the unmasked kernel only for an unpadded batch
        feeds = sample_encoder_feeds(model, batch=3, length=24, padded=padded)
        assert relative_difference(graph_outputs(source, feeds), graph_outputs(fused, feeds)) < 1e-5


def _cli(*args: str) -> tuple[int, str]:
    """Run `lora-edge` in-process; return (exit code, stderr+stdout text)."""
    import contextlib
    import io

    from lora_edge.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main(list(args))
            code = 0
        except SystemExit as exc:
            code = int(exc.code or 0)
    return code, err.getvalue() + out.getvalue()


@pytest.fixture
def bundle_copy(tmp_path_factory, tiny_model, tiny_adapter, tmp_path):
    """A fresh copy of the tiny BERT fp32 bundle a test may modify."""
    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle(tmp_path_factory, tiny_model, tiny_adapter, "bert"), bundle)
    return bundle


@pytest.mark.parametrize("weight_type", ["QInt8", "QUInt8"])
def test_vectorized_per_channel_weights_are_ort_s_own_byte_for_byte(bundle_copy, tmp_path, monkeypatch, weight_type):
    """quantize_dynamic per channel writes the same graph with the whole-tensor weight quantization as without it."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from lora_edge.quantize import methods as quantize_methods
    from lora_edge.quantize.methods import vectorized_per_channel

    source = bundle_copy / "onnx" / "branched.fp32.onnx"
    taken = []
    original = quantize_methods._per_channel_all_at_once
    monkeypatch.setattr(quantize_methods, "_per_channel_all_at_once",
                        lambda *args: taken.append(original(*args)) or taken[-1])
    quantize_dynamic(source, tmp_path / "ort.onnx", per_channel=True, weight_type=getattr(QuantType, weight_type))
    with vectorized_per_channel():
        quantize_dynamic(source, tmp_path / "fast.onnx", per_channel=True, weight_type=getattr(QuantType, weight_type))
    assert taken and all(taken)  # every weight went through the whole-tensor path
    assert (tmp_path / "fast.onnx").read_bytes() == (tmp_path / "ort.onnx").read_bytes()


@pytest.mark.parametrize("weight_type", ["QInt8", "QUInt8"])
@pytest.mark.parametrize("per_channel", [True, False])
def test_per_tensor_weights_in_place_are_ort_s_own_byte_for_byte(bundle_copy, tmp_path, monkeypatch, weight_type,
                                                                  per_channel):
    """quantize_dynamic writes the same graph with the in-place per-tensor quantization (Gather tables) as without."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from lora_edge.quantize import methods as quantize_methods
    from lora_edge.quantize.methods import per_tensor_in_place

    source = bundle_copy / "onnx" / "merged.fp32.onnx"
    taken = []
    original = quantize_methods._quantize_nparray_in_place
    monkeypatch.setattr(quantize_methods, "_quantize_nparray_in_place",
                        lambda *args: taken.append(original(*args)) or taken[-1])
    options = dict(per_channel=per_channel, weight_type=getattr(QuantType, weight_type))
    quantize_dynamic(source, tmp_path / "ort.onnx", **options)
    with per_tensor_in_place():
        quantize_dynamic(source, tmp_path / "in_place.onnx", **options)
    assert taken and all(value is not None for value in taken)  # every per-tensor weight went the in-place way
    assert len(taken) >= 3 if not per_channel else len(taken) >= 1  # the embedding tables at least
    assert (tmp_path / "in_place.onnx").read_bytes() == (tmp_path / "ort.onnx").read_bytes()


@pytest.mark.parametrize("q_type", ["INT8", "UINT8", "INT16"])
@pytest.mark.parametrize("size", [1, 6, 7, 50])
def test_per_tensor_chunks_give_ort_s_bytes(q_type, size, monkeypatch):
    """The in-place quantization a chunk at a time (chunks of 7 here) = ORT's quantize_nparray, clipping included."""
    import numpy as np
    from onnx import TensorProto
    from onnxruntime.quantization import quant_utils

    from lora_edge.quantize import methods as quantize_methods

    monkeypatch.setattr(quantize_methods, "QUANTIZE_CHUNK", 7)
    rng = np.random.default_rng(size)
    values = (rng.standard_normal((size, 3)) * 4).astype(np.float32)
    values.flat[0] = 1e4  # beyond the range: clipped
    qtype = getattr(TensorProto, q_type)
    zero_point = np.array(3 if q_type == "UINT8" else 0, dtype=quant_utils.ONNX_TYPE_TO_NP_TYPE[qtype])
    scale = np.array(0.05, dtype=np.float32)
    for low, high in [(None, None), (-50, 60)]:
        ours = quantize_methods._quantize_nparray_in_place(qtype, values, scale, zero_point, low, high)
        stock = quant_utils.quantize_nparray(qtype, values, scale, zero_point, low, high)
        assert ours.dtype == stock.dtype and ours.shape == stock.shape
        assert ours.tobytes() == stock.tobytes()
    assert values.flat[0] == 1e4  # the caller's array is left alone


@pytest.mark.parametrize("form", ["merged", "hotswap"])
def test_int8_written_conformed_is_the_rewritten_file_byte_for_byte(bundle_copy, tmp_path, form):
    """quantize_dynamic saving its graph conformed = its file loaded, conformed and saved again (as the check did)."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from lora_edge.core.onnx_spec import conform
    from lora_edge.quantize.methods import conformed_on_save

    source = bundle_copy / "onnx" / f"{form}.fp32.onnx"
    quantize_dynamic(source, tmp_path / "ort.onnx", weight_type=QuantType.QInt8)
    rewritten = onnx.load(str(tmp_path / "ort.onnx"))
    assert any(conform(rewritten).values())  # ORT's node order is not the spec's: the check rewrote the file
    onnx.save(rewritten, str(tmp_path / "rewritten.onnx"))
    with conformed_on_save():
        quantize_dynamic(source, tmp_path / "once.onnx", weight_type=QuantType.QInt8)
    assert not any(conform(onnx.load(str(tmp_path / "once.onnx"))).values())
    assert (tmp_path / "once.onnx").read_bytes() == (tmp_path / "rewritten.onnx").read_bytes()


@pytest.mark.parametrize("form", ["merged", "branched", "hotswap"])
def test_int8_dynamic_in_memory_writes_the_graph_ort_s_files_give_byte_for_byte(bundle_copy, tmp_path, form):
    """quantize_dynamic on the model in memory (shapes inferred on its twin) = quantize_dynamic on the file."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from lora_edge.quantize.lora import linear_roles
    from lora_edge.quantize.methods import (_common_extra_options, gemm_to_matmul, shape_inference_in_memory,
                                            vectorized_per_channel)

    model = onnx.load(str(bundle_copy / "onnx" / f"{form}.fp32.onnx"))
    out = tmp_path / "out"
    out.mkdir()
    roles = linear_roles(model)
    assert gemm_to_matmul(model, set(roles.swappable)) == (1 if form == "hotswap" else 0)
    onnx.save(model, str(out / "source.onnx"))
    excluded = roles.keep_float + [f"{name}_MatMul" for name in roles.keep_float]
    options = dict(per_channel=True, weight_type=QuantType.QInt8, nodes_to_exclude=excluded)
    with vectorized_per_channel():
        quantize_dynamic(out / "source.onnx", out / "files.onnx", extra_options=_common_extra_options(),
                         **options)
        with shape_inference_in_memory():
            quantize_dynamic(model, out / "memory.onnx", extra_options=_common_extra_options(), **options)
    assert sorted(p.name for p in out.iterdir()) == ["files.onnx", "memory.onnx", "source.onnx"]
    assert (out / "memory.onnx").read_bytes() == (out / "files.onnx").read_bytes()
    # the patch is gone after the block: ORT's own functions again
    from onnxruntime.quantization import onnx_quantizer, quant_utils

    assert onnx_quantizer.save_and_reload_model_with_shape_infer is quant_utils.save_and_reload_model_with_shape_infer


def test_save_streamed_reads_back_as_the_same_model(bundle_copy, tmp_path):
    import onnx

    from lora_edge.core.onnx_io import save_streamed, weightless_twin

    model = onnx.load(str(bundle_copy / "onnx" / "hotswap.fp32.onnx"))
    save_streamed(model, tmp_path / "streamed.onnx")
    assert onnx.load(str(tmp_path / "streamed.onnx")).SerializeToString() == model.SerializeToString()
    twin = weightless_twin(model, min_elements=64)
    assert [node.SerializeToString() for node in twin.graph.node] == \
        [node.SerializeToString() for node in model.graph.node]
    stripped = [t for t in twin.graph.initializer if not t.raw_data and not t.float_data]
    assert stripped and all(list(t.dims) == list(i.dims) for t in stripped for i in model.graph.initializer
                            if i.name == t.name)


def test_a_graph_fused_at_export_is_quantized_as_if_fused_again(bundle_copy, tmp_path):
    """Skipping the second fusion of an export-fused graph changes no byte of the quantized graph."""
    from lora_edge.core.manifest import find_graph
    from lora_edge.quantize.quantizer import fusion_plan_for, quantize_graph

    record = find_graph(bundle_copy, "branched.fp32")
    assert record.extra.get("fusion") and not record.extra["fusion"].get("dropped")
    source, plan = bundle_copy / record.file, fusion_plan_for(bundle_copy)
    again = quantize_graph(source, tmp_path / "again.onnx", "int8-dynamic", plan=plan)
    reused = quantize_graph(source, tmp_path / "reused.onnx", "int8-dynamic", plan=plan,
                            source_fusion=record.extra["fusion"])
    assert reused.fusion.get("from_export") and not again.fusion.get("from_export")
    assert (tmp_path / "reused.onnx").read_bytes() == (tmp_path / "again.onnx").read_bytes()


def _snapshot(bundle: Path) -> dict[str, bytes]:
    return {str(p.relative_to(bundle)): p.read_bytes() for p in sorted(bundle.rglob("*")) if p.is_file()}


def test_unknown_precision_lists_the_valid_ones(bundle_copy):
    code, text = _cli("quantize", str(bundle_copy), "--precisions", "int8-dynamic,int3")
    assert code == ConfigError.exit_code
    assert "int3" in text and "int8-static" in text and "int4" in text and "Traceback" not in text


def test_int8_static_without_calibration_data_says_how_to_give_it(bundle_copy):
    from lora_edge.core.manifest import Manifest, update_manifest

    adapters = Manifest.read(bundle_copy).adapters
    update_manifest(bundle_copy, adapters=[dataclasses.replace(adapters[0], data=None), *adapters[1:]])
    before = _snapshot(bundle_copy)
    code, text = _cli("quantize", str(bundle_copy), "--precisions", "int8-static")
    assert code == ConfigError.exit_code and "--calibration" in text and "Traceback" not in text
    assert _snapshot(bundle_copy) == before


def test_int8_static_uses_the_data_recorded_with_the_adapter(bundle_copy):
    from lora_edge.core.data import default_intent_files
    from lora_edge.core.manifest import Manifest, find_graph, update_manifest

    adapters = Manifest.read(bundle_copy).adapters
    update_manifest(bundle_copy, adapters=[dataclasses.replace(adapters[0], data=default_intent_files().to_json()),
                                           *adapters[1:]])
    code, text = _cli("quantize", str(bundle_copy), "--precisions", "int8-static", "--calib-size", "8", "--json")
    assert code == 0, text
    record = find_graph(bundle_copy, "merged.int8-static")
    assert record.extra["quantization"]["calib_batches"] == 1 and record.source == "merged.fp32"
    assert (bundle_copy / record.file).is_file()


def test_a_graph_that_cannot_be_quantized_names_the_node_and_leaves_the_bundle_alone(bundle_copy):
    import onnx
    from onnx import numpy_helper

    from lora_edge.core.manifest import find_graph
    from lora_edge.quantize.lora import linear_roles

    # Break the branched graph: one base weight gets a wrong inner size, so the graph cannot run.
    path = bundle_copy / find_graph(bundle_copy, "branched.fp32").file
    model = onnx.load(str(path))
    broken = next(n for n in model.graph.node if n.name in linear_roles(model).base and n.op_type == "MatMul")
    init = next(i for i in model.graph.initializer if i.name == broken.input[1])
    weight = numpy_helper.to_array(init)
    init.CopyFrom(numpy_helper.from_array(np.concatenate([weight, weight[:1]]), init.name))
    onnx.save(model, str(path))
    before = _snapshot(bundle_copy)
    code, text = _cli("quantize", str(bundle_copy), "--precisions", "int8-dynamic")
    assert code == 6, text  # QuantizationError
    assert broken.name in text and "Traceback" not in text, text
    assert _snapshot(bundle_copy) == before, "merged.int8-dynamic succeeded but must not be kept alone"


# --- the default model on the shipped intent task (slow: uses the trained intent adapter) ---------------------


@pytest.fixture(scope="module")
def intent_graphs(intent_adapter, tmp_path_factory):
    """fp32 merged/branched/hotswap graphs of MiniLM + the intent adapter, and the quantized ones the tests need."""
    from lora_edge.core.adapters import AdapterRef
    from lora_edge.export.bundle import export_bundle
    from lora_edge.core.recipe import QuantizeOptions
    from lora_edge.quantize.quantizer import quantize_bundle

    bundle = export_bundle("default", [AdapterRef("intent", Path(intent_adapter))], ["merged", "branched", "hotswap"],
                           tmp_path_factory.mktemp("intent") / "bundle", progress=lambda m: None)
    options = QuantizeOptions()
    quantize_bundle(bundle, ["int8-dynamic"], options, progress=lambda m: None)
    # The remaining precisions only for the merged graph (time): quantize_graph, one graph at a time.
    return bundle


@pytest.fixture(scope="module")
def intent_eval(intent_graphs, intent_adapter):
    """Test-split feeds (batched), labels, and the PyTorch reference logits."""
    from lora_edge.core.adapters import AdapterRef, load_reference
    from lora_edge.core.data import DataFiles, LabelMap
    from lora_edge.core.choices import Task
    from lora_edge.core.cache import default_model_path
    from lora_edge.core.models import load_tokenizer

    adapter = Path(intent_adapter)
    data = DataFiles.from_json(json.loads((adapter / "data.json").read_text()))
    examples = data.load(Task.SEQ_CLS)["test"]
    labels = LabelMap.load(adapter)
    tokenizer = load_tokenizer(intent_graphs / "onnx")
    texts = [example.text for example in examples]
    batches = [feeds_for(tokenizer, texts[i:i + 64], ["input_ids", "attention_mask", "token_type_ids"])
               for i in range(0, len(texts), 64)]
    reference = load_reference(default_model_path(), AdapterRef("intent", adapter))
    expected = np.concatenate([torch_logits(reference, feeds) for feeds in batches])
    gold = np.array([labels.id_of(example.label) for example in examples])
    return batches, gold, expected


def _logits_of(graph: Path, batches: list[dict], adapter_file: Path | None = None) -> np.ndarray:
    from lora_edge.runtime.session import load_lora_adapter, run

    session = _session(graph)
    adapter = load_lora_adapter(adapter_file) if adapter_file else None
    return np.concatenate([run(session, feeds, adapter)[0] for feeds in batches])


def _quantized(bundle: Path, form: str, precision: str) -> Path:
    """The bundle's graph, quantizing the fp32 one on first use (quantize_graph: one graph only)."""
    from lora_edge.core.manifest import find_graph
    from lora_edge.core.recipe import QuantizeOptions
    from lora_edge.quantize.quantizer import calibration_for, fusion_plan_for, quantize_graph

    target = bundle / "onnx" / f"{form}.{precision}.onnx"
    if not target.is_file():
        source, options = find_graph(bundle, f"{form}.fp32"), QuantizeOptions()
        calibration = calibration_for(bundle, source, options) if precision == "int8-static" else None
        quantize_graph(bundle / source.file, target, precision, options, plan=fusion_plan_for(bundle),
                       calibration=calibration)
    return target


@pytest.mark.slow
@pytest.mark.parametrize("precision, max_drop", [("int8-dynamic", 0.01), ("int8-static", 0.01), ("int4", 0.02)])
def test_intent_accuracy_after_quantization(intent_graphs, intent_eval, precision, max_drop):
    batches, gold, _ = intent_eval
    fp32 = _logits_of(intent_graphs / "onnx" / "merged.fp32.onnx", batches).argmax(1)
    quantized = _logits_of(_quantized(intent_graphs, "merged", precision), batches).argmax(1)
    agreement = float((fp32 == quantized).mean())
    drop = float((fp32 == gold).mean() - (quantized == gold).mean())
    print(f"{precision}: top-1 agreement with fp32 {agreement:.4f}, accuracy drop {drop * 100:+.2f} points")
    if precision.startswith("int8"):
        assert agreement >= 0.99
    assert drop <= max_drop


@pytest.mark.slow
def test_intent_fp16_logits_stay_within_1e_2(intent_graphs, intent_eval):
    batches, _, _ = intent_eval
    fp32 = _logits_of(intent_graphs / "onnx" / "merged.fp32.onnx", batches)
    fp16 = _logits_of(_quantized(intent_graphs, "merged", "fp16"), batches)
    assert np.abs(fp16 - fp32).max() <= 1e-2


@pytest.fixture(scope="module")
def delta_bundle(tmp_path_factory, tiny_model, tiny_adapter):
    """Tiny BERT + a head-less adapter (the delta is the low-rank pairs alone), 3 forms, int8-dynamic."""
    from lora_edge.core.adapters import AdapterRef
    from lora_edge.export.bundle import export_bundle
    from lora_edge.quantize.quantizer import quantize_bundle

    adapter = tiny_adapter("bert", rank=4, alpha=8.0, seed=3, modules_to_save=None)
    bundle = export_bundle(tiny_model("bert"), [AdapterRef("delta", adapter)], ["merged", "branched", "hotswap"],
                           tmp_path_factory.mktemp("delta") / "bundle", progress=lambda message: None)
    quantize_bundle(bundle, ["int8-dynamic"], progress=lambda message: None)
    return bundle, adapter


def _adapter_delta_errors(delta_bundle, tiny_model, precision: str) -> tuple[dict[str, float], float]:
    """Mean abs error of the adapter's effect per form, measured against the quantized base graph."""
    from lora_edge.core.adapters import AdapterRef, load_reference
    from lora_edge.core.models import load_tokenizer

    bundle, adapter = delta_bundle
    model_dir = tiny_model("bert")
    reference = load_reference(model_dir, AdapterRef("delta", adapter))
    feeds = feeds_for(load_tokenizer(model_dir), list(TEST_BATCHES[-1]),
                      ["input_ids", "attention_mask", "token_type_ids"])
    with reference.disable_adapter():
        reference_base = torch_logits(reference, feeds)
    reference_delta = torch_logits(reference, feeds) - reference_base
    quantized_base = _graph_logits(bundle / "onnx" / f"hotswap.{precision}.onnx", feeds)
    errors = {form: float(np.abs(_graph_logits(bundle / "onnx" / f"{form}.{precision}.onnx", feeds)
                                 - quantized_base - reference_delta).mean()) for form in ("merged", "branched")}
    print(f"{precision}: adapter delta error vs PyTorch: merged {errors['merged']:.2e}, "
          f"branched {errors['branched']:.2e} (delta scale {np.abs(reference_delta).mean():.2e})")
    return errors, float(np.abs(reference_delta).mean())


def test_int8_dynamic_carries_the_adapter_delta_in_both_forms(delta_bundle, tiny_model):
    """The adapter's effect, measured against the quantized base (hot-swap graph, no adapter), per form.

    int8-dynamic rounds activations as well as weights, so both forms carry the
    delta with first-order noise: measured here, the branched form (float LoRA
    pairs) is slightly closer (4.1e-4 vs 4.5e-4 on a 1.2e-1 delta), not
    markedly so. The test holds it to "no worse than merged" and the delta far
    above the error.
    """
    errors, delta_scale = _adapter_delta_errors(delta_bundle, tiny_model, "int8-dynamic")
    assert delta_scale > 50 * errors["branched"]
    assert errors["branched"] <= 1.05 * errors["merged"]


@pytest.mark.slow
def test_intent_int8_error_figures_of_merged_and_branched(intent_graphs, intent_eval):
    """On the trained intent adapter both int8 forms land as close to PyTorch (figures printed for the record)."""
    batches, _, expected = intent_eval
    errors = {form: float(np.abs(_logits_of(intent_graphs / "onnx" / f"{form}.int8-dynamic.onnx", batches)
                                 - expected).mean()) for form in ("merged", "branched")}
    print(f"mean abs logit error vs PyTorch: merged int8 {errors['merged']:.4f}, "
          f"branched int8 (float LoRA) {errors['branched']:.4f}")
    assert errors["branched"] <= 1.05 * errors["merged"]
    assert errors["branched"] <= 0.05 * float(np.abs(expected).max())


@pytest.mark.slow
def test_intent_hotswap_int8_with_adapter_file_follows_pytorch(intent_graphs, intent_eval):
    batches, _, expected = intent_eval
    graph = intent_graphs / "onnx" / "hotswap.int8-dynamic.onnx"
    logits = _logits_of(graph, batches, intent_graphs / "onnx" / "adapters" / "intent.onnx_adapter")
    base = _logits_of(graph, batches)
    error, adapter_effect = float(np.abs(logits - expected).mean()), float(np.abs(expected - base).mean())
    print(f"hotswap int8 + adapter file: mean abs logit error {error:.4f}, adapter effect {adapter_effect:.4f}")
    assert float((logits.argmax(1) == expected.argmax(1)).mean()) >= 0.99
    assert error <= 0.05 * np.abs(expected).max()
    assert error < 0.1 * adapter_effect, "the adapter must matter far more than the int8 error"
