"""The int4 base as the exported graph holds it, in numpy and on a PyTorch model (quantization-aware LoRA).

An adapter trained on the float base is deployed on an int4 base (branched or
hot-swap int4 graphs): the base's round-to-nearest error is not what it was
trained against, and on SmolLM2-135M + the commands task it costs about 30
points of exact match (docs/ARCHITECTURE.md, "Facts"). Training against the
base *as the int4 graph will hold it* (QLoRA-style) lets the adapter compensate
that error. That needs the export's rounding exactly, so this module reproduces
it bit for bit:

* linear weights (``MatMul`` -> ``MatMulNBits``): ONNX Runtime's C++ blockwise
  quantizer (MLAS, which ``MatMulNBitsQuantizer`` calls): blocks of
  ``block_size`` along the input dimension, per output column; asymmetric:
  ``scale = (max(0, hi) - min(0, lo)) / 15``, zero point ``roundf(-lo / scale)``;
  symmetric: ``scale = m / -8`` (``m`` the block's value of largest magnitude),
  zero point 8; values ``clamp(roundf(v * (1 / scale) + zp), 0, 15)``, rounding
  half away from zero;
* embedding lookups (``Gather`` -> ``GatherBlockQuantized``): ORT's numpy path,
  ``v / scale`` rounded half to even; a tied embedding instead reads the LM
  head's symmetric blocks (the int4 quantizer stores the pair once).

Dequantized values are ``(q - zp) * scale`` in float32, as the kernels compute
them. :func:`fake_quantize_base` applies this once to a model's base weights
(frozen, so training costs nothing more per step); the adapter records it
(:func:`write_base_quantization`), so the gate can build the reference the
int4 graphs are measured against.
"""

from __future__ import annotations

import json
import struct
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from lora_edge.core.adapters import ADAPTER_WEIGHTS

if TYPE_CHECKING:
    import numpy as np

INT4 = "int4"
QUANTIZED_BASES = (INT4,)
# The key of adapter_model.safetensors' metadata that records the base an adapter was trained against.
METADATA_KEY = "lora_edge.quantized_base"


@dataclass(frozen=True)
class BaseQuantization:
    """How the base was fake-quantized for training: the int4 export's settings (block size, zero points)."""

    precision: str = INT4
    block_size: int = 32
    symmetric: bool = False  # quantize.int4_symmetric; a tied LM head / embedding is always symmetric

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "BaseQuantization":
        return cls(str(data.get("precision", INT4)), int(data.get("block_size", 32)), bool(data.get("symmetric")))

    def describe(self) -> str:
        return f"{self.precision} (blocks of {self.block_size}, {'symmetric' if self.symmetric else 'zero points'})"


# --- numpy: the export's rounding -----------------------------------------------------------------------------

def _round_half_away(x: "np.ndarray") -> "np.ndarray":
    """C's ``roundf`` on float32: half away from zero (``x - trunc(x)`` is exact, unlike ``floor(x + 0.5)``)."""
    import numpy as np

    whole = np.trunc(x)
    return whole + np.sign(x) * (np.abs(x - whole) >= np.float32(0.5))


