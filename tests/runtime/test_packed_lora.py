"""Packing per-target LoRA factors for a graph with packed q|k|v LoRA inputs (lora_edge.runtime.packed_lora)."""

from __future__ import annotations

import numpy as np
import pytest

from lora_edge.core.errors import AdapterMismatchError
from lora_edge.runtime.packed_lora import PackedLora, PackedMember, pack_tensors, packs_of, packs_to_metadata

Q = "base_model.model.model.layers.0.self_attn.q_proj"
V = "base_model.model.model.layers.0.self_attn.v_proj"
O = "base_model.model.model.layers.0.self_attn.o_proj"
PACK = PackedLora("model.layers.0.self_attn.qkv_proj.lora_A.packed", "model.layers.0.self_attn.qkv_proj.lora_B.packed",
                  fan_in=12, width=20, members=(PackedMember(f"{Q}.lora_A.weight", f"{Q}.lora_B.weight", 0, 12),
                                                PackedMember(f"{V}.lora_A.weight", f"{V}.lora_B.weight", 16, 4)))


def _adapter(rng, q_rank=3, v_rank=2) -> dict[str, np.ndarray]:
    """PEFT layout: A [r, in], s·B [out, r]; plus an o_proj pair the pack does not cover."""
    return {f"{Q}.lora_A.weight": rng.standard_normal((q_rank, 12)), f"{Q}.lora_B.weight": rng.standard_normal((12, q_rank)),
            f"{V}.lora_A.weight": rng.standard_normal((v_rank, 12)), f"{V}.lora_B.weight": rng.standard_normal((4, v_rank)),
            f"{O}.lora_A.weight": rng.standard_normal((2, 12)), f"{O}.lora_B.weight": rng.standard_normal((12, 2))}


def test_packed_product_is_each_targets_delta_in_its_columns():
    """x·A·B over the packed [q | k | v] output = q's and v's own x·Aᵀ·Bᵀ in their columns, zeros for k."""
    rng = np.random.default_rng(0)
    tensors = {name: value.astype(np.float32) for name, value in _adapter(rng).items()}
    packed = pack_tensors([PACK], tensors)
    assert set(packed) == {PACK.a, PACK.b, f"{O}.lora_A.weight", f"{O}.lora_B.weight"}  # o_proj passes through
    assert packed[PACK.a].shape == (12, 5) and packed[PACK.b].shape == (5, 20)
    x = rng.standard_normal((2, 3, 12)).astype(np.float32)
    delta = x @ packed[PACK.a] @ packed[PACK.b]
    np.testing.assert_allclose(delta[..., :12], x @ tensors[f"{Q}.lora_A.weight"].T @ tensors[f"{Q}.lora_B.weight"].T,
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(delta[..., 12:16], 0)
    np.testing.assert_allclose(delta[..., 16:], x @ tensors[f"{V}.lora_A.weight"].T @ tensors[f"{V}.lora_B.weight"].T,
                               rtol=1e-5, atol=1e-5)


def test_an_adapter_without_a_member_packs_the_others_and_one_without_any_is_left_to_the_default():
    rng = np.random.default_rng(1)
    only_q = {k: v for k, v in _adapter(rng, q_rank=4).items() if k.startswith(Q)}
    packed = pack_tensors([PACK], only_q)
    assert packed[PACK.a].shape == (12, 4) and not packed[PACK.b][:, 12:].any()
    assert pack_tensors([PACK], {f"{O}.lora_A.weight": np.zeros((2, 12))}).keys() == {f"{O}.lora_A.weight"}


@pytest.mark.parametrize("corrupt, message", [
    (lambda t: t.pop(f"{V}.lora_B.weight"), "has no 'base_model.model.model.layers.0.self_attn.v_proj.lora_B"),
    (lambda t: t.update({f"{V}.lora_B.weight": np.zeros((5, 2))}), "do not fit the graph"),
    (lambda t: t.update({f"{Q}.lora_A.weight": np.zeros((3, 8))}), "do not fit the graph"),
])
def test_factors_that_do_not_fit_are_refused_naming_them(corrupt, message):
    tensors = _adapter(np.random.default_rng(2))
    corrupt(tensors)
    with pytest.raises(AdapterMismatchError, match=message):
        pack_tensors([PACK], tensors, "a.onnx_adapter")


def test_packs_round_trip_through_graph_metadata():
    assert packs_of({"lora_edge.packed_lora": packs_to_metadata([PACK])}) == [PACK]
    assert packs_of({}) == []
