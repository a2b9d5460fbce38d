"""The causal-LM graph contract, torch-free: input/output names, KV-cache geometry, context length.

What every exporter, runner, gate and profiler of a decoder graph agrees on;
:mod:`lora_edge.export.decoder` builds graphs to it on the export side (with torch),
:mod:`lora_edge.runtime.generate`, the gate and the profiler run them with ONNX Runtime
and numpy only (docs/ARCHITECTURE.md, "Decoder graphs").

Graph I/O (the ``causal-lm`` contract every exporter, runner and check shares)::

    inputs   input_ids                    int64  [batch, sequence]
             attention_mask               int64  [batch, past_sequence + sequence]   1 = real token, 0 = padding
             position_ids                 int64  [batch, sequence]
             past_key_values.<i>.key      float  [batch, kv_heads, past_sequence, head_dim]   (i = 0 .. layers-1)
             past_key_values.<i>.value    float  [batch, kv_heads, past_sequence, head_dim]
             logits_to_keep               int64  []   optional (default 0): 0 = logits of every position,
                                                      k = of the last k positions only
    outputs  logits                       float  [batch, sequence, vocab]   ([batch, min(k, sequence), vocab])
             present.<i>.key / .value     float  [batch, kv_heads, past_sequence + sequence, head_dim]

Why ONE graph for prefill and decode (rather than a prefill/decode pair):
the two graphs would hold the same weights twice (double the size on disk
and in memory, which is what an edge device has least of), every quantized
precision and every hot-swap adapter would have to be made and activated
twice, and a pair saves only the concatenation of an empty past in prefill.
Prefill feeds ``past_sequence = 0`` tensors; decode feeds the previous
``present`` tensors back as ``past_key_values``; a chunked prefill (several
new tokens after a past) works the same way. ``benchmarks/decoder_latency.py``
measures both phases per form.

``logits_to_keep`` (graphs exported since it exists; :mod:`lora_edge.export.last_logits`)
is a graph input with a same-named initializer, so a caller that does not know it
gets every position as before; generation feeds 1 (one row of logits per prefill:
the LM head runs on the last position only), the gate's perplexity leaves it out.
Runners feed it only when :func:`takes_logits_to_keep` says the graph has it.

Padding: batches are LEFT padded. ``position_ids`` are ``cumsum(attention_mask) - 1``
(0 on padding), exactly as ``transformers.GenerationMixin`` computes them, so a
padded prompt sees the same positions as the prompt alone.

Graphs whose attention was fused into ONNX Runtime's ``GroupQueryAttention``
(``lora-edge quantize``, CPU precisions) say so in their metadata
(``ModelProto.metadata_props``, read by :class:`lora_edge.runtime.generate.DecoderRunner`):

* ``CHUNKED_BATCH_KEY = "1"``: several new tokens after a non-empty past (a
  chunked prefill) are taken for a batch of one row only (the kernel refuses
  more); prefill of a left-padded batch and one-token decode steps take any batch.
* ``SHARED_CACHE_KEY = SHARED_BUFFER``: the graph reads the past only inside the
  attention kernel and takes the past length from ``attention_mask`` / ``input_ids``,
  so ``past_key_values.<i>.*`` may be a preallocated buffer longer than the past
  (``[batch, kv_heads, capacity, head_dim]``, valid up to ``past_sequence``), bound
  as its own ``present`` output: the kernel appends in place, no copy per step.
  Fed a past of exactly ``past_sequence`` positions the graph keeps the I/O above.
"""

from __future__ import annotations

from dataclasses import dataclass

INPUT_IDS, ATTENTION_MASK, POSITION_IDS, LOGITS = "input_ids", "attention_mask", "position_ids", "logits"
LOGITS_TO_KEEP = "logits_to_keep"  # optional int64 scalar input (see the module docstring)
PAST_NAME = "past_key_values.{layer}.{kind}"
PRESENT_NAME = "present.{layer}.{kind}"
KV_KINDS = ("key", "value")
DEFAULT_MAX_NEW_TOKENS = 64  # tokens `generate` adds per prompt unless asked for another count
# Graph metadata of decoders with GroupQueryAttention (see the module docstring).
CHUNKED_BATCH_KEY = "lora_edge.chunked_prefill_batch"
SHARED_CACHE_KEY = "lora_edge.kv_cache"
SHARED_BUFFER = "shared-buffer"
# Symbolic dimension names written into the graph (readable in Netron / get_inputs()).
BATCH, SEQUENCE, PAST, TOTAL = "batch", "sequence", "past_sequence", "total_sequence"


@dataclass(frozen=True)
class DecoderShape:
    """The sizes of a decoder's KV cache and vocabulary, read from its config."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_positions: int | None  # the context length; None when the config sets no limit

    @classmethod
    def from_config(cls, config) -> "DecoderShape":
        """Read the cache geometry from a transformers config (Llama, Qwen2, Mistral, GPT-2, ...)."""
        config = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
        heads = config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return cls(int(config.num_hidden_layers), int(kv_heads), int(head_dim), int(config.vocab_size),
                   context_length(config.to_dict()))

    @property
    def past_names(self) -> list[str]:
        """Graph input names of the past keys and values, in forward() order (layer 0 key, layer 0 value, ...)."""
        return [PAST_NAME.format(layer=i, kind=kind) for i in range(self.num_layers) for kind in KV_KINDS]

    @property
    def present_names(self) -> list[str]:
        """Graph output names of the grown keys and values, in the same order as :attr:`past_names`."""
        return [PRESENT_NAME.format(layer=i, kind=kind) for i in range(self.num_layers) for kind in KV_KINDS]

    @property
    def input_names(self) -> list[str]:
        """All graph input names, in the order of :meth:`KVCacheDecoder.forward`."""
        return [INPUT_IDS, ATTENTION_MASK, POSITION_IDS] + self.past_names

    @property
    def output_names(self) -> list[str]:
        """All graph output names: logits, then the presents."""
        return [LOGITS] + self.present_names

    def empty_past(self, batch: int, dtype=None) -> list:
        """Zero-length past tensors (numpy) for a prefill step of ``batch`` sequences."""
        import numpy as np

        shape = (batch, self.num_kv_heads, 0, self.head_dim)
        return [np.zeros(shape, dtype=dtype or np.float32) for _ in self.past_names]


def context_length(config: dict) -> int | None:
    """The context length (most positions) a config.json allows; None when it sets no limit."""
    config = config.get("text_config") or config
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        if config.get(key):
            return int(config[key])
    return None


def takes_logits_to_keep(session) -> bool:
    """True when an ONNX Runtime session's graph has the optional ``logits_to_keep`` input.

    It is a graph input with a default, which ONNX Runtime lists among the
    overridable initializers rather than the inputs.
    """
    names = [item.name for item in session.get_inputs()]
    names += [item.name for item in session.get_overridable_initializers()]
    return LOGITS_TO_KEEP in names
