"""Bundles for the profiler and comparison tests.

* :func:`export_tiny_bundle`: a real bundle from ``export_bundle`` (tiny BERT +
  random adapter, merged and hot-swap), for the eager baselines and hot-swap runs.
* :func:`synthetic_bundle`: hand-built ONNX graphs (numpy weights, onnx.helper)
  in the bundle layout: an embedding, linear layers with and without explicit
  ``lora_A``/``lora_B`` pairs, a pooled head; optionally a KV-cache input like
  the decoders'. They need neither torch nor a model directory, so the same
  helpers run on a bare GPU image (``scripts/gpu_checks.sh``) and keep CPU tests fast.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from lora_edge.core.bundle import write_json
from lora_edge.core.choices import Form, Precision
from lora_edge.core.manifest import GraphRecord

ADAPTER_NAME = "tiny"
_BUILT: dict[tuple, Path] = {}


def export_tiny_bundle(model_dir: Path, adapter_dir: Path, out: Path) -> Path:
    """merged and hotswap fp32 graphs of ``model_dir`` + ``adapter_dir`` via export_bundle (cached).

    The branched form is left to the synthetic bundles: each exported form costs seconds.
    """
    from lora_edge.core.adapters import AdapterRef
    from lora_edge.export.bundle import export_bundle

    key = ("export", str(model_dir), str(adapter_dir))
    if key not in _BUILT:
        _BUILT[key] = export_bundle(model_dir, [AdapterRef(ADAPTER_NAME, adapter_dir)],
                                    ["merged", "hotswap"], out, progress=lambda message: None)
    return _BUILT[key]


def copy_bundle(bundle: Path, out: Path) -> Path:
    """A private copy of a shared bundle (tests that write reports must not race each other)."""
    shutil.copytree(bundle, out)
    return out


# --- synthetic graphs ------------------------------------------------------------------------

def _tensor(name: str, value: np.ndarray):
    from onnx import numpy_helper

    return numpy_helper.from_array(value, name)


def _linear_layers(rng, hidden: int, layers: int, rank: int, branched: bool, dtype) -> tuple[list, list, dict]:
    """Nodes and initializers of ``layers`` linears (h -> h), each merged or with an explicit LoRA pair."""
    from onnx import helper

    nodes, inits, lora = [], [], {}
    current = "embedded"
    for index in range(layers):
        weight = (rng.standard_normal((hidden, hidden)) / np.sqrt(hidden)).astype(np.float32)
        a = (rng.standard_normal((rank, hidden)) / np.sqrt(hidden)).astype(np.float32)
        b = (rng.standard_normal((hidden, rank)) * 0.1).astype(np.float32)
        module = f"base_model.model.layer.{index}.dense"
        lora[f"{module}.lora_A.weight"], lora[f"{module}.lora_B.weight"] = a, b
        out = f"hidden_{index}"
        if branched:
            inits += [_tensor(f"W{index}", weight.astype(dtype)), _tensor(f"{module}.lora_A", a.T.astype(dtype)),
                      _tensor(f"{module}.lora_B", b.T.astype(dtype))]
            nodes += [helper.make_node("MatMul", [current, f"W{index}"], [f"base_{index}"]),
                      helper.make_node("MatMul", [current, f"{module}.lora_A"], [f"down_{index}"]),
                      helper.make_node("MatMul", [f"down_{index}", f"{module}.lora_B"], [f"up_{index}"]),
                      helper.make_node("Add", [f"base_{index}", f"up_{index}"], [f"pre_{index}"])]
        else:
            inits.append(_tensor(f"W{index}", (weight + (b @ a).T).astype(dtype)))
            nodes.append(helper.make_node("MatMul", [current, f"W{index}"], [f"pre_{index}"]))
        nodes.append(helper.make_node("Relu", [f"pre_{index}"], [out]))
        current = out
    return nodes, inits, lora


def synthetic_graph(path: Path, branched: bool, hidden: int = 64, layers: int = 2, rank: int = 4,
                    vocab: int = 100, labels: int = 3, fp16: bool = False, decoder: bool = False,
                    extra_op: str | None = None, seed: int = 0, positions: int | None = None) -> dict[str, np.ndarray]:
    """Write one synthetic graph to ``path``; returns its LoRA tensors (PEFT names and layout).

    Encoder I/O: input_ids, attention_mask [batch, sequence] -> logits [batch, labels].
    With ``decoder``: also position_ids and one layer's past_key_values.0.key/value
    [batch, 2, past_sequence, hidden/2] -> logits [batch, sequence, vocab] and
    present.0.key/value, like the exported decoders. ``extra_op`` inserts an
    identity-like node of that op type (e.g. to exercise provider placement).
    ``positions`` (decoders): a learned position table of that many rows, gathered by
    ``position_ids``, so that a position past the context fails like a real model's.
    """
    import onnx
    from onnx import TensorProto, helper

    rng = np.random.default_rng(seed)
    dtype = np.float16 if fp16 else np.float32
    elem = TensorProto.FLOAT16 if fp16 else TensorProto.FLOAT
    embedding = rng.standard_normal((vocab, hidden)).astype(dtype)
    nodes = [helper.make_node("Gather", ["embedding", "input_ids"], ["embedded"])]
    inits = [_tensor("embedding", embedding)]
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"]),
              helper.make_tensor_value_info("attention_mask", TensorProto.INT64,
                                            ["batch", "total_sequence" if decoder else "sequence"])]
    if decoder and positions:
        inits.append(_tensor("position_table", rng.standard_normal((positions, hidden)).astype(dtype)))
        nodes = [helper.make_node("Gather", ["embedding", "input_ids"], ["tokens"]),
                 helper.make_node("Gather", ["position_table", "position_ids"], ["placed"]),
                 helper.make_node("Add", ["tokens", "placed"], ["embedded"])]
    linear_nodes, linear_inits, lora = _linear_layers(rng, hidden, layers, rank, branched, dtype)
    nodes += linear_nodes
    inits += linear_inits
    last = f"hidden_{layers - 1}"
    if extra_op:
        nodes.append(helper.make_node(extra_op, [last], [f"{last}_extra"]))
        last = f"{last}_extra"
    outputs = []
    if decoder:
        half = hidden // 2
        inputs.append(helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["batch", "sequence"]))
        head = (rng.standard_normal((hidden, vocab)) / np.sqrt(hidden)).astype(dtype)
        inits += [_tensor("lm_head", head), _tensor("kv_shape", np.array([0, 0, 2, half], dtype=np.int64))]
        nodes += [helper.make_node("MatMul", [last, "lm_head"], ["logits_raw"]),
                  helper.make_node("Reshape", [last, "kv_shape"], ["kv_split"]),
                  helper.make_node("Transpose", ["kv_split"], ["kv_new"], perm=[0, 2, 1, 3])]
        for kind in ("key", "value"):
            past = f"past_key_values.0.{kind}"
            inputs.append(helper.make_tensor_value_info(past, elem, ["batch", 2, "past_sequence", half]))
            nodes.append(helper.make_node("Concat", [past, "kv_new"], [f"present.0.{kind}"], axis=2))
            outputs.append(helper.make_tensor_value_info(f"present.0.{kind}", elem,
                                                         ["batch", 2, "total_sequence", half]))
        logits_shape = ["batch", "sequence", vocab]
    else:
        head = (rng.standard_normal((hidden, labels)) / np.sqrt(hidden)).astype(dtype)
        inits.append(_tensor("classifier", head))
        nodes += [helper.make_node("ReduceMean", [last], ["pooled"], axes=[1], keepdims=0),
                  helper.make_node("MatMul", ["pooled", "classifier"], ["logits_raw"])]
        logits_shape = ["batch", labels]
    # inputs and outputs stay fp32 in fp16 graphs, like the quantizer's fp16 graphs
    nodes.append(helper.make_node("Cast", ["logits_raw"], ["logits"], to=TensorProto.FLOAT))
    outputs.insert(0, helper.make_tensor_value_info("logits", TensorProto.FLOAT, logits_shape))
    graph = helper.make_graph(nodes, "synthetic", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return lora


def synthetic_bundle(out: Path, forms: tuple[str, ...] = ("merged", "branched"), fp16: bool = False,
                     decoder: bool = False, extra_op: str | None = None, rank: int = 4, hidden: int = 64,
                     **graph_options) -> Path:
    """A bundle of synthetic graphs (fp32, or fp16 with ``fp16``) with a matching PEFT adapter file."""
    from safetensors.numpy import save_file

    precision = Precision.FP16 if fp16 else Precision.FP32
    task = "causal-lm" if decoder else "seq-cls"
    (out / "onnx").mkdir(parents=True)
    (out / "adapter").mkdir()
    records, lora = [], {}
    for form in forms:
        file = f"onnx/{form}.{precision.value}.onnx"
        lora = synthetic_graph(out / file, branched=(form == "branched"), fp16=fp16, decoder=decoder,
                               extra_op=extra_op, rank=rank, hidden=hidden, **graph_options)
        records.append(GraphRecord(GraphRecord.graph_name(Form(form), precision), file, Form(form), precision,
                                   task, adapter=ADAPTER_NAME).to_json())
    save_file(lora, str(out / "adapter" / "adapter_model.safetensors"))
    vocab = graph_options.get("vocab", 100)
    (out / "onnx" / "config.json").write_text(json.dumps({"vocab_size": vocab, "hidden_size": hidden}))
    config = {"r": rank, "lora_alpha": rank, "peft_type": "LORA", "task_type": "SEQ_CLS" if not decoder else "CAUSAL_LM",
              "target_modules": ["dense"]}
    (out / "adapter" / "adapter_config.json").write_text(json.dumps(config))
    manifest = {"lora_edge_version": "test", "created": "", "libraries": {}, "seed": 0,
                # no model directory: the eager baselines are reported as not measured
                "model": {"path": str(out / "no-model"), "sha256": "", "task": task, "default": False},
                "adapters": [{"name": ADAPTER_NAME, "source": "synthetic", "sha256": "", "bundle_dir": "adapter",
                              "lora_config": config, "labels": None, "data": None}],
                "graphs": records, "recipe": None}
    write_json(out / "manifest.json", manifest)
    return out


def synthetic_rank_bundle(out: Path, ranks: tuple[int, ...], hidden: int = 64) -> Path:
    """One bundle with an adapter per rank (``r<rank>``), each with its merged and branched fp32 graphs.

    What the rank axis of a sweep exports: one bundle for every rank.
    """
    from safetensors.numpy import save_file

    (out / "onnx").mkdir(parents=True)
    records, adapters = [], []
    for rank in ranks:
        name = f"r{rank}"
        (out / name).mkdir()
        for form in ("merged", "branched"):
            file = f"onnx/{form}.{name}.fp32.onnx"
            lora = synthetic_graph(out / file, branched=(form == "branched"), rank=rank, hidden=hidden)
            records.append(GraphRecord(GraphRecord.graph_name(Form(form), Precision.FP32, name), file, Form(form),
                                       Precision.FP32, "seq-cls", adapter=name).to_json())
        save_file(lora, str(out / name / "adapter_model.safetensors"))
        config = {"r": rank, "lora_alpha": rank, "peft_type": "LORA", "task_type": "SEQ_CLS",
                  "target_modules": ["dense"]}
        (out / name / "adapter_config.json").write_text(json.dumps(config))
        adapters.append({"name": name, "source": "synthetic", "sha256": "", "bundle_dir": name,
                         "lora_config": config, "labels": None, "data": None})
    (out / "onnx" / "config.json").write_text(json.dumps({"vocab_size": 100, "hidden_size": hidden}))
    write_json(out / "manifest.json", {"lora_edge_version": "test", "created": "", "libraries": {}, "seed": 0,
                                       "model": {"path": str(out / "no-model"), "sha256": "", "task": "seq-cls",
                                                 "default": False},
                                       "adapters": adapters, "graphs": records, "recipe": None})
    return out

