"""`lora-edge merge`: base + adapter folded into one Hugging Face model directory, for PyTorch deployment.

Kept apart from :mod:`lora_edge.export.merge` (the fold itself, torch only) so that
the math does not import the loaders and file writers this command needs.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lora_edge.core.adapters import AdapterRef
    from lora_edge.core.choices import Task


def save_merged(model: str | Path, adapter: AdapterRef, out: Path, task: Task | str | None = None,
                force: bool = False, trust_remote_code: bool = False) -> Path:
    """Write base + adapter merged as a Hugging Face model directory (safetensors, config, tokenizer), atomically.

    The directory also holds the adapter's ``label_map.json`` for classifiers.
    Loads with ``AutoModelFor...from_pretrained(out)`` for PyTorch deployment.
    """
    from lora_edge.core.adapters import load_reference
    from lora_edge.core.bundle import atomic_directory
    from lora_edge.core.choices import Task
    from lora_edge.core.data import LabelMap
    from lora_edge.export.merge import merge_adapter
    from lora_edge.core.model_source import resolve_model_path
    from lora_edge.core.models import load_tokenizer
    from lora_edge.runtime.tokenizer import make_portable

    model_path = resolve_model_path(model)
    with atomic_directory(Path(out), force) as staging:  # entered first: an existing --out fails before any loading
        reference = load_reference(model_path, adapter, Task.parse(task) if task else None, trust_remote_code)
        merged = merge_adapter(reference)
        merged.save_pretrained(str(staging), safe_serialization=True)
        load_tokenizer(model_path, trust_remote_code).save_pretrained(str(staging))
        # no fixed padding to the base model's length, as in bundles (lora_edge.runtime.tokenizer)
        make_portable(staging, getattr(merged.config, "max_position_embeddings", None))
        label_map = LabelMap.load(adapter.path)
        if label_map is not None:
            label_map.save(staging)
    return Path(out)
