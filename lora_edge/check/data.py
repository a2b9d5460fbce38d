"""The accuracy gate's evaluation sets: given data, the adapter's recorded test split, or generated inputs."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lora_edge.core.data import DataFiles, read_examples
from lora_edge.core.errors import DataError
from lora_edge.core.manifest import AdapterRecord
from lora_edge.core.choices import Task
from lora_edge.core.recipe import CheckSpec


@dataclass
class EvalSet:
    """The texts a check runs on, where they came from, and the labels (class ids) when there are any."""

    texts: list[str]
    source: str
    labels: list[int] | None = None
    n_classes: int = 0
    task_skip_reason: str = ""  # why the task metric cannot run ("" = it can)
    prompts: list[list[int]] | None = None  # causal LM: token ids each graph and the reference continue greedily
    answers: list[str] | None = None  # causal LM on chat data: the expected answer to each prompt


def generated_texts(tokenizer, count: int, seed: int, max_tokens: int = 48) -> list[str]:
    """``count`` random texts made of the tokenizer's own (non-special) tokens, lengths 4..max_tokens."""
    rng = np.random.default_rng(seed)
    vocab = tokenizer.get_vocab()
    special = set(tokenizer.all_special_ids)
    usable = np.array(sorted(i for token, i in vocab.items()
                             if i not in special and not (token.startswith("[") and token.endswith("]"))
                             and not (token.startswith("<") and token.endswith(">"))))
    texts = []
    for _ in range(count):
        ids = rng.choice(usable, size=int(rng.integers(4, max(5, max_tokens))))
        texts.append(tokenizer.decode(ids.tolist(), skip_special_tokens=True).strip() or "hello")
    return texts


def _causal_lm(examples, source: str, tokenizer) -> EvalSet:
    """Chat rows: the rendered chats, their prompts and expected answers; text rows: each text's first half as prompt."""
    from lora_edge.core.chat import prompt_ids, render_chat, require_chat_template

    if examples and all(ex.messages for ex in examples):
        require_chat_template(tokenizer, source)
        return EvalSet([render_chat(tokenizer, ex.messages) for ex in examples], source,
                       prompts=[prompt_ids(tokenizer, ex.messages[:-1]) for ex in examples],
                       answers=[ex.messages[-1][1] for ex in examples])
    return _with_text_prompts(EvalSet([ex.text for ex in examples], source), tokenizer)


def _with_text_prompts(evalset: EvalSet, tokenizer) -> EvalSet:
    """Plain texts: the first half of each text's tokens is a prompt to continue (texts of two tokens or more)."""
    encoded = [tokenizer(text)["input_ids"] for text in evalset.texts]
    evalset.prompts = [ids[:len(ids) // 2] for ids in encoded if len(ids) >= 2]
    return evalset


def _labeled(examples, labels: list[str] | None, source: str, task: str, tokenizer) -> EvalSet:
    if task == Task.CAUSAL_LM.value:
        return _causal_lm(examples, source, tokenizer)
    texts = [ex.text for ex in examples]
    if not labels:
        return EvalSet(texts, source, task_skip_reason="the adapter records no label names")
    unknown = sorted({ex.label for ex in examples} - set(labels))
    if unknown:  # scoring them would be meaningless, and skipping the metric would pass the gate silently
        shown = ", ".join(f"'{label}'" for label in unknown[:3]) + (" ..." if len(unknown) > 3 else "")
        raise DataError(f"{len(unknown)} label(s) are not in the bundle's label map ({shown})", source,
                        f"use data labeled with: {', '.join(labels[:10])}{' ...' if len(labels) > 10 else ''}")
    return EvalSet(texts, source, [labels.index(ex.label) for ex in examples], len(labels))


def eval_set(spec: CheckSpec, adapter: AdapterRecord, task: Task, tokenizer) -> EvalSet:
    """The evaluation set of one adapter: --data, else its recorded test split, else generated inputs."""
    labels = adapter.labels
    if spec.data:
        evalset = _labeled(read_examples(spec.data, task), labels, f"--data {spec.data}", task, tokenizer)
    else:
        reason = "no data was given and the adapter records none"
        evalset = None
        if adapter.data:
            files = DataFiles.from_json(adapter.data)
            try:
                test = files.load(task)["test"]
                evalset = _labeled(test, labels, f"test split {files.test or files.train}", task, tokenizer)
            except DataError as exc:
                reason = f"the recorded data cannot be read ({exc.format_message()})"
        if evalset is None:
            texts = generated_texts(tokenizer, spec.generated_examples, spec.seed, min(48, spec.max_length - 2))
            evalset = EvalSet(texts, f"{len(texts)} generated inputs ({reason})",
                              task_skip_reason=f"no labeled data: {reason}; give --data FILE")
            if task == Task.CAUSAL_LM.value:
                evalset = _with_text_prompts(evalset, tokenizer)
    if spec.max_examples and len(evalset.texts) > spec.max_examples:
        evalset.texts = evalset.texts[:spec.max_examples]
        evalset.labels = evalset.labels[:spec.max_examples] if evalset.labels is not None else None
        evalset.prompts = evalset.prompts[:spec.max_examples] if evalset.prompts is not None else None
        evalset.answers = evalset.answers[:spec.max_examples] if evalset.answers is not None else None
    return evalset
