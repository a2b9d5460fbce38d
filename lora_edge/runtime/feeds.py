"""Synthetic graph inputs: every place that runs a graph without real data builds its feeds here.

Four callers need inputs no user gave: the profiler (a batch and length of
the user's choosing, for any graph: :func:`build_feeds`, and a decoder's decode
step after it: :func:`decode_step_feeds`), the CPU rewrites
of export and quantize (an encoder batch with padding, a decoder prefill and
a decode step, to check a rewrite against its source:
:func:`sample_encoder_feeds`, :func:`sample_decoder_feeds`), and calibration
(tokenized text completed with what a graph needs beyond ids and mask:
:func:`complete_feeds`). The conventions are shared: token ids inside the
vocabulary and past its special tokens, masks of ones (left padding for
decoders), position ids counted over the mask, an empty KV cache for a prefill.

numpy only at import (onnx and onnxruntime objects are passed in).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lora_edge.core.errors import QuantizationError

if TYPE_CHECKING:
    import numpy as np
    import onnx
    import onnxruntime

# ONNX Runtime's input type strings -> numpy dtypes.
ONNX_TYPES = {"tensor(int64)": "int64", "tensor(int32)": "int32", "tensor(float)": "float32",
              "tensor(float16)": "float16", "tensor(bool)": "bool", "tensor(double)": "float64"}
# Decoder graphs take the KV cache as inputs named past_key_values.* (or past.*).
PAST_MARKERS = ("past_key_values", "past.")


def is_past_input(name: str) -> bool:
    """True for a KV-cache input of a decoder graph."""
    return any(marker in name for marker in PAST_MARKERS)


def position_ids(mask: "np.ndarray") -> "np.ndarray":
    """Positions of a left-padded batch: each row counts its attended tokens from 0; padding gets 0."""
    import numpy as np

    return np.clip(np.cumsum(mask, axis=1) - 1, 0, None).astype(np.int64)


# --- from a session's inputs (profiling) --------------------------------------------------------

def _dims(node, batch: int, seq: int, past_shape: dict[int, int]) -> list[int]:
    """Concrete shape for an input: static dims kept; symbolic ones become batch, seq or past."""
    past = is_past_input(node.name)
    shape = []
    for index, dim in enumerate(node.shape):
        if isinstance(dim, int) and dim >= 0:
            shape.append(dim)
        elif index == 0:
            shape.append(batch)
        elif past:
            # [batch, kv_heads, past_length, head_dim]: a zero-length past (prefill)
            shape.append(past_shape.get(index, 0))
        else:
            shape.append(seq)
    return shape


def build_feeds(session: "onnxruntime.InferenceSession", batch: int, seq: int, seed: int = 0,
                past_shape: dict[int, int] | None = None, vocab_size: int = 1000) -> dict[str, "np.ndarray"]:
    """Inputs of the given batch and sequence length for every input the graph declares.

    Token ids are drawn from a fixed seed below ``vocab_size``; masks are all
    ones; decoder KV-cache inputs get a zero-length past (the prefill step).
    ``past_shape`` gives dims of the past tensors that the graph leaves
    symbolic besides batch and length (e.g. {1: kv_heads, 3: head_dim}).
    """
    import numpy as np

    rng = np.random.default_rng(seed)
    past_shape = past_shape or {}
    feeds = {}
    for node in session.get_inputs():
        dtype = ONNX_TYPES.get(node.type)
        if dtype is None:
            continue
        shape = _dims(node, batch, seq, past_shape)
        if node.name == "input_ids":
            # ids >= 5 skip the special tokens of common vocabularies
            feeds[node.name] = rng.integers(5, max(6, vocab_size), size=shape, dtype=np.int64).astype(dtype)
        elif node.name == "attention_mask":
            feeds[node.name] = np.ones(shape, dtype=dtype)
        elif node.name == "position_ids":
            feeds[node.name] = np.broadcast_to(np.arange(shape[-1], dtype=dtype), shape).copy()
        else:
            feeds[node.name] = np.zeros(shape, dtype=dtype)
    return feeds


def decode_step_feeds(prefill: dict[str, "np.ndarray"], presents: dict[str, "np.ndarray"]) -> dict[str, "np.ndarray"]:
    """Feeds of one decode step after a prefill: its last token, the prefill's presents as the past.

    ``prefill`` are the prefill's feeds (all-ones mask, as :func:`build_feeds`
    makes them), ``presents`` its outputs by name (``present.<i>.key`` ->
    ``past_key_values.<i>.key``). The step's position is the past's length.
    """
    import numpy as np

    ids = prefill["input_ids"]
    batch, length = ids.shape
    feeds = {}
    for name, value in prefill.items():
        if is_past_input(name):
            feeds[name] = presents[name.replace("past_key_values.", "present.", 1)]
        elif name == "input_ids":
            feeds[name] = ids[:, -1:].copy()
        elif name == "attention_mask":
            feeds[name] = np.ones((batch, value.shape[1] + 1), dtype=value.dtype)
        elif name == "position_ids":
            feeds[name] = np.full((batch, 1), length, dtype=value.dtype)
        else:
            feeds[name] = value
    return feeds

# --- from a graph (checking rewrites) -----------------------------------------------------------

def embedding_rows(model: "onnx.ModelProto", default: int = 1000) -> int:
    """Vocabulary size: the rows of the table ``input_ids`` is gathered from (``default`` when none is found)."""
    initializers = {init.name: init for init in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Gather" and "input_ids" in node.input[1:] and node.input[0] in initializers:
            return int(initializers[node.input[0]].dims[0])
    return default


def sample_encoder_feeds(model: "onnx.ModelProto", batch: int = 2, length: int = 16, seed: int = 0,
                         padded: bool = True, trailing: bool = False) -> dict[str, "np.ndarray"]:
    """A batch for an encoder graph: random token ids (inside the vocabulary).

    ``padded``: the last row is half padding; ``trailing``: every row ends in
    padding (the first row at 3/4 of the length), as a batch padded to a fixed length.
    Only the inputs the graph declares are returned.
    """
    import numpy as np

    vocab = embedding_rows(model)
    rng = np.random.default_rng(seed)
    ids = rng.integers(min(1000, vocab - 1), vocab, size=(batch, length), dtype=np.int64)
    mask = np.ones((batch, length), dtype=np.int64)
    if padded:
        mask[-1, length // 2:] = 0
    if trailing:
        mask[:, 3 * length // 4:] = 0
    feeds = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
    declared = {value.name for value in model.graph.input}
    return {name: value for name, value in feeds.items() if name in declared}


def sample_decoder_feeds(model: "onnx.ModelProto", seed: int = 0) -> list[dict[str, "np.ndarray"]]:
    """Feeds of a left-padded 2-row prefill and of a 1-token decode step after a random past.

    The cache geometry is read from the graph's ``past_key_values.*`` inputs; token
    ids stay below 100 (every vocabulary has them).
    """
    import numpy as np

    rng = np.random.default_rng(seed)
    pasts = [value for value in model.graph.input if value.name.startswith("past_key_values.")]
    dims = pasts[0].type.tensor_type.shape.dim
    heads, head_dim = dims[1].dim_value, dims[3].dim_value
    ids = rng.integers(3, 100, size=(2, 6)).astype(np.int64)
    mask = np.ones((2, 6), dtype=np.int64)
    mask[1, :2] = 0
    prefill = {"input_ids": ids, "attention_mask": mask, "position_ids": position_ids(mask),
               **{value.name: np.zeros((2, heads, 0, head_dim), np.float32) for value in pasts}}
    past_length = 7
    decode = {"input_ids": ids[:, -1:], "attention_mask": np.ones((2, past_length + 1), dtype=np.int64),
              "position_ids": np.full((2, 1), past_length, dtype=np.int64),
              **{value.name: rng.standard_normal((2, heads, past_length, head_dim)).astype(np.float32)
                 for value in pasts}}
    decode["attention_mask"][1, :2] = 0
    decode["position_ids"][1] = past_length - 2
    return [prefill, decode]


def chunked_feed(model: "onnx.ModelProto", seed: int = 1) -> dict:
    """Feeds of a one-row step of 3 new tokens after a random past of 5 (a chunked prefill)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    pasts = [value for value in model.graph.input if value.name.startswith("past_key_values.")]
    dims = pasts[0].type.tensor_type.shape.dim
    heads, head_dim = dims[1].dim_value, dims[3].dim_value
    return {"input_ids": rng.integers(3, 100, size=(1, 3)).astype(np.int64),
            "attention_mask": np.ones((1, 8), dtype=np.int64), "position_ids": np.arange(5, 8)[None].astype(np.int64),
            **{value.name: rng.standard_normal((1, heads, 5, head_dim)).astype(np.float32) for value in pasts}}


