"""LoRA training on PEFT + transformers.Trainer: one adapter directory per run.

:func:`train_adapter` injects LoRA layers with PEFT (the classifier head is
trained and saved too, through ``modules_to_save``), runs
``transformers.Trainer`` (its loop, checkpoints, progress bar, and DDP when
launched under ``torchrun``: gloo on CPU), evaluates on the validation and test
splits and writes ``OUT/`` atomically::

    adapter_config.json, adapter_model.safetensors   PEFT format
    label_map.json                                   class names (classification)
    data.json                                        the data files (DataFiles.to_json)
    metrics.json                                     scores on validation + test, training summary
    training.png                                     loss and validation-metric curves

Checkpoints live beside OUT in ``OUT.checkpoints/`` while a run is unfinished:
an interrupted run is continued with ``resume=True`` (``--resume``), and the
directory is removed once OUT is written. Only the main process writes.
"""

from __future__ import annotations

import json
import math
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from lora_edge.core.adapters import ADAPTER_WEIGHTS, DATA_RECORD
from lora_edge.core.bundle import atomic_directory, library_versions, write_json
from lora_edge.core.chat import IGNORE_INDEX, require_chat_template
from lora_edge.core.data import DataFiles, Example, LabelMap
from lora_edge.core.errors import ConfigError, DataError, TrainingError, env_int, first_line
from lora_edge.core.choices import Task
from lora_edge.core.console import quiet_transformers
from lora_edge.core.model_source import resolve_model_path
from lora_edge.core.models import load_base_model, load_tokenizer
from lora_edge.core.recipe import LoraSpec, TrainSpec
from lora_edge.train.io import (RUN_RECORD, EncodedDataset, check_resume, checkpoint_dir, plot_training,
                                prepare_output, run_record, stderr_progress)

if TYPE_CHECKING:
    from transformers import Trainer

METRICS_FILE = "metrics.json"
TRAINING_PLOT = "training.png"
PISSA_INIT_DIR = "pissa-init"
CURVE_POINTS = 25  # about this many loss points per run in training.png

# LoRA targets for "auto" where PEFT's own per-architecture table has none.
EXTRA_DEFAULT_TARGETS = {"distilbert": ["q_lin", "v_lin"], "deberta-v2": ["query_proj", "value_proj"]}


@dataclass
class TrainResult:
    """What a training run produced (``metrics`` is the content of metrics.json)."""

    out: Path
    task: Task
    metrics: dict
    trainable_params: int
    adapter_bytes: int
    train_seconds: float
    global_step: int
    is_main_process: bool = True

    def summary(self) -> dict:
        """The headline numbers, JSON-ready (what `lora-edge train --json` prints)."""
        headline = {"out": str(self.out), "task": self.task.value, "trainable_params": self.trainable_params,
                    "adapter_bytes": self.adapter_bytes, "train_seconds": round(self.train_seconds, 2),
                    "steps": self.global_step}
        for split in ("validation", "test"):
            scores = self.metrics.get(split, {})
            for key in ("accuracy", "macro_f1", "loss", "perplexity", "exact_match", "base_exact_match"):
                if key in scores:
                    headline[f"{split}_{key}"] = scores[key]
        return headline


def resolve_lora(lora: LoraSpec, model_type: str) -> dict:
    """``peft.LoraConfig`` kwargs with targets "auto" resolved for ``model_type``."""
    from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT_TARGETS

    kwargs = lora.peft_config_kwargs()
    if kwargs["target_modules"] is None:  # "auto"
        targets = EXTRA_DEFAULT_TARGETS.get(model_type) or PEFT_TARGETS.get(model_type)
        if not targets:
            raise ConfigError(f"no default LoRA targets for model type '{model_type}'", "--targets",
                              "name the modules to adapt, e.g. --targets q_proj,v_proj, or use all-linear")
        kwargs["target_modules"] = list(targets)
    return kwargs


