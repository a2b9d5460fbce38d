"""The typed manifest: old bundles still read, unknown keys survive, bad manifests are a BundleError naming the key."""

from __future__ import annotations

import ast
import copy
import dataclasses
import json
from pathlib import Path

import pytest

from cli_runner import exit_code_of
from lora_edge.core.choices import Form, Precision
from lora_edge.core.errors import BundleError, ConfigError
from lora_edge.core.manifest import (MANIFEST_VERSION, AdapterRecord, GraphRecord, Manifest, add_graphs, find_task_graph,
                                update_manifest)
from lora_edge.core.choices import Task

# A manifest as export_bundle wrote it before the typed manifest (no manifest_version), abridged but complete
# in its keys: every key of docs/ARCHITECTURE.md, a hot-swap graph and a quantized graph with their extras.
OLD_MANIFEST = {
    "lora_edge_version": "0.1.0",
    "created": "2026-11-30T10:00:00+00:00",
    "libraries": {"python": "3.11.7", "platform": "Linux", "torch": "2.13.0", "onnxruntime": "1.32.0"},
    "seed": 7,
    "model": {"path": "/models/minilm", "sha256": "ab" * 32, "task": "seq-cls", "default": True},
    "adapters": [{"name": "intent", "source": "/runs/intent", "sha256": "cd" * 32, "bundle_dir": "adapter",
                  "lora_config": {"r": 8, "lora_alpha": 16, "target_modules": ["query", "value"]},
                  "labels": ["lights_on", "weather"],
                  "data": {"train": "/data/train.jsonl", "validation": None, "test": "/data/test.jsonl"}}],
    "graphs": [
        {"name": "hotswap.fp32", "file": "onnx/hotswap.fp32.onnx", "form": "hotswap", "precision": "fp32",
         "task": "seq-cls", "adapter": None, "adapters": ["intent"], "source": None,
         "extra": {"opset": 18, "adapter_files": {"intent": "onnx/adapters/intent.onnx_adapter"},
                   "max_abs_diff": 1.2e-7, "max_abs_diff_by_adapter": {"base": 1e-8, "intent": 1.2e-7}}},
        {"name": "merged.int8-dynamic", "file": "onnx/merged.int8-dynamic.onnx", "form": "merged",
         "precision": "int8-dynamic", "task": "seq-cls", "adapter": "intent", "adapters": [],
         "source": "merged.fp32", "extra": {"quantization": {"method": "dynamic"}, "quantize_seconds": 1.5}},
    ],
    "recipe": {"name": "tiny", "check": {"max_examples": 16}},
    "export_stages": [{"stage": "load", "seconds": 1.25, "peak_rss_mb": 512},
                      {"stage": "trace (torchscript)", "seconds": 5.0, "peak_rss_mb": None}],
}


def _bundle(tmp_path: Path, manifest, name: str = "bundle") -> Path:
    bundle = tmp_path / name
    bundle.mkdir()
    text = manifest if isinstance(manifest, str) else json.dumps(manifest)
    (bundle / "manifest.json").write_text(text)
    return bundle


def _on_disk(bundle: Path) -> dict:
    return json.loads((bundle / "manifest.json").read_text())


def test_a_bundle_written_before_the_typed_manifest_reads_with_typed_values(tmp_path):
    manifest = Manifest.read(_bundle(tmp_path, OLD_MANIFEST))
    assert manifest.manifest_version == 1 and manifest.seed == 7 and manifest.recipe_section("check") == \
        {"max_examples": 16}
    assert manifest.model.task is Task.SEQ_CLS and manifest.model.default is True
    (adapter,) = manifest.adapters
    assert adapter.bundle_dir == "adapter" and adapter.labels == ["lights_on", "weather"]
    assert adapter.data["test"] == "/data/test.jsonl" and adapter.lora_config["r"] == 8
    hotswap, int8 = manifest.graphs
    assert (hotswap.form, hotswap.precision, hotswap.task) == (Form.HOTSWAP, Precision.FP32, Task.SEQ_CLS)
    assert hotswap.adapters == ["intent"] and int8.source == "merged.fp32"
    assert int8.precision is Precision.INT8_DYNAMIC and int8.extra["quantize_seconds"] == 1.5
    assert [(s.stage, s.seconds, s.peak_rss_mb) for s in manifest.export_stages] == \
        [("load", 1.25, 512), ("trace (torchscript)", 5.0, None)]


