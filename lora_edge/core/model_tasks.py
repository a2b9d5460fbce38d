"""Which tasks a base model can do, decided from its config.json before any weights are loaded.

transformers happily builds ``BertLMHeadModel`` for ``--task causal-lm`` on an
encoder-only BERT (it only warns that ``is_decoder`` is off), so training and
exporting would run and produce a model that cannot generate text. This check
refuses such a pair up front, with the task the model can do.
"""

from __future__ import annotations

import json
from pathlib import Path

from lora_edge.core.errors import ConfigError, ModelError


def _read_config(model_path: Path) -> dict:
    path = Path(model_path) / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"config.json cannot be read ({exc.__class__.__name__})", path,
                         "re-save the model with save_pretrained()") from None
    if not isinstance(config, dict):
        raise ModelError("config.json is not a JSON object", path, "re-save the model with save_pretrained()")
    return config


def require_task_support(model_path: Path, task: str) -> None:
    """Raise ConfigError when the model in ``model_path`` cannot do ``task`` ("seq-cls" or "causal-lm").

    Models with remote code (``auto_map``) or a type transformers does not know
    are left to transformers, which reports them itself.
    """
    from transformers.models.auto.modeling_auto import (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
                                                        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
                                                        MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES)

    config = _read_config(model_path)
    model_type = config.get("model_type")
    if not isinstance(model_type, str) or config.get("auto_map"):
        return
    task = getattr(task, "value", task)
    source = "--task, the recipe's task or the adapter's task_type"
    known = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES) | set(MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES)
    if model_type not in known:
        return
    if task == "causal-lm":
        encoder_only = model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES and not config.get("is_decoder")
        if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES or encoder_only:
            raise ConfigError(f"'{model_type}' is an encoder-only model and cannot generate text",
                              f"{model_path} with task causal-lm ({source})",
                              "use task seq-cls with this model, or a decoder model (llama, qwen2, gpt2, ...) and "
                              "its adapters")
    elif task == "seq-cls" and model_type not in MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES:
        raise ConfigError(f"'{model_type}' has no sequence-classification head in transformers",
                          f"{model_path} with task seq-cls ({source})",
                          "use task causal-lm with this model, or an encoder model for classification")
