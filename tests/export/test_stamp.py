"""Layer stamping (lora_edge/export/stamp.py): a shallow trace with its last layer repeated for the other layers.

A 5-layer tiny decoder (3 traced, 2 stamped): the stamped graph must compute
what a trace of every layer computes, every derived form must match PyTorch,
and whatever the stamper cannot vouch for must take the full trace.
"""

from __future__ import annotations

import collections

import numpy as np
import pytest

from lora_edge.core.adapters import AdapterRef, load_reference
from lora_edge.core.choices import Form, Task
from lora_edge.core.manifest import list_graphs
from lora_edge.core.models import load_tokenizer
from lora_edge.runtime.session import create_session, load_lora_adapter

LAYERS = 5
# Deep enough to stamp, wide enough that the layers' weights are not folded into anonymous constants by the trace
# optimizer (it folds tensors of up to 8192 values, e.g. a Transpose of a 32x32 weight; then nothing is stamped).
DEEP = {"llama": dict(num_hidden_layers=LAYERS, hidden_size=128, head_dim=64, intermediate_size=128),
        "gpt2": dict(num_hidden_layers=LAYERS, n_embd=128)}


@pytest.fixture(scope="module")
def deep_model(tmp_path_factory):
    """arch -> a tiny decoder with LAYERS wider layers (the fixtures' tiny models have 2: too few to stamp)."""
    from tiny_models import build_tiny_model

    cache = {}

    def make(arch: str):
        if arch not in cache:
            cache[arch] = _perturb_vectors(build_tiny_model(arch, tmp_path_factory.mktemp(f"deep-{arch}"),
                                                            config_overrides=DEEP[arch]))
        return cache[arch]

    return make


