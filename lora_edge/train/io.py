"""What a training run reads and writes besides the loop: encoded data, checkpoint rules, records, plots."""

from __future__ import annotations

import json
import re
import shutil
import sys
from dataclasses import asdict
from pathlib import Path

from lora_edge.core.data import DataFiles, Example, LabelMap
from lora_edge.core.errors import BundleError, ConfigError, TrainingError
from lora_edge.core.choices import Task
from lora_edge.core.models import load_config
from lora_edge.core.recipe import LoraSpec, TrainSpec
from lora_edge.core.report import png_figure

RUN_RECORD = "run.json"
# Settings a resumed run must share with the run that wrote the checkpoints (the schedule may change).
RESUME_MUST_MATCH = ("model", "task", "lora", "data", "batch", "quantized_base")


def checkpoint_dir(out: Path) -> Path:
    """Where an unfinished run into ``out`` keeps its Trainer checkpoints: ``<out>.checkpoints``."""
    out = Path(out)
    return out.with_name(out.name + ".checkpoints")


def last_checkpoint(checkpoints: Path) -> str | None:
    """The Trainer checkpoint (``checkpoint-<step>``) with the highest step in ``checkpoints``, if any."""
    steps = {int(match.group(1)): path for path in (checkpoints.iterdir() if checkpoints.is_dir() else [])
             if path.is_dir() and (match := re.fullmatch(r"checkpoint-(\d+)", path.name))}
    return str(steps[max(steps)]) if steps else None


def prepare_output(out: Path, resume: bool, force: bool) -> str | None:
    """Decide how a run may use ``out`` and its checkpoint directory; return the checkpoint to resume.

    * ``out`` exists: refused unless ``force`` (replace it) or ``resume`` with checkpoints left.
    * checkpoints of an unfinished run exist: ``resume`` continues from the latest,
      ``force`` discards them, anything else is refused (so no work is lost silently).
    """
    checkpoints = checkpoint_dir(out)
    latest = last_checkpoint(checkpoints)
    if resume:
        if latest is None:
            raise TrainingError("there is no checkpoint to resume from", checkpoints,
                                "run again without --resume to start a new training run")
        return latest
    if Path(out).exists() and not force:
        raise BundleError(f"'{out}' already exists", "--out", "pass --force to replace it or choose another path")
    if latest is not None and not force:
        raise BundleError("an unfinished training run left checkpoints here", checkpoints,
                          "pass --resume to continue it, or --force to start over")
    if checkpoints.exists():
        shutil.rmtree(checkpoints, ignore_errors=True)
    return None


def check_resume(checkpoints: Path, record: dict) -> None:
    """Refuse to resume checkpoints written with other settings (model, task, LoRA, data, batch)."""
    path = checkpoints / RUN_RECORD
    if not path.is_file():
        return
    earlier = json.loads(path.read_text())
    changed = [key for key in RESUME_MUST_MATCH if earlier.get(key) != record.get(key)]
    if changed:
        raise ConfigError(f"--resume with other settings ({', '.join(changed)}) than the unfinished run", path,
                          "resume with the original options, or pass --force to start over")


class EncodedDataset:
    """Tokenized examples (unpadded); a collator pads each batch to its longest row."""

    def __init__(self, rows: list[dict]):
        self.rows = rows

    @classmethod
    def build(cls, tokenizer, examples: list[Example], label_map: LabelMap | None,
              max_length: int) -> "EncodedDataset":
        """Tokenize ``examples``; classification rows carry ``labels`` = class id.

        Chat examples are rendered with the tokenizer's chat template and carry answer-only
        ``labels`` (prompt tokens -100), see :func:`lora_edge.core.chat.encode_chat`.
        """
        if examples and examples[0].messages is not None:
            from lora_edge.core.chat import encode_chat

            return cls([encode_chat(tokenizer, ex.messages, max_length) for ex in examples])
        encoded = tokenizer([ex.text for ex in examples], truncation=True, max_length=max_length)
        rows = [{key: encoded[key][i] for key in encoded} for i in range(len(examples))]
        if label_map is not None:
            for row, example in zip(rows, examples):
                row["labels"] = label_map.id_of(example.label)
        return cls(rows)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict:
        return self.rows[index]


def stderr_progress():
    """transformers' progress bar with its log lines on stderr (stdout stays for results)."""
    from transformers import ProgressCallback  # imported here: importing this module stays torch-free

    class StderrProgress(ProgressCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            """One compact line per log event, under the bar."""
            if not state.is_world_process_zero or self.training_bar is None or not logs:
                return
            shown = {k: v for k, v in logs.items() if k in ("loss", "eval_loss", "eval_accuracy", "eval_macro_f1",
                                                             "learning_rate", "epoch")}
            if shown:
                text = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in shown.items())
                self.training_bar.write(f"step {state.global_step}: {text}", file=sys.stderr)

    return StderrProgress()


def run_record(model_path: Path, task: Task, lora: LoraSpec, spec: TrainSpec, data: DataFiles) -> dict:
    """The settings of a run, JSON-ready: stored with its checkpoints and in metrics.json."""
    config = load_config(model_path)
    record = {"model": {"path": str(model_path), "model_type": config.get("model_type")},
              "task": task.value, "lora": asdict(lora), "train_spec": asdict(spec), "data": data.to_json(),
              "batch": {"batch_size": spec.batch_size, "grad_accum": spec.grad_accum, "seed": spec.seed,
                        "max_length": spec.max_length},
              "quantized_base": ({"precision": spec.quantized_base, "block_size": spec.quantized_base_block_size}
                                 if spec.quantized_base else None)}
    return json.loads(json.dumps(record, default=str))


def plot_training(metrics: dict, path: Path) -> Path:
    """training.png: training/validation loss (left) and the validation metric (right) per step."""
    history = metrics.get("history", [])
    train = [(e["step"], e["loss"]) for e in history if "loss" in e]
    evals = [e for e in history if "eval_loss" in e]
    with png_figure(path, width=10.0, height=4.0) as figure:
        loss_axis, metric_axis = figure.subplots(1, 2)
        if train:
            loss_axis.plot(*zip(*train), label="training loss")
        if evals:
            loss_axis.plot([e["step"] for e in evals], [e["eval_loss"] for e in evals], "o-",
                           label="validation loss")
        loss_axis.set(xlabel="step", ylabel="loss", title="Loss")
        loss_axis.legend(loc="best")
        if metrics.get("task") == Task.SEQ_CLS.value:
            for key, name in (("eval_accuracy", "accuracy"), ("eval_macro_f1", "macro-F1")):
                points = [(e["step"], e[key]) for e in evals if key in e]
                if points:
                    metric_axis.plot(*zip(*points), "o-", label=f"validation {name}")
            metric_axis.set(xlabel="step", ylabel="score", title="Validation", ylim=(0, 1.02))
        else:
            points = [(e["step"], min(_exp(e["eval_loss"]), 1e6)) for e in evals]
            if points:
                metric_axis.plot(*zip(*points), "o-", label="validation perplexity")
            metric_axis.set(xlabel="step", ylabel="perplexity", title="Validation")
        if metric_axis.lines:
            metric_axis.legend(loc="best")
    return path


def _exp(value: float) -> float:
    from lora_edge.core.metrics import perplexity

    return perplexity(value)
