"""GGUF files as base models: converted once into a cached Hugging Face directory (safetensors).

llama.cpp users already hold their models as ``.gguf`` files. ``--model`` takes
such a file (or a directory holding exactly one) anywhere a model is taken:
:func:`gguf_model_dir` checks the file, dequantizes it with transformers' own
GGUF loader (through the ``gguf`` package, to fp32), and saves the model
(safetensors), its tokenizer and chat template into
``<cache>/gguf-<sha256 prefix>/``, keyed by the file's content, so the
conversion runs once per file. The directory is written under a temporary name
and renamed into place: a failed or interrupted conversion leaves nothing in the
cache. The cache root is ``$LORA_EDGE_CACHE/models`` or
``~/.cache/lora-edge/models``.

Quantized GGUF weights (Q4_1, Q8_0, ...) come out dequantized: the converted
model is the function the GGUF file computes, in fp32.
"""

from __future__ import annotations

import json
from pathlib import Path

from lora_edge.core.bundle import staging_directory
from lora_edge.core.console import Progress, stderr_lines
from lora_edge.core.errors import ModelError, first_line
from lora_edge.core.cache import cache_root, file_sha256

GGUF_SUFFIX = ".gguf"
GGUF_MAGIC = b"GGUF"
SOURCE_RECORD = "gguf_source.json"  # provenance of a converted directory
# GGUF architectures transformers converts that have no causal-LM head (encoder-decoder / encoder only).
NOT_CAUSAL = ("t5", "t5encoder", "umt5")


def find_gguf(path: Path) -> Path | None:
    """The GGUF file ``path`` names: itself (``*.gguf``), or the only ``*.gguf`` in a directory without config.json.

    None when ``path`` is not about GGUF; ModelError when a directory holds several.
    """
    if path.suffix.lower() == GGUF_SUFFIX:
        if not path.is_file():
            raise ModelError(f"GGUF file '{path}' does not exist", "--model", "give the path of an existing .gguf file")
        return path
    if not path.is_dir() or (path / "config.json").is_file():
        return None
    found = sorted(p for p in path.iterdir() if p.suffix.lower() == GGUF_SUFFIX and p.is_file())
    if len(found) > 1:
        raise ModelError(f"the directory holds {len(found)} .gguf files", path,
                         f"name one of them with --model, e.g. --model {found[0]}")
    return found[0] if found else None


def read_architecture(path: Path) -> str:
    """``general.architecture`` of a GGUF file, reading its header and tensor table (not the weights).

    A file that is not GGUF, is truncated, or is corrupt raises ModelError.
    """
    with open(path, "rb") as handle:
        magic = handle.read(4)
    if magic != GGUF_MAGIC:
        raise ModelError("the file is not a GGUF model (wrong magic bytes)", path,
                         "give a .gguf file written by llama.cpp or gguf-py")
    try:
        from gguf import GGUFReader

        reader = GGUFReader(str(path))
        field = reader.fields["general.architecture"]
        architecture = bytes(field.parts[field.data[0]]).decode("utf-8")
        end = max((int(t.data_offset) + int(t.n_bytes) for t in reader.tensors), default=0)
    except (KeyError, ValueError, IndexError, OSError, UnicodeDecodeError, TypeError) as exc:
        raise ModelError(f"cannot read the GGUF file, it is truncated or corrupt ({exc.__class__.__name__})", path,
                         "download or copy the file again") from None
    if end > path.stat().st_size:
        raise ModelError(f"the GGUF file is truncated ({path.stat().st_size} of {end} bytes)", path,
                         "download or copy the file again")
    return architecture


def check_architecture(path: Path, architecture: str) -> None:
    """Refuse architectures transformers cannot load from GGUF as a causal LM."""
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    supported = [name for name in GGUF_SUPPORTED_ARCHITECTURES if name not in ("general", "tokenizer")]
    if architecture not in supported or architecture in NOT_CAUSAL:
        causal = ", ".join(name for name in supported if name not in NOT_CAUSAL)
        raise ModelError(f"GGUF architecture '{architecture}' cannot be loaded as a causal LM by transformers", path,
                         f"use a GGUF of a supported architecture ({causal}) or a Hugging Face model directory")


def convert_gguf(path: Path, out: Path) -> None:
    """Dequantize the GGUF at ``path`` into a transformers model + tokenizer saved in ``out`` (safetensors)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lora_edge.core.console import quiet_transformers

    where, name = str(path.parent), path.name
    try:
        with quiet_transformers():
            tokenizer = AutoTokenizer.from_pretrained(where, gguf_file=name, local_files_only=True)
            loaded = AutoModelForCausalLM.from_pretrained(where, gguf_file=name, local_files_only=True,
                                                          dtype=torch.float32)
    except Exception as exc:  # noqa: BLE001 - any failure inside transformers/tokenizers on this file is the file's
        raise ModelError(f"transformers cannot load the GGUF file ({first_line(exc, 160)})", path,
                         "use a GGUF of a supported architecture or a Hugging Face model directory") from None
    config = loaded.config
    if hasattr(config, "quantization_config"):  # dequantized already; a leftover makes save_pretrained refuse
        del config.quantization_config
    with quiet_transformers():
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    if set(missing) - tied or unexpected:
        raise ModelError(f"the GGUF weights do not fill the {config.model_type} model "
                         f"(missing {sorted(set(missing) - tied)[:3]}, unexpected {sorted(unexpected)[:3]})", path,
                         "use a GGUF of a supported architecture or a Hugging Face model directory")
    model.tie_weights()
    with quiet_transformers():
        model.save_pretrained(str(out), safe_serialization=True)
        tokenizer.save_pretrained(str(out))


def gguf_model_dir(path: str | Path, progress: Progress = stderr_lines) -> Path:
    """The cached Hugging Face directory for the GGUF file ``path``, converting it on first use.

    Raises ModelError for a missing, truncated, corrupt or unsupported file; nothing is left in the cache then.
    """
    path = Path(path).expanduser().resolve()
    digest = file_sha256(path)
    target = cache_root() / f"gguf-{digest[:32]}"
    if (target / SOURCE_RECORD).is_file():
        return target
    architecture = read_architecture(path)
    check_architecture(path, architecture)
    progress(f"converting {path.name} ({architecture}, {path.stat().st_size / 1e6:.0f} MB) to safetensors "
                   f"in {target} (once per file)")
    # Staged as the bundle's directories are: named for this process, swept by a later run if it was killed.
    with staging_directory(target, option="--model") as staging:
        convert_gguf(path, staging)
        record = {"file": path.name, "sha256": digest, "architecture": architecture, "bytes": path.stat().st_size}
        (staging / SOURCE_RECORD).write_text(json.dumps(record, indent=2) + "\n")
        try:
            staging.rename(target)
        except OSError:  # another process converted the same file meanwhile
            if not (target / SOURCE_RECORD).is_file():
                raise
    return target
