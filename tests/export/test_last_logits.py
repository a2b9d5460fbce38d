"""Decoder graphs' ``logits_to_keep`` input: the last positions' logits only, every form and precision."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from decoder_bundles import bundle_for, shared_root
from lora_edge.core.adapters import AdapterRef, load_reference
from lora_edge.core.bundle import ONNX_DIR
from lora_edge.core.choices import Form
from lora_edge.core.decoder_io import LOGITS_TO_KEEP, takes_logits_to_keep
from lora_edge.core.manifest import find_graph
from lora_edge.runtime.generate import BoundAdapter, DecoderRunner, generate, left_pad, positions_from_mask
from lora_edge.runtime.adapter_layout import write_packed_adapter
from lora_edge.runtime.packed_lora import packs_of
from lora_edge.runtime.session import create_session, load_lora_adapter, run

PROMPTS = [[5, 17, 23, 9, 41, 8, 30], [12, 7], [3, 60, 44, 2, 19]]  # left-padded to 7 columns


@pytest.fixture(scope="module")
def llama(tmp_path_factory, tiny_model, tiny_adapter):
    """Factory: ``llama(form)`` -> (bundle, graph file, hot-swap adapter file or None), tiny llama + adapter ``a``."""
    root = shared_root(tmp_path_factory)

    def make(form: Form):
        bundle, graph = bundle_for("llama", form, root, tiny_model, tiny_adapter)
        adapter = bundle / ONNX_DIR / "adapters" / "a.onnx_adapter" if form is Form.HOTSWAP else None
        return bundle, bundle / find_graph(bundle, graph).file, adapter

    return make


def _prefill_feeds(session) -> dict:
    ids, mask = left_pad(PROMPTS, 0)
    runner = DecoderRunner(session)
    return {"input_ids": ids, "attention_mask": mask, "position_ids": positions_from_mask(mask),
            **dict(zip(runner.past_names, runner.empty_past(len(ids))))}


def _torch_logits(reference, feeds: dict) -> np.ndarray:
    import torch

    with torch.no_grad():
        return reference(**{name: torch.from_numpy(feeds[name]) for name in ("input_ids", "attention_mask",
                                                                             "position_ids")}).logits.numpy()


@pytest.mark.parametrize("form", [Form.MERGED, Form.BRANCHED, Form.HOTSWAP])
def test_last_position_logits_equal_the_full_graphs_last_row_and_pytorchs(form, llama, tiny_model, tiny_adapter):
    """k = 1 / 2 / more than the sequence vs the default (every position), and the PyTorch reference's rows."""
    bundle, graph, adapter_file = llama(form)
    session = create_session(graph)
    assert takes_logits_to_keep(session)
    adapter = load_lora_adapter(adapter_file) if adapter_file else None
    feeds = _prefill_feeds(session)
    full, *presents = run(session, feeds, adapter)
    assert full.shape[:2] == (3, 7)  # not fed: every position, as the gate's perplexity reads them
    for keep in (1, 2, 100):
        kept, *kept_presents = run(session, {**feeds, LOGITS_TO_KEEP: np.array(keep, np.int64)}, adapter)
        assert kept.shape == (3, min(keep, 7), full.shape[2])
        np.testing.assert_allclose(kept, full[:, -min(keep, 7):], rtol=0, atol=1e-6 * np.abs(full).max())
        for want, got in zip(presents, kept_presents):  # the cache does not depend on it
            np.testing.assert_array_equal(got, want)
    reference = load_reference(tiny_model("llama"), AdapterRef("a", tiny_adapter("llama", alpha=32.0)))
    expected = _torch_logits(reference, feeds)[:, -1:]
    last = run(session, {**feeds, LOGITS_TO_KEEP: np.array(1, np.int64)}, adapter)[0]
    np.testing.assert_allclose(last, expected, rtol=0, atol=1e-4 * np.abs(expected).max())
    # the adapter moves the last row by far more than the tolerance: a graph without it could not pass
    assert np.abs(expected - _torch_base_last(reference, feeds)).max() > 1e-2 * np.abs(expected).max()