def head_module_names(model) -> list[str]:
    """Top-level modules of a task model outside its backbone that hold weights: the task head.

    ``classifier`` for BERT/RoBERTa, ``pre_classifier`` + ``classifier`` for DistilBERT,
    ``score`` for decoder classifiers. These are trained in full and saved with the adapter.
    """
    backbone = getattr(model, "base_model_prefix", "")
    return [name for name, module in model.named_children()
            if name != backbone and any(True for _ in module.parameters())]


def _peft_model(base, task: Task, lora: LoraSpec):
    """Wrap ``base`` with fresh LoRA layers (PEFT), turning PEFT's errors into ConfigErrors."""
    from peft import LoraConfig, TaskType, get_peft_model

    kwargs = resolve_lora(lora, base.config.model_type)
    task_type = TaskType.SEQ_CLS if task is Task.SEQ_CLS else TaskType.CAUSAL_LM
    head = head_module_names(base) if task is Task.SEQ_CLS else []
    # PEFT adds "classifier" and "score" to modules_to_save for SEQ_CLS itself.
    extra_head = [name for name in head if name not in ("classifier", "score")] or None
    try:
        return get_peft_model(base, LoraConfig(task_type=task_type, modules_to_save=extra_head, **kwargs))
    except ValueError as exc:
        linear = sorted({name.rsplit(".", 1)[-1] for name, module in base.named_modules()
                         if module.__class__.__name__ in ("Linear", "Conv1D")})
        raise ConfigError(f"cannot place LoRA layers ({first_line(exc, 160)})", "--targets",
                          f"choose among the model's linear modules: {', '.join(linear[:12])}") from None


def _check_pissa(lora: LoraSpec) -> None:
    """PiSSA adapters are saved converted to plain LoRA, which PEFT cannot do with rsLoRA and per-layer patterns."""
    if lora.init.value == "pissa" and lora.rslora and (lora.rank_pattern or lora.alpha_pattern):
        raise ConfigError("PiSSA adapters cannot be converted to LoRA with rslora and rank/alpha patterns",
                          "--init pissa", "drop --rslora or the rank/alpha patterns")


def base_quantization(spec: TrainSpec, task: Task):
    """The quantized base ``spec`` asks to train against (None: the float base); causal LMs only.

    Classifier heads are trained in full and the int4 export's treatment of an
    encoder's embeddings is not modelled, so only decoders may ask for it.
    """
    from lora_edge.core.fake_quant import BaseQuantization

    if not spec.quantized_base:
        return None
    if task is not Task.CAUSAL_LM:
        raise ConfigError("a quantized base (train.quantized_base) is for causal LMs only", "--quantized-base",
                          "drop --quantized-base, or train with --task causal-lm")
    return BaseQuantization(spec.quantized_base, spec.quantized_base_block_size, symmetric=False)


def _check_init_adapter(spec: TrainSpec) -> None:
    """Refuse an --init-adapter directory without adapter weights before anything heavy is loaded."""
    if spec.init_adapter and not (Path(spec.init_adapter) / ADAPTER_WEIGHTS).is_file():
        raise ConfigError(f"no {ADAPTER_WEIGHTS} in '{spec.init_adapter}'", "--init-adapter",
                          "name a PEFT adapter directory (written by lora-edge train)")


