"""Export-time CPU fusions of fp32 graphs: kept only when they match PyTorch, padding trimmed, switchable.

Tiny BERT + random adapter; every check compares with the PyTorch reference (base
+ adapter) or the graph as exported, on padded and unpadded batches.
"""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest

from lora_edge.core.adapters import AdapterRef

FORMS = ["merged", "branched", "hotswap"]


@pytest.fixture(scope="module")
def bundles(tiny_model, tiny_adapter, tmp_path_factory):
    """The same adapter exported fused (the default) and with fuse=False."""
    from lora_edge.export.bundle import export_bundle

    root = tmp_path_factory.mktemp("fusion")
    adapter = tiny_adapter("bert")
    fused = export_bundle(tiny_model("bert"), [AdapterRef("tiny", adapter)], FORMS, root / "fused",
                          progress=lambda message: None)
    plain = export_bundle(tiny_model("bert"), [AdapterRef("tiny", adapter)], ["merged"], root / "plain", fuse=False,
                          progress=lambda message: None)
    return fused, plain, adapter


def _ops(path) -> Counter:
    import onnx

    return Counter(node.op_type for node in onnx.load(str(path)).graph.node)


def _run(path, feeds, adapter_file=None):
    from lora_edge.runtime.session import create_session, load_lora_adapter, run

    session = create_session(path)
    declared = {value.name for value in session.get_inputs()}
    adapter = load_lora_adapter(adapter_file) if adapter_file else None
    return run(session, {k: v for k, v in feeds.items() if k in declared}, adapter=adapter)[0]


def _reference_logits(model_dir, adapter, feeds):
    import torch

    from lora_edge.core.adapters import load_reference

    reference = load_reference(model_dir, AdapterRef("tiny", adapter)).eval()
    with torch.no_grad():
        return reference(**{k: torch.from_numpy(v) for k, v in feeds.items()}).logits.numpy()


def _batch(length: int, real: list[int], seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    ids = rng.integers(5, 1000, size=(len(real), length), dtype=np.int64)
    mask = np.zeros_like(ids)
    for row, count in enumerate(real):
        mask[row, :count] = 1
        ids[row, count:] = 0
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}


def test_fp32_graphs_are_fused_and_recorded(bundles):
    fused, plain, _ = bundles
    records = {g["name"]: g for g in json.loads((fused / "manifest.json").read_text())["graphs"]}
    for form in FORMS:
        fusion = records[f"{form}.fp32"]["extra"]["fusion"]
        assert fusion["attention"] == 2 and fusion["padding_trimmed"] == 3 and "dropped" not in fusion
        # the last layer's query side starts from the layer input and, with LoRA, the query pair's output
        assert fusion["first_token_only"] == {"merged": 1, "branched": 2, "hotswap": 2}[form]
        assert fusion["max_abs_diff_vs_pytorch"] <= 1e-4
        ops = _ops(fused / records[f"{form}.fp32"]["file"])
        assert ops["If"] == 2 and ops["Softmax"] == 0 and ops["Slice"] >= 3
    assert records["branched.fp32"]["extra"]["fusion"]["lora_shared"] == 4
    plain_record = json.loads((plain / "manifest.json").read_text())["graphs"][0]
    assert "fusion" not in plain_record["extra"]
    assert _ops(plain / plain_record["file"])["Softmax"] == 2  # --no-fuse: as exported


def test_each_graph_is_fused_verified_and_written_once_without_reloading_pytorch(bundles):
    fused, _, _ = bundles
    manifest = json.loads((fused / "manifest.json").read_text())
    stages = [stage["stage"] for stage in manifest["export_stages"]]
    assert "reload" not in stages and "fuse" not in stages
    for form in FORMS:  # derived, then fused and the fused graph verified in one session, written; nothing more
        position = stages.index(f"write {form}.fp32")
        assert stages[position:position + 2] == [f"write {form}.fp32", f"fuse {form}.fp32"]
        assert f"verify {form}.fp32" not in stages
    records = {g["name"]: g["extra"] for g in manifest["graphs"]}
    assert set(records["hotswap.fp32"]["max_abs_diff_by_adapter"]) == {"tiny", "base"}  # the base model too
    for form in FORMS:
        assert records[f"{form}.fp32"]["max_abs_diff"] == records[f"{form}.fp32"]["fusion"]["max_abs_diff_vs_pytorch"]
        assert records[f"{form}.fp32"]["max_abs_diff"] <= 1e-4
    assert not list((fused / "onnx").glob(".*"))  # no trace, staged or temporary file left


