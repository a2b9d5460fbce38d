"""Hot-swap: adapters of different ranks and label sets through ONE session, run by run; no adapter = base."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import onnx
import pytest
from safetensors.torch import load_file

from export_helpers import TEST_BATCHES, feeds_for, torch_logits
from lora_edge.core.adapters import AdapterRef, load_reference, read_adapter_config
from lora_reference import lora_scaling
from lora_edge.export.bundle import export_bundle
from lora_edge.export.exporter import low_rank_pairs
from lora_edge.runtime.adapter_layout import read_onnx_adapter
from lora_edge.core.manifest import list_graphs, require_adapter_file
from lora_edge.core.choices import Task
from lora_edge.core.models import load_base_model, load_tokenizer
from lora_edge.runtime.session import create_session, load_lora_adapter, run
from tiny_models import TINY_LABELS

INPUTS = ["input_ids", "attention_mask", "token_type_ids"]
LABELS = [f"LABEL_{i}" for i in range(3)]  # what load_reference names a head without a label map


@pytest.fixture(scope="module")
def swap(tiny_model, tiny_adapter, tmp_path_factory):
    """One hot-swap graph for three bert adapters: r=4 on query/value, r=8 rsLoRA on query/key/value/dense,
    and r=2 on query with a two-label head (the others have three labels)."""
    from tiny_models import build_random_adapter, build_tiny_model

    model_dir = tiny_model("bert")
    out = tmp_path_factory.mktemp("hotswap")
    # Same seed, same encoder weights as the three-label tiny bert: only the head's size differs.
    two_labels = build_tiny_model("bert", out / "bert-2-labels", labels=TINY_LABELS[:2])
    adapters = {"small": tiny_adapter("bert"),
                "large": tiny_adapter("bert", rank=8, alpha=4.0, seed=11, use_rslora=True,
                                      target_modules=["query", "key", "value", "dense"]),
                "binary": build_random_adapter(two_labels, out / "binary", "bert", rank=2, seed=4,
                                               target_modules=["query"])}
    references = {name: load_reference(model_dir, AdapterRef(name, path)) for name, path in adapters.items()}
    bundle = export_bundle(model_dir, [AdapterRef(name, path) for name, path in adapters.items()], ["hotswap"],
                           out / "bundle", fuse=False, progress=lambda message: None)  # the graph as exported
    (graph,) = list_graphs(bundle)
    result = SimpleNamespace(graph=bundle / graph.file,
                             adapter_files={name: require_adapter_file(bundle, graph, name) for name in adapters})
    return result, references, adapters, model_dir


def test_ranks_and_label_sets_switch_run_by_run_in_one_session(swap):
    result, references, _, model_dir = swap
    base = load_base_model(model_dir, Task.SEQ_CLS, labels=LABELS)
    tokenizer = load_tokenizer(model_dir)
    session = create_session(result.graph)  # the only session of this test
    loaded = {name: load_lora_adapter(path) for name, path in result.adapter_files.items()}
    outputs = {}
    sequence = [("small", 1), ("large", 2), (None, 1), ("binary", 2), ("large", 1), ("small", 2), ("binary", 1),
                (None, 2)]  # every adapter (and none) once on each batch, switching at every run
    for step, (name, batch) in enumerate(sequence):
        feeds = feeds_for(tokenizer, TEST_BATCHES[batch], INPUTS)
        (logits,) = run(session, feeds, adapter=loaded.get(name))
        want = torch_logits(references[name] if name else base, feeds)
        assert logits.shape == want.shape == (len(feeds["input_ids"]), 2 if name == "binary" else 3)
        assert np.abs(logits - want).max() <= 1e-4, f"run {step} with adapter {name}"
        outputs.setdefault(batch, []).append(logits)
    for same_batch in outputs.values():  # the adapters and the base really differ on the same input
        same_batch = [logits for logits in same_batch if logits.shape[1] == 3]
        assert min(np.abs(a - b).max() for i, a in enumerate(same_batch) for b in same_batch[i + 1:]) > 1e-3


def test_graph_inputs_have_dynamic_rank_and_same_named_defaults(swap):
    result, _, _, model_dir = swap
    model = onnx.load(str(result.graph))
    initializers = {init.name: onnx.numpy_helper.to_array(init) for init in model.graph.initializer}
    inputs = {value.name: [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]
              for value in model.graph.input}
    lora_inputs = [name for name in inputs if ".lora_" in name]
    assert len(lora_inputs) == 2 * 13  # 2 layers x (q, k, v, attention/intermediate/output dense) + pooler
    for name in lora_inputs:
        rank_axis = 0 if ".lora_A." in name else 1
        assert isinstance(inputs[name][rank_axis], str), f"{name} needs a dynamic rank axis"
        assert initializers[name].shape[rank_axis] == 0 and initializers[name].size == 0
    base = load_base_model(model_dir, Task.SEQ_CLS, labels=LABELS)
    head = initializers["base_model.model.classifier.weight"]
    assert np.array_equal(head, base.classifier.weight.detach().numpy()), "head default = the base model's head"
    assert isinstance(inputs["base_model.model.classifier.weight"][0], str), "label count varies across adapters"
    assert inputs["base_model.model.classifier.weight"][0] == inputs["base_model.model.classifier.bias"][0]
    assert len(low_rank_pairs(model)) == 13


def test_adapter_files_hold_peft_keys_with_scaled_b(swap):
    result, _, adapters, _ = swap
    for name, directory in adapters.items():
        config = read_adapter_config(directory)
        tensors = load_file(str(directory / "adapter_model.safetensors"))
        stored = read_onnx_adapter(result.adapter_files[name])
        assert set(stored) == set(tensors)
        for key, value in tensors.items():
            if ".lora_B." in key:
                module = key.removeprefix("base_model.model.").split(".lora_B.")[0]
                rank, scale = lora_scaling(config, module)
                assert value.shape[1] == rank
                np.testing.assert_allclose(stored[key], scale * value.numpy(), rtol=1e-6)
            else:
                assert np.array_equal(stored[key], value.numpy())
