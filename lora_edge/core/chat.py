"""Chat rows for causal-LM training: the model's chat template, answer-only labels, greedy answers, exact match.

A chat example is a list of ``(role, content)`` messages whose last message is
the assistant's answer. It is encoded the way generation will see it: the
prompt (every message but the last, rendered by the tokenizer's chat template
with the generation prompt) as token ids, then the answer's tokens (the rest of
the rendered chat, end-of-turn token included, so the model learns to stop).
Labels are -100 on every prompt token: the loss, and the perplexity reported
from it, cover the answer tokens only.

Exact match (:func:`exact_match`): when the reference answer is JSON, the
generated answer matches if it parses as JSON to an equal value (key order and
spacing do not matter); otherwise the two strings must be equal after
stripping surrounding whitespace.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from lora_edge.core.errors import DataError, ModelError

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

Messages = Sequence[tuple[str, str]]  # (role, content) pairs
IGNORE_INDEX = -100  # label value PyTorch's cross-entropy skips


ANSWER_SLACK_TOKENS = 8  # greedy answers may run this many tokens past the longest reference answer


def answer_budget(tokenizer: "PreTrainedTokenizerBase", answers: Sequence[str]) -> int:
    """New tokens a greedy answer may take: the longest expected answer plus ANSWER_SLACK_TOKENS."""
    return ANSWER_SLACK_TOKENS + max(len(tokenizer(text, add_special_tokens=False)["input_ids"]) for text in answers)


def require_chat_template(tokenizer: "PreTrainedTokenizerBase", where: str | Path) -> None:
    """Refuse a tokenizer without a chat template: chat rows cannot be rendered for this model."""
    if not getattr(tokenizer, "chat_template", None):
        raise ModelError("the model's tokenizer has no chat template, so chat rows cannot be rendered", where,
                         "use a chat/instruct model (e.g. `lora-edge models pull smollm2`) or plain {\"text\": ...} rows")


def _as_dicts(messages: Messages) -> list[dict]:
    return [{"role": role, "content": content} for role, content in messages]


def render_chat(tokenizer: "PreTrainedTokenizerBase", messages: Messages) -> str:
    """The whole chat (answer included) as the model's chat template writes it."""
    return tokenizer.apply_chat_template(_as_dicts(messages), tokenize=False)


def prompt_ids(tokenizer: "PreTrainedTokenizerBase", messages: Messages) -> list[int]:
    """Token ids of the chat template applied to ``messages`` plus the assistant's generation prompt."""
    text = tokenizer.apply_chat_template(_as_dicts(messages), add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def encode_chat(tokenizer: "PreTrainedTokenizerBase", messages: Messages, max_length: int) -> dict:
    """``input_ids``, ``attention_mask`` and answer-only ``labels`` of one chat, cut to ``max_length`` tokens.

    Raises DataError when the prompt alone fills ``max_length`` (no answer token would be trained).
    """
    prompt_text = tokenizer.apply_chat_template(_as_dicts(messages[:-1]), add_generation_prompt=True,
                                                tokenize=False)
    full_text = tokenizer.apply_chat_template(_as_dicts(messages), tokenize=False)
    if not full_text.startswith(prompt_text):
        raise DataError("the chat template renders the prompt differently with and without the answer",
                        "the model's chat template", "use a model whose template renders turns in order")
    prompt = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    answer = tokenizer(full_text[len(prompt_text):], add_special_tokens=False)["input_ids"]
    if len(prompt) >= max_length:
        raise DataError(f"a chat prompt has {len(prompt)} tokens, no room for its answer within --max-length "
                        f"{max_length}", "the chat rows", f"raise --max-length above {len(prompt) + len(answer)}")
    ids = (prompt + answer)[:max_length]
    labels = ([IGNORE_INDEX] * len(prompt) + answer)[:max_length]
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}


def greedy_answers(model: "PreTrainedModel", tokenizer: "PreTrainedTokenizerBase", prompts: list[Messages],
                   max_new_tokens: int, batch_size: int = 16) -> list[str]:
    """Greedy-decode the assistant's answer to each prompt (left-padded batches), special tokens dropped."""
    import torch

    answers: list[str] = []
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        for start in range(0, len(prompts), batch_size):
            batch = [prompt_ids(tokenizer, messages) for messages in prompts[start:start + batch_size]]
            padded = tokenizer.pad({"input_ids": batch}, return_tensors="pt")
            with torch.no_grad():
                output = model.generate(**padded, max_new_tokens=max_new_tokens, do_sample=False,
                                        pad_token_id=tokenizer.pad_token_id)
            new = output[:, padded["input_ids"].shape[1]:]
            answers += [text.strip() for text in tokenizer.batch_decode(new, skip_special_tokens=True)]
    finally:
        tokenizer.padding_side = side
    return answers


def _parse(text: str):
    try:
        return True, json.loads(text)
    except (json.JSONDecodeError, ValueError):
        return False, None


def exact_match(predicted: str, reference: str) -> bool:
    """Equal as parsed JSON when the reference is JSON, else equal as stripped strings."""
    ref_ok, ref_value = _parse(reference.strip())
    if not ref_ok:
        return predicted.strip() == reference.strip()
    ok, value = _parse(predicted.strip())
    return ok and value == ref_value


def answer_scores(predicted: list[str], references: list[str]) -> dict:
    """Exact match, share of answers that parse as JSON, and intent accuracy (when answers carry one)."""
    n = max(len(references), 1)
    parsed = [_parse(text.strip()) for text in predicted]
    wanted = [_parse(text.strip())[1] for text in references]
    intents = [isinstance(value, dict) and isinstance(ref, dict) and value.get("intent") == ref.get("intent")
               for (_, value), ref in zip(parsed, wanted)]
    return {"exact_match": sum(exact_match(p, r) for p, r in zip(predicted, references)) / n,
            "valid_json": sum(ok for ok, _ in parsed) / n, "intent_accuracy": sum(intents) / n,
            "answers": len(references)}
