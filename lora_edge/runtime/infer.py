"""Classify text with a bundle's graph through ONNX Runtime (``lora-edge infer``).

Uses only what the bundle holds: the graph, the tokenizer and config beside it
in ``onnx/``, the label names recorded in the manifest, and for a hot-swap graph
the adapter's ``.onnx_adapter`` file (activated per run, no new session).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from lora_edge.core.bundle import ONNX_DIR
from lora_edge.core.choices import Form, Task
from lora_edge.core.data import DEFAULT_MAX_LENGTH
from lora_edge.core.errors import ConfigError
from lora_edge.core.manifest import Manifest, choose_adapter, find_task_graph, require_adapter_file

if TYPE_CHECKING:
    from lora_edge.runtime.session import SessionSettings



@dataclass
class Prediction:
    """One text's predicted label and the softmax score of every label."""

    text: str
    label: str
    scores: dict[str, float]

    def to_json(self) -> dict:
        """JSON form: text, label, scores."""
        return {"text": self.text, "label": self.label, "scores": self.scores}


def _labels(manifest: Manifest, adapter: str | None, width: int) -> list[str]:
    # The base model of a hot-swap graph carries the first adapter's label names (export_bundle builds it so).
    entry = manifest.adapter(adapter) or next(iter(manifest.adapters), None)
    labels = (entry.labels if entry else None) or []
    return list(labels) if len(labels) == width else [f"LABEL_{i}" for i in range(width)]


def infer(bundle: Path, graph: str, texts: Sequence[str], adapter: str | None = None,
          settings: "SessionSettings | None" = None, max_length: int = DEFAULT_MAX_LENGTH) -> list[Prediction]:
    """Classify ``texts`` with graph ``graph`` of ``bundle`` (for hot-swap, with ``adapter``; 'none' = base)."""
    import numpy as np

    from lora_edge.core.data import encode_texts
    from lora_edge.core.models import load_config
    from lora_edge.runtime.session import create_session, load_lora_adapter, run
    from lora_edge.runtime.tokenizer import load_bundle_tokenizer

    bundle = Path(bundle)
    manifest, record = find_task_graph(bundle, graph, Task.SEQ_CLS)
    if not texts:
        raise ConfigError("no text given", "--text", "pass --text \"...\" (repeatable)")
    chosen = choose_adapter(record, manifest, adapter)
    onnx_dir = bundle / ONNX_DIR
    tokenizer = load_bundle_tokenizer(onnx_dir)  # no transformers/torch on the device side
    max_length = min(max_length, load_config(onnx_dir).get("max_position_embeddings", 514) - 2)
    encoded = encode_texts(tokenizer, texts, max_length, tensors="np")
    feeds = {name: np.asarray(value, dtype=np.int64) for name, value in encoded.items()}
    session = create_session(bundle / record.file, settings)
    lora = load_lora_adapter(require_adapter_file(bundle, record, chosen)) \
        if record.form is Form.HOTSWAP and chosen is not None else None
    (logits,) = run(session, feeds, adapter=lora, output_names=["logits"])
    logits = logits.astype(np.float64)
    probabilities = np.exp(logits - logits.max(axis=-1, keepdims=True))
    probabilities /= probabilities.sum(axis=-1, keepdims=True)
    labels = _labels(manifest, chosen, logits.shape[-1])
    return [Prediction(text, labels[int(row.argmax())], {label: round(float(p), 6) for label, p in zip(labels, row)})
            for text, row in zip(texts, probabilities)]


def format_predictions(predictions: list[Prediction], as_json: bool = False) -> str:
    """Human lines (``label  score  text``) or a JSON list."""
    if as_json:
        return json.dumps([p.to_json() for p in predictions], indent=2)
    return "\n".join(f"{p.label}\t{p.scores[p.label]:.3f}\t{p.text}" for p in predictions)
