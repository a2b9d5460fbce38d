"""int4 hot-swap decoders take one packed LoRA A and B per layer: the bundle's adapters are packed for them."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from decoder_bundles import bundle_for, shared_root
from lora_edge.core.bundle import ONNX_DIR
from lora_edge.core.choices import Form
from lora_edge.core.manifest import find_graph, hotswap_adapter_file


@pytest.fixture(scope="module")
def int4_bundle(tmp_path_factory, tiny_model, tiny_adapter):
    """A copy of the tiny llama hot-swap bundle (adapters a: rank 4, b: rank 2) quantized to int4."""
    from lora_edge.quantize.quantizer import quantize_bundle

    source, _ = bundle_for("llama", Form.HOTSWAP, shared_root(tmp_path_factory), tiny_model, tiny_adapter)
    bundle = shutil.copytree(source, tmp_path_factory.mktemp("packed") / "bundle")
    quantize_bundle(bundle, ["int4"], progress=lambda message: None)
    return bundle


def test_the_int4_graph_records_its_own_packed_adapter_files(int4_bundle):
    """ONNX Runtime's own adapter API on the recorded file = the per-target file packed by the runner."""
    from lora_edge.runtime.generate import BoundAdapter, DecoderRunner
    from lora_edge.runtime.session import create_session, load_lora_adapter

    record = find_graph(int4_bundle, "hotswap.int4")
    layers = json.loads((int4_bundle / ONNX_DIR / "config.json").read_text())["num_hidden_layers"]
    assert record.extra["fusion"]["packed_lora"] == layers  # every layer's q|v LoRA is one packed pair
    runner = DecoderRunner(create_session(int4_bundle / record.file))
    declared = {item.name for item in runner.session.get_overridable_initializers()}
    assert set(record.extra["adapter_inputs"]) <= declared and {pack.a for pack in runner.packs} <= declared
    ids = np.array([[5, 9, 17, 3]], np.int64)
    feeds = (ids, np.ones_like(ids), np.arange(4)[None])
    base = runner.step(*feeds, runner.empty_past(1))[0][0, -1]
    for name in ("a", "b"):
        packed_file = hotswap_adapter_file(int4_bundle, record, name)
        assert packed_file.is_file() and packed_file != int4_bundle / ONNX_DIR / "adapters" / f"{name}.onnx_adapter"
        native = runner.step(*feeds, runner.empty_past(1), load_lora_adapter(packed_file))[0][0, -1]
        bound, _ = runner.bound_step(*feeds, None, BoundAdapter.load(int4_bundle / ONNX_DIR / "adapters" /
                                                                      f"{name}.onnx_adapter"))
        np.testing.assert_allclose(bound[0], native, rtol=0, atol=1e-5 * np.abs(native).max())
        assert np.abs(native - base).max() > 1e-2 * np.abs(base).max(), f"adapter {name} changes the logits"


def test_generate_takes_a_bundle_adapter_by_name_or_its_per_target_file(int4_bundle):
    """`lora-edge generate --adapter b` and `--adapter .../b.onnx_adapter` (PEFT layout) give the same tokens."""
    from lora_edge.core.errors import AdapterMismatchError
    from lora_edge.runtime.adapter_layout import read_onnx_adapter, write_onnx_adapter
    from lora_edge.runtime.bundle_generate import generate_from_bundle

    def tokens(adapter):
        return generate_from_bundle(int4_bundle, "hotswap.int4", ["hello there"], adapter, max_new_tokens=8,
                                    chat=False).result.new_ids

    by_file = tokens(str(int4_bundle / ONNX_DIR / "adapters" / "b.onnx_adapter"))
    assert tokens("b") == by_file != tokens("none")
    other = int4_bundle / ONNX_DIR / "adapters" / "other.onnx_adapter"
    tensors = read_onnx_adapter(int4_bundle / ONNX_DIR / "adapters" / "b.onnx_adapter")
    write_onnx_adapter(other, {name: value[:, :-1] if "lora_A" in name else value for name, value in tensors.items()})
    with pytest.raises(AdapterMismatchError, match="do not fit the graph"):
        tokens(str(other))


