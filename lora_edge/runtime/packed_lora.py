"""Packed LoRA inputs of CPU-fused hot-swap decoder graphs: one ``A`` and one ``B`` per attention block.

A decoder step at batch 1 costs per ONNX node, not per FLOP (docs/ARCHITECTURE.md,
"Packed LoRA inputs"). The CPU rewrites of a quantized decoder compute q, k and v with
one packed ``x·[Wq | Wk | Wv]``; its LoRA branches are packed the same way, so a layer
adds three nodes to the base graph instead of seven: ``h = x·A``, ``d = h·B``, ``qkv + d``.
Such a graph takes, per attention block,

* ``A`` ``[in, R]``: the members' A factors side by side (``[A_q; A_v]ᵀ``), ``R`` the sum of their ranks;
* ``B`` ``[R, width]``: block-structured over the packed ``[q | k | v]`` output, each member's
  ``s·Bᵀ`` in its own rows and in the columns of its projection, zeros elsewhere (k has no LoRA
  unless the adapter targets it),

in place of the members' own ``lora_A`` / ``lora_B`` inputs; which inputs were packed, and
where, is recorded in the graph's metadata (:data:`PACKED_LORA_KEY`). Adapter files stay in
PEFT's per-target layout (one file serves the fp32 graph, ONNX Runtime GenAI and Olive):
:func:`pack_tensors` turns them into what a packed graph takes, once per adapter, and
``lora-edge quantize`` writes each bundle adapter packed beside it for the packed graph.
numpy only.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING

from lora_edge.core.errors import AdapterMismatchError

if TYPE_CHECKING:
    import numpy as np

PACKED_LORA_KEY = "lora_edge.packed_lora"  # graph metadata: JSON list of PackedLora
PACKED_SUFFIX = ".packed"  # packed input names: <projection prefix>.qkv_proj.lora_A.packed (names keep "lora_A")


@dataclass(frozen=True)
class PackedMember:
    """One LoRA target inside a pack: its per-target input names and the output columns of its projection."""

    a: str  # PEFT key of A [r, in]
    b: str  # PEFT key of s·B [out, r]
    offset: int  # first column of the projection in the packed output
    width: int  # its columns (B's rows)


@dataclass(frozen=True)
class PackedLora:
    """One attention block's packed LoRA inputs: ``a`` ``[fan_in, R]`` and ``b`` ``[R, width]``."""

    a: str
    b: str
    fan_in: int
    width: int
    members: tuple[PackedMember, ...]

    def to_json(self) -> dict:
        return {"a": self.a, "b": self.b, "fan_in": self.fan_in, "width": self.width,
                "members": [member.__dict__ for member in self.members]}

    @classmethod
    def from_json(cls, data: dict) -> "PackedLora":
        return cls(data["a"], data["b"], int(data["fan_in"]), int(data["width"]),
                   tuple(PackedMember(m["a"], m["b"], int(m["offset"]), int(m["width"])) for m in data["members"]))


def packs_to_metadata(packs: list[PackedLora]) -> str:
    """The metadata value recording ``packs`` (:data:`PACKED_LORA_KEY`)."""
    return json.dumps([pack.to_json() for pack in packs], separators=(",", ":"))


def packs_of(metadata: dict[str, str]) -> list[PackedLora]:
    """The packs a graph's metadata records (``session.get_modelmeta().custom_metadata_map``); [] when none."""
    value = metadata.get(PACKED_LORA_KEY)
    return [PackedLora.from_json(item) for item in json.loads(value)] if value else []


def model_packs(model) -> list[PackedLora]:
    """The packs an ONNX model (``onnx.ModelProto``) records in its metadata; [] when none."""
    return packs_of({prop.key: prop.value for prop in model.metadata_props})


def member_names(packs: list[PackedLora]) -> set[str]:
    """The per-target input names the packs replace."""
    return {name for pack in packs for member in pack.members for name in (member.a, member.b)}


def pack_tensors(packs: list[PackedLora], tensors: dict[str, "np.ndarray"], where=None) -> dict[str, "np.ndarray"]:
    """An adapter's per-target tensors (PEFT layout, A ``[r, in]``, s·B ``[out, r]``) as a packed graph takes them.

    Tensors of targets not packed (other modules, heads) pass through. A pack none
    of whose members the adapter has is left out (its default: no LoRA). Raises
    AdapterMismatchError for a member with one factor only or shapes that do not fit.
    """
    import numpy as np

    packed_away = member_names(packs)
    result = {name: tensor for name, tensor in tensors.items() if name not in packed_away}
    for pack in packs:
        present = [member for member in pack.members if member.a in tensors or member.b in tensors]
        if not present:
            continue
        factors = [_member_factors(pack, member, tensors, where) for member in present]
        rank = sum(a.shape[0] for a, _ in factors)
        a_packed = np.zeros((pack.fan_in, rank), dtype=np.float32)
        b_packed = np.zeros((rank, pack.width), dtype=np.float32)
        row = 0
        for member, (a, b) in zip(present, factors):
            a_packed[:, row:row + a.shape[0]] = a.T
            b_packed[row:row + a.shape[0], member.offset:member.offset + member.width] = b.T
            row += a.shape[0]
        result[pack.a], result[pack.b] = a_packed, b_packed
    return result


def _member_factors(pack: PackedLora, member: PackedMember, tensors: dict, where) -> tuple:
    """(A, B) of one member, checked: both present, A ``[r, fan_in]``, B ``[width, r]``."""
    if member.a not in tensors or member.b not in tensors:
        missing = member.b if member.a in tensors else member.a
        raise AdapterMismatchError(f"the adapter has no '{missing}' (each LoRA layer needs both factors)", where,
                                   "re-create the adapter file with lora-edge export")
    a, b = tensors[member.a], tensors[member.b]
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != pack.fan_in or b.shape[0] != member.width \
            or a.shape[0] != b.shape[1]:
        raise AdapterMismatchError(f"'{member.a}' {list(a.shape)} and '{member.b}' {list(b.shape)} do not fit the "
                                   f"graph (A [r, {pack.fan_in}], B [{member.width}, r])", where,
                                   "use an adapter of this graph's base model")
    return a, b

