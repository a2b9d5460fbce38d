"""lora-edge: take a Hugging Face model and a LoRA adapter to the edge.

The public API is imported lazily so that importing the package (and
`lora-edge --help`) does not import torch.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> module that defines it
_PUBLIC = {
    "LoraEdgeError": "lora_edge.core.errors",
    "Task": "lora_edge.core.choices",
    "load_base_model": "lora_edge.core.models",
    "resolve_model_path": "lora_edge.core.model_source",
    "read_examples": "lora_edge.core.data",
    "DataFiles": "lora_edge.core.data",
    "LoraSpec": "lora_edge.core.recipe",
    "TrainSpec": "lora_edge.core.recipe",
    "train_adapter": "lora_edge.train.trainer",
    "TrainResult": "lora_edge.train.trainer",
    "run_sweep": "lora_edge.profile.sweep",
    "Recipe": "lora_edge.core.recipe",
    "CheckSpec": "lora_edge.core.recipe",
    "Thresholds": "lora_edge.core.thresholds",
    "load_recipe": "lora_edge.core.recipe",
    "check_bundle": "lora_edge.check.gate",
    "run_recipe": "lora_edge.pipeline.runner",
    "merge_adapter": "lora_edge.export.merge",
    "branch_adapter": "lora_edge.export.merge",
    "unmerge_adapter": "lora_edge.export.merge",
}


def __getattr__(name: str):
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'lora_edge' has no attribute '{name}'")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return sorted(list(globals()) + list(_PUBLIC))