def _load_initial_adapter(peft_model, directory: Path) -> None:
    """Start from a trained adapter's LoRA weights; it must have this run's LoRA layers and shapes."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    fix = "train with the adapter's own --targets, --layers and --rank (its adapter_config.json)"
    try:
        loaded = set_peft_model_state_dict(peft_model, load_file(str(directory / ADAPTER_WEIGHTS)))
    except RuntimeError as exc:  # shape mismatches
        raise ConfigError(f"the adapter does not fit this run's LoRA layers ({first_line(exc, 160)})",
                          "--init-adapter", fix) from None
    missing = [key for key in loaded.missing_keys if ".lora_" in key]
    if missing or loaded.unexpected_keys:
        names = (missing or loaded.unexpected_keys)[:2]
        raise ConfigError(f"the adapter does not fit this run's LoRA layers ({', '.join(names)})", "--init-adapter",
                          fix)


def _check_splits(splits: dict[str, list[Example]], data: DataFiles, task: Task) -> LabelMap | None:
    """Refuse empty splits and evaluation labels the training split never shows."""
    chat = splits["train"] and splits["train"][0].messages is not None
    for name, examples in splits.items():
        source = data.files.get(name) or data.train
        if not examples:
            raise DataError(f"the {name} split is empty", source,
                            "add examples, or give --validation/--test files")
        if any((ex.messages is not None) != bool(chat) for ex in examples):
            raise DataError(f"the {name} split mixes chat rows (messages) and text rows", source,
                            "use one kind of row in every split")
    if task is not Task.SEQ_CLS:
        return None
    label_map = LabelMap.from_examples(splits["train"])
    for name in ("validation", "test"):
        unknown = sorted({ex.label for ex in splits[name]} - set(label_map.labels))
        if unknown:
            raise DataError(f"the {name} split has label(s) {', '.join(unknown[:5])} that training never sees",
                            data.files.get(name) or data.train, "add training examples of those labels")
    return label_map


def _training_arguments(spec: TrainSpec, checkpoints: Path, n_train: int, progress: bool):
    """transformers.TrainingArguments for ``spec``: eval/save/log cadence from the run length."""
    import torch
    from transformers import TrainingArguments

    world = max(1, env_int("WORLD_SIZE", 1))  # set by torchrun
    cpu_ddp = world > 1 and not torch.cuda.is_available()
    steps_per_epoch = max(1, math.ceil(n_train / (spec.batch_size * world * spec.grad_accum)))
    total = spec.max_steps if spec.max_steps > 0 else max(1, math.ceil(spec.epochs * steps_per_epoch))
    if spec.eval_steps:
        cadence = dict(eval_strategy="steps", eval_steps=spec.eval_steps, save_strategy="steps",
                       save_steps=spec.eval_steps)
    elif spec.max_steps > 0:  # a step budget: evaluate (and checkpoint) about five times
        every = max(1, total // 5)
        cadence = dict(eval_strategy="steps", eval_steps=every, save_strategy="steps", save_steps=every)
    else:
        cadence = dict(eval_strategy="epoch", save_strategy="epoch")
    return TrainingArguments(
        output_dir=str(checkpoints), per_device_train_batch_size=spec.batch_size,
        per_device_eval_batch_size=max(64, spec.batch_size), gradient_accumulation_steps=spec.grad_accum,
        num_train_epochs=spec.epochs, max_steps=spec.max_steps, learning_rate=spec.learning_rate,
        lr_scheduler_type="linear", warmup_steps=spec.warmup if spec.warmup < 1 else int(spec.warmup), weight_decay=0.0,
        logging_steps=max(1, total // CURVE_POINTS), logging_nan_inf_filter=False,
        save_total_limit=1, seed=spec.seed, data_seed=spec.seed, report_to="none",
        disable_tqdm=not progress, remove_unused_columns=False, label_names=["labels"],
        dataloader_num_workers=0, dataloader_pin_memory=torch.cuda.is_available(),
        # DDP under torchrun (WORLD_SIZE > 1) without a GPU: accelerate needs use_cpu to pick multi-CPU DDP
        # (gloo); otherwise each rank would silently train alone.
        use_cpu=cpu_ddp, ddp_backend="gloo" if cpu_ddp else None,
        ddp_find_unused_parameters=False,  # every trainable tensor (LoRA pairs, head) is used in each step
        **cadence)


def _classification_scores(trainer: "Trainer", dataset, labels: list[str]) -> dict:
    """Predict ``dataset`` (gathered across DDP ranks) and score it."""
    from lora_edge.core.metrics import classification_report

    output = trainer.predict(dataset)
    logits = output.predictions[0] if isinstance(output.predictions, tuple) else output.predictions
    return classification_report(output.label_ids, logits.argmax(axis=-1), labels)


def _lm_scores(trainer: "Trainer", dataset, prefix: str) -> dict:
    """Mean token loss and perplexity of ``dataset``."""
    from lora_edge.core.metrics import perplexity

    loss = float(trainer.evaluate(dataset, metric_key_prefix=prefix)[f"{prefix}_loss"])
    return {"examples": len(dataset), "loss": loss, "perplexity": perplexity(loss)}


def _answer_scores(peft_model, tokenizer, examples: list[Example], shown: int = 5) -> dict:
    """Greedy answers to the held-out chats, scored by exact match with the adapter and without it (the base).

    The answer budget is the longest reference answer plus chat.ANSWER_SLACK_TOKENS, so a
    model that does not stop is cut off rather than left to run.
    """
    from lora_edge.core.chat import answer_budget, answer_scores, greedy_answers

    prompts = [ex.messages[:-1] for ex in examples]
    references = [ex.messages[-1][1] for ex in examples]
    budget = answer_budget(tokenizer, references)
    peft_model.eval()
    answers = greedy_answers(peft_model, tokenizer, prompts, budget)
    with peft_model.disable_adapter():
        base_answers = greedy_answers(peft_model, tokenizer, prompts, budget)
    base = answer_scores(base_answers, references)
    samples = [{"utterance": ex.text, "answer": answer, "base_answer": base_answer, "reference": reference}
               for ex, answer, base_answer, reference in zip(examples, answers, base_answers, references)][:shown]
    return {**answer_scores(answers, references), "base_exact_match": base["exact_match"], "base": base,
            "max_new_tokens": budget, "samples": samples}


def _check_finite(history: list[dict]) -> None:
    for entry in history:
        loss = entry.get("loss")
        if loss is not None and not math.isfinite(loss):
            raise TrainingError(f"the training loss became {loss} at step {entry.get('step')}", "--lr",
                                "lower the learning rate (or the LoRA alpha) and train again")


def _trainer(peft_model, tokenizer, datasets: dict, task: Task, chat: bool, label_map: LabelMap | None, args,
             progress: bool):
    """A Trainer for ``task``: the collator of its batches, accuracy and macro-F1 for classifiers, our progress."""
    from transformers import (DataCollatorForLanguageModeling, DataCollatorForSeq2Seq, DataCollatorWithPadding,
                              PrinterCallback, ProgressCallback, Trainer)

    collator = (DataCollatorWithPadding(tokenizer) if task is Task.SEQ_CLS
                else DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=IGNORE_INDEX) if chat
                else DataCollatorForLanguageModeling(tokenizer, mlm=False))

    def compute_metrics(prediction) -> dict:
        from lora_edge.core.metrics import accuracy, macro_f1

        logits = prediction.predictions[0] if isinstance(prediction.predictions, tuple) else prediction.predictions
        predicted = logits.argmax(axis=-1)
        return {"accuracy": accuracy(prediction.label_ids, predicted),
                "macro_f1": macro_f1(prediction.label_ids, predicted, len(label_map.labels))}

    with quiet_transformers():
        trainer = Trainer(model=peft_model, args=args, data_collator=collator, train_dataset=datasets["train"],
                          eval_dataset=datasets["validation"], processing_class=tokenizer,
                          compute_metrics=compute_metrics if task is Task.SEQ_CLS else None)
    trainer.remove_callback(PrinterCallback)
    if progress:
        trainer.remove_callback(ProgressCallback)
        trainer.add_callback(stderr_progress())
    return trainer


def _run_trainer(trainer, resume_from: str | None, checkpoints: Path) -> tuple[float, list[dict]]:
    """Train (from ``resume_from`` when resuming); return the seconds it took and the log history, checked finite.

    Ctrl-C is a TrainingError that says how to continue from the checkpoints.
    """
    started = time.perf_counter()
    try:
        with quiet_transformers():
            trainer.train(resume_from_checkpoint=resume_from)
    except KeyboardInterrupt:
        raise TrainingError("training was interrupted", checkpoints,
                            "re-run the same command with --resume to continue") from None
    history = list(trainer.state.log_history)
    _check_finite(history)
    return time.perf_counter() - started, history


def _train_facts(trainer, examples: int, seconds: float, history: list[dict], trainable: int) -> dict:
    """The ``train`` section of metrics.json: size, steps, time, parallelism, final loss."""
    import torch

    return {"examples": examples, "steps": trainer.state.global_step, "epochs": trainer.state.epoch,
            "seconds": round(seconds, 2), "world_size": trainer.args.world_size, "threads": torch.get_num_threads(),
            "final_loss": next((e["loss"] for e in reversed(history) if "loss" in e), None),
            "trainable_params": trainable}


def _lora_model(model_path: Path, task: Task, label_map, quantized, lora: LoraSpec, spec: TrainSpec, record: dict,
                progress: bool):
    """The base model (fake-quantized when trained against a quantized base) with fresh or initial LoRA weights."""
    from transformers import set_seed

    with quiet_transformers(progress_bars=progress):  # a new task head is always "missing" from the checkpoint
        base = load_base_model(model_path, task, labels=list(label_map.labels) if label_map else None)
    if quantized is not None:  # once, before LoRA: the frozen base is what the int4 graph will hold
        from lora_edge.core.fake_quant import fake_quantize_base

        record["quantized_base_weights"] = fake_quantize_base(base, quantized)
    set_seed(spec.seed)  # LoRA initialisation draws from the global RNG
    with quiet_transformers():
        peft_model = _peft_model(base, task, lora)
    if spec.init_adapter:
        _load_initial_adapter(peft_model, Path(spec.init_adapter))
    return peft_model


def _held_out_scores(trainer, peft_model, tokenizer, datasets: dict, splits: dict, task: Task, label_map,
                     chat: bool) -> dict:
    """Validation and test scores: classification metrics, or perplexity (+ exact match of chat answers)."""
    if task is Task.SEQ_CLS:
        return {name: _classification_scores(trainer, datasets[name], list(label_map.labels))
                for name in ("validation", "test")}
    scores = {name: _lm_scores(trainer, datasets[name], name) for name in ("validation", "test")}
    if chat and trainer.is_world_process_zero():
        scores["test"].update(_answer_scores(peft_model, tokenizer, splits["test"]))
    return scores


def train_adapter(model: str | Path, data: DataFiles, out: Path, task: Task | str = Task.SEQ_CLS,
                  lora: LoraSpec | None = None, spec: TrainSpec | None = None, resume: bool = False,
                  force: bool = False, progress: bool = True) -> TrainResult:
    """Train a LoRA adapter of ``model`` on ``data`` and write it, with its metrics, to ``out``.

    ``model`` is a local model directory or ``"default"``; ``task`` is seq-cls or
    causal-lm. Raises DataError (bad/empty/single-class data), ConfigError (bad
    targets), BundleError (``out`` exists without ``force``), TrainingError
    (nothing to resume, diverged loss). Under ``torchrun`` every rank trains
    and only the main process writes ``out``.
    """
    task, lora, spec, out = Task.parse(task), lora or LoraSpec(), spec or TrainSpec(), Path(out)
    _check_pissa(lora)
    quantized = base_quantization(spec, task)
    _check_init_adapter(spec)
    model_path = resolve_model_path(model)
    splits = data.load(task)
    label_map = _check_splits(splits, data, task)
    resume_from = prepare_output(out, resume, force)
    checkpoints = checkpoint_dir(out)
    record = run_record(model_path, task, lora, spec, data)
    if resume_from:
        check_resume(checkpoints, record)

    # Inputs are checked: now the heavy loads (bad input fails fast, without loading torch).
    tokenizer = load_tokenizer(model_path)
    chat = splits["train"][0].messages is not None
    if chat:
        require_chat_template(tokenizer, model_path)
        tokenizer.padding_side = "right"  # training batches; greedy answers pad on the left
    peft_model = _lora_model(model_path, task, label_map, quantized, lora, spec, record, progress)
    datasets = {name: EncodedDataset.build(tokenizer, examples, label_map, spec.max_length)
                for name, examples in splits.items()}
    trainer = _trainer(peft_model, tokenizer, datasets, task, chat, label_map,
                       _training_arguments(spec, checkpoints, len(datasets["train"]), progress), progress)
    main = trainer.is_world_process_zero()
    if main:
        checkpoints.mkdir(parents=True, exist_ok=True)
        write_json(checkpoints / RUN_RECORD, record)
        if lora.init.value == "pissa" and not (checkpoints / PISSA_INIT_DIR).exists():
            peft_model.save_pretrained(str(checkpoints / PISSA_INIT_DIR))

    train_seconds, history = _run_trainer(trainer, resume_from, checkpoints)
    scores = _held_out_scores(trainer, peft_model, tokenizer, datasets, splits, task, label_map, chat)
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    metrics = {"task": task.value, "labels": list(label_map.labels) if label_map else None, **scores,
               "train": _train_facts(trainer, len(datasets["train"]), train_seconds, history, trainable),
               **record, "libraries": library_versions(), "history": history}
    result = TrainResult(out, task, metrics, trainable, 0, train_seconds, trainer.state.global_step, main)
    if main:
        result.adapter_bytes = _write_outputs(out, peft_model, label_map, data, metrics, checkpoints, lora,
                                              force=force or resume, quantized=quantized)
        shutil.rmtree(checkpoints, ignore_errors=True)
    return result


def _write_outputs(out: Path, peft_model, label_map: LabelMap | None, data: DataFiles, metrics: dict,
                   checkpoints: Path, lora: LoraSpec, force: bool, quantized=None) -> int:
    """Write the adapter directory atomically; return the size of the adapter weights in bytes.

    An adapter trained against a quantized base records it in its weights file's metadata
    (:func:`lora_edge.core.fake_quant.write_base_quantization`), so export and check know.
    """
    conversion = {}
    if lora.init.value == "pissa":
        # PiSSA changes the base weights; convert to a plain LoRA adapter of the original base model.
        conversion = {"path_initial_model_for_weight_conversion": str(checkpoints / PISSA_INIT_DIR)}
    with atomic_directory(out, force=force) as staging, warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="PiSSA changes the base weights")  # we convert, as it advises
        peft_model.save_pretrained(str(staging), safe_serialization=True, **conversion)
        if conversion:
            _restore_saved_modules(peft_model, staging / ADAPTER_WEIGHTS)
        if quantized is not None:
            from lora_edge.core.fake_quant import write_base_quantization

            write_base_quantization(staging, quantized)
        if label_map is not None:
            label_map.save(staging)
        write_json(staging / DATA_RECORD, data.to_json())
        write_json(staging / METRICS_FILE, metrics)
        from lora_edge.train.adapter_card import write_adapter_card
        write_adapter_card(staging, metrics)  # a portable base model name and a real README.md
        plot_training(metrics, staging / TRAINING_PLOT)
    return (out / ADAPTER_WEIGHTS).stat().st_size


def _restore_saved_modules(peft_model, weights_path: Path) -> None:
    """Put the modules_to_save tensors (the head) back: PEFT's PiSSA->LoRA conversion keeps only LoRA pairs."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import load_file, save_file

    saved = load_file(str(weights_path))
    missing = {key: tensor.detach().contiguous() for key, tensor in get_peft_model_state_dict(peft_model).items()
               if ".lora_" not in key and key not in saved}
    if missing:
        save_file({**saved, **missing}, str(weights_path), metadata={"format": "pt"})


def load_metrics(adapter_dir: Path) -> dict:
    """Read an adapter directory's metrics.json (written by :func:`train_adapter`)."""
    path = Path(adapter_dir) / METRICS_FILE
    if not path.is_file():
        raise DataError(f"no {METRICS_FILE} in '{adapter_dir}'", adapter_dir,
                        "point at a directory written by lora-edge train")
    return json.loads(path.read_text())
