"""Make a trained adapter directory portable and self-describing: a base model name, and a real model card.

PEFT records ``base_model_name_or_path`` as the directory the base model was
loaded from -- for the embedded default, a path inside the trainer's virtual
environment -- and writes a blank card. Such an adapter loads only on the
machine that trained it and says nothing of its data or scores.
:func:`write_adapter_card` (called once by ``lora-edge train`` on the finished
adapter directory) rewrites the base model as

* the Hugging Face Hub name for the embedded default
  (``sentence-transformers/all-MiniLM-L6-v2``) and for models loaded from the
  Hub cache (``.../models--org--name/snapshots/...`` -> ``org/name``);
* else the path relative to the working directory when the model lies below
  it (PEFT resolves a relative path from the working directory), else the
  directory as given -- never a path inside a Python installation;

and replaces README.md with a card built from the run's metrics: base model,
task, labels, data, scores, LoRA and training settings, and how to load the
adapter in PEFT and in lora-edge.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from lora_edge import __version__
from lora_edge.core.choices import Task

CARD_FILE = "README.md"
ADAPTER_CONFIG_FILE = "adapter_config.json"
DEFAULT_MODEL_HUB_NAME = "sentence-transformers/all-MiniLM-L6-v2"
_HUB_SNAPSHOT = re.compile(r"models--([^/]+)--([^/]+)/snapshots/[^/]+/?$")
_INSTALL_MARKERS = ("site-packages", "dist-packages")
_HUB_NAME = re.compile(r"[\w.-]+/[\w.-]+")


def portable_base_name(model_path: str | Path, cwd: Path | None = None) -> str:
    """What ``base_model_name_or_path`` should say for the base model loaded from ``model_path`` (see module doc)."""
    from lora_edge.core.cache import default_model_path

    path = Path(model_path).resolve()
    if path == default_model_path().resolve():
        return DEFAULT_MODEL_HUB_NAME
    hub = _HUB_SNAPSHOT.search(path.as_posix())
    if hub:
        return f"{hub.group(1)}/{hub.group(2)}"
    if any(part in _INSTALL_MARKERS for part in path.parts):
        named = _config_name(path)
        if named:
            return named
    cwd = (cwd or Path.cwd()).resolve()
    if path.is_relative_to(cwd):
        return os.path.relpath(path, cwd)
    return str(path)


def _config_name(path: Path) -> str | None:
    """A Hub name the model's config.json records (``_name_or_path``), if it looks like one (``org/name``)."""
    config = path / "config.json"
    if not config.is_file():
        return None
    name = json.loads(config.read_text()).get("_name_or_path") or ""
    return name if _HUB_NAME.fullmatch(name) else None


def _fmt(value, digits: int = 4) -> str:
    return f"{value:.{digits}f}" if isinstance(value, float) else ("—" if value is None else str(value))


def _scores_table(metrics: dict, task: Task) -> list[str]:
    keys = ("accuracy", "macro_f1", "precision", "recall") if task is Task.SEQ_CLS else ("loss", "perplexity")
    rows = ["| split | examples | " + " | ".join(keys) + " |", "|---|---|" + "---|" * len(keys)]
    for split in ("validation", "test"):
        scores = metrics.get(split) or {}
        if scores:
            rows.append(f"| {split} | {scores.get('examples', '—')} | "
                        + " | ".join(_fmt(scores.get(key)) for key in keys) + " |")
    return rows


def _data_lines(data: dict) -> list[str]:
    lines = []
    for split in ("train", "validation", "test"):
        if data.get(split):
            lines.append(f"- {split}: `{Path(data[split]).name}`")
        elif split != "train":
            lines.append(f"- {split}: split from the training file")
    fractions = data.get("split_fractions")
    if fractions:
        lines.append(f"- split fractions (when a split is drawn from the training file): {fractions}, "
                     f"seed {data.get('seed')}")
    return lines


def _load_snippet(base: str, task: Task) -> list[str]:
    """PEFT loading code; classifiers pass their label count and names (the base model's head has others)."""
    if task is not Task.SEQ_CLS:
        return ["```python", "from peft import AutoPeftModelForCausalLM", "from transformers import AutoTokenizer",
                "", f'model = AutoPeftModelForCausalLM.from_pretrained("path/to/this/adapter")  # finds {base}',
                f'tokenizer = AutoTokenizer.from_pretrained("{base}")', "```"]
    return [
        "```python",
        "import json",
        "from peft import AutoPeftModelForSequenceClassification",
        "from transformers import AutoTokenizer",
        "",
        'adapter = "path/to/this/adapter"',
        'labels = json.load(open(f"{adapter}/label_map.json"))["labels"]',
        f"model = AutoPeftModelForSequenceClassification.from_pretrained(  # finds {base}",
        "    adapter, num_labels=len(labels), id2label=dict(enumerate(labels)),",
        "    label2id={label: i for i, label in enumerate(labels)})",
        f'tokenizer = AutoTokenizer.from_pretrained("{base}")',
        "```",
    ]


