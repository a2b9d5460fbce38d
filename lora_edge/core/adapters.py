"""PEFT adapter I/O: naming, validation against a base model, and loading base + adapter.

An adapter is a PEFT directory (``adapter_config.json`` +
``adapter_model.safetensors``), optionally with lora-edge's ``label_map.json``
and ``data.json`` (the data files it was trained on). Adapters written by PEFT
itself load unchanged.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from lora_edge.core.data import LabelMap
from lora_edge.core.errors import AdapterMismatchError, first_line
from lora_edge.core.choices import Task
from lora_edge.core.console import quiet_transformers
from lora_edge.core.models import load_base_model
from lora_edge.core.names import require_name

if TYPE_CHECKING:
    import torch
    from peft import PeftModel

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
DATA_RECORD = "data.json"
PEFT_TASKS = {"SEQ_CLS": Task.SEQ_CLS, "CAUSAL_LM": Task.CAUSAL_LM}


@dataclass(frozen=True)
class AdapterRef:
    """An adapter directory and the name it goes by in a bundle."""

    name: str
    path: Path

    @classmethod
    def parse(cls, value: str) -> "AdapterRef":
        """Parse ``NAME=DIR`` or ``DIR`` (the name is then the directory's name)."""
        name, sep, path = value.partition("=")
        if not sep:
            name, path = "", value
        path_obj = Path(path).expanduser()
        name = name or path_obj.resolve().name
        return cls(require_name(name, "adapter name", "--adapter", "give it a name: --adapter NAME=DIR"), path_obj)


def read_adapter_config(path: Path) -> dict:
    """Read and check an adapter directory's ``adapter_config.json`` (LoRA only)."""
    config_path = Path(path) / ADAPTER_CONFIG
    if not config_path.is_file():
        raise AdapterMismatchError(f"no {ADAPTER_CONFIG} in '{path}'", "--adapter",
                                   "point --adapter at a PEFT adapter directory (save_pretrained output)")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise AdapterMismatchError(f"adapter config is not valid JSON ({exc.msg})", config_path,
                                   "re-save the adapter with PEFT") from None
    except UnicodeDecodeError:
        raise AdapterMismatchError("adapter config is not UTF-8 text", config_path,
                                   "re-save the adapter with PEFT") from None
    if not isinstance(config, dict):
        raise AdapterMismatchError("adapter config is not a JSON object", config_path,
                                   "re-save the adapter with PEFT")
    if config.get("peft_type", "LORA") != "LORA":
        raise AdapterMismatchError(f"adapter is {config.get('peft_type')}, not LoRA", config_path,
                                   "lora-edge handles LoRA adapters only")
    if config.get("use_dora"):
        raise AdapterMismatchError("DoRA adapters are not supported", f"{config_path}: use_dora",
                                   "train a plain LoRA adapter (use_dora=false)")
    _check_lora_fields(config, config_path)
    return config


def _is_number(value, positive: bool = True) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) \
        and (value > 0 if positive else True)


def _check_lora_fields(config: dict, config_path: Path) -> None:
    """The fields lora-edge computes with (rank, alpha, their patterns, targets) have usable types and values."""
    import re

    def bad(field: str, wanted: str) -> AdapterMismatchError:
        return AdapterMismatchError(f"adapter config field '{field}' is {config.get(field)!r}, not {wanted}",
                                    f"{config_path}: {field}", "re-save the adapter with PEFT")

    if not (isinstance(config.get("r"), int) and not isinstance(config.get("r"), bool) and config["r"] > 0):
        raise bad("r", "a positive integer")
    if not _is_number(config.get("lora_alpha"), positive=False):
        raise bad("lora_alpha", "a number")
    for field in ("rank_pattern", "alpha_pattern"):
        pattern = config.get(field) or {}
        if not isinstance(pattern, dict) or not all(isinstance(k, str) and _is_number(v) for k, v in pattern.items()):
            raise bad(field, "an object of module name -> positive number")
        for key in pattern:
            try:
                re.compile(key)
            except re.error:
                raise bad(field, f"a valid pattern (bad key {key!r})") from None
    targets = config.get("target_modules")
    if not (targets is None or isinstance(targets, str)
            or (isinstance(targets, list) and all(isinstance(t, str) for t in targets))):
        raise bad("target_modules", "a module name, a list of them, or null")


