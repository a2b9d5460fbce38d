"""The command-parsing chat task: chat rows, answer-only labels, greedy answers, exact match, training."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from gguf_helpers import byte_vocab, tiny_llama, write_gguf

from lora_edge.core.chat import IGNORE_INDEX, answer_scores, encode_chat, exact_match, greedy_answers, prompt_ids
from lora_edge.core.data import command_files, read_examples
from lora_edge.core.errors import DataError
from lora_edge.core.choices import Task


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory) -> Path:
    """A tiny llama with a byte-level tokenizer and a ChatML template, converted from its GGUF."""
    from lora_edge.core.gguf import convert_gguf

    root = tmp_path_factory.mktemp("chat")
    model = tiny_llama(root / "hf", len(byte_vocab()))
    convert_gguf(write_gguf(model, root / "tiny.gguf"), root / "model")
    return root / "model"


@pytest.fixture(scope="module")
def tokenizer(chat_model):
    from lora_edge.core.models import load_tokenizer

    return load_tokenizer(chat_model)


def _commands(split: str, n: int):
    return read_examples(command_files().files[split], Task.CAUSAL_LM)[:n]


def test_labels_cover_the_answer_tokens_only(chat_model, tokenizer):
    import torch
    from transformers import AutoModelForCausalLM, DataCollatorForSeq2Seq

    first, second = _commands("test", 2)
    row = encode_chat(tokenizer, first.messages, 1024)
    ids, labels = row["input_ids"], row["labels"]
    prompt = prompt_ids(tokenizer, first.messages[:-1])  # what generation is fed
    n = len(prompt)
    assert ids[:n] == prompt and len(ids) > n
    for i, (token, label) in enumerate(zip(ids, labels)):
        assert label == (IGNORE_INDEX if i < n else token), i
    assert tokenizer.decode(ids[n:]) == first.messages[-1][1] + "<|im_end|>\n"

    batch = DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=IGNORE_INDEX)(
        [row, encode_chat(tokenizer, second.messages, 1024)])
    short = int(batch["attention_mask"][1].sum())
    assert (batch["labels"][1, short:] == IGNORE_INDEX).all() and batch["labels"].shape == batch["input_ids"].shape
    model = AutoModelForCausalLM.from_pretrained(chat_model, local_files_only=True).eval()
    with torch.no_grad():  # the model's loss is the mean cross-entropy over the answer tokens alone
        out = model(input_ids=torch.tensor([ids]), labels=torch.tensor([labels]))
        manual = torch.nn.functional.cross_entropy(out.logits[0, n - 1:-1], torch.tensor(ids[n:]))
    assert torch.allclose(out.loss, manual, rtol=1e-5)


def test_a_prompt_longer_than_max_length_is_refused(tokenizer):
    with pytest.raises(DataError, match="no room for its answer"):
        encode_chat(tokenizer, _commands("test", 1)[0].messages, 32)


def test_greedy_answers_do_not_depend_on_padding(chat_model, tokenizer):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(chat_model, local_files_only=True).eval()
    prompts = [ex.messages[:-1] for ex in _commands("test", 3)]
    batched = greedy_answers(model, tokenizer, prompts, max_new_tokens=6, batch_size=3)
    assert batched == greedy_answers(model, tokenizer, prompts, max_new_tokens=6, batch_size=1)
    ids = torch.tensor([prompt_ids(tokenizer, prompts[1])])
    with torch.no_grad():  # a plain argmax loop without cache or padding
        for _ in range(6):
            ids = torch.cat([ids, model(ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    start = len(prompt_ids(tokenizer, prompts[1]))
    assert batched[1] == tokenizer.decode(ids[0, start:], skip_special_tokens=True).strip()


def test_exact_match_compares_parsed_json():
    reference = '{"intent": "set_timer", "slots": {"duration": "5 minutes", "item": "eggs"}}'
    assert exact_match('{"slots": {"item": "eggs", "duration": "5 minutes"}, "intent": "set_timer"}', reference)
    assert exact_match(' {"intent":"set_timer","slots":{"duration":"5 minutes","item":"eggs"}}\n', reference)
    assert not exact_match('{"intent": "set_timer", "slots": {"duration": "5 minutes"}}', reference)
    assert not exact_match('{"intent": "set_timer", "slots": {"duration": "5 minutes", "item": "eggs"}', reference)
    assert exact_match(" Paris. ", "Paris.") and not exact_match("paris.", "Paris.")
    scores = answer_scores(['{"intent": "set_timer", "slots": {}}', "nonsense"], [reference, reference])
    assert scores == {"exact_match": 0.0, "valid_json": 0.5, "intent_accuracy": 0.5, "answers": 2}


def test_shipped_command_rows_are_chats_with_json_answers():
    splits = command_files().load(Task.CAUSAL_LM)
    assert {name: len(rows) for name, rows in splits.items()} == {"train": 1770, "validation": 100, "test": 100}
    texts = {name: {ex.text for ex in rows} for name, rows in splits.items()}
    assert not texts["train"] & texts["test"] and not texts["train"] & texts["validation"]
    for ex in splits["test"]:
        assert [role for role, _ in ex.messages] == ["system", "user", "assistant"] and ex.text == ex.messages[1][1]
        answer = json.loads(ex.messages[-1][1])
        assert set(answer) == {"intent", "slots"} and all(isinstance(v, str) for v in answer["slots"].values())


@pytest.mark.parametrize("row, message", [
    ({"messages": [{"role": "user", "content": "hi"}]}, "not a list of"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "user", "content": "again"}]}, "must end with"),
    ({"messages": "hi"}, "not a list of"),
])
def test_bad_chat_rows_name_their_line(tmp_path, row, message):
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"text": "a plain row"}) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(DataError, match=message) as caught:
        read_examples(path, Task.CAUSAL_LM)
    assert f"{path}:2" in str(caught.value)
    with pytest.raises(DataError, match="causal-lm"):
        read_examples(command_files().test, Task.SEQ_CLS)


def test_training_on_chat_rows_reports_exact_match(chat_model, tmp_path):
    from lora_edge.core.data import DataFiles
    from lora_edge.core.recipe import LoraSpec, TrainSpec
    from lora_edge.train.trainer import train_adapter

    files = {}
    for split, n in (("train", 8), ("validation", 4), ("test", 4)):
        files[split] = tmp_path / f"{split}.jsonl"
        files[split].write_text("".join(line + "\n" for line in
                                        command_files().files[split].read_text().splitlines()[:n]))
    result = train_adapter(chat_model, DataFiles(files["train"], files["validation"], files["test"]),
                           tmp_path / "adapter", Task.CAUSAL_LM, LoraSpec(rank=4, targets="all-linear"),
                           TrainSpec(max_steps=2, batch_size=4, max_length=512), progress=False)
    test = json.loads((tmp_path / "adapter" / "metrics.json").read_text())["test"]
    assert test["answers"] == 4 and 0.0 <= test["exact_match"] <= 1.0 and 0.0 <= test["base_exact_match"] <= 1.0
    assert test["perplexity"] == pytest.approx(math.exp(test["loss"]))
    assert len(test["samples"]) == 4 and all(s["reference"].startswith('{"intent"') for s in test["samples"])
    assert result.summary()["test_exact_match"] == test["exact_match"]


def test_command_generator_reproduces_the_committed_files(tmp_path):
    import subprocess
    import sys

    script = Path(__file__).resolve().parents[2] / "scripts" / "make_command_data.py"
    subprocess.run([sys.executable, str(script), "--out", str(tmp_path)], check=True, capture_output=True)
    for split, path in command_files().files.items():
        assert (tmp_path / f"{split}.jsonl").read_bytes() == path.read_bytes(), f"{split}.jsonl differs"
