"""What a ``--model`` value names, turned into a local Hugging Face model directory.

``"default"`` (the embedded all-MiniLM-L6-v2), a pulled model's name, a local
directory or a ``.gguf`` file. Kept apart from :mod:`lora_edge.core.models` (which
loads a directory with transformers) so that loading does not import the GGUF
conversion, and the conversion does not import the loader
(docs/ARCHITECTURE.md, "Layers and what each may import").
"""

from __future__ import annotations

from pathlib import Path

from lora_edge.core.cache import DEFAULT_MODEL, PULLABLE, default_model_path, pulled_model_dir
from lora_edge.core.console import Progress, stderr_lines
from lora_edge.core.errors import ModelError
from lora_edge.core.gguf import find_gguf, gguf_model_dir  # light: torch loads only when a conversion runs


def resolve_model_path(model: str | Path, progress: Progress = stderr_lines) -> Path:
    """Turn ``"default"``, a pulled model's name, a local directory or a ``.gguf`` file into a model directory.

    A GGUF file (or a directory holding exactly one) is converted once into a cached
    directory (:mod:`lora_edge.core.gguf`); a name such as ``smollm2`` means the model
    ``lora-edge models pull`` fetched (:mod:`lora_edge.core.pull`).
    """
    if str(model) == DEFAULT_MODEL:
        return default_model_path()
    path = Path(model).expanduser()
    if not path.exists() and str(model) in PULLABLE:
        return pulled_model_dir(str(model))
    gguf_file = find_gguf(path)
    if gguf_file is not None:
        return gguf_model_dir(gguf_file, progress)
    if not path.is_dir():
        raise ModelError(f"model directory '{path}' does not exist", "--model",
                         "give a local Hugging Face model directory, a .gguf file, or 'default' "
                         "(models are never downloaded)")
    if not (path / "config.json").is_file():
        raise ModelError("model directory has no config.json", path,
                         "point --model at a directory written by save_pretrained()")
    has_safetensors = any(path.glob("*.safetensors")) or (path / "model.safetensors.index.json").is_file()
    if not has_safetensors:
        raise ModelError("model directory has no .safetensors weights", path,
                         "convert the weights to safetensors; pickled .bin checkpoints are never loaded")
    return path
