"""``onnx/genai_config.json``: what onnxruntime-genai needs to run a causal-LM bundle's graphs as they are.

lora-edge's decoder graphs already use the input/output names and KV-cache
layout onnxruntime-genai expects by default (``input_ids``,
``attention_mask``, ``position_ids``, ``past_key_values.%d.key`` ->
``present.%d.key``, ``logits``); genai only lacks the model description it
reads from ``genai_config.json`` beside the graph (schema: onnxruntime-genai's
``src/config.h``; the fields below are those its model builder writes for a
decoder-only model). The tokenizer files are already in ``onnx/``.

One config names one graph (``model.decoder.filename``): the hot-swap fp32
graph when the bundle has one (its ``.onnx_adapter`` files load with
``og.Adapters``; no adapter active = the base model), else the merged fp32
graph. Other graphs of the bundle run with the same file and an overlay that
changes the filename (``og.Config.overlay``), see README.md.

The KV cache grows with every step (``past_present_share_buffer`` false): the
graphs concatenate past and new keys instead of writing into a
preallocated buffer.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from lora_edge.core.bundle import ONNX_DIR
from lora_edge.core.choices import Form, Precision
from lora_edge.core.manifest import GraphRecord

GENAI_CONFIG_FILE = "genai_config.json"
# Model types onnxruntime-genai runs as plain decoders (its ModelType::IsLLM); others run as the generic "decoder".
GENAI_LLM_TYPES = {"chatglm", "decoder", "ernie4_5", "gemma", "gemma2", "gemma3_text", "gpt2", "granite", "llama",
                   "mistral", "nemotron", "olmo", "phi", "phimoe", "phi3", "phi3small", "qwen2", "qwen3", "smollm3"}
# config.json field names across architectures (GPT-2 uses its own).
_FIELDS = {"heads": ("num_attention_heads", "n_head"), "layers": ("num_hidden_layers", "n_layer"),
           "hidden": ("hidden_size", "n_embd"), "context": ("max_position_embeddings", "n_positions", "n_ctx")}


def _first(config: dict, key: str):
    return next((config[name] for name in _FIELDS[key] if config.get(name) is not None), None)


def default_graph(records: Sequence[GraphRecord]) -> GraphRecord | None:
    """The graph genai_config.json names: hot-swap fp32, else merged fp32, else the first fp32 causal-LM graph;
    in a bundle without fp32 graphs (only quantized precisions exported), the same among its quantized graphs."""
    graphs = [r for r in records if r.task == "causal-lm"]
    fp32 = [r for r in graphs if r.precision is Precision.FP32] or graphs
    for form in (Form.HOTSWAP, Form.MERGED):
        chosen = next((r for r in fp32 if r.form is form), None)
        if chosen is not None:
            return chosen
    return fp32[0] if fp32 else None


def build_genai_config(model_config: dict, graph: GraphRecord, pad_token_id: int | None = None) -> dict:
    """The genai_config.json dict for ``graph`` of a model whose HF ``config.json`` is ``model_config``."""
    heads, layers = _first(model_config, "heads"), _first(model_config, "layers")
    hidden, context = _first(model_config, "hidden"), _first(model_config, "context")
    inputs = graph.extra.get("inputs") or ["input_ids", "attention_mask", "position_ids"]
    eos = model_config.get("eos_token_id")
    pad = model_config.get("pad_token_id")
    pad = pad if pad is not None else (pad_token_id if pad_token_id is not None else
                                       (eos[0] if isinstance(eos, list) else eos))
    model_type = model_config.get("model_type", "decoder")
    decoder_inputs = {name: name for name in ("input_ids", "attention_mask", "position_ids") if name in inputs}
    decoder_inputs.update(past_key_names="past_key_values.%d.key", past_value_names="past_key_values.%d.value")
    return {
        "model": {
            "bos_token_id": model_config.get("bos_token_id"),
            "eos_token_id": eos,
            "pad_token_id": pad,
            "context_length": context,
            "vocab_size": model_config.get("vocab_size"),
            "type": model_type if model_type in GENAI_LLM_TYPES else "decoder",
            "decoder": {
                "filename": Path(graph.file).name,
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "head_size": model_config.get("head_dim") or hidden // heads,
                "hidden_size": hidden,
                "num_attention_heads": heads,
                "num_hidden_layers": layers,
                "num_key_value_heads": model_config.get("num_key_value_heads") or heads,
                "inputs": decoder_inputs,
                "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                            "present_value_names": "present.%d.value"},
            },
        },
        "search": {"do_sample": False, "num_beams": 1, "num_return_sequences": 1, "max_length": context,
                   "min_length": 0, "past_present_share_buffer": False, "early_stopping": True,
                   "length_penalty": 1.0, "repetition_penalty": 1.0, "no_repeat_ngram_size": 0,
                   "diversity_penalty": 0.0, "temperature": 1.0, "top_k": 1, "top_p": 1.0},
    }


def write_genai_config(bundle_dir: Path, records: Sequence[GraphRecord]) -> Path | None:
    """Write ``bundle_dir/onnx/genai_config.json`` for the bundle's causal-LM graphs; None when there is none."""
    graph = default_graph(records)
    if graph is None:
        return None
    onnx_dir = Path(bundle_dir) / ONNX_DIR
    model_config = json.loads((onnx_dir / "config.json").read_text())
    pad = None
    tokenizer_config = onnx_dir / "tokenizer_config.json"
    if tokenizer_config.is_file():
        from lora_edge.runtime.tokenizer import load_bundle_tokenizer

        pad = load_bundle_tokenizer(onnx_dir).pad_token_id
    path = onnx_dir / GENAI_CONFIG_FILE
    path.write_text(json.dumps(build_genai_config(model_config, graph, pad), indent=2) + "\n")
    return path
