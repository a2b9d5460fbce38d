"""Helpers shared by the merge/export/hot-swap/infer tests: tiny bundles (built once per session), inputs, references."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from tiny_models import TINY_LABELS

ADAPTER_NAME = "tiny"
ALL_FORMS = ("merged", "branched", "hotswap")
# Texts other than the exporter's own verification texts, in batches of different sizes and lengths.
TEST_BATCHES = (
    ["dim the bedroom lights to thirty percent"],
    ["what time is it", "tell me a joke about cats and dogs and a very long story after that"],
    ["stop", "next song please", "how far is the moon from the earth in kilometres, roughly?", "ok"],
)
_BUNDLES: dict[str, Path] = {}


def labeled_adapter(source: Path, target: Path) -> Path:
    """Copy a PEFT adapter dir and add lora-edge's label_map.json and data.json records."""
    shutil.copytree(source, target)
    (target / "label_map.json").write_text(json.dumps({"labels": TINY_LABELS}))
    (target / "data.json").write_text(json.dumps({"train": "/data/train.jsonl", "validation": None, "test": None,
                                                  "split_fractions": [0.8, 0.1, 0.1], "seed": 0}))
    return target


def tiny_bundle(tmp_path_factory, tiny_model, tiny_adapter, arch: str) -> Path:
    """A bundle with all three fp32 forms of tiny ``arch`` + one labeled adapter named 'tiny' (cached)."""
    from lora_edge.core.adapters import AdapterRef
    from lora_edge.export.bundle import export_bundle

    if arch not in _BUNDLES:
        root = tmp_path_factory.mktemp(f"bundle-{arch}")
        adapter = labeled_adapter(tiny_adapter(arch), root / ADAPTER_NAME)
        _BUNDLES[arch] = export_bundle(tiny_model(arch), [AdapterRef(ADAPTER_NAME, adapter)], ALL_FORMS,
                                       root / "bundle", progress=lambda message: None)
    return _BUNDLES[arch]


def feeds_for(tokenizer, texts: list[str], input_names: list[str]) -> dict[str, np.ndarray]:
    """Tokenized int64 numpy feeds holding exactly ``input_names``."""
    encoded = tokenizer(texts, padding="longest", truncation=True, max_length=120, return_tensors="np")
    return {name: encoded[name].astype(np.int64) for name in input_names}


def torch_logits(model, feeds: dict[str, np.ndarray]) -> np.ndarray:
    """Logits of a PyTorch seq-cls model (PEFT or plain) on numpy feeds."""
    import torch

    with torch.no_grad():
        return model(**{name: torch.from_numpy(value) for name, value in feeds.items()}).logits.numpy()


def session_inputs(session) -> list[str]:
    """The task inputs an ORT session takes (its adapter inputs excluded)."""
    return [i.name for i in session.get_inputs() if not i.name.startswith("base_model.model.")]
