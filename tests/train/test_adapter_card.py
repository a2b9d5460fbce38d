"""Portable adapters: a base model name PEFT can resolve elsewhere, and a model card that says what the adapter is."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

TEXTS = ["turn the lights off in the kitchen", "what's the weather tomorrow", "call mum"]
# Load the adapter as a user on another machine would: base model by name from a Hugging Face cache, offline.
PEFT_LOAD = """
import json, sys
from peft import AutoPeftModelForSequenceClassification
from transformers import AutoTokenizer
import torch
adapter, base = sys.argv[1:3]
texts = json.loads(sys.argv[3])
labels = json.load(open(f"{adapter}/label_map.json"))["labels"]
model = AutoPeftModelForSequenceClassification.from_pretrained(
    adapter, num_labels=len(labels), id2label=dict(enumerate(labels)),
    label2id={label: i for i, label in enumerate(labels)}).eval()
tokenizer = AutoTokenizer.from_pretrained(base)
with torch.no_grad():
    logits = model(**tokenizer(texts, padding=True, return_tensors="pt")).logits
print(json.dumps({"logits": logits.tolist(), "base": model.peft_config["default"].base_model_name_or_path}))
"""


def test_portable_base_name(tmp_path, monkeypatch):
    from lora_edge.train.adapter_card import DEFAULT_MODEL_HUB_NAME, portable_base_name
    from lora_edge.core.cache import default_model_path

    assert portable_base_name(default_model_path()) == DEFAULT_MODEL_HUB_NAME
    snapshot = tmp_path / "hub" / "models--HuggingFaceTB--SmolLM2-135M" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    assert portable_base_name(snapshot) == "HuggingFaceTB/SmolLM2-135M"
    mine = tmp_path / "work" / "models" / "mine"
    mine.mkdir(parents=True)
    assert portable_base_name(mine, cwd=tmp_path / "work") == "models/mine"
    assert portable_base_name(mine, cwd=tmp_path / "elsewhere") == str(mine)
    installed = tmp_path / "venv" / "lib" / "site-packages" / "pkg" / "model"
    installed.mkdir(parents=True)
    (installed / "config.json").write_text(json.dumps({"_name_or_path": "org/some-model"}))
    assert portable_base_name(installed) == "org/some-model"


def _hub_cache(root: Path, name: str, model_dir: Path) -> Path:
    """A Hugging Face cache holding ``model_dir`` as ``name`` (what a machine that downloaded it has)."""
    org, repo = name.split("/")
    snapshot = root / f"models--{org}--{repo}" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    for item in model_dir.iterdir():
        (snapshot / item.name).symlink_to(item.resolve())
    (root / f"models--{org}--{repo}" / "refs").mkdir()
    (root / f"models--{org}--{repo}" / "refs" / "main").write_text("0" * 40)
    return root


@pytest.mark.slow
def test_default_model_adapter_loads_in_peft_by_hub_name_alone(tmp_path):
    """On 'another machine' (a fresh process whose HF cache has the base model, offline): the same logits."""
    import torch

    from lora_edge.train.adapter_card import DEFAULT_MODEL_HUB_NAME, write_adapter_card
    from lora_edge.core.adapters import AdapterRef, load_reference
    from lora_edge.core.data import LabelMap, encode_texts
    from lora_edge.core.cache import default_model_path
    from lora_edge.core.models import load_tokenizer
    from lora_edge.core.tiny import build_random_adapter

    adapter = build_random_adapter(default_model_path(), tmp_path / "adapter", "bert", rank=4, alpha=8.0)
    LabelMap(("negative", "positive")).save(adapter)
    metrics = {"task": "seq-cls", "labels": ["negative", "positive"], "model": {"path": str(default_model_path())}}
    assert write_adapter_card(adapter, metrics) == DEFAULT_MODEL_HUB_NAME
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == \
        DEFAULT_MODEL_HUB_NAME
    moved = tmp_path / "other-machine" / "adapter"  # nothing of the training machine's paths survives the copy
    moved.parent.mkdir()
    adapter.rename(moved)
    cache = _hub_cache(tmp_path / "hf-cache", DEFAULT_MODEL_HUB_NAME, default_model_path())
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "HF_HOME": str(tmp_path / "hf-home"),
           "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", PEFT_LOAD, str(moved), DEFAULT_MODEL_HUB_NAME, json.dumps(TEXTS)],
                            capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    loaded = json.loads(result.stdout.strip().splitlines()[-1])
    assert loaded["base"] == DEFAULT_MODEL_HUB_NAME
    reference = load_reference(default_model_path(), AdapterRef("a", moved))
    with torch.no_grad():
        expected = reference(**encode_texts(load_tokenizer(default_model_path()), TEXTS, 128)).logits.numpy()
    np.testing.assert_allclose(np.array(loaded["logits"]), expected, atol=1e-5)


def test_trained_adapter_has_a_real_model_card(tiny_model, tmp_path):
    """`lora-edge train` output: a card with base, task, labels, data, scores and LoRA settings; no blanks."""
    from lora_edge.core.data import DataFiles, default_intent_files
    from lora_edge.core.recipe import LoraSpec, TrainSpec
    from lora_edge.train.trainer import train_adapter

    intent = default_intent_files()
    data = DataFiles(intent.train, intent.validation, intent.test)
    out = tmp_path / "adapter"
    train_adapter(tiny_model("bert"), data, out, "seq-cls", LoraSpec(rank=4, targets=["query", "value"]),
                  TrainSpec(max_steps=2, batch_size=8, eval_steps=0, warmup=0), progress=False)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tiny_model("bert").resolve())  # outside cwd: as given
    assert "site-packages" not in config["base_model_name_or_path"]
    card = (out / "README.md").read_text()
    metrics = json.loads((out / "metrics.json").read_text())
    assert "More Information Needed" not in card
    assert card.startswith(f"---\nbase_model: {config['base_model_name_or_path']}\n")
    for label in metrics["labels"]:
        assert f"`{label}`" in card
    assert f"| test | {metrics['test']['examples']} | {metrics['test']['accuracy']:.4f} |" in card
    assert "rank 4, alpha" in card and "target modules: query, value" in card
    assert "train.jsonl" in card and "AutoPeftModelForSequenceClassification" in card
    assert "lora-edge export --model" in card