def _column_blocks(weight_kn: "np.ndarray", block_size: int) -> "np.ndarray":
    """``[K, N]`` -> ``[N, blocks, block_size]`` float32, K zero-padded to whole blocks (as ORT pads it)."""
    import numpy as np

    k, n = weight_kn.shape
    blocks = -(-k // block_size)
    padded = np.zeros((blocks * block_size, n), np.float32)
    padded[:k] = weight_kn
    return np.ascontiguousarray(padded.T).reshape(n, blocks, block_size)


def matmul_blocks(weight_kn: "np.ndarray", block_size: int, symmetric: bool):
    """MatMulNBits' 4-bit quantization of a ``[K, N]`` weight: ``(q [N, blocks, block], scales, zero points)``.

    ``q`` and the zero points are unpacked uint8 (0..15); scales ``[N, blocks]`` float32.
    """
    import numpy as np

    values = _column_blocks(np.asarray(weight_kn, np.float32), block_size)
    low, high = values.min(axis=-1), values.max(axis=-1)
    if symmetric:
        largest = np.where(np.abs(high) > np.abs(low), high, low)
        scales = (largest / np.float32(-8.0)).astype(np.float32)
        zero_points = np.full(scales.shape, 8, np.uint8)
    else:
        low, high = np.minimum(low, np.float32(0)), np.maximum(high, np.float32(0))
        scales = ((high - low) / np.float32(15.0)).astype(np.float32)
        with np.errstate(divide="ignore", invalid="ignore"):
            zero_fp = np.where(scales != 0, np.float32(0) - low / scales, low).astype(np.float32)
        zero_points = np.clip(_round_half_away(zero_fp), 0, 15).astype(np.uint8)
    with np.errstate(divide="ignore"):
        reciprocal = np.where(scales != 0, np.float32(1.0) / scales, np.float32(0)).astype(np.float32)
    scaled = (values * reciprocal[..., None]).astype(np.float32) + zero_points[..., None].astype(np.float32)
    q = np.clip(_round_half_away(scaled), 0, 15).astype(np.uint8)
    return q, scales, zero_points


def dequantize_blocks(q: "np.ndarray", scales: "np.ndarray", zero_points: "np.ndarray", k: int) -> "np.ndarray":
    """``(q - zp) * scale`` of ``[N, blocks, block]`` blocks, back to a ``[K, N]`` float32 weight."""
    import numpy as np

    n = q.shape[0]
    values = (q.astype(np.float32) - zero_points[..., None].astype(np.float32)) * scales[..., None]
    return np.ascontiguousarray(values.reshape(n, -1)[:, :k].T)


def fake_quantize_matmul(weight_kn: "np.ndarray", block_size: int, symmetric: bool) -> "np.ndarray":
    """A ``[K, N]`` MatMul weight as its int4 MatMulNBits graph holds it (quantized, dequantized)."""
    q, scales, zero_points = matmul_blocks(weight_kn, block_size, symmetric)
    return dequantize_blocks(q, scales, zero_points, weight_kn.shape[0])


def fake_quantize_gather(table: "np.ndarray", block_size: int, symmetric: bool) -> "np.ndarray":
    """A ``[rows, dim]`` embedding table as an int4 ``GatherBlockQuantized`` holds it (ORT's numpy quantizer).

    Blocks run along ``dim``; rounding is numpy's (half to even) on ``v / scale``.
    """
    import numpy as np

    values = _column_blocks(np.asarray(table, np.float32).T, block_size)  # [rows, blocks, block]
    low, high = values.min(axis=-1, keepdims=True), values.max(axis=-1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        if symmetric:
            scales = np.where(np.abs(high) > np.abs(low), high, low) / np.float32(-8.0)
            q = np.where(scales == 0, 0, values / scales).round().clip(-8, 7)
            out = q.astype(np.float32) * scales
        else:
            low, high = np.minimum(low, 0), np.maximum(high, 0)
            scales = (high - low) / np.float32(15.0)
            zero = np.where(scales == 0, 8, -low / scales).round().clip(0, 15)
            q = np.where(scales == 0, 8, values / scales + zero).round().clip(0, 15)
            out = (q.astype(np.float32) - zero.astype(np.float32)) * scales
    return np.ascontiguousarray(out.astype(np.float32).reshape(table.shape[0], -1)[:, :table.shape[1]])


def unpack_matmul_nbits(packed: "np.ndarray", scales: "np.ndarray", zero_points: "np.ndarray | None",
                        k: int, n: int, block_size: int) -> "np.ndarray":
    """The ``[K, N]`` float32 weight a 4-bit MatMulNBits node computes with, from its B / scales / zero points.

    B is ``[N, blocks, block_size / 2]`` bytes, low nibble first; zero points are
    packed the same way per column (absent: 8).
    """
    import numpy as np

    blocks = -(-k // block_size)
    raw = np.asarray(packed, np.uint8).reshape(n, blocks, block_size // 2)
    q = np.stack([raw & 0x0F, raw >> 4], axis=-1).reshape(n, blocks, block_size)
    if zero_points is None:
        zeros = np.full((n, blocks), 8, np.uint8)
    else:
        zp = np.asarray(zero_points, np.uint8).reshape(n, -1)
        zeros = np.stack([zp & 0x0F, zp >> 4], axis=-1).reshape(n, -1)[:, :blocks]
    return dequantize_blocks(q, np.asarray(scales, np.float32).reshape(n, blocks), zeros, k)


# --- PyTorch: the base of a model, fake-quantized in place ----------------------------------------------------

def _skipped(name: str) -> bool:
    """LoRA factors and fully trained heads are not part of the quantized base."""
    return any(part.startswith("lora_") or part == "modules_to_save" for part in name.split("."))


def fake_quantize_base(model, spec: BaseQuantization) -> dict:
    """Replace every base weight the int4 export quantizes by its int4 value, in place; return counts.

    ``model`` is a causal LM, plain or PEFT-wrapped (LoRA factors are left alone).
    Linear layers (and GPT-2's ``Conv1D``) get MatMulNBits' blocks; a token
    embedding tied to the LM head gets the head's symmetric blocks once (both
    read them); other embeddings (an untied token or a position table) get
    GatherBlockQuantized's.
    """
    import numpy as np
    import torch

    head = model.get_output_embeddings()
    embedding = model.get_input_embeddings()
    tied = head is not None and embedding is not None and head.weight is embedding.weight
    counts = {"linear": 0, "embedding": 0, "tied_head": int(tied)}
    with torch.no_grad():
        for name, module in model.named_modules():
            if _skipped(name) or not hasattr(module, "weight") or not isinstance(module.weight, torch.Tensor):
                continue
            kind = type(module).__name__
            weight = module.weight
            if tied and weight is embedding.weight:
                continue  # below, once
            if isinstance(module, torch.nn.Linear):  # [out, in]: K = in
                new = fake_quantize_matmul(weight.detach().float().numpy().T, spec.block_size, spec.symmetric).T
                counts["linear"] += 1
            elif kind == "Conv1D":  # GPT-2: [in, out] already
                new = fake_quantize_matmul(weight.detach().float().numpy(), spec.block_size, spec.symmetric)
                counts["linear"] += 1
            elif isinstance(module, torch.nn.Embedding):
                new = fake_quantize_gather(weight.detach().float().numpy(), spec.block_size, spec.symmetric)
                counts["embedding"] += 1
            else:
                continue
            weight.copy_(torch.from_numpy(np.ascontiguousarray(new)).to(weight.dtype))
        if tied:  # the head [vocab, hidden] is MatMul(x, Wᵀ): K = hidden, quantized symmetric
            weight = embedding.weight
            new = fake_quantize_matmul(weight.detach().float().numpy().T, spec.block_size, True).T
            weight.copy_(torch.from_numpy(np.ascontiguousarray(new)).to(weight.dtype))
    return counts


# --- the record in the adapter's weights file ------------------------------------------------------------------

def read_base_quantization(adapter_dir: str | Path) -> BaseQuantization | None:
    """The quantized base an adapter was trained against (from its safetensors metadata), or None.

    Reads only the file's JSON header, so it needs neither torch nor the weights.
    """
    path = Path(adapter_dir) / ADAPTER_WEIGHTS
    try:
        with path.open("rb") as handle:
            (size,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(size))
    except (OSError, ValueError, struct.error):
        return None
    value = (header.get("__metadata__") or {}).get(METADATA_KEY)
    return BaseQuantization.from_json(json.loads(value)) if value else None


def write_base_quantization(adapter_dir: str | Path, spec: BaseQuantization) -> None:
    """Record ``spec`` in ``adapter_dir``'s adapter_model.safetensors metadata (PEFT ignores it; it travels)."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    path = Path(adapter_dir) / ADAPTER_WEIGHTS
    with safe_open(str(path), framework="pt") as handle:
        metadata = dict(handle.metadata() or {})
    metadata[METADATA_KEY] = json.dumps(spec.to_json(), sort_keys=True)
    save_file(load_file(str(path)), str(path), metadata=metadata)