def test_round_trip_keeps_the_json_and_adds_only_the_format_version(tmp_path):
    bundle = _bundle(tmp_path, OLD_MANIFEST)
    Manifest.read(bundle).write(bundle)
    assert _on_disk(bundle) == {"manifest_version": MANIFEST_VERSION, **OLD_MANIFEST}
    assert Manifest.read(bundle) == Manifest.from_json(OLD_MANIFEST)
    assert not [p.name for p in bundle.iterdir() if p.name != "manifest.json"]  # written by rename, nothing left


def test_unknown_keys_survive_a_read_and_write(tmp_path):
    newer = copy.deepcopy(OLD_MANIFEST)
    newer["signature"] = {"alg": "ed25519"}
    newer["model"]["revision"] = "main"
    newer["adapters"][0]["license"] = "apache-2.0"
    newer["graphs"][0]["checksum"] = "ef" * 32
    newer["export_stages"][0]["cpu_seconds"] = 2.0
    bundle = _bundle(tmp_path, newer)
    record = GraphRecord("merged.fp16", "onnx/merged.fp16.onnx", Form.MERGED, Precision.FP16, Task.SEQ_CLS,
                         adapter="intent", source="merged.fp32")
    add_graphs(bundle, [record])
    written = _on_disk(bundle)
    assert written["signature"] == {"alg": "ed25519"} and written["model"]["revision"] == "main"
    assert written["adapters"][0]["license"] == "apache-2.0" and written["graphs"][0]["checksum"] == "ef" * 32
    assert written["export_stages"][0]["cpu_seconds"] == 2.0
    assert [g["name"] for g in written["graphs"]] == ["hotswap.fp32", "merged.int8-dynamic", "merged.fp16"]
    assert list(written)[-1] == "signature"  # the known keys first, in the documented order


def test_add_graphs_replaces_a_graph_of_the_same_name_in_place(tmp_path):
    bundle = _bundle(tmp_path, OLD_MANIFEST)
    again = GraphRecord.from_json(OLD_MANIFEST["graphs"][0])
    again.extra = {"opset": 20}
    add_graphs(bundle, [again])
    graphs = Manifest.read(bundle).graphs
    assert [g.name for g in graphs] == ["hotswap.fp32", "merged.int8-dynamic"] and graphs[0].extra == {"opset": 20}


def test_update_manifest_takes_typed_records(tmp_path):
    bundle = _bundle(tmp_path, OLD_MANIFEST)
    adapter = Manifest.read(bundle).adapters[0]
    update_manifest(bundle, adapters=[dataclasses.replace(adapter, data=None)])
    assert _on_disk(bundle)["adapters"][0]["data"] is None
    assert Manifest.read(bundle).adapters[0].data is None


def test_a_minimal_manifest_reads_with_the_defaults_commands_relied_on(tmp_path):
    """Hand-written and early manifests: no task means seq-cls, no bundle_dir means adapter/."""
    manifest = Manifest.read(_bundle(tmp_path, {"adapters": [{"name": "a"}]}))
    assert manifest.model.task is Task.SEQ_CLS and manifest.adapters == (AdapterRecord("a"),)
    assert manifest.adapters[0].bundle_dir == "adapter" and manifest.graphs == () and manifest.seed is None