def test_a_fusion_that_drifts_from_pytorch_leaves_the_exported_graph_verified(tiny_model, tiny_adapter, tmp_path,
                                                                              monkeypatch):
    """The graph then written is the exported one, byte for byte (as an export without fusions writes it)."""
    from lora_edge.export import fusion
    from lora_edge.export.bundle import export_bundle

    adapter = tiny_adapter("bert")
    plain = export_bundle(tiny_model("bert"), [AdapterRef("tiny", adapter)], ["merged", "hotswap"],
                          tmp_path / "plain", fuse=False, progress=lambda message: None)
    checked = []

    def drifting(session, record, *args):
        checked.append(record.name)
        return {"tiny": 1.0}

    monkeypatch.setattr(fusion, "pytorch_diffs", drifting)
    kept = export_bundle(tiny_model("bert"), [AdapterRef("tiny", adapter)], ["merged", "hotswap"],
                         tmp_path / "kept", progress=lambda message: None)
    # merged: ORT's fusions + lora-edge's, then lora-edge's alone; hot-swap: lora-edge's alone
    assert checked == ["merged.fp32", "merged.fp32", "hotswap.fp32"]
    manifest = json.loads((kept / "manifest.json").read_text())
    records = {g["name"]: g for g in manifest["graphs"]}
    stages = [stage["stage"] for stage in manifest["export_stages"]]
    for name in ("merged.fp32", "hotswap.fp32"):
        assert "changed the outputs" in records[name]["extra"]["fusion"]["dropped"]
        assert f"verify {name}" in stages and records[name]["extra"]["max_abs_diff"] <= 1e-4  # verified as exported
        assert (kept / "onnx" / f"{name}.onnx").read_bytes() == (plain / "onnx" / f"{name}.onnx").read_bytes()


@pytest.mark.parametrize("real", [[16, 16], [5, 9], [3], [16, 2]])
def test_fused_graphs_match_pytorch_padded_or_not(bundles, tiny_model, real):
    fused, _, adapter = bundles
    feeds = _batch(16, real)
    expected = _reference_logits(tiny_model("bert"), adapter, feeds)
    for form in FORMS:
        adapter_file = fused / "onnx" / "adapters" / "tiny.onnx_adapter" if form == "hotswap" else None
        actual = _run(fused / "onnx" / f"{form}.fp32.onnx", feeds, adapter_file)
        assert np.abs(actual - expected).max() <= 1e-4, form


def test_padding_is_trimmed_to_the_last_attended_column(bundles):
    import onnx

    fused, _, _ = bundles
    model = onnx.load(str(fused / "onnx" / "merged.fp32.onnx"))
    from lora_edge.export.cpu_fusion import TRIM_LENGTH

    model.graph.output.append(onnx.helper.make_tensor_value_info(TRIM_LENGTH, onnx.TensorProto.INT64, [1]))
    from lora_edge.runtime.session import graph_outputs

    for real, kept in (([5, 9], 9), ([16, 2], 16), ([0], 1)):
        feeds = _batch(16, real)
        assert graph_outputs(model.SerializeToString(), feeds)[1].tolist() == [kept]


def test_quantized_graphs_from_a_fused_source_and_fp16_restores_gpu_fusions(bundles, tmp_path):
    from lora_edge.quantize.quantizer import quantize_graph
    from lora_edge.export.cpu_fusion import restore_for_gpu
    from lora_edge.export.prepare import FusionPlan

    fused, _, _ = bundles
    source = fused / "onnx" / "merged.fp32.onnx"
    plan = FusionPlan.from_config(json.loads((fused / "onnx" / "config.json").read_text()))
    feeds = _batch(16, [5, 9])
    expected = _run(source, feeds)
    int8 = quantize_graph(source, tmp_path / "merged.int8.onnx", "int8-dynamic", plan=plan)
    assert "dropped" not in int8.fusion
    assert np.abs(_run(int8.path, feeds) - expected).max() <= 0.1
    import onnx

    model = onnx.load(str(source))
    assert restore_for_gpu(model) == 5 + 2  # residual Sums back to Add, the mask switches to masked MHA
    ops = Counter(node.op_type for node in model.graph.node)
    assert ops["If"] == 0 and ops["Sum"] == 0 and ops["MultiHeadAttention"] == 2
    from lora_edge.runtime.session import graph_outputs

    assert np.abs(graph_outputs(model.SerializeToString(), feeds)[0] - expected).max() <= 1e-5


def _last_hidden(model) -> str:
    """The tensor the pooler reads token 0 of (``hidden[:, 0]``)."""
    return next(node.input[0] for node in model.graph.node if node.op_type == "Gather"
                and any(a.name == "axis" and a.i == 1 for a in node.attribute))


