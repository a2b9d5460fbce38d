"""Datasets: JSONL, CSV and plain-text files, label maps, seeded splits, tokenized batches.

Classification rows are ``{"text": ..., "label": ...}`` (JSONL) or a CSV with
``text`` and ``label`` columns; causal-LM rows are ``{"text": ...}``, one
document per line of a ``.txt`` file, or chat rows ``{"messages": [{"role": ...,
"content": ...}, ...]}`` whose last message is the assistant's answer (rendered
with the model's chat template; see :mod:`lora_edge.core.chat`). A bad row raises a :class:`DataError`
naming the file and the line.
"""

from __future__ import annotations

import csv
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterable

from lora_edge.core.errors import DataError
from lora_edge.core.choices import SHIPPED_CHAT_DATA, SHIPPED_DATA_NAMES, Task

if TYPE_CHECKING:
    import torch

LABEL_MAP_FILE = "label_map.json"
SPLIT_NAMES = ("train", "validation", "test")

DEFAULT_MAX_LENGTH = 128  # tokens a text is cut to where no setting says otherwise (infer, export samples, calibration)


@dataclass(frozen=True)
class Example:
    """One utterance (and its label name, for classification), or one chat (causal LM).

    A chat example keeps its ``(role, content)`` messages; its ``text`` is the last user message,
    so splitting and de-duplication work on the utterance.
    """

    text: str
    label: str | None = None
    messages: tuple[tuple[str, str], ...] | None = None


@dataclass(frozen=True)
class LabelMap:
    """Ordered label names; the position of a name is its class id."""

    labels: tuple[str, ...]

    @classmethod
    def from_examples(cls, examples: Iterable[Example]) -> "LabelMap":
        """Collect the sorted set of label names used by ``examples``."""
        return cls(tuple(sorted({ex.label for ex in examples if ex.label is not None})))

    def id_of(self, label: str) -> int:
        """Class id of a label name."""
        return self.labels.index(label)

    def to_json(self) -> dict:
        """JSON form: ``{"labels": [...], "id2label": {...}, "label2id": {...}}``."""
        return {"labels": list(self.labels),
                "id2label": {str(i): name for i, name in enumerate(self.labels)},
                "label2id": {name: i for i, name in enumerate(self.labels)}}

    def save(self, directory: Path) -> Path:
        """Write ``label_map.json`` into ``directory``."""
        path = directory / LABEL_MAP_FILE
        path.write_text(json.dumps(self.to_json(), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, directory: Path) -> "LabelMap | None":
        """Read ``label_map.json`` from ``directory``; None when there is none."""
        path = directory / LABEL_MAP_FILE
        if not path.is_file():
            return None
        try:
            return cls(tuple(json.loads(path.read_text())["labels"]))
        except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as exc:
            raise DataError("label map is not valid JSON with a 'labels' list", path,
                            "re-run lora-edge train or fix the file") from exc


def _row_error(path: Path, line: int, what: str, fix: str) -> DataError:
    return DataError(what, f"{path}:{line}", fix)


def _chat_example(path: Path, line: int, messages, task: Task) -> Example:
    """A chat row: a list of {role, content} strings ending with the assistant's answer, after a user turn."""
    if task is not Task.CAUSAL_LM:
        raise _row_error(path, line, "chat rows (messages) are a causal-lm task", "pass --task causal-lm")
    good = isinstance(messages, list) and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
        for m in messages)
    if not good or len(messages) < 2:
        raise _row_error(path, line, "'messages' is not a list of {role, content} strings",
                         'write {"messages": [{"role": "user", "content": ...}, {"role": "assistant", ...}]}')
    users = [m["content"] for m in messages[:-1] if m["role"] == "user"]
    if messages[-1]["role"] != "assistant" or not users or not messages[-1]["content"].strip():
        raise _row_error(path, line, "a chat row must end with a non-empty assistant answer after a user message",
                         "put the answer to train on last, with role 'assistant'")
    return Example(users[-1], messages=tuple((m["role"], m["content"]) for m in messages))