def test_find_task_graph_refuses_a_graph_of_another_task(tmp_path):
    bundle = _bundle(tmp_path, OLD_MANIFEST)
    manifest, record = find_task_graph(bundle, "hotswap.fp32.onnx", Task.SEQ_CLS)
    assert record.name == "hotswap.fp32" and manifest.adapter("intent").sha256 == "cd" * 32
    with pytest.raises(ConfigError) as refused:
        find_task_graph(bundle, "hotswap.fp32", Task.CAUSAL_LM)
    assert "is a seq-cls graph" in refused.value.what and "lora-edge infer" in refused.value.fix


def _broken(**changes) -> dict:
    manifest = copy.deepcopy(OLD_MANIFEST)
    for path, value in changes.items():
        *parents, key = path.split("__")
        target = manifest
        for part in parents:
            target = target[int(part)] if part.isdigit() else target[part]
        target[key] = value
    return manifest


@pytest.mark.parametrize("manifest, key", [
    (_broken(model__task="token-cls"), "model.task"),
    (_broken(model__default="yes"), "model.default"),
    (_broken(adapters__0__name=None), "adapters[0].name"),
    (_broken(adapters__0__labels=["a", 1]), "adapters[0].labels"),
    (_broken(graphs__1__precision="int2"), "graphs[1].precision"),
    (_broken(graphs__0__file=3), "graphs[0].file"),
    (_broken(graphs__0__extra=[]), "graphs[0].extra"),
    (_broken(export_stages__0__seconds="1"), "export_stages[0].seconds"),
    (_broken(seed=True), "seed"),
    (_broken(graphs={"a": 1}), "graphs"),
    (_broken(manifest_version="1"), "manifest_version"),
])
def test_a_value_of_the_wrong_kind_is_a_bundle_error_naming_the_key(tmp_path, manifest, key):
    with pytest.raises(BundleError) as refused:
        Manifest.read(_bundle(tmp_path, manifest))
    assert f"'{key}'" in refused.value.what and "re-run lora-edge export" in refused.value.fix
    assert str(refused.value.where).endswith("manifest.json")


def test_a_newer_manifest_format_asks_for_an_upgrade(tmp_path):
    with pytest.raises(BundleError) as refused:
        Manifest.read(_bundle(tmp_path, {**OLD_MANIFEST, "manifest_version": MANIFEST_VERSION + 1}))
    assert "manifest_version" in refused.value.what and "upgrade lora-edge" in refused.value.fix


@pytest.mark.parametrize("text", ["[]", "{not json", json.dumps({**OLD_MANIFEST, "manifest_version": 99}),
                                  json.dumps(_broken(model__task=5))])
@pytest.mark.parametrize("command", [["infer", "--text", "hi"], ["check"], ["profile", "--device", "host-cpu"],
                                     ["quantize", "--precisions", "int8-dynamic"], ["compare", "--device", "host-cpu"]])
def test_every_command_refuses_a_bad_manifest_with_the_bundle_exit_code(tmp_path, capsys, text, command):
    bundle = _bundle(tmp_path, text)
    assert exit_code_of(command[0], str(bundle), *command[1:]) == BundleError.exit_code
    err = capsys.readouterr().err
    assert "error: " in err and "manifest" in err and "Traceback" not in err


def test_no_module_reads_the_manifest_as_a_dict():
    """Only lora_edge/core/manifest.py parses manifest.json: elsewhere ``manifest[...]``/``manifest.get`` is a bug."""
    package = Path(__file__).resolve().parents[2] / "lora_edge"
    found = []
    for path in package.rglob("*.py"):
        if path.stem == "manifest":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            target = node.value if isinstance(node, ast.Subscript) else \
                node.func.value if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                and node.func.attr == "get" else None
            if isinstance(target, ast.Name) and target.id == "manifest":
                found.append(f"{path.name}:{node.lineno}")
    assert not found, f"raw manifest lookups (use lora_edge.core.manifest.Manifest attributes): {found}"
