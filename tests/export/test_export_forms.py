"""One trace, every form: merged and branched graphs derived from the hot-swap trace agree with PyTorch.

Covers rsLoRA, per-layer rank/alpha patterns, several adapters of different
ranks in one bundle, a quantized precision, the exporter fallback, the stage
timings in the manifest, and that a failing stage leaves nothing at OUT.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from export_helpers import TEST_BATCHES, feeds_for, torch_logits
from lora_edge.core.adapters import AdapterRef, load_reference
from lora_edge.core.choices import Form, Precision
from lora_edge.core.manifest import Manifest, list_graphs
from lora_edge.core.models import load_tokenizer
from lora_edge.quantize.quantizer import quantize_bundle
from lora_edge.runtime.session import create_session, load_lora_adapter, run

INPUTS = ["input_ids", "attention_mask", "token_type_ids"]
# int8 error on a tiny random model relative to the logit scale (tests/quantize/test_quantize.py measures the same).
INT8_RELATIVE = 0.08


@pytest.fixture(scope="module")
def patterned(tiny_model, tiny_adapter, tmp_path_factory):
    """tiny BERT + two adapters in one bundle, three forms x (fp32, int8-dynamic):

    ``rs``: r=8 rsLoRA on query/key/value/dense with rank_pattern (query r=2) and alpha_pattern (value alpha=3);
    ``plain``: r=4 on query/value (so the hot-swap graph has layers one adapter does not target).
    """
    from lora_edge.export.bundle import export_bundle

    adapters = {"rs": tiny_adapter("bert", rank=8, alpha=4.0, seed=11, use_rslora=True,
                                   target_modules=["query", "key", "value", "dense"],
                                   rank_pattern={"query": 2}, alpha_pattern={"value": 3.0}),
                "plain": tiny_adapter("bert", rank=4, seed=3)}
    out = tmp_path_factory.mktemp("forms") / "bundle"
    messages = []
    bundle = export_bundle(tiny_model("bert"), [AdapterRef(n, p) for n, p in adapters.items()],
                           ["merged", "branched", "hotswap"], out, precisions=["fp32", "int8-dynamic"],
                           fuse=False, progress=messages.append, quantize=quantize_bundle)  # the forms as derived (fusions: test_fusion.py)
    return bundle, adapters, messages


def _logits(bundle, record, feeds, adapter_file=None):
    adapter = load_lora_adapter(bundle / adapter_file) if adapter_file else None
    return run(create_session(bundle / record.file), feeds, adapter=adapter)[0]


def test_every_derived_form_and_precision_matches_pytorch(patterned, tiny_model):
    bundle, adapters, _ = patterned
    references = {name: load_reference(tiny_model("bert"), AdapterRef(name, path)) for name, path in adapters.items()}
    tokenizer = load_tokenizer(bundle / "onnx")
    graphs = list_graphs(bundle)
    assert {g.name for g in graphs} == {f"{form}.{name}.{precision}" for form in ("merged", "branched")
                                        for name in adapters for precision in ("fp32", "int8-dynamic")} | \
        {"hotswap.fp32", "hotswap.int8-dynamic"}
    for graph in graphs:
        names = [graph.adapter] if graph.form is not Form.HOTSWAP else list(adapters)
        for name in names:
            adapter_file = graph.extra["adapter_files"][name] if graph.form is Form.HOTSWAP else None
            for texts in TEST_BATCHES:
                feeds = feeds_for(tokenizer, list(texts), INPUTS)
                want = torch_logits(references[name], feeds)
                got = _logits(bundle, graph, feeds, adapter_file)
                tolerance = 1e-4 if graph.precision is Precision.FP32 else INT8_RELATIVE * np.abs(want).max()
                assert np.abs(got - want).max() <= tolerance, f"{graph.name} with {name} on {len(texts)} texts"


def test_the_adapters_really_differ_and_patterns_shape_the_branches(patterned, tiny_model):
    """The rank pattern shows in the branched graph (query r=2, key r=8); the two adapters give other logits."""
    from lora_edge.export.exporter import low_rank_pairs

    bundle, adapters, _ = patterned
    graphs = {g.name: g for g in list_graphs(bundle)}
    branched = onnx.load(str(bundle / graphs["branched.rs.fp32"].file))
    shapes = {init.name: list(init.dims) for init in branched.graph.initializer}
    ranks = {first.removeprefix("bert.").removesuffix(".lora_A"): shapes[first][1]
             for first, _ in low_rank_pairs(branched)}
    layer = "encoder.layer.1.attention."
    assert ranks[layer + "self.query"] == 2 and ranks[layer + "self.key"] == 8 == ranks["pooler.dense"]
    assert len(ranks) == 13  # 2 layers x (q, k, v, attention/intermediate/output dense) + pooler dense
    assert len(low_rank_pairs(onnx.load(str(bundle / graphs["branched.plain.fp32"].file)))) == 4  # 2 layers x q, v
    tokenizer = load_tokenizer(bundle / "onnx")
    feeds = feeds_for(tokenizer, list(TEST_BATCHES[1]), INPUTS)
    rs, plain = (_logits(bundle, graphs[f"merged.{n}.fp32"], feeds) for n in ("rs", "plain"))
    assert np.abs(rs - plain).max() > 1e-3


def test_one_trace_serves_every_form_and_the_manifest_times_each_stage(patterned):
    bundle, _, messages = patterned
    stages = Manifest.read(bundle).export_stages
    names = [stage.stage for stage in stages]
    assert sum(name.startswith("trace") for name in names) == 1, names
    assert names[0] == "load" and names[-1] == "quantize"
    for graph in list_graphs(bundle):
        if graph.precision is Precision.FP32:
            assert f"write {graph.name}" in names and f"verify {graph.name}" in names
            assert graph.extra["exporter"] in ("torchscript", "dynamo") and graph.extra["verify_seconds"] >= 0
    assert all(isinstance(stage.seconds, float) for stage in stages)
    assert any(message.strip().startswith("trace (") and message.rstrip().endswith(" s]") for message in messages)


def test_int8_keeps_the_derived_lora_pairs_float(patterned):
    from lora_edge.quantize.lora import inventory

    bundle, _, _ = patterned
    for graph in list_graphs(bundle):
        if graph.precision is not Precision.INT8_DYNAMIC:
            continue
        found = inventory(onnx.load(str(bundle / graph.file)))
        assert found.quantized_lora() == [] and found.float_base == []
        assert (len(found.float_lora) > 0) == (graph.form is not Form.MERGED), graph.name


def test_the_torchscript_exporter_still_exists():
    """lora-edge traces with torch.onnx.export(dynamo=False), which torch has deprecated.

    When this fails, torch removed it: every export silently takes the slower
    torch.export path (still correct, see the fallback test). Re-measure
    benchmarks/export_time.py and update docs/ARCHITECTURE.md, "Facts".
    """
    from lora_edge.export.exporter import torchscript_available

    assert torchscript_available(), "torch no longer ships the TorchScript ONNX exporter (dynamo=False)"


def test_a_failing_torchscript_trace_falls_back_to_torch_export(tiny_model, tiny_adapter, tmp_path, monkeypatch):
    import lora_edge.export.exporter as exporter
    from lora_edge.export.bundle import export_bundle

    def broken(io, opset):
        raise RuntimeError("TorchScript exporter removed")

    monkeypatch.setattr(exporter, "_trace_torchscript", broken)
    messages = []
    bundle = export_bundle(tiny_model("distilbert"), [AdapterRef("a", tiny_adapter("distilbert"))],
                           ["merged", "hotswap"], tmp_path / "bundle", progress=messages.append)
    assert any("tracing again with dynamo" in message for message in messages)
    reference = load_reference(tiny_model("distilbert"), AdapterRef("a", tiny_adapter("distilbert")))
    feeds = feeds_for(load_tokenizer(bundle / "onnx"), list(TEST_BATCHES[2]), ["input_ids", "attention_mask"])
    for graph in list_graphs(bundle):
        assert graph.extra["exporter"] == "dynamo"
        adapter_file = graph.extra["adapter_files"]["a"] if graph.form is Form.HOTSWAP else None
        assert np.abs(_logits(bundle, graph, feeds, adapter_file) - torch_logits(reference, feeds)).max() <= 1e-4


def test_a_failing_derivation_leaves_nothing_at_out(tiny_model, tiny_adapter, tmp_path, monkeypatch):
    import lora_edge.export.forms as forms
    from lora_edge.core.errors import ExportError
    from lora_edge.export.bundle import export_bundle

    written = []
    original = forms.derive  # (a graph is written, or serialized to be checked and fused first, once derived)

    def fail_second(*args, **kwargs):
        if written:
            raise ExportError("disk full", "branched.fp32", "free some space")
        written.append(original(*args, **kwargs))
        return written[-1]

    monkeypatch.setattr(forms, "derive", fail_second)
    out = tmp_path / "out" / "bundle"
    with pytest.raises(ExportError, match="disk full"):
        export_bundle(tiny_model("bert"), [AdapterRef("a", tiny_adapter("bert"))], ["merged", "branched"], out,
                      exporter="torchscript", progress=lambda m: None)
    assert written and not out.exists() and list(out.parent.iterdir()) == []


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_decoder_forms_with_all_linear_rslora_patterns_match_pytorch(arch, tiny_model, tiny_adapter, tmp_path):
    """Decoders: all linear layers (GPT-2's Conv1D too), rsLoRA and a rank pattern, every form against PyTorch."""
    from lora_edge.export.bundle import export_bundle
    from lora_edge.export.exporter import ExportContext, graph_io_for, reference_outputs, run_verify_inputs, max_abs_diff
    from lora_edge.core.choices import Task

    pattern = {"llama": {"down_proj": 2}, "gpt2": {"c_fc": 2}}[arch]
    adapter = tiny_adapter(arch, rank=4, alpha=16.0, seed=5, use_rslora=True, target_modules="all-linear",
                           rank_pattern=pattern)
    bundle = export_bundle(tiny_model(arch), [AdapterRef("a", adapter)], ["merged", "branched", "hotswap"],
                           tmp_path / "bundle", progress=lambda m: None)
    reference = load_reference(tiny_model(arch), AdapterRef("a", adapter))
    context = ExportContext(Task.CAUSAL_LM, load_tokenizer(tiny_model(arch)), reference.get_base_model().config,
                            sample_texts=("a different prompt than the exporter's", "two", "and a third one here"))
    io = graph_io_for(Task.CAUSAL_LM)(reference, context)
    expected = reference_outputs(io)
    for graph in list_graphs(bundle):
        adapter_file = graph.extra["adapter_files"]["a"] if graph.form is Form.HOTSWAP else None
        session = create_session(bundle / graph.file)
        actual = run_verify_inputs(session, io, adapter=load_lora_adapter(bundle / adapter_file) if adapter_file else None)
        assert max_abs_diff(expected, actual) <= 1e-4, graph.name


def test_cli_export_json_prints_the_seconds_of_each_stage(tiny_model, tiny_adapter, tmp_path, capsys):
    import json

    from cli_runner import exit_code_of

    out = tmp_path / "bundle"
    code = exit_code_of("export", "--model", str(tiny_model("distilbert")), "--adapter",
                        f"a={tiny_adapter('distilbert')}", "--forms", "merged", "--out", str(out), "--json")
    assert code == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["bundle"] == str(out)
    assert printed["export_stages"] == [stage.to_json() for stage in Manifest.read(out).export_stages]
    # a classifier's graph is verified in its fuse stage (fused in memory, checked, written once)
    assert {"load", "reference outputs", "trace (torchscript)", "write merged.fp32", "fuse merged.fp32"} <= \
        {s["stage"] for s in printed["export_stages"]}


@pytest.mark.parametrize("external", [None, 64])
def test_streamed_graph_file_loads_with_inline_or_external_weights(tmp_path, external):
    """write_model appends initializers one at a time (lazy ones as raw bytes); ORT reads the file as written."""
    from onnx import TensorProto, helper, numpy_helper

    from lora_edge.export.forms import Derived, Lazy, write_model

    rng = np.random.default_rng(0)
    weight, bias = rng.standard_normal((8, 6)).astype(np.float32), rng.standard_normal(6).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["y0"]), helper.make_node("Add", ["y0", "b"], ["y"])]
    graph = helper.make_graph(nodes,
                              "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 6])])
    shell = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    derived = Derived(graph, {"w": Lazy(lambda: weight, weight.shape), "b": numpy_helper.from_array(bias, "b")})
    path = write_model(shell, derived, tmp_path / "g.onnx", external_bytes=external)
    assert (tmp_path / "g.onnx.data").is_file() == (external is not None)
    x = rng.standard_normal((3, 8)).astype(np.float32)
    (y,) = create_session(path).run(None, {"x": x})
    np.testing.assert_allclose(y, x @ weight + bias, rtol=1e-5, atol=1e-6)
    loaded = onnx.load(str(path))
    assert [init.name for init in loaded.graph.initializer] == ["w", "b"]


def test_the_lean_trace_optimizer_still_applies():
    """Decoder traces run onnxscript's optimizer without its SlicesSplit rule (90% of its time on SmolLM2).

    lora-edge finds that rule in onnxscript's private default rule list. When this
    fails, onnxscript moved it: traces silently run the full (same-result, several
    times slower) optimizer. Find the rule again (exporter.lean_rewrite_rules) or
    re-measure benchmarks/export_time.py.
    """
    import onnxscript.rewriter as rewriter

    from lora_edge.export.exporter import lean_rewrite_rules

    rules = lean_rewrite_rules()
    assert rules is not None, "onnxscript no longer has its default rules / slice_split_rule where lora-edge looks"
    assert len(rules) == len(rewriter._DEFAULT_REWRITE_RULES) - 1


def test_the_in_memory_trace_shares_the_weights_and_optimizes_like_onnxscript(tiny_model, monkeypatch):
    """trace_in_memory: stub initializers whose arrays ARE the module's tensors; the lean optimizer gives the
    graph onnxscript's full optimizer (torch.onnx.export(optimize=True)) gives, node for node; once the arrays
    are dropped, nothing of the trace holds the module's tensors (the optimizer never saw them)."""
    import gc

    import onnx_ir as ir
    import onnxscript.optimizer
    import torch

    import lora_edge.export.exporter as exporter
    from lora_edge.core.models import Task, load_base_model

    unoptimized = []
    lean = exporter.optimize_trace

    def keep_a_copy(model):
        unoptimized.append(ir.serde.deserialize_model(ir.serde.serialize_model(model)))
        return lean(model)

    monkeypatch.setattr(exporter, "optimize_trace", keep_a_copy)
    model = load_base_model(tiny_model("llama"), Task.CAUSAL_LM)
    io = exporter.graph_io_for(Task.CAUSAL_LM)(model, exporter.ExportContext(
        Task.CAUSAL_LM, load_tokenizer(tiny_model("llama")), model.config))
    traced, weights = exporter.trace_in_memory(io)
    parameters = [p.detach().numpy() for p in model.parameters()]
    assert weights and all(any(np.shares_memory(a, p) for p in parameters) for a in weights.values())
    stubs = {init.name: init for init in traced.graph.initializer if init.name in weights}
    assert set(stubs) == set(weights)
    assert all(not s.raw_data and list(s.dims) == list(weights[n].shape) for n, s in stubs.items())
    (full,) = unoptimized
    onnxscript.optimizer.optimize_ir(full)
    stock = ir.serde.serialize_model(full)

    def structure(model):
        """Nodes in order, constants (lifted to initializers, named by the optimizer) by value, weights by name."""
        constants = {i.name: (tuple(i.dims), i.data_type, i.raw_data) for i in model.graph.initializer
                     if i.name not in weights}
        return [(n.op_type, [constants.get(name, name) for name in n.input]) for n in model.graph.node]

    assert len(traced.graph.node) > 100 and structure(traced) == structure(stock)
    large = {p.data_ptr() for p in model.parameters()}  # one surviving view pins a memory-mapped weights file
    weights.clear()
    unoptimized.clear()
    del parameters, full, io, model
    gc.collect()
    assert large and not [t for t in gc.get_objects()
                          if type(t) in (torch.Tensor, torch.nn.Parameter) and t.data_ptr() in large]
    assert set(weights) <= {name for node in traced.graph.node for name in node.input}


def test_torchscript_trace_in_memory_is_the_file_s_graph_byte_for_byte(tiny_model, tiny_adapter, tmp_path,
                                                                        monkeypatch):
    """The exporter's bytes taken in memory are what it writes to a file; a model over the limit goes to a file."""
    import lora_edge.export.exporter as exporter
    from lora_edge.core.choices import Task

    model_dir = tiny_model("bert")
    reference = load_reference(model_dir, AdapterRef("a", tiny_adapter("bert")))
    context = exporter.ExportContext(Task.SEQ_CLS, load_tokenizer(model_dir), reference.get_base_model().config)
    io = exporter.graph_io_for(Task.SEQ_CLS)(reference, context)
    serialized = exporter.trace_torchscript_bytes(io)
    written = exporter.trace_onnx(io, tmp_path / "trace.onnx")
    assert isinstance(serialized, bytes) and len(serialized) > 10_000
    assert serialized == written.read_bytes()
    monkeypatch.setattr(exporter, "EXTERNAL_DATA_BYTES", 0)  # weights over the limit need external data files
    assert exporter.trace_torchscript_bytes(io) is None


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_a_reference_is_freed_without_a_garbage_collection(arch, tiny_model, tiny_adapter):
    """The export freezes objects (gc.freeze) before it releases the references: they must go by reference counting."""
    import gc
    import weakref

    reference = load_reference(tiny_model(arch), AdapterRef("a", tiny_adapter(arch)))
    alive = [weakref.ref(reference), weakref.ref(next(reference.parameters()))]
    gc.freeze()
    try:
        del reference
        assert all(ref() is None for ref in alive)
    finally:
        gc.unfreeze()