def _check_row(path: Path, line: int, row: dict, task: Task) -> Example:
    if "messages" in row:
        return _chat_example(path, line, row["messages"], task)
    text = row.get("text")
    if not isinstance(text, str) or not text.strip():
        raise _row_error(path, line, "row has no non-empty 'text' field", "give every row a 'text' string")
    if task is Task.CAUSAL_LM:
        return Example(text)
    label = row.get("label")
    if label is None or (isinstance(label, str) and not label.strip()):
        raise _row_error(path, line, "row has no 'label' field", "give every row a 'label' (a class name)")
    return Example(text.strip(), str(label).strip())


def read_examples(path: str | Path, task: Task) -> list[Example]:
    """Read a JSONL, CSV or (causal LM only) plain-text file into examples.

    Raises DataError for a missing file, an unknown extension, a bad row
    (naming the line), or a file without rows.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file '{path}' does not exist", "--data", "give an existing .jsonl, .csv or .txt file")
    try:
        examples = _read_rows(path, task)
    except UnicodeDecodeError as exc:
        raise DataError(f"file is not UTF-8 text (byte {exc.start} cannot be decoded)", path,
                        "save the file as UTF-8") from None
    if not examples:
        raise DataError("data file holds no rows", path, "add examples to the file")
    return examples


def _read_rows(path: Path, task: Task) -> list[Example]:
    """The examples of a .jsonl/.json, .csv or .txt file (DataError for a bad row or type)."""
    suffix = path.suffix.lower()
    examples: list[Example] = []
    if suffix in (".jsonl", ".json"):
        with open(path, encoding="utf-8") as handle:
            for line_no, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise _row_error(path, line_no, f"line is not valid JSON ({exc.msg})",
                                     "write one JSON object per line") from None
                if not isinstance(row, dict):
                    raise _row_error(path, line_no, "line is not a JSON object", 'write {"text": ..., "label": ...}')
                examples.append(_check_row(path, line_no, row, task))
    elif suffix == ".csv":
        with open(path, encoding="utf-8", newline="") as handle:
            reader = csv.DictReader(handle)
            needed = {"text"} if task is Task.CAUSAL_LM else {"text", "label"}
            missing = needed - set(reader.fieldnames or [])
            if missing:
                raise DataError(f"CSV header lacks column(s) {', '.join(sorted(missing))}", f"{path}:1",
                                "add a header row naming the text and label columns")
            for row in reader:
                examples.append(_check_row(path, reader.line_num, row, task))
    elif suffix == ".txt":
        if task is not Task.CAUSAL_LM:
            raise DataError("plain-text files carry no labels", path,
                            "use JSONL or CSV with a label column for seq-cls, or --task causal-lm")
        with open(path, encoding="utf-8") as handle:
            examples = [Example(line.rstrip("\n")) for line in handle if line.strip()]
    else:
        raise DataError(f"unknown data file type '{suffix}'", path, "use .jsonl, .csv or .txt")
    return examples


def check_classification_set(examples: list[Example], path: str | Path) -> None:
    """Refuse a classification set with fewer than two classes."""
    labels = {ex.label for ex in examples}
    if len(labels) < 2:
        raise DataError(f"data set has {len(labels)} class(es); classification needs at least 2", path,
                        "add examples of other labels")


def split_examples(examples: list[Example], fractions: tuple[float, float, float],
                   seed: int) -> dict[str, list[Example]]:
    """Shuffle with ``seed`` and cut into train/validation/test by ``fractions``.

    Identical texts always land in the same split, so no two splits share an utterance.
    """
    texts = sorted({ex.text for ex in examples})
    random.Random(seed).shuffle(texts)
    n_val = int(round(len(texts) * fractions[1]))
    n_test = int(round(len(texts) * fractions[2]))
    bucket = {}
    for i, text in enumerate(texts):
        bucket[text] = "validation" if i < n_val else "test" if i < n_val + n_test else "train"
    splits: dict[str, list[Example]] = {name: [] for name in SPLIT_NAMES}
    for ex in examples:
        splits[bucket[ex.text]].append(ex)
    return splits


@dataclass
class DataFiles:
    """Where a data set came from: one file per split, or one file split by seed."""

    train: Path
    validation: Path | None = None
    test: Path | None = None
    split_fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)
    seed: int = 0
    files: dict = field(init=False)

    def __post_init__(self):
        self.files = {"train": self.train, "validation": self.validation, "test": self.test}

    def to_json(self) -> dict:
        """Record of the files (absolute paths) for manifests and metrics."""
        return {"train": str(Path(self.train).resolve()),
                "validation": str(Path(self.validation).resolve()) if self.validation else None,
                "test": str(Path(self.test).resolve()) if self.test else None,
                "split_fractions": list(self.split_fractions), "seed": self.seed}

    @classmethod
    def from_json(cls, record: dict) -> "DataFiles":
        """Inverse of :meth:`to_json`."""
        return cls(Path(record["train"]),
                   Path(record["validation"]) if record.get("validation") else None,
                   Path(record["test"]) if record.get("test") else None,
                   tuple(record.get("split_fractions", (0.8, 0.1, 0.1))), int(record.get("seed", 0)))

    def load(self, task: Task) -> dict[str, list[Example]]:
        """Read the splits; missing validation/test splits are cut from train by seed."""
        train = read_examples(self.train, task)
        splits = {"train": train}
        if self.validation is None or self.test is None:
            cut = split_examples(train, self.split_fractions, self.seed)
            splits["train"] = cut["train"]
            splits["validation"] = read_examples(self.validation, task) if self.validation else cut["validation"]
            splits["test"] = read_examples(self.test, task) if self.test else cut["test"]
        else:
            splits["validation"] = read_examples(self.validation, task)
            splits["test"] = read_examples(self.test, task)
        if task is Task.SEQ_CLS:
            check_classification_set(splits["train"], self.train)
        return splits


def default_intent_files() -> DataFiles:
    """The shipped voice-assistant intent task (train/validation/test JSONL files)."""
    root = Path(__file__).resolve().parents[1] / "resources" / "intent"
    return DataFiles(root / "train.jsonl", root / "validation.jsonl", root / "test.jsonl")


def command_files() -> DataFiles:
    """The shipped command-parsing chat task (causal LM): utterance -> one-line JSON action."""
    root = Path(__file__).resolve().parents[1] / "resources" / "commands"
    return DataFiles(root / "train.jsonl", root / "validation.jsonl", root / "test.jsonl")




def resolve_data_files(data: str | Path, validation: str | Path | None = None, test: str | Path | None = None,
                       seed: int = 0) -> DataFiles:
    """``--data FILE [--validation FILE] [--test FILE]``, ``default``/``intent`` or ``commands`` for a shipped task.

    Splits without a file are cut from ``data`` by ``seed``. The shipped tasks have
    their own fixed splits, so they take no --validation/--test.
    """
    if str(data) in SHIPPED_DATA_NAMES + (SHIPPED_CHAT_DATA,):
        if validation or test:
            raise DataError(f"--validation/--test go with a --data file, not the shipped '{data}' task",
                            "--data", "give --data FILE, or drop --validation/--test")
        return command_files() if str(data) == SHIPPED_CHAT_DATA else default_intent_files()
    return DataFiles(Path(data), Path(validation) if validation else None, Path(test) if test else None,
                     seed=seed)


def encode_texts(tokenizer, texts: list[str], max_length: int, padding: str | bool = "longest",
                 tensors: str = "pt") -> dict:
    """Tokenize ``texts`` into a dict of tensors (input_ids, attention_mask, ...): torch ("pt") or numpy ("np")."""
    return dict(tokenizer(list(texts), padding=padding, truncation=True, max_length=max_length,
                          return_tensors=tensors))


def calibration_batches(tokenizer, texts: list[str], batch_size: int = 8, max_length: int = DEFAULT_MAX_LENGTH, *,
                        limit: int) -> list[dict[str, "torch.Tensor"]]:
    """Up to ``limit`` texts (``QuantizeOptions.calib_size``) tokenized into batches, for static calibration."""
    texts = list(texts)[:limit]
    return [encode_texts(tokenizer, texts[i:i + batch_size], max_length)
            for i in range(0, len(texts), batch_size)]
