"""Floating-point work of a model and of an adapter's low-rank pairs (the theory beside the timings).

A LoRA pair on a linear layer ``in -> out`` of rank ``r`` adds ``x·Aᵀ`` (r·in
multiply-adds per token) and ``(x·Aᵀ)·Bᵀ`` (out·r), i.e. ``2·r·(in + out)``
FLOPs per token over the base layer's ``2·in·out``. The merged form adds none.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def lora_pair_flops(in_features: int, out_features: int, rank: int, tokens: int = 1) -> int:
    """FLOPs (multiply and add counted apart) a rank-``rank`` pair adds on ``in -> out`` for ``tokens`` tokens."""
    return 2 * tokens * rank * (in_features + out_features)


def lora_shapes(adapter_weights: Path) -> list[tuple[str, int, int, int]]:
    """``(module, in, out, rank)`` of each LoRA pair in an ``adapter_model.safetensors`` (header only).

    Embedding pairs (``lora_embedding_A/B``) are listed with ``in = 0``: their A
    is a table lookup, not a matmul.
    """
    from safetensors import safe_open

    shapes: dict[str, dict[str, list[int]]] = {}
    with safe_open(str(adapter_weights), framework="numpy") as handle:
        for key in handle.keys():
            for part in ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B"):
                marker = f".{part}"
                if marker in key:
                    module = key.split(marker)[0]
                    shapes.setdefault(module, {})[part] = list(handle.get_slice(key).get_shape())
    pairs = []
    for module, parts in sorted(shapes.items()):
        if "lora_A" in parts and "lora_B" in parts:
            rank, in_features = parts["lora_A"]
            out_features = parts["lora_B"][0]
            pairs.append((module, in_features, out_features, rank))
        elif "lora_embedding_A" in parts and "lora_embedding_B" in parts:
            rank = parts["lora_embedding_A"][0]
            # PEFT stores embedding B as [out, r] ([embedding_dim, r])
            pairs.append((module, 0, parts["lora_embedding_B"][0], rank))
    return pairs


def adapter_flops_per_token(adapter_weights: Path) -> int:
    """Extra FLOPs per token of an adapter's branches (the branched and hot-swap forms)."""
    return sum(lora_pair_flops(in_features, out_features, rank) for _, in_features, out_features, rank
               in lora_shapes(adapter_weights))


def model_flops(model: "torch.nn.Module", inputs: dict[str, "torch.Tensor"]) -> int:
    """FLOPs of one forward pass of ``model`` on ``inputs``, counted by torch's FlopCounterMode.

    Counts matmuls and attention exactly for the given shapes; elementwise ops
    are not counted (they are a few percent of a transformer's work).
    """
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        model(**inputs)
    return int(counter.get_total_flops())
