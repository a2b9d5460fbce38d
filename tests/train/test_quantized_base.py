"""Quantization-aware adapters: the int4 base as the graph holds it, training against it, the gate's reference."""

from __future__ import annotations

import random

import numpy as np
import pytest
from decoder_bundles import bundle_for, shared_root

from lora_edge.core.choices import Form
from lora_edge.core.errors import ConfigError
from lora_edge.core.fake_quant import (BaseQuantization, fake_quantize_base, fake_quantize_matmul, read_base_quantization,
                                  unpack_matmul_nbits)
from lora_edge.core.models import Task
from lora_edge.core.recipe import LoraSpec, TrainSpec

WORDS = ["the", "a", "this", "my", "was", "is", "so", "very", "really", "it", "minute", "paper", "light", "off"]


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("block_size", [16, 32])
def test_numpy_rounding_is_ort_kernels_bit_for_bit(symmetric, block_size):
    """The MatMulNBits quantizer's own C++ kernel, on K not a multiple of the block and on exact .5 ties."""
    from onnxruntime.capi._pybind_state import quantize_matmul_4bits

    rng = np.random.default_rng(0)
    for weight in (rng.standard_normal((100, 24)).astype(np.float32),
                   (rng.integers(-30, 30, (64, 8)) / 4).astype(np.float32),  # many values land on .5 steps
                   np.zeros((32, 3), np.float32)):
        k, n = weight.shape
        blocks = -(-k // block_size)
        padded = np.zeros((blocks * block_size, n), np.float32)
        padded[:k] = weight
        packed = np.zeros((n, blocks, block_size // 2), np.uint8)
        zero_points = np.zeros((n, (blocks + 1) // 2), np.uint8)
        scales = np.zeros((n, blocks), np.float32)
        quantize_matmul_4bits(packed, padded, scales, zero_points, block_size, n, k, symmetric)
        kernel = unpack_matmul_nbits(packed, scales, None if symmetric else zero_points, k, n, block_size)
        ours = fake_quantize_matmul(weight, block_size, symmetric)
        assert np.array_equal(ours, kernel)
        assert not np.array_equal(ours, weight) or not weight.any()


def _tensor(model, name: str) -> np.ndarray:
    from onnx import numpy_helper

    return next(numpy_helper.to_array(init) for init in model.graph.initializer if init.name == name)


def _graph_weights(path) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The dequantized [K, N] weights of every MatMulNBits node and [rows, dim] tables of every quantized Gather."""
    import onnx
    from onnx import helper

    model = onnx.load(str(path))
    matmuls, tables = [], []
    for node in model.graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type == "MatMulNBits":
            zero_points = _tensor(model, node.input[3]) if len(node.input) > 3 and node.input[3] else None
            matmuls.append(unpack_matmul_nbits(_tensor(model, node.input[1]), _tensor(model, node.input[2]),
                                               zero_points, attrs["K"], attrs["N"], attrs["block_size"]))
        elif node.op_type == "GatherBlockQuantized" and attrs.get("quantize_axis", 1) == 1:  # an untied table
            q = _tensor(model, node.input[0]).astype(np.float32)
            scales = np.repeat(_tensor(model, node.input[2]), attrs["block_size"], axis=1)[:, :q.shape[1]]
            zero = (np.repeat(_tensor(model, node.input[3]), attrs["block_size"], axis=1)[:, :q.shape[1]]
                    if len(node.input) > 3 else 0)
            tables.append((q - zero) * scales)
    return matmuls, tables


def _same(found: list[np.ndarray], expected: list[np.ndarray]) -> int:
    """How many of ``found`` equal (bit for bit) one of ``expected``."""
    return sum(any(f.shape == e.shape and np.array_equal(f, e) for e in expected) for f in found)


def _covered(found: list[np.ndarray], linears: list[np.ndarray]) -> list[int]:
    """The indices of ``linears`` that ``found`` holds bit for bit, one by one or packed.

    The CPU rewrites pack each block's q, k and v into one MatMul (their
    weights side by side along N: blocks run along K, so each column keeps its
    own rounding).
    """
    packed = {start: np.concatenate(linears[start:start + 3], axis=1) for start in range(0, len(linears) - 1, 7)}
    held = []
    for weight in found:
        single = [i for i, e in enumerate(linears) if e.shape == weight.shape and np.array_equal(e, weight)]
        triple = [s for s, e in packed.items() if e.shape == weight.shape and np.array_equal(e, weight)]
        assert single or triple, f"a MatMulNBits weight {weight.shape} is no fake-quantized base weight"
        held += single[:1] or list(range(triple[0], triple[0] + 3))
    return sorted(held)


@pytest.fixture(scope="module")
def tied_llama(tiny_model, tmp_path_factory):
    """The tiny llama with its LM head tied to the embedding (as SmolLM2, Llama-3.2, Qwen2.5)."""
    import shutil

    import torch
    from transformers import AutoModelForCausalLM

    from lora_edge.core.tiny import tiny_config

    source, out = tiny_model("llama"), tmp_path_factory.mktemp("tied-llama")
    for path in source.iterdir():
        if path.is_file() and path.name not in ("config.json", "model.safetensors", "generation_config.json"):
            shutil.copy(path, out / path.name)
    config = tiny_config("llama")
    config.tie_word_embeddings = True
    torch.manual_seed(5)
    AutoModelForCausalLM.from_config(config).save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def qat_adapter(tied_llama, tmp_path_factory):
    """A tied tiny-llama adapter trained against the int4 base (a few steps on random text)."""
    from lora_edge.core.data import DataFiles
    from lora_edge.train.trainer import train_adapter

    root = tmp_path_factory.mktemp("qat")
    rng = random.Random(3)
    corpus = root / "corpus.txt"
    corpus.write_text("".join(" ".join(rng.choice(WORDS) for _ in range(10)) + "\n" for _ in range(48)))
    return train_adapter(tied_llama, DataFiles(corpus), root / "adapter", "causal-lm",
                         LoraSpec(rank=4, alpha=32, targets="q_proj,v_proj"),
                         TrainSpec(max_steps=4, batch_size=8, learning_rate=5e-2, max_length=16,
                                   quantized_base="int4"), progress=False)


@pytest.fixture(scope="module")
def qat_bundle(qat_adapter, tied_llama, tmp_path_factory):
    """The adapter's branched graph, fp32 and int4."""
    from lora_edge.core.adapters import AdapterRef
    from lora_edge.export.bundle import export_bundle
    from lora_edge.quantize.quantizer import quantize_bundle

    bundle = tmp_path_factory.mktemp("qat-bundle") / "bundle"
    export_bundle(tied_llama, [AdapterRef("qat", qat_adapter.out)], ["branched"], bundle, task="causal-lm",
                  progress=lambda message: None)
    quantize_bundle(bundle, ["int4"], progress=lambda message: None)
    return bundle


@pytest.mark.parametrize("head", ["untied", "tied"])
def test_fake_quantized_base_is_the_int4_graphs_base(head, tiny_model, tiny_adapter, tmp_path_factory, tmp_path,
                                                     request):
    """Every MatMulNBits weight (and quantized table) of the exported int4 graph is a fake-quantized base weight.

    Untied: the LM head is a linear of its own and the embedding an asymmetric
    table; tied: one symmetric int4 copy serves head and lookup.
    """
    import torch
    from transformers import AutoModelForCausalLM

    from lora_edge.quantize.quantizer import quantize_graph

    if head == "tied":
        model_dir, int4 = request.getfixturevalue("tied_llama"), request.getfixturevalue("qat_bundle")
        int4 = int4 / "onnx" / "branched.int4.onnx"
    else:
        model_dir = tiny_model("llama")
        bundle, graph = bundle_for("llama", Form.BRANCHED, shared_root(tmp_path_factory), tiny_model, tiny_adapter)
        int4 = quantize_graph(bundle / "onnx" / f"{graph}.onnx", tmp_path / "branched.int4.onnx", "int4",
                              task="causal-lm").path
    matmuls, tables = _graph_weights(int4)

    model = AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()
    original = {name: p.detach().clone() for name, p in model.named_parameters()}
    counts = fake_quantize_base(model, BaseQuantization())
    linears = [m.weight.detach().numpy().T for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert counts == {"linear": 2 * 7 + (head == "untied"), "embedding": int(head == "untied"),
                      "tied_head": int(head == "tied")}
    assert len(linears) == 2 * 7 + 1  # q, k, v, o, gate, up, down per block + the head
    assert _covered(matmuls, linears) == list(range(len(linears)))
    assert len(tables) == counts["embedding"]
    if tables:
        assert np.array_equal(tables[0], model.get_input_embeddings().weight.detach().numpy())
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, original[n])]
    assert len(changed) == len(linears) + counts["embedding"] and not any("norm" in n for n in changed)


def test_a_quantized_base_is_refused_where_it_cannot_apply(tiny_model, tmp_path):
    from lora_edge.core.data import DataFiles
    from lora_edge.train.trainer import train_adapter

    for bad in ({"quantized_base": "int3"}, {"quantized_base": "int4", "quantized_base_block_size": 24}):
        with pytest.raises(ConfigError, match="quantized_base"):
            TrainSpec(**bad)
    corpus = tmp_path / "c.csv"
    corpus.write_text("text,label\n" + "".join(f"w{i},{i % 2}\n" for i in range(10)))
    with pytest.raises(ConfigError, match="causal LMs only"):
        train_adapter(tiny_model("bert"), DataFiles(corpus), tmp_path / "out", "seq-cls",
                      spec=TrainSpec(max_steps=1, quantized_base="int4"), progress=False)
    assert not (tmp_path / "out").exists()


def test_training_records_the_quantized_base(qat_adapter):
    assert read_base_quantization(qat_adapter.out) == BaseQuantization("int4", 32, False)
    assert qat_adapter.metrics["quantized_base"] == {"precision": "int4", "block_size": 32}
    assert qat_adapter.metrics["quantized_base_weights"] == {"linear": 2 * 7, "embedding": 0, "tied_head": 1}
    assert read_base_quantization(qat_adapter.out.parent) is None  # no weights file: no record


def test_gate_measures_int4_graphs_against_the_int4_base(qat_adapter, qat_bundle, tied_llama):
    """The int4 graph of a quantization-aware adapter is checked against fake-quantized base + adapter.

    That reference is much closer to the graph than the float base + adapter is
    (so the gate measures the graph, not the quantization the adapter absorbs),
    and fp32 graphs are still held to the float reference.
    """
    from lora_edge.core.adapters import AdapterRef, load_reference
    from lora_edge.check.gate import check_bundle, quantized_reference_note
    from lora_edge.check.tasks import BACKENDS, EvalSet
    from lora_edge.core.manifest import Manifest
    from lora_edge.core.models import load_tokenizer
    from lora_edge.core.recipe import CheckSpec
    from lora_edge.runtime.session import create_session

    report = check_bundle(qat_bundle, CheckSpec(max_examples=6, greedy_prompts=2, greedy_tokens=4), write=False)
    assert "trained against the base quantized to int4" in report.data["qat"]
    by_precision = {result.precision: result for result in report.targets}
    fp32 = {m.metric: m for m in by_precision["fp32"].metrics}
    assert fp32["max_abs_diff"].status == "passed"  # the float reference: fp32 graphs unaffected
    gated = {m.metric: m.value for m in by_precision["int4"].metrics}
    graphs = Manifest.read(qat_bundle).graphs
    assert "blocks of 32, not as the adapter" in quantized_reference_note(BaseQuantization(block_size=64), graphs)
    assert "not as the adapter" not in quantized_reference_note(BaseQuantization(), graphs)

    backend, tokenizer = BACKENDS["causal-lm"], load_tokenizer(tied_llama)
    texts = ["the very minute it was", "my paper is so light off", "this was really it a"]
    batches = backend.batches(tokenizer, EvalSet(texts, "test"), 8, 32)
    session = create_session(qat_bundle / "onnx" / "branched.int4.onnx")
    graph = [backend.rows(backend.graph(session, b, None), b) for b in batches]
    model = load_reference(tied_llama, AdapterRef("qat", qat_adapter.out), Task.CAUSAL_LM)
    floating = [backend.rows(backend.reference(model, b), b) for b in batches]
    fake_quantize_base(model, BaseQuantization())
    quantized = [backend.rows(backend.reference(model, b), b) for b in batches]
    to_float = np.mean([np.abs(g - f).mean() for g, f in zip(graph, floating)])
    to_quantized = np.mean([np.abs(g - q).mean() for g, q in zip(graph, quantized)])
    assert to_quantized < 0.25 * to_float
    assert gated["mean_abs_diff"] < 0.25 * to_float  # the gate used the quantized reference too


def test_init_adapter_starts_from_a_trained_adapter(qat_adapter, tied_llama, tmp_path):
    """--init-adapter loads the LoRA weights (an almost-zero learning rate keeps them); another rank is refused."""
    from safetensors.numpy import load_file

    from lora_edge.core.data import DataFiles
    from lora_edge.train.trainer import train_adapter

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(f"{WORDS[i % len(WORDS)]} {WORDS[(3 * i) % len(WORDS)]} it was\n" for i in range(20)))
    lora = LoraSpec(rank=4, alpha=32, targets="q_proj,v_proj", dropout=0.0)
    spec = dict(max_steps=1, batch_size=8, learning_rate=1e-12, max_length=16, quantized_base="int4",
                init_adapter=str(qat_adapter.out))
    result = train_adapter(tied_llama, DataFiles(corpus), tmp_path / "again", "causal-lm", lora, TrainSpec(**spec),
                           progress=False)
    start, end = load_file(str(qat_adapter.out / "adapter_model.safetensors")), \
        load_file(str(result.out / "adapter_model.safetensors"))
    assert set(start) == set(end) and all(np.allclose(start[k], end[k], atol=1e-6) for k in start)
    assert any(np.abs(start[k]).max() > 1e-3 for k in start if "lora_B" in k)  # a trained B, not zeros
    with pytest.raises(ConfigError, match="does not fit"):
        train_adapter(tied_llama, DataFiles(corpus), tmp_path / "other", "causal-lm",
                      LoraSpec(rank=2, targets="q_proj,v_proj"), TrainSpec(**spec), progress=False)
    with pytest.raises(ConfigError, match="no adapter_model.safetensors"):
        train_adapter(tied_llama, DataFiles(corpus), tmp_path / "none", "causal-lm", lora,
                      TrainSpec(**{**spec, "init_adapter": str(tmp_path)}), progress=False)
    assert not (tmp_path / "other").exists() and not (tmp_path / "none").exists()