def random_lora_feed(model: "onnx.ModelProto", rank: int = 3, seed: int = 2) -> dict[str, "np.ndarray"]:
    """Random factors for every LoRA input of a hot-swap graph (PEFT layout, rank ``rank``); {} for other graphs.

    Large enough that what the adapter adds shows in the outputs (a rewrite that
    dropped or misplaced a branch would not pass as a rounding difference).
    """
    import numpy as np

    rng = np.random.default_rng(seed)
    feed = {}
    for value in model.graph.input:
        dims = value.type.tensor_type.shape.dim
        if not ("lora_A" in value.name or "lora_B" in value.name) or len(dims) != 2:
            continue
        axis = 0 if "lora_A" in value.name else 1
        shape = [rank if i == axis else dims[i].dim_value for i in range(2)]
        if all(size > 0 for size in shape):
            feed[value.name] = (0.1 * rng.standard_normal(shape)).astype(np.float32)
    return feed


def decoder_check_feeds(model: "onnx.ModelProto") -> list[dict[str, "np.ndarray"]]:
    """The feeds a decoder's CPU rewrites are checked on: :func:`sample_decoder_feeds` and :func:`chunked_feed`;
    for a hot-swap graph the prefill and the chunk carry :func:`random_lora_feed` (the rewrites must keep what an
    adapter adds, its LoRA inputs may get packed) and the decode step none (the base model's path). Each feed is
    a run of the whole graph twice per export (SmolLM2-135M fp32: ~0.08 s), so no case is run twice.

    Export runs them in its verification session when the graph will be quantized
    (``runtime.session.remember_outputs``), so the quantize stage's check needs no
    session of the source graph of its own.
    """
    feeds = sample_decoder_feeds(model) + [chunked_feed(model)]
    lora = random_lora_feed(model)
    return [feeds[0] | lora, feeds[1], feeds[2] | lora] if lora else feeds