def adapter_task(config: dict, where: Path) -> Task:
    """The task an adapter was trained for, from its PEFT ``task_type``."""
    task_type = config.get("task_type")
    task = PEFT_TASKS.get(task_type) if isinstance(task_type, str) else None
    if task is None:
        raise AdapterMismatchError(f"adapter task_type {config.get('task_type')!r} is not supported", where,
                                   "use a SEQ_CLS or CAUSAL_LM adapter")
    return task


def read_adapter_weights(path: Path) -> dict[str, "torch.Tensor"]:
    """Load ``adapter_model.safetensors`` and check every tensor is finite.

    Raises AdapterMismatchError naming the file (corrupt) or the key (NaN/Inf).
    """
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    weights_path = Path(path) / ADAPTER_WEIGHTS
    if not weights_path.is_file():
        raise AdapterMismatchError(f"no {ADAPTER_WEIGHTS} in '{path}'", "--adapter",
                                   "save the adapter with safe_serialization=True; pickled .bin files are never loaded")
    try:
        tensors = load_file(str(weights_path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise AdapterMismatchError(f"adapter weights are not a readable safetensors file ({exc})", weights_path,
                                   "re-save or re-train the adapter") from None
    for key, tensor in tensors.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise AdapterMismatchError(f"tensor '{key}' holds NaN or Inf values", weights_path,
                                       "re-train the adapter (lower the learning rate)")
    return tensors


def head_labels(adapter_path: Path, weights: dict[str, "torch.Tensor"]) -> list[str] | None:
    """Label names for a classification adapter: its label map, else one per classifier row."""
    label_map = LabelMap.load(Path(adapter_path))
    if label_map is not None:
        return list(label_map.labels)
    for key, tensor in weights.items():
        if key.endswith("classifier.weight") or key.endswith("classifier.out_proj.weight") or key.endswith("score.weight"):
            return [f"LABEL_{i}" for i in range(tensor.shape[0])]
    return None


def attach_adapter(base_model, adapter: AdapterRef, weights: dict | None = None) -> "PeftModel":
    """Wrap ``base_model`` with the adapter (eval mode), checking it fits the base.

    Raises AdapterMismatchError when the adapter targets modules the base lacks
    or its tensor shapes do not match.
    """
    from peft import PeftModel

    weights = weights if weights is not None else read_adapter_weights(adapter.path)
    module_names = {name for name, _ in base_model.named_modules()}
    for key in weights:
        module = key.removeprefix("base_model.model.").split(".lora_")[0]
        if ".lora_" in key and module not in module_names:
            raise AdapterMismatchError(f"adapter targets module '{module}', which the base model lacks",
                                       adapter.path / ADAPTER_WEIGHTS,
                                       "use the base model this adapter was trained on")
    try:
        with quiet_transformers():
            model = PeftModel.from_pretrained(base_model, str(adapter.path), adapter_name="default",
                                              is_trainable=False)
    except (RuntimeError, ValueError, KeyError) as exc:
        raise AdapterMismatchError(f"adapter does not fit the base model ({first_line(exc)})",
                                   adapter.path / ADAPTER_WEIGHTS,
                                   "use the base model this adapter was trained on") from None
    model.eval()
    return model


def load_reference(model_path: Path, adapter: AdapterRef, task: Task | None = None,
                   trust_remote_code: bool = False) -> "PeftModel":
    """The PyTorch reference: the base model (fp32, eval) with the adapter attached, unmerged."""
    config = read_adapter_config(adapter.path)
    task = task or adapter_task(config, adapter.path / ADAPTER_CONFIG)
    weights = read_adapter_weights(adapter.path)
    labels = head_labels(adapter.path, weights) if task is Task.SEQ_CLS else None
    base = load_base_model(model_path, task, labels=labels, trust_remote_code=trust_remote_code)
    return attach_adapter(base, adapter, weights)