def _perturb_vectors(directory):
    """Random norm scales and biases: at their initial ones and zeros the trace optimizer folds them away."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(directory)
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() == 1:
                parameter.add_(0.1 * torch.randn(parameter.shape, generator=generator))
    model.save_pretrained(directory, safe_serialization=True)
    return directory


def _adapter(tmp_path_factory, model, arch: str, **kwargs):
    from tiny_models import build_random_adapter

    kwargs.setdefault("target_modules", "all-linear")
    return build_random_adapter(model, tmp_path_factory.mktemp(f"deep-adapter-{arch}"), arch, rank=4, alpha=8.0,
                                seed=3, **kwargs)


def _hotswap_io(model_dir, adapter_dir):
    """(hot-swap base model, slots, export context, hot-swap GraphIO, task GraphIO, reference) as the export builds them."""
    from lora_edge.export.exporter import ExportContext
    from lora_edge.export.hotswap import hotswap_base, hotswap_graph_io, plan_slots
    from lora_edge.export.merge import base_view

    reference = load_reference(model_dir, AdapterRef("a", adapter_dir))
    context = ExportContext(Task.CAUSAL_LM, load_tokenizer(model_dir), reference.get_base_model().config)
    base = base_view(reference)
    slots = plan_slots(base, {"a": reference})
    model = hotswap_base(base, slots)
    io, task_io = hotswap_graph_io(model, slots, context)
    return model, slots, context, io, task_io, reference


def _run_hotswap(traced, weights, task_io, tensors, path):
    """Write the traced hot-swap graph (the adapter's tensors fed as inputs) and run it on the verify inputs."""
    import onnxruntime as ort

    from lora_edge.export.forms import derive, write_model

    write_model(traced, derive(traced, [], [], "hotswap", None, weights), path)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = {i.name for i in session.get_inputs()}
    outputs = []
    for inputs in task_io.verify_inputs:
        feeds = {name: t.numpy() for name, t in zip(task_io.input_names, inputs)}
        feeds.update({name: value for name, value in tensors.items() if name in names})
        outputs.append(session.run(None, feeds))
    return outputs


@pytest.mark.slow  # two traces of each model: ~25 s each arch on 2 quiet cores
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_a_stamped_trace_computes_what_the_full_trace_computes(arch, deep_model, tmp_path_factory, tmp_path,
                                                               monkeypatch):
    """Same ops, inputs and outputs as tracing every layer, and the same outputs on the verify inputs (with an adapter)."""
    import lora_edge.export.stamp as stamp
    from lora_edge.export.exporter import trace_in_memory
    from lora_edge.export.hotswap import add_default_initializers, adapter_tensors, hotswap_graph_io
    from lora_edge.export.stamp import trace_stamped

    original, named = stamp.name_rank_dims, []

    def recording(*args):
        named.append(original(*args))
        return named[-1]

    monkeypatch.setattr(stamp, "name_rank_dims", recording)
    adapter = _adapter(tmp_path_factory, deep_model(arch), arch)
    model, slots, context, io, task_io, reference = _hotswap_io(deep_model(arch), adapter)
    tensors = adapter_tensors(reference, slots)
    full, full_weights = trace_in_memory(io, None, "full")
    stamped, stamped_weights = trace_stamped(model, slots, context, io, lambda s, c: hotswap_graph_io(model, s, c)[0],
                                             None, "stamped")
    assert named == [True]  # the twin traced once, with static ranks, and its rank axes named
    for traced in (full, stamped):
        add_default_initializers(traced, {}, slots)
    ops = [collections.Counter(node.op_type for node in m.graph.node) for m in (full, stamped)]
    assert ops[0] == ops[1]
    assert [v.name for v in full.graph.input] == [v.name for v in stamped.graph.input]
    assert [str(v.type) for v in full.graph.input] == [str(v.type) for v in stamped.graph.input]
    assert [v.name for v in full.graph.output] == [v.name for v in stamped.graph.output]
    # the twin is traced with static ranks: its values' rank axes are named again, as in a trace of every layer
    assert _rank_dims(stamped) == _rank_dims(full) and len(_rank_dims(full)) == len(slots) // 2
    # the stamped layers' weights are the model's own tensors of those layers (no copy for large ones)
    layer_names = [init.name for init in stamped.graph.initializer if f".{LAYERS - 1}." in init.name]
    assert layer_names and set(layer_names) <= {init.name for init in full.graph.initializer}
    expected = _run_hotswap(full, full_weights, task_io, tensors, tmp_path / "full.onnx")
    actual = _run_hotswap(stamped, stamped_weights, task_io, tensors, tmp_path / "stamped.onnx")
    for want, got in zip(expected, actual, strict=True):
        for a, b in zip(want, got, strict=True):
            np.testing.assert_allclose(b, a, atol=1e-5, rtol=0)


def _rank_dims(model) -> collections.Counter:
    """How many values' types name each LoRA rank axis (the inputs and what they reach)."""
    return collections.Counter(dim.dim_param for value in list(model.graph.input) + list(model.graph.value_info)
                               for dim in value.type.tensor_type.shape.dim if dim.dim_param.startswith("rank_"))


def _lora_graph(last_op: str = "MatMul"):
    """x [b, 4] -> MatMul(x, Aᵀ) -> ``last_op``(·, Bᵀ): a LoRA branch as the twin's trace writes it (rank static 2)."""
    from onnx import TensorProto, helper

    from lora_edge.export.hotswap import TRACE_RANK, SwapSlot

    slots = [SwapSlot("a", "m", "lora_A", "lora_A", (0, 4), ((0, "rank_0"),)),
             SwapSlot("b", "m", "lora_B", "lora_B", (6, 0), ((1, "rank_0"),))]
    nodes = [helper.make_node("Transpose", ["a"], ["at"], perm=[1, 0]),
             helper.make_node("Transpose", ["b"], ["bt"], perm=[1, 0]),
             helper.make_node("MatMul", ["x", "at"], ["xa"]),
             helper.make_node(last_op, ["xa", "bt"], ["y"])]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4]),
              helper.make_tensor_value_info("a", TensorProto.FLOAT, [TRACE_RANK, 4]),
              helper.make_tensor_value_info("b", TensorProto.FLOAT, [6, TRACE_RANK])]
    infos = [helper.make_tensor_value_info("at", TensorProto.FLOAT, [4, TRACE_RANK]),
             helper.make_tensor_value_info("bt", TensorProto.FLOAT, [TRACE_RANK, 6]),
             helper.make_tensor_value_info("xa", TensorProto.FLOAT, ["batch", TRACE_RANK])]
    graph = helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              value_info=infos)
    return helper.make_model(graph), slots


def test_the_rank_axes_of_a_static_rank_trace_get_their_names():
    from lora_edge.export.stamp import name_rank_dims

    model, slots = _lora_graph()
    assert name_rank_dims(model, slots)
    shapes = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
              for v in list(model.graph.input) + list(model.graph.value_info)}
    assert shapes == {"x": ["batch", 4], "a": ["rank_0", 4], "b": [6, "rank_0"], "at": [4, "rank_0"],
                      "bt": ["rank_0", 6], "xa": ["batch", "rank_0"]}


def test_a_rank_that_reaches_an_op_it_cannot_follow_asks_for_a_dynamic_trace():
    """An Add of [b, r] and [r, 6] (or anything but Transpose/MatMul): where the rank goes is not known."""
    from lora_edge.export.stamp import name_rank_dims

    model, slots = _lora_graph("Add")
    assert not name_rank_dims(model, slots)