# --- completing real inputs (calibration) -------------------------------------------------------

def complete_feeds(model: "onnx.ModelProto", feeds: dict[str, "np.ndarray"]) -> dict[str, "np.ndarray"]:
    """Add what a graph needs beyond token ids and mask: position ids, token types, empty past key/values.

    Inputs with defaults (hot-swap initializers) are left out; a missing input
    this cannot fill raises QuantizationError (calibration is its use).
    """
    import numpy as np
    from onnx import helper

    initializers = {init.name for init in model.graph.initializer}
    ids = feeds["input_ids"]
    batch, length = ids.shape
    result = {}
    for value in model.graph.input:
        name = value.name
        if name in feeds:
            result[name] = feeds[name]
        elif name in initializers:
            continue
        elif name == "position_ids":
            result[name] = position_ids(feeds.get("attention_mask", np.ones_like(ids)))
        elif name == "token_type_ids":
            result[name] = np.zeros_like(ids)
        else:
            shape = value.type.tensor_type.shape.dim
            dims = [0 if "past" in d.dim_param else (batch if i == 0 else length) if d.dim_param else d.dim_value
                    for i, d in enumerate(shape)]
            if 0 not in dims:
                raise QuantizationError(f"cannot build calibration inputs for graph input '{name}'", name,
                                        "use int8-dynamic for this graph")
            dtype = helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type)
            result[name] = np.zeros(dims, dtype=dtype)
    return result
