"""The KV-cache wrapper and the causal-LM graph I/O: export, graph structure, prefill + decode, errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from decoder_bundles import adapter_dirs, bundle_for, shared_root
from lora_edge.core.bundle import ONNX_DIR
from lora_edge.core.choices import Form
from lora_edge.export.decoder import wrap_decoder
from lora_edge.core.decoder_io import DecoderShape
from lora_edge.core.errors import ExportError
from lora_edge.core.manifest import Manifest, find_graph
from lora_edge.core.choices import Task


@pytest.fixture(scope="session")
def bundles(tmp_path_factory, tiny_model, tiny_adapter):
    """Factory: ``bundles(arch, form)`` -> (bundle, graph name), exported once per session."""
    root = shared_root(tmp_path_factory)
    return lambda arch, form: bundle_for(arch, form, root, tiny_model, tiny_adapter)


def _dims(value_info) -> list:
    return [d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim]


def test_cli_export_writes_decoder_graphs_with_kv_cache_io(bundles):
    import onnx

    bundle, _ = bundles("gpt2", Form.MERGED)  # exported with `lora-edge export --task causal-lm`
    manifest = Manifest.read(bundle)
    assert manifest.model.task is Task.CAUSAL_LM
    assert {g.name for g in manifest.graphs} == {"merged.fp32", "branched.fp32", "hotswap.fp32"}
    layers = [f"{kind}.{i}.{part}" for kind in ("past_key_values",) for i in range(2) for part in ("key", "value")]
    for form in (Form.MERGED, Form.BRANCHED, Form.HOTSWAP):
        record = find_graph(bundle, f"{form.value}.fp32")
        assert record.task == "causal-lm"
        graph = onnx.load(str(bundle / record.file)).graph
        initializers = {init.name for init in graph.initializer}
        inputs = {i.name: _dims(i) for i in graph.input if i.name not in initializers}
        outputs = {o.name: _dims(o) for o in graph.output}
        assert list(inputs) == ["input_ids", "attention_mask", "position_ids"] + layers, form
        assert inputs["input_ids"] == ["batch", "sequence"] == inputs["position_ids"]
        assert inputs["attention_mask"] == ["batch", "total_sequence"]
        assert inputs["past_key_values.1.value"] == ["batch", 4, "past_sequence", 8]  # GPT-2: 4 heads of 8
        assert list(outputs) == ["logits"] + [name.replace("past_key_values", "present") for name in layers]
        # the last logits_to_keep positions (0, the default, keeps all of them: `sequence`)
        assert outputs["logits"] == ["batch", "kept_sequence", 30522]
        for name in outputs:
            if name != "logits":  # the exporter writes the sum in either order
                batch, heads, length, head_dim = outputs[name]
                assert (batch, heads, head_dim) == ("batch", 4, 8)
                assert sorted(length.split(" + ")) == ["past_sequence", "sequence"], (name, length)
        hotswap_inputs = [i.name for i in graph.input if "lora_" in i.name]
        assert bool(hotswap_inputs) == (form is Form.HOTSWAP)
    assert (bundle / ONNX_DIR / "adapters" / "a.onnx_adapter").is_file()


def test_one_graph_serves_prefill_and_decode(bundles):
    """Prefill of n tokens == prefill of k tokens + n-k single-token decode steps (Qwen2, GQA: 2 KV heads)."""
    from lora_edge.runtime.generate import DecoderRunner
    from lora_edge.runtime.session import create_session

    bundle, graph = bundles("qwen2", Form.BRANCHED)
    runner = DecoderRunner(create_session(bundle / find_graph(bundle, graph).file))
    assert (runner.num_layers, runner.num_kv_heads, runner.head_dim) == (2, 2, 8)
    ids = np.array([[101, 2054, 2003, 1996, 4633, 1999, 3000, 102, 7592, 2088]], dtype=np.int64)
    n, k = ids.shape[1], 4
    full, full_present = runner.step(ids, np.ones_like(ids), np.arange(n)[None], runner.empty_past(1))
    logits, past = runner.step(ids[:, :k], np.ones((1, k), np.int64), np.arange(k)[None], runner.empty_past(1))
    steps = [logits[:, -1]]
    for t in range(k, n):
        logits, past = runner.step(ids[:, t:t + 1], np.ones((1, t + 1), np.int64), np.array([[t]]), past)
        steps.append(logits[:, -1])
    np.testing.assert_allclose(np.stack(steps, 1), full[:, k - 1:], atol=1e-5)
    for got, want in zip(past, full_present):
        assert got.shape == want.shape == (1, 2, n, 8)
        np.testing.assert_allclose(got, want, atol=1e-5)


def test_wrapper_matches_the_model_and_zeroes_padding(tiny_model, tiny_adapter):
    """In PyTorch: a left-padded row gives the unpadded logits; padded positions' outputs are exactly zero."""
    import torch

    from lora_edge.core.adapters import AdapterRef, load_reference

    model = load_reference(tiny_model("mistral"), AdapterRef("a", adapter_dirs("mistral", tiny_adapter)["a"]))
    wrapper = wrap_decoder(model)
    shape = wrapper.shape
    assert shape == DecoderShape(2, 2, 8, 30522, 128)
    ids = torch.tensor([[0, 0, 101, 7592, 2088], [101, 2054, 2003, 1996, 4633]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    positions = (mask.cumsum(-1) - 1).clamp(min=0) * mask
    empty = [torch.zeros(2, 2, 0, 8) for _ in shape.past_names]
    with torch.no_grad():
        logits, *presents = wrapper(ids, mask, positions, *empty)
        alone = model(input_ids=ids[:1, 2:]).logits
    assert logits.shape == (2, 5, 30522) and len(presents) == 4
    torch.testing.assert_close(logits[0, 2:], alone[0], atol=1e-5, rtol=1e-5)
    assert torch.count_nonzero(logits[0, :2]) == 0
    for present in presents:
        assert present.shape == (2, 2, 5, 8)
        assert torch.count_nonzero(present[0, :, :2]) == 0 and torch.count_nonzero(present[0, :, 2:]) > 0


def test_an_unexportable_module_is_named_in_the_error(tiny_model, tmp_path):
    """A layer whose forward branches on tensor data cannot be traced: the error names that module."""
    import torch

    from lora_edge.export.exporter import ExportContext, export_onnx
    from lora_edge.core.choices import Task
    from lora_edge.core.models import load_base_model, load_tokenizer

    class DataDependentMLP(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            if x.sum() > 0:  # data-dependent Python control flow: torch.export cannot trace it
                return self.inner(x)
            return -self.inner(x)

    path = tiny_model("llama")
    model = load_base_model(path, Task.CAUSAL_LM)
    model.model.layers[1].mlp = DataDependentMLP(model.model.layers[1].mlp)
    from lora_edge.export.decoder import causal_lm_graph_io

    io = causal_lm_graph_io(model, ExportContext(Task.CAUSAL_LM, load_tokenizer(path), model.config))
    with pytest.raises(ExportError) as caught:
        export_onnx(io, tmp_path / "broken.onnx", graph_name="merged.fp32")
    message = caught.value.format_message()
    assert "model.layers.1.mlp" in message and "DataDependentMLP" in message, message
    assert "\n" not in message
    assert not (tmp_path / "broken.onnx").exists()


@pytest.mark.parametrize("change, field", [
    (dict(layer_types=["full_attention", "linear_attention"]), "layer_types"),
    (dict(kv_sharing_modes=["store", "reuse"]), "kv_sharing_modes"),
])
def test_architectures_whose_cache_does_not_fit_are_refused(change, field):
    from transformers import LlamaConfig

    from lora_edge.export.decoder import check_supported

    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    check_supported(config)
    for key, value in change.items():
        setattr(config, key, value)
    with pytest.raises(ExportError, match=field):
        check_supported(config)


def test_cli_export_refuses_an_adapter_of_another_base(tiny_model, tiny_adapter, tmp_path, capsys):
    from lora_edge.cli import main

    out = tmp_path / "bundle"
    with pytest.raises(SystemExit) as caught:
        main(["export", "--task", "causal-lm", "--model", str(tiny_model("llama")), "--adapter",
              f"g={tiny_adapter('gpt2')}", "--forms", "merged", "--out", str(out)])
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    assert caught.value.code == 4, errors
    assert len(errors) == 1 and "c_attn" in errors[0], errors  # one line, naming the module the base lacks
    assert not out.exists() and not list(tmp_path.glob(".bundle*"))


def test_manifest_records_the_verified_diff_of_each_decoder_graph(bundles):
    bundle, _ = bundles("mistral", Form.HOTSWAP)
    graphs = {g["name"]: g for g in json.loads((bundle / "manifest.json").read_text())["graphs"]}
    for name in ("merged.fp32", "branched.fp32", "hotswap.fp32"):
        assert graphs[name]["extra"]["max_abs_diff"] <= 1e-4, name
