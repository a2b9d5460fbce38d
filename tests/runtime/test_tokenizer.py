"""The device side without torch: the bundle tokenizer matches transformers', infer runs where torch is absent."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from export_helpers import tiny_bundle
from tiny_models import TINY_LABELS

ROOT = Path(__file__).resolve().parents[2]
TEXTS = ["dim the bedroom lights to thirty percent", "ok",
         "Hello, World! It's a test. Don't you think?  ÉTÉ naïve 東京 🙂", "a " * 300]
# Run in a fresh interpreter where `import torch` / `import transformers` fail, as on a device without them.
NO_TORCH = """
import sys
sys.modules["torch"] = None
sys.modules["transformers"] = None
from lora_edge.cli import main
try:
    main(sys.argv[1:])
except SystemExit as exc:
    assert exc.code in (0, None), exc.code
print("IMPORTED", [m for m in sys.modules if m.split(".")[0] in ("torch", "transformers", "peft", "onnx")
                   and sys.modules[m] is not None])
"""


def _tokenizer_dirs(tmp_path_factory, tiny_model, tiny_adapter) -> dict[str, Path]:
    from lora_edge.core.bundle import ONNX_DIR
    from lora_edge.core.model_source import resolve_model_path

    return {"bundle": tiny_bundle(tmp_path_factory, tiny_model, tiny_adapter, "bert") / ONNX_DIR,
            "default": resolve_model_path("default"), "decoder": tiny_model("llama")}


@pytest.mark.parametrize("which", ["bundle", "default", "decoder"])
def test_bundle_tokenizer_gives_transformers_ids(which, tmp_path_factory, tiny_model, tiny_adapter):
    from lora_edge.core.data import encode_texts
    from lora_edge.core.models import load_tokenizer
    from lora_edge.runtime.tokenizer import load_bundle_tokenizer

    directory = _tokenizer_dirs(tmp_path_factory, tiny_model, tiny_adapter)[which]
    reference, ours = load_tokenizer(directory), load_bundle_tokenizer(directory)
    for max_length in (8, 64):
        expected = encode_texts(reference, TEXTS, max_length, tensors="np")
        got = encode_texts(ours, TEXTS, max_length, tensors="np")
        for name, value in expected.items():
            np.testing.assert_array_equal(got[name], value, err_msg=name)
    ids = reference(TEXTS, add_special_tokens=True)["input_ids"]
    assert ours(TEXTS, add_special_tokens=True)["input_ids"] == ids
    assert (ours.pad_token_id, ours.eos_token_id) == (reference.pad_token_id, reference.eos_token_id)
    for row in ids:
        for skip in (True, False):
            assert ours.decode(row, skip_special_tokens=skip) == reference.decode(row, skip_special_tokens=skip)


def test_bundle_tokenizer_json_has_no_fixed_padding(tmp_path_factory, tiny_model, tiny_adapter):
    """The base model's file pads every input to 128; the bundle's copy pads nothing (a user's load stays short)."""
    from tokenizers import Tokenizer

    from lora_edge.core.bundle import ONNX_DIR
    from lora_edge.core.model_source import resolve_model_path

    source = json.loads((resolve_model_path("default") / "tokenizer.json").read_text())
    assert source["padding"]["strategy"] == {"Fixed": 128}  # what the bundle must not inherit
    bundle = tiny_bundle(tmp_path_factory, tiny_model, tiny_adapter, "bert")
    data = json.loads((bundle / ONNX_DIR / "tokenizer.json").read_text())
    assert data["padding"] is None
    config = json.loads((bundle / ONNX_DIR / "config.json").read_text())
    assert data["truncation"] is None or data["truncation"]["max_length"] <= config["max_position_embeddings"]
    assert len(Tokenizer.from_file(str(bundle / ONNX_DIR / "tokenizer.json")).encode("ok").ids) == 3


def test_portable_tokenizer_json_caps_truncation_at_the_position_table():
    from lora_edge.runtime.tokenizer import portable_tokenizer_json

    data = {"padding": {"strategy": {"Fixed": 128}}, "truncation": {"max_length": 1024, "strategy": "LongestFirst"}}
    assert portable_tokenizer_json(data, 512) == {"padding": None,
                                                  "truncation": {"max_length": 512, "strategy": "LongestFirst"}}
    assert portable_tokenizer_json(data, None)["truncation"]["max_length"] == 1024


def _run_without_torch(args: list[str]) -> str:
    """Run the CLI where torch cannot be imported: the device environment of requirements-device.txt when CI
    built one (LORA_EDGE_DEVICE_PYTHON), else this interpreter with torch and transformers blocked."""
    python = os.environ.get("LORA_EDGE_DEVICE_PYTHON") or sys.executable
    result = subprocess.run([python, "-c", NO_TORCH, *args], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "IMPORTED []" in result.stdout, result.stdout[-500:]
    return result.stdout


@pytest.mark.parametrize("graph", ["merged.fp32", "hotswap.fp32"])
def test_infer_runs_where_torch_and_transformers_cannot_be_imported(graph, tmp_path_factory, tiny_model,
                                                                    tiny_adapter):
    from lora_edge.runtime.infer import infer

    bundle = tiny_bundle(tmp_path_factory, tiny_model, tiny_adapter, "bert")
    texts = ["turn on the kitchen lights", "what is the weather like"]
    out = _run_without_torch(["infer", str(bundle), "--graph", graph, "--json"]
                             + [arg for text in texts for arg in ("--text", text)])
    predictions = json.loads(out[:out.rindex("IMPORTED")])
    assert [p["label"] for p in predictions] == [p.label for p in infer(bundle, graph, texts)]
    assert {p["label"] for p in predictions} <= set(TINY_LABELS)
    expected = [p.scores for p in infer(bundle, graph, texts)]
    for got, want in zip(predictions, expected):
        assert got["scores"] == pytest.approx(want, abs=1e-5)


@pytest.mark.slow
def test_generate_runs_where_torch_and_transformers_cannot_be_imported(tmp_path_factory, tiny_model, tiny_adapter):
    """generate of an existing decoder bundle: same tokens as in this (torch-importing) process."""
    from decoder_bundles import bundle_for, shared_root
    from lora_edge.core.choices import Form
    from lora_edge.runtime.generate import SamplingSpec
    from lora_edge.runtime.bundle_generate import generate_from_bundle

    bundle, graph = bundle_for("llama", Form.MERGED, shared_root(tmp_path_factory), tiny_model, tiny_adapter)
    out = _run_without_torch(["generate", str(bundle), "--graph", graph, "--prompt", "the weather in paris is",
                              "--max-new-tokens", "8", "--json"])
    got = json.loads(out[:out.rindex("IMPORTED")])
    expected = generate_from_bundle(bundle, graph, ["the weather in paris is"], None, 8,
                                    SamplingSpec.from_options(True, None, None, 0), None).to_json()
    assert got["new_ids"] == expected["new_ids"] and got["texts"] == expected["texts"]