def _torch_base_last(reference, feeds: dict) -> np.ndarray:
    with reference.disable_adapter():
        return _torch_logits(reference, feeds)[:, -1:]


@pytest.mark.parametrize("form, precision", [(Form.MERGED, "int4"), (Form.HOTSWAP, "int4"),
                                             (Form.BRANCHED, "int8-dynamic"), (Form.MERGED, "fp16")])
def test_quantized_graphs_keep_the_input_and_their_last_row(form, precision, llama, tmp_path):
    """The quantize stage (GroupQueryAttention rewrites included) carries the input; the last row is the full one's."""
    from lora_edge.quantize.quantizer import quantize_graph

    bundle, graph, adapter_file = llama(form)
    (tmp_path / ONNX_DIR).mkdir()
    shutil.copy(bundle / ONNX_DIR / "config.json", tmp_path / ONNX_DIR / "config.json")
    source = shutil.copy(graph, tmp_path / ONNX_DIR / graph.name)
    result = quantize_graph(source, tmp_path / ONNX_DIR / f"{form.value}.{precision}.onnx", precision,
                            task="causal-lm")
    session = create_session(result.path)
    assert takes_logits_to_keep(session)
    packs = packs_of(session.get_modelmeta().custom_metadata_map)
    assert bool(packs) == (form is Form.HOTSWAP and precision == "int4")  # (the CPU rewrites pack q|k|v's LoRA)
    if adapter_file and packs:
        adapter_file = write_packed_adapter(packs, adapter_file, tmp_path / "a.packed.onnx_adapter")
    adapter = load_lora_adapter(adapter_file) if adapter_file else None
    feeds = _prefill_feeds(session)
    full = run(session, feeds, adapter)[0]
    last = run(session, {**feeds, LOGITS_TO_KEEP: np.array(1, np.int64)}, adapter)[0]
    assert last.shape == (3, 1, full.shape[2])
    # int8-dynamic quantizes the LM head's input with one scale per tensor: over the last rows only, that scale
    # (and so the rounding) differs from the whole sequence's; weight-only and float graphs compute the same row
    tolerance = 2e-2 if precision == "int8-dynamic" else 1e-5
    np.testing.assert_allclose(last, full[:, -1:], rtol=0, atol=tolerance * np.abs(full).max())
    np.testing.assert_array_equal(last.argmax(-1), full[:, -1:].argmax(-1))


def without_logits_to_keep(path, out):
    """A copy of the graph at ``path`` as exported before ``logits_to_keep`` existed (the slices bypassed)."""
    import onnx

    model = onnx.load(path)
    ours = [node for node in model.graph.node if node.name.startswith("logits_to_keep/")]
    bypass = {node.output[0]: node.input[0] for node in ours if node.op_type == "Slice"}
    assert bypass, "the exported graph has no logits_to_keep slices"
    kept = [node for node in model.graph.node if node not in ours]
    for node in kept:
        for index, name in enumerate(node.input):
            node.input[index] = bypass.get(name, name)
    del model.graph.node[:]
    model.graph.node.extend(kept)
    for field in (model.graph.input, model.graph.initializer):
        for item in [item for item in field if item.name.startswith(LOGITS_TO_KEEP)]:
            field.remove(item)
    onnx.save(model, out)
    return out


@pytest.mark.parametrize("form", [Form.MERGED, Form.HOTSWAP])
def test_generate_tokens_are_unchanged_and_graphs_without_the_input_still_run(form, llama, tmp_path):
    """Greedy tokens of a graph fed logits_to_keep = those of the same graph without the input (older exports),
    through IO binding and through numpy feeds (an onnxruntime.LoraAdapter)."""
    bundle, graph, adapter_file = llama(form)
    new = DecoderRunner(create_session(graph), max_positions=128)
    old = DecoderRunner(create_session(without_logits_to_keep(graph, tmp_path / "old.onnx")), max_positions=128)
    assert new.keeps_last_logits and not old.keeps_last_logits
    adapters = [None] if adapter_file is None else [BoundAdapter.load(adapter_file), load_lora_adapter(adapter_file)]
    for adapter in adapters:
        want = generate(old, PROMPTS, 12, eos_token_id=None, adapter=adapter).new_ids
        got = generate(new, PROMPTS, 12, eos_token_id=None, adapter=adapter).new_ids
        assert got == want and all(len(row) == 12 for row in got)
    feeds = _prefill_feeds(old.session)  # a feed the old graph does not declare is left out, not an error
    assert run(old.session, {**feeds, LOGITS_TO_KEEP: np.array(1, np.int64)})[0].shape[1] == 7