def test_every_form_of_a_stamped_export_matches_pytorch(deep_model, tmp_path_factory, tmp_path):
    """Per-layer ranks and scales (rank_pattern, alpha_pattern) leave the layers stampable; every form checks out."""
    from lora_edge.export.bundle import export_bundle
    from lora_edge.export.exporter import ExportContext, graph_io_for, max_abs_diff, reference_outputs, run_verify_inputs

    model_dir = deep_model("llama")
    adapter = _adapter(tmp_path_factory, model_dir, "llama", rank_pattern={"layers.3.self_attn.q_proj": 2},
                       alpha_pattern={"layers.4.mlp.down_proj": 2.0})
    lines = []
    bundle = export_bundle(model_dir, [AdapterRef("a", adapter)], ["merged", "branched", "hotswap"],
                           tmp_path / "bundle", progress=lines.append)
    assert any("stamped" in line for line in lines), lines
    reference = load_reference(model_dir, AdapterRef("a", adapter))
    context = ExportContext(Task.CAUSAL_LM, load_tokenizer(model_dir), reference.get_base_model().config,
                            sample_texts=("a different prompt than the exporter's", "two", "and a third one here"))
    io = graph_io_for(Task.CAUSAL_LM)(reference, context)
    expected = reference_outputs(io)
    graphs = list_graphs(bundle)
    assert {g.form for g in graphs} == {Form.MERGED, Form.BRANCHED, Form.HOTSWAP}
    for graph in graphs:
        adapter_file = graph.extra["adapter_files"]["a"] if graph.form is Form.HOTSWAP else None
        session = create_session(bundle / graph.file)
        actual = run_verify_inputs(session, io, adapter=load_lora_adapter(bundle / adapter_file) if adapter_file else None)
        assert max_abs_diff(expected, actual) <= 1e-4, graph.name


def test_layers_with_different_lora_targets_are_traced_whole(deep_model, tmp_path_factory):
    from lora_edge.export.stamp import NotStampable, layer_stack

    adapter = _adapter(tmp_path_factory, deep_model("llama"), "llama", layers_to_transform=[0, 2, 3],
                       target_modules=["q_proj", "v_proj", "down_proj"])
    model, slots, context, *_ = _hotswap_io(deep_model("llama"), adapter)
    with pytest.raises(NotStampable, match="layer 1's LoRA targets differ"):
        layer_stack(model, context.config, slots)


def test_a_two_layer_model_takes_the_plain_trace(tiny_model, tiny_adapter):
    from lora_edge.export.stamp import NotStampable, layer_stack

    model, slots, context, *_ = _hotswap_io(tiny_model("llama"), tiny_adapter("llama"))
    with pytest.raises(NotStampable, match="2 layers") as caught:
        layer_stack(model, context.config, slots)
    assert not caught.value.notable  # the plan, not a fallback: no progress line


@pytest.mark.slow  # two traces and an export: ~30 s on 2 quiet cores
def test_a_stamped_graph_that_drifts_is_traced_again_whole(deep_model, tmp_path_factory, tmp_path, monkeypatch):
    """Layers that differ in a way three traced layers cannot show fail the check, and the export traces every layer."""
    from onnx import numpy_helper

    import lora_edge.export.stamp as stamp
    from lora_edge.export.bundle import export_bundle

    original = stamp.trace_stamped

    def wrong_last_layer(*args, **kwargs):
        traced, weights = original(*args, **kwargs)
        for init in traced.graph.initializer:
            if init.name.endswith(f"layers.{LAYERS - 1}.input_layernorm.weight"):
                init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * 3, init.name))
        return traced, weights

    monkeypatch.setattr(stamp, "trace_stamped", wrong_last_layer)
    adapter = _adapter(tmp_path_factory, deep_model("llama"), "llama")
    lines = []
    export_bundle(deep_model("llama"), [AdapterRef("a", adapter)], ["merged"], tmp_path / "bundle",
                  progress=lines.append)
    assert any("the layer-stamped graph failed" in line for line in lines), "\n".join(lines)
    assert sum(line.strip().startswith("trace (dynamo)") for line in lines) == 2


def test_a_layer_weight_the_optimizer_folded_away_is_not_stamped(tmp_path_factory):
    """At their initial values (norm scales all ones) the optimizer drops the Mul: the copies would lose theirs."""
    from tiny_models import build_tiny_model

    from lora_edge.export.hotswap import hotswap_graph_io
    from lora_edge.export.stamp import NotStampable, trace_stamped

    model_dir = build_tiny_model("llama", tmp_path_factory.mktemp("deep-ones"), config_overrides=DEEP["llama"])
    adapter = _adapter(tmp_path_factory, model_dir, "llama")
    model, slots, context, io, *_ = _hotswap_io(model_dir, adapter)
    with pytest.raises(NotStampable, match="folded"):
        trace_stamped(model, slots, context, io, lambda s, c: hotswap_graph_io(model, s, c)[0], None, "stamped")
    assert len(model.get_submodule("model.layers")) == LAYERS  # the shallow twin's layer list was put back