def test_adapters_convert_refuses_a_packed_graph_naming_the_graph_to_use(int4_bundle, tmp_path):
    from lora_edge.core.errors import ConfigError
    from lora_edge.runtime.adapter_layout import convert_adapter_file

    graph = int4_bundle / find_graph(int4_bundle, "hotswap.int4").file
    with pytest.raises(ConfigError, match="packed LoRA inputs") as refused:
        convert_adapter_file(int4_bundle / ONNX_DIR / "adapters" / "a.onnx_adapter", graph, tmp_path / "out.onnx_adapter")
    assert "hotswap.fp32" in str(refused.value) and not (tmp_path / "out.onnx_adapter").exists()


@pytest.mark.slow  # its own export: ~15 s of CPU
def test_rank_patterns_and_other_targets_pack_per_layer_and_match_pytorch(tiny_model, tiny_adapter, tmp_path):
    """q, k and v targeted (k packed too), per-layer rank and alpha; o_proj keeps its own inputs beside the packs.
    The fused graph fed the per-target adapter (packed by the runner) = PyTorch base + adapter, prefill and a step."""
    import onnx
    import torch

    from lora_edge.core.adapters import AdapterRef, load_reference
    from lora_edge.export.bundle import export_bundle
    from lora_edge.quantize.decoder import fuse_decoder
    from lora_edge.runtime.generate import BoundAdapter, DecoderRunner, positions_from_mask
    from lora_edge.runtime.session import create_session

    model_dir = tiny_model("llama")
    adapter_dir = tiny_adapter("llama", alpha=32.0, seed=5, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                               rank_pattern={"layers.1.self_attn.q_proj": 2}, alpha_pattern={"layers.0.self_attn.v_proj": 8.0})
    bundle = export_bundle(model_dir, [AdapterRef("p", adapter_dir)], ["hotswap"], tmp_path / "bundle", task="causal-lm",
                           progress=lambda message: None)
    source = bundle / find_graph(bundle, "hotswap.fp32").file
    fused, report = fuse_decoder(onnx.load(source), str(source), json.loads((bundle / ONNX_DIR / "config.json").read_text()))
    assert report.dropped is None and report.packed_lora == 2
    path = tmp_path / "fused.onnx"
    onnx.save(fused, path)
    runner = DecoderRunner(create_session(path))
    assert all(len(pack.members) == 3 for pack in runner.packs)  # q, k and v
    assert any(".o_proj.lora_A." in value.name for value in fused.graph.input)
    adapter = BoundAdapter.load(bundle / ONNX_DIR / "adapters" / "p.onnx_adapter")
    packed = runner.graph_adapter(adapter)
    assert [packed.parameters[pack.a].shape()[1] for pack in runner.packs] == [12, 10]  # 4+4+4, 2+4+4
    reference = load_reference(model_dir, AdapterRef("p", adapter_dir))
    ids = np.array([[0, 0, 5, 9, 17], [4, 8, 15, 16, 23]], np.int64)
    mask = (ids > 0).astype(np.int64)
    full_ids, full_mask = np.concatenate([ids, [[7], [11]]], 1), np.concatenate([mask, [[1], [1]]], 1)
    with torch.no_grad():
        expected = reference(input_ids=torch.from_numpy(full_ids), attention_mask=torch.from_numpy(full_mask),
                             position_ids=torch.from_numpy(positions_from_mask(full_mask))).logits.numpy()
    scale = np.abs(expected).max()
    logits, past = runner.bound_step(ids, mask, positions_from_mask(mask), None, adapter)
    np.testing.assert_allclose(logits, expected[:, 4], atol=1e-4 * scale)
    logits, _ = runner.bound_step(full_ids[:, 5:], full_mask, positions_from_mask(full_mask)[:, -1:], past, adapter)
    np.testing.assert_allclose(logits, expected[:, 5], atol=1e-4 * scale)