def _base_link(base: str) -> str:
    """The base model as a Hub link when it is a Hub name, else as a path."""
    return f"[{base}](https://huggingface.co/{base})" if _HUB_NAME.fullmatch(base) else f"`{base}`"


def _model_argument(base: str) -> str:
    """``--model`` for lora-edge export: 'default', or a local directory (lora-edge does not download models)."""
    if base == DEFAULT_MODEL_HUB_NAME:
        return "default"
    return f"path/to/{base.split('/')[-1]}" if _HUB_NAME.fullmatch(base) else base


def _quantized_base_lines(metrics: dict) -> list[str]:
    """The quantized base a quantization-aware adapter was trained against, and where it keeps its accuracy."""
    record = metrics.get("quantized_base")
    if not record:
        return []
    precision, block = record.get("precision", "int4"), record.get("block_size", 32)
    return [f"- trained against the base quantized to {precision} (blocks of {block}, zero points; "
            f"`--quantized-base {precision}`, recorded in adapter_model.safetensors' metadata): deploy it on an "
            f"{precision} base with the adapter kept float (`branched` or `hotswap` {precision} graphs), which hold "
            f"exactly that base; a `merged` {precision} graph re-quantizes W + s·B·A and is only close to it"]


def build_card(base: str, adapter_config: dict, metrics: dict) -> str:
    """The README.md text of an adapter trained by lora-edge, from its adapter_config.json and metrics.json."""
    task = Task.parse(metrics.get("task", Task.SEQ_CLS.value))
    lora, train, spec = metrics.get("lora", {}), metrics.get("train", {}), metrics.get("train_spec", {})
    labels = metrics.get("labels") or []
    pipeline = "text-classification" if task is Task.SEQ_CLS else "text-generation"
    lines = [
        "---", f"base_model: {base}", "library_name: peft", f"pipeline_tag: {pipeline}", "tags:",
        f"- base_model:adapter:{base}", "- lora", "- lora-edge", "---", "",
        f"# LoRA adapter for {base} ({task.value})", "",
        f"A LoRA adapter of {_base_link(base)} for "
        + ("sequence classification" if task is Task.SEQ_CLS else "causal language modelling")
        + f", trained with lora-edge {__version__}.", "",
        "## Model", "",
        f"- base model: `{base}` (`base_model_name_or_path` in adapter_config.json)",
        f"- task: {task.value}" + (f", {len(labels)} labels" if labels else ""),
        f"- LoRA: rank {adapter_config.get('r', lora.get('rank'))}, alpha {adapter_config.get('lora_alpha')}, "
        f"dropout {adapter_config.get('lora_dropout')}, init {lora.get('init', 'default')}"
        + (", rsLoRA" if adapter_config.get("use_rslora") else ""),
        f"- target modules: {', '.join(sorted(adapter_config.get('target_modules') or []))}",
        f"- trained in full (modules_to_save): {', '.join(adapter_config.get('modules_to_save') or []) or 'none'}",
        f"- trainable parameters: {train.get('trainable_params', '—')}", *_quantized_base_lines(metrics), "",
    ]
    if labels:
        lines += ["## Labels", "", "Output index -> label (also in `label_map.json`):", "",
                  ", ".join(f"{i}: `{label}`" for i, label in enumerate(labels)), ""]
    lines += ["## Data", "", *_data_lines(metrics.get("data", {})),
              f"- training examples: {train.get('examples', '—')}", "",
              "## Results", "", *_scores_table(metrics, task), "",
              "## Training", "",
              f"- steps {train.get('steps', '—')}, epochs {_fmt(train.get('epochs'), 2)}, learning rate "
              f"{spec.get('learning_rate', '—')}, batch {spec.get('batch_size', '—')} x grad accumulation "
              f"{spec.get('grad_accum', 1)}, max length {spec.get('max_length', '—')}, seed {spec.get('seed', '—')}",
              f"- final training loss {_fmt(train.get('final_loss'))}, {_fmt(train.get('seconds'), 1)} s "
              f"on {train.get('threads', '—')} thread(s)",
              "- full history: `metrics.json`; curves: `training.png`", "",
              "## Use", "", "In PEFT (base model from the Hub, or its local directory):", "",
              *_load_snippet(base, task), "",
              "With lora-edge (ONNX graphs, quantized, profiled and gated for a device):", "",
              "```bash",
              f"lora-edge export --model {_model_argument(base)} --adapter path/to/this/adapter --out bundle",
              "lora-edge quantize bundle --precisions int8-dynamic && lora-edge check bundle",
              "```", ""]
    return "\n".join(lines)


def write_adapter_card(adapter_dir: Path, metrics: dict) -> str:
    """Rewrite ``adapter_dir``'s base model reference portably and write its README.md; return the base name."""
    adapter_dir = Path(adapter_dir)
    config_path = adapter_dir / ADAPTER_CONFIG_FILE
    config = json.loads(config_path.read_text())
    base = portable_base_name(metrics.get("model", {}).get("path") or config["base_model_name_or_path"])
    config["base_model_name_or_path"] = base
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    (adapter_dir / CARD_FILE).write_text(build_card(base, config, metrics), encoding="utf-8")
    return base