@pytest.mark.parametrize("form", FORMS)
def test_the_last_layer_runs_for_the_pooled_token_only(bundles, form):
    """The last layer's output has one token however long the batch is, and the logits still match (above)."""
    import onnx

    from lora_edge.runtime.session import graph_outputs, load_lora_adapter

    fused, _, _ = bundles
    model = onnx.load(str(fused / "onnx" / f"{form}.fp32.onnx"))
    model.graph.output.append(onnx.helper.make_tensor_value_info(_last_hidden(model), onnx.TensorProto.FLOAT, None))
    feeds = _batch(16, [16, 9])
    if form == "hotswap":  # run with the adapter active, as served
        import onnxruntime

        session = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        options = onnxruntime.RunOptions()
        options.add_active_adapter(load_lora_adapter(fused / "onnx" / "adapters" / "tiny.onnx_adapter"))
        hidden = session.run(None, feeds, options)[1]
    else:
        hidden = graph_outputs(model.SerializeToString(), feeds)[1]
    assert hidden.shape[:2] == (2, 1)


def test_no_first_token_cut_where_other_tokens_are_read(bundles):
    """A graph that also outputs every token's last hidden state keeps its last layer whole."""
    import onnx

    from lora_edge.export.cpu_fusion import compute_first_token_only, fuse_attention

    _, plain, _ = bundles
    model = onnx.load(str(plain / "onnx" / "merged.fp32.onnx"))
    assert fuse_attention(model, num_heads=json.loads((plain / "onnx" / "config.json").read_text())[
        "num_attention_heads"]) == 2
    cut = onnx.ModelProto()
    cut.CopyFrom(model)
    assert compute_first_token_only(cut) == 1  # the control: this graph is cut when only the pooler reads it
    model.graph.output.append(onnx.helper.make_tensor_value_info(_last_hidden(model), onnx.TensorProto.FLOAT, None))
    assert compute_first_token_only(model) == 0


def test_int8_static_quantizes_every_linear_of_a_fused_graph(bundles, tmp_path):
    """Every MatMul of the merged int8-static graph reads quantized activations (none is left float by a fusion)."""
    import onnx

    from lora_edge.quantize.quantizer import quantize_graph
    from lora_edge.export.prepare import FusionPlan

    fused, _, _ = bundles
    plan = FusionPlan.from_config(json.loads((fused / "onnx" / "config.json").read_text()))
    calibration = [_batch(16, [16, 9], seed) for seed in range(4)]
    result = quantize_graph(fused / "onnx" / "merged.fp32.onnx", tmp_path / "merged.int8-static.onnx", "int8-static",
                            plan=plan, calibration=calibration)
    model = onnx.load(str(result.path))
    producers = {output: node for node in model.graph.node for output in node.output}
    matmuls = [node for node in model.graph.node if node.op_type == "MatMul"]
    assert len(matmuls) == 12  # 2 layers x (Q, K, V, O, FFN in, FFN out)
    for node in matmuls:
        assert [producers[name].op_type for name in node.input] == ["DequantizeLinear"] * 2, node.name


def test_ort_fusions_left_off_change_nothing(bundles, monkeypatch):
    """ORT's rotary and q-ordered MatMul fusions, skipped for their time, would not change an encoder graph."""
    import copy

    import onnx
    from onnxruntime.transformers import optimizer

    from lora_edge.export.prepare import FusionPlan, FusionReport, _ort_transformer_fusions

    _, plain, _ = bundles
    model = onnx.load(str(plain / "onnx" / "merged.fp32.onnx"))
    plan = FusionPlan.from_config(json.loads((plain / "onnx" / "config.json").read_text()))
    report = FusionReport()
    ours = _ort_transformer_fusions(copy.deepcopy(model), plan, report).SerializeToString()
    assert report.ort_fusions  # the optimizer did fuse something: the comparison below means something
    stock_optimize = optimizer.optimize_model
    seen = []

    def every_fusion_on(model, **kwargs):
        options = kwargs["optimization_options"]
        seen.append((options.enable_rotary_embeddings, options.enable_qordered_matmul))
        options.enable_rotary_embeddings = options.enable_qordered_matmul = True
        return stock_optimize(model, **kwargs)

    monkeypatch.setattr(optimizer, "optimize_model", every_fusion_on)
    stock = _ort_transformer_fusions(copy.deepcopy(model), plan, FusionReport()).SerializeToString()
    assert seen == [(False, False)]
    assert ours == stock
