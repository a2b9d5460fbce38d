"""lora-edge: take a Hugging Face model and a LoRA adapter to the edge.

The public API is imported lazily so that importing the package (and
`lora-edge --help`) does not import torch.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> module that defines it
_PUBLIC = {
    "LoraEdgeError": "lora_edge.errors",
    "Task": "lora_edge.choices",
    "load_base_model": "lora_edge.models",
    "resolve_model_path": "lora_edge.model_source",
    "read_examples": "lora_edge.data",
    "DataFiles": "lora_edge.data",
    "LoraSpec": "lora_edge.recipe",
    "TrainSpec": "lora_edge.recipe",
    "train_adapter": "lora_edge.train",
    "TrainResult": "lora_edge.train",
    "run_sweep": "lora_edge.sweep",
    "Recipe": "lora_edge.recipe",
    "CheckSpec": "lora_edge.recipe",
    "Thresholds": "lora_edge.thresholds",
    "load_recipe": "lora_edge.recipe",
    "check_bundle": "lora_edge.check",
    "run_recipe": "lora_edge.pipeline",
    "merge_adapter": "lora_edge.merge",
    "branch_adapter": "lora_edge.merge",
    "unmerge_adapter": "lora_edge.merge",
}


def __getattr__(name: str):
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'lora_edge' has no attribute '{name}'")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return sorted(list(globals()) + list(_PUBLIC))
