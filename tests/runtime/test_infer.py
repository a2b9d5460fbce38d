"""`lora-edge infer`: text -> label and scores through ONNX Runtime with the bundled tokenizer and label map."""

from __future__ import annotations

import json

import numpy as np
import pytest

from export_helpers import ADAPTER_NAME, feeds_for, tiny_bundle, torch_logits
from lora_edge.core.adapters import AdapterRef, load_reference
from lora_edge.core.errors import ConfigError
from lora_edge.core.choices import Task
from lora_edge.core.models import load_base_model, load_tokenizer
from tiny_models import TINY_LABELS

TEXTS = ["turn off the kitchen lights", "what's on my calendar tomorrow afternoon?"]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory, tiny_model, tiny_adapter):
    return tiny_bundle(tmp_path_factory, tiny_model, tiny_adapter, "bert")


def _softmax(logits):
    exp = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return exp / exp.sum(axis=-1, keepdims=True)


def _infer_json(capsys, bundle, *args):
    from lora_edge.cli import main

    capsys.readouterr()
    main(["infer", str(bundle), *args, *[a for text in TEXTS for a in ("--text", text)], "--json"])
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("graph", ["merged.fp32", "branched.fp32", "hotswap.fp32"])
def test_infer_gives_the_reference_label_and_scores(graph, bundle, tiny_model, capsys):
    predictions = _infer_json(capsys, bundle, "--graph", graph)
    reference = load_reference(tiny_model("bert"), AdapterRef(ADAPTER_NAME, bundle / "adapter"))
    feeds = feeds_for(load_tokenizer(tiny_model("bert")), TEXTS, ["input_ids", "attention_mask", "token_type_ids"])
    want = _softmax(torch_logits(reference, feeds).astype(np.float64))
    assert [p["text"] for p in predictions] == TEXTS
    for prediction, row in zip(predictions, want):
        assert list(prediction["scores"]) == TINY_LABELS, "label names come from the bundled label map"
        assert prediction["label"] == TINY_LABELS[int(row.argmax())]
        np.testing.assert_allclose([prediction["scores"][label] for label in TINY_LABELS], row, atol=1e-4)


def test_hotswap_without_adapter_is_the_base_model(bundle, tiny_model, capsys):
    predictions = _infer_json(capsys, bundle, "--graph", "hotswap.fp32", "--adapter", "none")
    base = load_base_model(tiny_model("bert"), Task.SEQ_CLS, labels=TINY_LABELS)
    feeds = feeds_for(load_tokenizer(tiny_model("bert")), TEXTS, ["input_ids", "attention_mask", "token_type_ids"])
    want = _softmax(torch_logits(base, feeds).astype(np.float64))
    for prediction, row in zip(predictions, want):
        np.testing.assert_allclose([prediction["scores"][label] for label in TINY_LABELS], row, atol=1e-4)


def test_human_output_is_one_line_per_text(bundle, capsys):
    from lora_edge.cli import main

    capsys.readouterr()
    main(["infer", str(bundle), "--graph", "merged.fp32", "--text", TEXTS[0], "--text", TEXTS[1]])
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split("\t")[2] for line in lines] == TEXTS
    assert all(line.split("\t")[0] in TINY_LABELS and 0 < float(line.split("\t")[1]) <= 1 for line in lines)


@pytest.mark.parametrize("args, code, words", [
    (["--graph", "folded.fp32"], 9, "merged.fp32, branched.fp32, hotswap.fp32"),
    (["--graph", "merged.fp32", "--adapter", "other"], ConfigError.exit_code, "holds adapter 'tiny'"),
    (["--graph", "hotswap.fp32", "--adapter", "other"], ConfigError.exit_code, "choose one of: tiny"),
])
def test_bad_graph_or_adapter_names_the_choices(args, code, words, bundle, capsys):
    from lora_edge.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["infer", str(bundle), *args, "--text", "hi"])
    assert exit_info.value.code == code
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1 and words in err