# --- the rewrite on hand-made graphs -------------------------------------------------------------------------

def _head_graph(reshape: bool, declare_shapes: bool):
    """input_ids -> embedding -> [LM head] -> Where(padding) -> logits; ``reshape`` flattens positions first."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((50, 8)).astype(np.float32), "embedding"),
             numpy_helper.from_array(rng.standard_normal((8, 50)).astype(np.float32), "head"),
             numpy_helper.from_array(np.array(0.0, np.float32), "zero"),
             numpy_helper.from_array(np.array([-1], np.int64), "last_axis"),
             numpy_helper.from_array(np.array([-1, 8], np.int64), "flat")]
    nodes = [helper.make_node("Gather", ["embedding", "input_ids"], ["hidden"]),
             helper.make_node("Cast", ["attention_mask"], ["real"], to=TensorProto.BOOL),
             helper.make_node("Unsqueeze", ["real", "last_axis"], ["real3"])]
    if reshape:
        nodes += [helper.make_node("Shape", ["input_ids"], ["ids_shape"]),
                  helper.make_node("Concat", ["ids_shape", "fifty"], ["out_shape"], axis=0),
                  helper.make_node("Reshape", ["hidden", "flat"], ["rows"]),
                  helper.make_node("MatMul", ["rows", "head"], ["flat_logits"]),
                  helper.make_node("Reshape", ["flat_logits", "out_shape"], ["raw"])]
        inits.append(numpy_helper.from_array(np.array([50], np.int64), "fifty"))
    else:
        nodes.append(helper.make_node("MatMul", ["hidden", "head"], ["raw"]))
    nodes.append(helper.make_node("Where", ["real3", "raw", "zero"], ["logits"]))
    graph = helper.make_graph(
        nodes, "head", [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"]),
                        helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "sequence"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "sequence", 50])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    return onnx.shape_inference.infer_shapes(model) if declare_shapes else model


@pytest.mark.parametrize("declare_shapes", [True, False])
def test_rewrite_slices_the_head_input_and_the_padding_mask(declare_shapes):
    """With declared shapes (torch.export) or without (TorchScript: inferred on a weightless copy)."""
    import onnxruntime

    from lora_edge.export.last_logits import add_logits_to_keep

    model = _head_graph(reshape=False, declare_shapes=declare_shapes)
    before = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    assert add_logits_to_keep(model) and not add_logits_to_keep(model)  # once only
    after = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    feeds = {"input_ids": np.array([[3, 4, 5, 6], [0, 0, 7, 8]]), "attention_mask": np.array([[1, 1, 1, 1],
                                                                                              [0, 0, 1, 1]])}
    full = before.run(None, feeds)[0]
    np.testing.assert_array_equal(after.run(None, feeds)[0], full)
    kept = after.run(None, {**feeds, LOGITS_TO_KEEP: np.array(3, np.int64)})[0]
    np.testing.assert_array_equal(kept, full[:, -3:])
    assert (kept[1, 0] == 0).all() and (kept[1, 1] != 0).any()  # the padding mask was sliced alike


def test_rewrite_leaves_a_head_that_mixes_positions_alone():
    """A head that flattens positions (Reshape) is not position-wise: the graph is not touched."""
    from lora_edge.export.last_logits import add_logits_to_keep

    model = _head_graph(reshape=True, declare_shapes=True)
    before = model.SerializeToString()
    assert not add_logits_to_keep(model)
    assert model.SerializeToString() == before
