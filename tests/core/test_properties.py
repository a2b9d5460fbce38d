"""Property tests: the parsers users feed by hand give a result or a lora-edge error, never another exception.

Recipe and device TOML, JSONL/CSV/TXT data, adapter configs, safetensors headers
and bundle manifests get arbitrary (and nearly valid) inputs from hypothesis.
"""

from __future__ import annotations

import json
import struct
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lora_edge.core.errors import LoraEdgeError

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# TOML-like values: what a user can write in a recipe or device file.
scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**40, 2**40), st.floats(allow_nan=True),
                    st.text(max_size=12))
keys = st.one_of(st.sampled_from(["name", "model", "task", "output", "seed", "adapters", "export", "profile",
                                  "check", "training", "lora", "train", "data", "rank", "alpha", "forms",
                                  "precisions", "devices", "providers", "options", "intra_op_threads",
                                  "graph_optimization_level", "tolerances", "thresholds", "max_steps",
                                  "batch_size", "opset", "runs", "int8-dynamic", "fp32", "max_abs_diff"]),
                 st.text(max_size=8))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                       st.dictionaries(keys, inner, max_size=5)), max_leaves=20)
tables = st.dictionaries(keys, values, max_size=8)


def _outcome(call, *args):
    """Call ``call``; a LoraEdgeError is an accepted outcome, anything else fails the test."""
    try:
        return call(*args)
    except LoraEdgeError:
        return None


def _write(directory: str, name: str, payload: bytes | str) -> Path:
    path = Path(directory) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(payload, str):
        path.write_text(payload, encoding="utf-8")
    else:
        path.write_bytes(payload)
    return path


@SETTINGS
@given(tables)
def test_recipe_tables(data):
    from lora_edge.core.recipe import recipe_from_dict

    _outcome(recipe_from_dict, data, "recipe.toml")


@SETTINGS
@given(tables)
def test_device_tables(data):
    from lora_edge.profile.devices import device_from_dict

    device = _outcome(device_from_dict, data, "device.toml")
    if device is not None:  # an accepted device also describes itself and builds session settings
        device.describe()
        _outcome(device.session_settings)


@SETTINGS
@given(st.one_of(st.text(max_size=200), st.binary(max_size=200)))
def test_toml_files(payload):
    from lora_edge.profile.devices import load_device_file
    from lora_edge.core.recipe import load_recipe

    with tempfile.TemporaryDirectory() as directory:
        path = _write(directory, "x.toml", payload)
        _outcome(load_recipe, path)
        _outcome(load_device_file, path)


rows = st.dictionaries(st.sampled_from(["text", "label", "other"]), values, max_size=3)


@SETTINGS
@given(st.sampled_from([".jsonl", ".json", ".csv", ".txt", ".tsv"]),
       st.one_of(st.binary(max_size=120), st.text(max_size=120),
                 st.lists(rows, max_size=5).map(lambda rs: "\n".join(json.dumps(r) for r in rs))),
       st.sampled_from(["seq-cls", "causal-lm"]))
def test_data_files(suffix, payload, task):
    from lora_edge.core.data import read_examples
    from lora_edge.core.choices import Task

    with tempfile.TemporaryDirectory() as directory:
        examples = _outcome(read_examples, _write(directory, "data" + suffix, payload), Task(task))
    for example in examples or []:
        assert isinstance(example.text, str) and example.text.strip()


adapter_configs = st.one_of(values, st.fixed_dictionaries(
    {"peft_type": st.sampled_from(["LORA", "IA3", None]), "r": values, "lora_alpha": values,
     "target_modules": values, "task_type": st.one_of(st.sampled_from(["SEQ_CLS", "CAUSAL_LM"]), values)},
    optional={"rank_pattern": values, "alpha_pattern": values, "use_rslora": values, "use_dora": values}))


@SETTINGS
@given(adapter_configs)
def test_adapter_configs(config):
    from lora_edge.core.adapters import adapter_task, read_adapter_config
    from lora_reference import lora_scaling

    with tempfile.TemporaryDirectory() as directory:
        _write(directory, "adapter_config.json", json.dumps(config))
        accepted = _outcome(read_adapter_config, Path(directory))
    if accepted is not None:  # what the stages compute from an accepted config works too
        _outcome(adapter_task, accepted, Path("adapter_config.json"))
        rank, scale = lora_scaling(accepted, "encoder.layer.0.attention.self.query")
        assert rank > 0 and isinstance(scale, float)


header_entries = st.fixed_dictionaries({"dtype": st.one_of(st.sampled_from(["F32", "F16", "I64", "BOOL"]), values),
                                        "shape": st.one_of(st.lists(st.integers(-2, 4), max_size=3), values),
                                        "data_offsets": st.one_of(st.lists(st.integers(-4, 64), max_size=3),
                                                                  values)})


@SETTINGS
@given(st.one_of(st.binary(max_size=64),
                 st.tuples(st.dictionaries(st.text(max_size=6), st.one_of(header_entries, values), max_size=3),
                           st.binary(max_size=64), st.integers(-8, 8))))
def test_safetensors_headers(payload):
    from lora_edge.core.adapters import read_adapter_weights

    if isinstance(payload, tuple):  # a length-prefixed JSON header, its length sometimes off, then data bytes
        header, data, skew = payload
        text = json.dumps(header).encode()
        payload = struct.pack("<Q", max(0, len(text) + skew)) + text + data
    with tempfile.TemporaryDirectory() as directory:
        _write(directory, "adapter_model.safetensors", payload)
        _outcome(read_adapter_weights, Path(directory))


graph_records = st.one_of(values, st.fixed_dictionaries(
    {"name": values, "file": values, "form": st.one_of(st.sampled_from(["merged", "hotswap"]), values),
     "precision": st.one_of(st.just("fp32"), values), "task": values}))


@SETTINGS
@given(st.one_of(values, st.fixed_dictionaries({"graphs": st.one_of(st.lists(graph_records, max_size=3), values),
                                                "adapters": values, "model": values})))
def test_manifests(manifest):
    from lora_edge.core.manifest import Manifest, find_graph, list_graphs

    with tempfile.TemporaryDirectory() as directory:
        _write(directory, "manifest.json", json.dumps(manifest))
        _outcome(Manifest.read, Path(directory))
        _outcome(list_graphs, Path(directory))
        _outcome(find_graph, Path(directory), "merged.fp32")


@pytest.mark.parametrize("payload", [b"\xff\xfe", b"name = ["])
def test_toml_examples_refused(tmp_path, payload):
    """Two known-bad files: a ConfigError, not a crash (the properties above cover the rest)."""
    from lora_edge.core.errors import ConfigError
    from lora_edge.core.recipe import load_recipe

    path = _write(str(tmp_path), "bad.toml", payload)
    with pytest.raises(ConfigError):
        load_recipe(path)
