"""The shipped intent data set (reproducible generator) and data-file handling: rows, splits, errors."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from lora_edge.core.data import (DataFiles, default_intent_files, read_examples, resolve_data_files, split_examples,
                            Example)
from lora_edge.core.errors import DataError
from lora_edge.core.choices import Task

ROOT = Path(__file__).resolve().parents[2]
INTENT_LABELS = {"set_timer", "set_alarm", "cancel_alarm", "get_weather", "play_music", "pause_music",
                 "volume_up", "volume_down", "lights_on", "lights_off", "call_contact", "send_message",
                 "navigate_to", "add_reminder", "get_time"}


def _normalise(text: str) -> str:
    sys.path.insert(0, str(ROOT / "scripts"))
    from make_intent_data import normalise

    return normalise(text)


def test_generator_reproduces_the_committed_files(tmp_path):
    subprocess.run([sys.executable, str(ROOT / "scripts" / "make_intent_data.py"), "--out", str(tmp_path)],
                   check=True, capture_output=True)
    shipped = default_intent_files()
    for split in ("train", "validation", "test"):
        committed = Path(shipped.files[split]).read_bytes()
        assert (tmp_path / f"{split}.jsonl").read_bytes() == committed, f"{split}.jsonl differs from the generator"


def test_intent_set_labels_size_and_disjoint_splits():
    splits = default_intent_files().load(Task.SEQ_CLS)
    total = sum(len(rows) for rows in splits.values())
    assert total >= 2000
    for name, rows in splits.items():
        assert {ex.label for ex in rows} == INTENT_LABELS, name
        counts = Counter(ex.label for ex in rows)
        assert max(counts.values()) - min(counts.values()) <= 2, f"{name} split is not stratified: {counts}"
    keys = {name: {_normalise(ex.text) for ex in rows} for name, rows in splits.items()}
    assert sum(len(k) for k in keys.values()) == total, "an utterance repeats (up to case/punctuation)"
    assert not keys["train"] & keys["test"] and not keys["train"] & keys["validation"]
    assert not keys["validation"] & keys["test"]
    texts = [ex.text for rows in splits.values() for ex in rows]
    assert len({t for t in texts if t[:1].isupper()}) > 200, "no casing variety"
    assert sum(t.lower().startswith(("please", "hey", "could you", "can you")) for t in texts) > 150


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize("content, line, what", [
    ('{"text": "a", "label": "x"}\n{"text": "b", "label": "y"}\n{"text": "c", "label"\n', 3, "not valid JSON"),
    ('{"text": "a", "label": "x"}\n{"text": "b"}\n', 2, "no 'label'"),
    ('{"text": "a", "label": "x"}\n\n{"text": "  ", "label": "y"}\n', 3, "no non-empty 'text'"),
    ('["a", "x"]\n', 1, "not a JSON object"),
])
def test_bad_jsonl_row_names_file_and_line(tmp_path, content, line, what):
    path = _write(tmp_path / "bad.jsonl", content)
    with pytest.raises(DataError) as error:
        read_examples(path, Task.SEQ_CLS)
    assert f"{path}:{line}" in str(error.value) and what in str(error.value)
    assert error.value.exit_code == 3


def test_csv_rows_and_missing_column(tmp_path):
    good = _write(tmp_path / "good.csv", 'text,label\n"hello, there",greet\nbye,leave\n')
    assert read_examples(good, Task.SEQ_CLS) == [Example("hello, there", "greet"), Example("bye", "leave")]
    bad = _write(tmp_path / "bad.csv", "text\nhello\n")
    with pytest.raises(DataError, match="lacks column"):
        read_examples(bad, Task.SEQ_CLS)
    row = _write(tmp_path / "row.csv", "text,label\nhello,greet\n,leave\n")
    with pytest.raises(DataError, match=f"{row}:3"):
        read_examples(row, Task.SEQ_CLS)


def test_text_file_only_for_causal_lm(tmp_path):
    path = _write(tmp_path / "corpus.txt", "first line\n\nsecond line\n")
    assert [ex.text for ex in read_examples(path, Task.CAUSAL_LM)] == ["first line", "second line"]
    with pytest.raises(DataError, match="carry no labels"):
        read_examples(path, Task.SEQ_CLS)


def test_empty_and_single_class_sets_are_refused(tmp_path):
    with pytest.raises(DataError, match="no rows"):
        read_examples(_write(tmp_path / "empty.jsonl", "\n"), Task.SEQ_CLS)
    rows = "".join(json.dumps({"text": f"utterance {i}", "label": "only"}) + "\n" for i in range(30))
    single = _write(tmp_path / "single.jsonl", rows)
    with pytest.raises(DataError, match="1 class"):
        DataFiles(single).load(Task.SEQ_CLS)


def test_seeded_split_keeps_duplicates_together_and_is_reproducible():
    examples = [Example(f"text {i % 40}", "ab"[i % 2]) for i in range(120)]  # every text appears 3 times
    first = split_examples(examples, (0.8, 0.1, 0.1), seed=3)
    assert split_examples(examples, (0.8, 0.1, 0.1), seed=3) == first
    assert split_examples(examples, (0.8, 0.1, 0.1), seed=4) != first
    texts = {name: {ex.text for ex in rows} for name, rows in first.items()}
    assert not texts["train"] & texts["validation"] and not texts["train"] & texts["test"]
    assert sum(len(rows) for rows in first.values()) == 120
    assert len(texts["validation"]) == 4 and len(texts["test"]) == 4


def test_resolve_data_files(tmp_path):
    assert resolve_data_files("default").train == default_intent_files().train
    assert resolve_data_files("intent").test == default_intent_files().test
    with pytest.raises(DataError, match="--validation/--test"):
        resolve_data_files("default", validation=tmp_path / "v.jsonl")
    files = resolve_data_files(tmp_path / "d.jsonl", test=tmp_path / "t.jsonl", seed=7)
    assert files.validation is None and files.test == tmp_path / "t.jsonl" and files.seed == 7
    assert DataFiles.from_json(files.to_json()).to_json() == files.to_json()
