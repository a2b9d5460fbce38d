"""Export bundles: every form against the PyTorch reference, graph structure, manifest, bad input via the CLI."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest

from export_helpers import (ADAPTER_NAME, ALL_FORMS, TEST_BATCHES, feeds_for, session_inputs,
                            tiny_bundle, torch_logits)
from lora_edge.core.adapters import AdapterRef, load_reference
from lora_edge.core.choices import Form
from lora_edge.core.errors import ConfigError
from lora_edge.export.exporter import low_rank_pairs
from lora_edge.core.manifest import GraphRecord, Manifest, list_graphs
from lora_edge.export.merge import lora_pairs
from lora_edge.core.cache import directory_sha256
from lora_edge.core.models import load_tokenizer
from lora_edge.runtime.session import create_session, load_lora_adapter, run
from tiny_models import ENCODERS, TINY_LABELS

ENCODER_INPUTS = {"bert": ["input_ids", "attention_mask", "token_type_ids"],
                  "roberta": ["input_ids", "attention_mask", "token_type_ids"],
                  "distilbert": ["input_ids", "attention_mask"]}


@pytest.fixture(scope="module")
def bundles(tmp_path_factory, tiny_model, tiny_adapter):
    return lambda arch: tiny_bundle(tmp_path_factory, tiny_model, tiny_adapter, arch)


@pytest.mark.parametrize("arch", ENCODERS)
def test_every_form_matches_pytorch(arch, bundles, tiny_model):
    bundle = bundles(arch)
    graphs = {graph.form: graph for graph in list_graphs(bundle)}
    assert set(graphs) == {Form(form) for form in ALL_FORMS}
    reference = load_reference(tiny_model(arch), AdapterRef(ADAPTER_NAME, bundle / "adapter"))
    tokenizer = load_tokenizer(bundle / "onnx")
    adapter = load_lora_adapter(bundle / "onnx" / "adapters" / f"{ADAPTER_NAME}.onnx_adapter")
    for form, graph in graphs.items():
        session = create_session(bundle / graph.file)
        assert session_inputs(session) == ENCODER_INPUTS[arch]
        for texts in TEST_BATCHES:
            feeds = feeds_for(tokenizer, texts, ENCODER_INPUTS[arch])
            (logits,) = run(session, feeds, adapter=adapter if form is Form.HOTSWAP else None)
            want = torch_logits(reference, feeds)
            assert logits.shape == want.shape == (len(texts), 3)
            assert np.abs(logits - want).max() <= 1e-4, f"{graph.name} on batch of {len(texts)}"


@pytest.mark.parametrize("arch", ENCODERS)
def test_branched_keeps_one_named_low_rank_pair_per_layer_and_merged_none(arch, bundles, tiny_model):
    bundle = bundles(arch)
    layers = len(lora_pairs(load_reference(tiny_model(arch), AdapterRef(ADAPTER_NAME, bundle / "adapter"))))
    graphs = {graph.form: onnx.load(str(bundle / graph.file)) for graph in list_graphs(bundle)}
    branched = low_rank_pairs(graphs[Form.BRANCHED])
    assert len(branched) == layers == 4
    assert all("lora_A" in first and "lora_B" in second for first, second in branched)
    assert low_rank_pairs(graphs[Form.MERGED]) == []
    assert not any("lora" in init.name for init in graphs[Form.MERGED].graph.initializer)
    hotswap = low_rank_pairs(graphs[Form.HOTSWAP])
    assert len(hotswap) == layers
    assert all(first.endswith(".lora_A.weight") and second.endswith(".lora_B.weight") for first, second in hotswap)
    for graph in list_graphs(bundle):
        assert graph.extra["low_rank_pairs"] == {Form.MERGED: 0}.get(graph.form, layers)


def test_manifest_records_what_went_in(bundles, tiny_model):
    bundle = bundles("bert")
    manifest = json.loads((bundle / "manifest.json").read_text())  # the file as docs/ARCHITECTURE.md describes it
    assert manifest["model"] == {"path": str(tiny_model("bert")), "sha256": directory_sha256(tiny_model("bert")),
                                 "task": "seq-cls", "default": False}
    (adapter,) = manifest["adapters"]
    assert adapter["name"] == ADAPTER_NAME and adapter["bundle_dir"] == "adapter"
    assert adapter["sha256"] == directory_sha256(bundle / "adapter", "adapter_*")
    assert adapter["lora_config"]["r"] == 4 and adapter["labels"] == TINY_LABELS
    assert adapter["data"]["train"] == "/data/train.jsonl"
    assert {"torch", "onnx", "onnxruntime", "peft", "transformers"} <= set(manifest["libraries"])
    assert Manifest.from_json(manifest).to_json() == manifest  # the typed manifest reads and writes it unchanged
    names = {GraphRecord.from_json(g).name for g in manifest["graphs"]}
    assert names == {"merged.fp32", "branched.fp32", "hotswap.fp32"}
    for graph in list_graphs(bundle):
        assert graph.extra["max_abs_diff"] <= 1e-4 and graph.extra["outputs"] == ["logits"]
        assert (graph.adapters == [ADAPTER_NAME]) if graph.form is Form.HOTSWAP else graph.adapter == ADAPTER_NAME


def test_onnx_directory_stands_on_its_own(bundles, tiny_model, tmp_path):
    """Copied elsewhere, onnx/ holds what a runtime user needs: graph, tokenizer, config, label map."""
    from transformers import AutoConfig, AutoTokenizer

    bundle = bundles("distilbert")
    alone = shutil.copytree(bundle / "onnx", tmp_path / "graphs")
    tokenizer = AutoTokenizer.from_pretrained(str(alone), local_files_only=True)
    config = AutoConfig.from_pretrained(str(alone), local_files_only=True)
    labels = json.loads((alone / "label_map.json").read_text())["labels"]
    assert labels == TINY_LABELS == [config.id2label[i] for i in range(3)]
    feeds = feeds_for(tokenizer, TEST_BATCHES[2], ENCODER_INPUTS["distilbert"])
    (logits,) = run(create_session(alone / "merged.fp32.onnx"), feeds)
    reference = load_reference(tiny_model("distilbert"), AdapterRef(ADAPTER_NAME, bundle / "adapter"))
    assert np.abs(logits - torch_logits(reference, feeds)).max() <= 1e-4


def test_several_adapters_get_named_graphs(tiny_model, tiny_adapter, tmp_path):
    from lora_edge.export.bundle import export_bundle

    adapters = [AdapterRef("first", tiny_adapter("bert")), AdapterRef("second", tiny_adapter("bert", rank=8, seed=7))]
    bundle = export_bundle(tiny_model("bert"), adapters, ["merged"], tmp_path / "b", progress=lambda m: None)
    tokenizer = load_tokenizer(bundle / "onnx")
    feeds = feeds_for(tokenizer, TEST_BATCHES[1], ENCODER_INPUTS["bert"])
    outputs = {}
    for adapter in adapters:
        graph = f"merged.{adapter.name}.fp32"
        assert (bundle / "adapters" / adapter.name / "adapter_model.safetensors").is_file()
        (outputs[adapter.name],) = run(create_session(bundle / "onnx" / f"{graph}.onnx"), feeds)
        want = torch_logits(load_reference(tiny_model("bert"), adapter), feeds)
        assert np.abs(outputs[adapter.name] - want).max() <= 1e-4
    assert np.abs(outputs["first"] - outputs["second"]).max() > 1e-3
    assert json.loads((bundle / "onnx" / "label_maps" / "second.json").read_text())["labels"] == \
        [f"LABEL_{i}" for i in range(3)]


def _corrupt(adapter, tmp_path):
    target = shutil.copytree(adapter, tmp_path / "corrupt")
    (target / "adapter_model.safetensors").write_bytes(b"\x00\x01 not a safetensors file")
    return target, "adapter_model.safetensors"


def _nan(adapter, tmp_path):
    import torch
    from safetensors.torch import load_file, save_file

    target = shutil.copytree(adapter, tmp_path / "nan")
    tensors = load_file(str(target / "adapter_model.safetensors"))
    key = next(k for k in tensors if "lora_B" in k)
    tensors[key][0, 0] = torch.nan
    save_file(tensors, str(target / "adapter_model.safetensors"))
    return target, key


BAD_INPUTS = {
    # case: (model arch, adapter maker, extra args, exit code, words the error must contain)
    "adapter-for-another-base": ("distilbert", lambda a, p: (a, "base model"), [], 4, ["query"]),
    "corrupt-safetensors": ("bert", _corrupt, [], 4, ["safetensors"]),
    "nan-weights": ("bert", _nan, [], 4, ["NaN"]),
    "unknown-form": ("bert", lambda a, p: (a, "folded"), ["--forms", "merged,folded"], ConfigError.exit_code,
                     ["merged, branched"]),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_gives_one_line_and_leaves_no_bundle(case, tiny_model, tiny_adapter, tmp_path, capsys):
    from lora_edge.cli import main

    arch, make, extra, code, words = BAD_INPUTS[case]
    adapter, named = make(tiny_adapter("bert"), tmp_path)
    out = tmp_path / "out" / "bundle"
    with pytest.raises(SystemExit) as exit_info:
        main(["export", "--model", str(tiny_model(arch)), "--adapter", str(adapter), "--out", str(out), *extra])
    assert exit_info.value.code == code
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0] == err.strip().splitlines()[-1] and "Traceback" not in err
    assert named in errors[0] and all(word in errors[0] for word in words)
    assert not out.exists()
    assert not out.parent.exists() or list(out.parent.iterdir()) == [], "no temporary directory left behind"


def test_a_graph_that_drifts_fails_the_export_and_leaves_nothing(tiny_model, tiny_adapter, tmp_path):
    from lora_edge.core.errors import ExportError
    from lora_edge.export.bundle import export_bundle

    out = tmp_path / "out" / "bundle"
    with pytest.raises(ExportError, match=r"graph merged.fp32 drifts from the PyTorch reference: max abs diff"):
        export_bundle(tiny_model("distilbert"), [AdapterRef("a", tiny_adapter("distilbert"))], ["merged"], out,
                      tolerance=0.0, progress=lambda m: None)  # no graph is bit-exact: forces the failure path
    assert not out.exists() and list(out.parent.iterdir()) == []


def test_existing_bundle_is_kept_without_force(bundles, tiny_model, capsys):
    from lora_edge.cli import main

    bundle = bundles("bert")
    before = (bundle / "manifest.json").read_text()
    with pytest.raises(SystemExit) as exit_info:
        main(["export", "--model", str(tiny_model("bert")), "--adapter", str(bundle / "adapter"),
              "--out", str(bundle)])
    assert exit_info.value.code == 9 and "--force" in capsys.readouterr().err
    assert (bundle / "manifest.json").read_text() == before


@pytest.mark.slow
def test_default_minilm_all_forms(tmp_path):
    """The embedded all-MiniLM-L6-v2 with a random r=8 adapter: all three forms match PyTorch up to length 128."""
    from lora_edge.export.bundle import export_bundle
    from lora_edge.core.cache import default_model_path
    from tiny_models import build_random_adapter

    adapter = build_random_adapter(default_model_path(), tmp_path / "minilm-r8", "bert", rank=8, alpha=16.0, seed=1)
    bundle = export_bundle("default", [AdapterRef("r8", adapter)], ALL_FORMS, tmp_path / "bundle",
                           progress=lambda m: None)
    assert Manifest.read(bundle).model.default is True
    reference = load_reference(default_model_path(), AdapterRef("r8", adapter))
    tokenizer = load_tokenizer(bundle / "onnx")
    long_text = " ".join(["please turn the kitchen lights on and then tell me the weather"] * 12)
    batches = [TEST_BATCHES[2], [long_text, "hi"]]
    lora = load_lora_adapter(bundle / "onnx" / "adapters" / "r8.onnx_adapter")
    for graph in list_graphs(bundle):
        session = create_session(bundle / graph.file)
        for texts in batches:
            encoded = tokenizer(texts, padding="longest", truncation=True, max_length=128, return_tensors="np")
            feeds = {name: encoded[name].astype(np.int64) for name in session_inputs(session)}
            (logits,) = run(session, feeds, adapter=lora if graph.form is Form.HOTSWAP else None)
            assert np.abs(logits - torch_logits(reference, feeds)).max() <= 1e-4, graph.name
        assert graph.extra["low_rank_pairs"] == {Form.MERGED: 0}.get(graph.form, 12)
