"""Causal-LM bundles carry onnx/genai_config.json that describes their graphs as onnxruntime-genai reads them."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from decoder_bundles import bundle_for, shared_root
from lora_edge.core.bundle import ONNX_DIR
from lora_edge.core.choices import Form
from lora_edge.core.manifest import find_graph

GENAI_PYTHON = os.environ.get("LORA_EDGE_GENAI_PYTHON")  # a python with onnxruntime-genai (its own venv)


@pytest.mark.parametrize("form, graph", [(Form.HOTSWAP, "hotswap.fp32"), (Form.MERGED, "merged.fp32")])
def test_genai_config_matches_the_graph(form, graph, tmp_path_factory, tiny_model, tiny_adapter):
    """Names, layer count, heads and special ids agree with the graph's own inputs/outputs and config.json."""
    from lora_edge.runtime.session import create_session

    bundle, _ = bundle_for("llama", form, shared_root(tmp_path_factory), tiny_model, tiny_adapter)
    onnx_dir = bundle / ONNX_DIR
    config = json.loads((onnx_dir / "genai_config.json").read_text())
    hf = json.loads((onnx_dir / "config.json").read_text())
    decoder = config["model"]["decoder"]
    assert decoder["filename"] == Path(find_graph(bundle, graph).file).name  # hot-swap preferred, else merged
    session = create_session(onnx_dir / decoder["filename"])
    inputs = {i.name: i for i in session.get_inputs()}
    outputs = {o.name for o in session.get_outputs()}
    layers = decoder["num_hidden_layers"]
    assert layers == hf["num_hidden_layers"] and decoder["num_key_value_heads"] == hf["num_key_value_heads"]
    for role in ("input_ids", "attention_mask", "position_ids"):
        assert decoder["inputs"][role] in inputs
    for layer in range(layers):
        for kind in ("key", "value"):
            past = inputs[decoder["inputs"][f"past_{kind}_names"] % layer]
            assert past.shape[1] == decoder["num_key_value_heads"] and past.shape[3] == decoder["head_size"]
            assert decoder["outputs"][f"present_{kind}_names"] % layer in outputs
    assert f"past_key_values.{layers}.key" not in inputs  # the layer count is the graph's, not more
    assert decoder["outputs"]["logits"] in outputs
    model = config["model"]
    assert (model["eos_token_id"], model["bos_token_id"], model["vocab_size"], model["type"]) == \
        (hf["eos_token_id"], hf["bos_token_id"], hf["vocab_size"], "llama")
    assert model["context_length"] == config["search"]["max_length"] == hf["max_position_embeddings"]
    assert config["search"]["past_present_share_buffer"] is False  # our KV cache grows by concatenation


def test_encoder_bundles_have_no_genai_config(tmp_path_factory, tiny_model, tiny_adapter):
    from export_helpers import tiny_bundle

    bundle = tiny_bundle(tmp_path_factory, tiny_model, tiny_adapter, "bert")
    assert not (bundle / ONNX_DIR / "genai_config.json").exists()


GENAI_RUN = """
import json, sys
import onnxruntime_genai as og
onnx_dir, prompt_ids, steps, adapter_file = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
model = og.Model(og.Config(onnx_dir))
params = og.GeneratorParams(model)
params.set_search_options(max_length=len(prompt_ids) + steps, do_sample=False)
generator = og.Generator(model, params)
if adapter_file:
    adapters = og.Adapters(model)
    adapters.load(adapter_file, "a")
    generator.set_active_adapter(adapters, "a")
generator.append_tokens(prompt_ids)
while not generator.is_done():
    generator.generate_next_token()
print(json.dumps([int(t) for t in generator.get_sequence(0)][len(prompt_ids):]))
"""


@pytest.mark.slow
@pytest.mark.skipif(not GENAI_PYTHON, reason="set LORA_EDGE_GENAI_PYTHON to a python with onnxruntime-genai")
@pytest.mark.parametrize("form", [Form.HOTSWAP, Form.MERGED])
def test_onnxruntime_genai_gives_the_tokens_of_lora_edge_generate(form, tmp_path_factory, tiny_model, tiny_adapter):
    """Greedy tokens of onnxruntime-genai (its own environment) == lora-edge generate, adapter active."""
    from lora_edge.runtime.generate import SamplingSpec
    from lora_edge.runtime.bundle_generate import generate_from_bundle

    bundle, graph = bundle_for("llama", form, shared_root(tmp_path_factory), tiny_model, tiny_adapter)
    ours = generate_from_bundle(bundle, graph, ["the weather in paris is"], "a" if form is Form.HOTSWAP else None,
                                12, SamplingSpec.from_options(True, None, None, 0), None).to_json()
    adapter_file = str(bundle / ONNX_DIR / "adapters" / "a.onnx_adapter") if form is Form.HOTSWAP else ""
    expected = _without_eos(bundle, ours["new_ids"][0])
    assert _genai_tokens(bundle, ours, adapter_file) == expected
    if form is Form.HOTSWAP:  # without the adapter genai runs the base model: other tokens (the adapter is applied)
        assert _genai_tokens(bundle, ours, "") != expected


def _without_eos(bundle: Path, tokens: list[int]) -> list[int]:
    """Our new tokens end with the EOS that stopped them; onnxruntime-genai's sequence does not include it."""
    eos = json.loads((bundle / ONNX_DIR / "genai_config.json").read_text())["model"]["eos_token_id"]
    eos = set(eos if isinstance(eos, list) else [eos])
    return tokens[:-1] if tokens and tokens[-1] in eos else tokens


def _genai_tokens(bundle: Path, ours: dict, adapter_file: str) -> list[int]:
    result = subprocess.run([GENAI_PYTHON, "-c", GENAI_RUN, str(bundle / ONNX_DIR), json.dumps(ours["prompt_ids"][0]),
                             str(len(ours["new_ids"][0])), adapter_file], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])
