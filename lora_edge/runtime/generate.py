"""Text generation on ONNX Runtime with ``causal-lm`` graphs: the decode loop.

``lora-edge generate`` runs it from a bundle through :mod:`lora_edge.runtime.bundle_generate`.

A :class:`DecoderRunner` holds one session of a graph with the I/O described
in :mod:`lora_edge.core.decoder_io` (one graph serves prefill and decode) and reads
the cache geometry from the graph itself, so generation needs neither torch
nor the model's config. :func:`generate` runs a left-padded batch: greedy, or
sampling with temperature / top-p from a seeded generator, with a per-call
hot-swap adapter (``onnxruntime.LoraAdapter``), so one session serves every
adapter. The measures the accuracy gate uses on language models (perplexity
of a graph on a text set, its delta against PyTorch, next-token top-1
agreement) are in :mod:`lora_edge.check.lm_metrics`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from lora_edge.core.decoder_io import (ATTENTION_MASK, CHUNKED_BATCH_KEY, DEFAULT_MAX_NEW_TOKENS, INPUT_IDS, KV_KINDS, LOGITS,
                                       LOGITS_TO_KEEP, PAST_NAME, POSITION_IDS, PRESENT_NAME, SHARED_BUFFER,
                                       SHARED_CACHE_KEY, takes_logits_to_keep)
from lora_edge.core.errors import AdapterMismatchError, ConfigError, DataError, ExportError, first_line
from lora_edge.runtime.packed_lora import packs_of
from lora_edge.runtime.session import run

if TYPE_CHECKING:
    import numpy as np
    import onnxruntime


# ONNX tensor element types of a cache input -> numpy dtype names.
_ORT_FLOAT_TYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64"}
# Positions a shared cache buffer holds beyond the current total when the caller gives no capacity.
CACHE_HEADROOM = 256


@dataclass
class SamplingSpec:
    """How the next token is chosen."""

    greedy: bool = field(default=True, metadata={"help": "Take the most likely token (ignores temperature/top-p)."})
    temperature: float = field(default=1.0, metadata={"help": "Divide logits by this before sampling (> 0)."})
    top_p: float = field(default=1.0, metadata={"help": "Sample from the smallest token set whose probability "
                                                        "reaches top_p (0 < top_p <= 1)."})
    seed: int = field(default=0, metadata={"help": "Seed of the sampling generator: same seed, same tokens."})

    @classmethod
    def from_options(cls, greedy: bool, temperature: float | None, top_p: float | None, seed: int) -> "SamplingSpec":
        """Greedy unless --temperature or --top-p asks for sampling; both at once is a ConfigError."""
        sampling = temperature is not None or top_p is not None
        if greedy and sampling:
            raise ConfigError("--greedy and sampling options given together", "--greedy/--temperature/--top-p",
                              "use --greedy, or --temperature/--top-p (with --seed) to sample")
        return cls(greedy=not sampling, temperature=1.0 if temperature is None else temperature,
                   top_p=1.0 if top_p is None else top_p, seed=seed)

    def __post_init__(self):
        if not self.temperature > 0:
            raise ConfigError(f"temperature {self.temperature} is not positive", "--temperature",
                              "use a value such as 0.7, or --greedy")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top-p {self.top_p} is outside (0, 1]", "--top-p", "use a value such as 0.9")


@dataclass
class GenerationResult:
    """Token ids and timings of one :func:`generate` call (one row per prompt)."""

    prompt_ids: list[list[int]]
    new_ids: list[list[int]]  # without padding; a row stops at (and includes) its EOS token
    prefill_seconds: float
    decode_seconds: float
    decode_steps: int

    @property
    def prefill_tokens_per_second(self) -> float:
        """Prompt tokens (all rows, padding excluded) processed per second of prefill."""
        tokens = sum(len(ids) for ids in self.prompt_ids)
        return tokens / self.prefill_seconds if self.prefill_seconds > 0 else float("inf")

    @property
    def decode_tokens_per_second(self) -> float:
        """Tokens produced per second of decoding, counting every row of the batch at each step."""
        tokens = self.decode_steps * len(self.prompt_ids)
        return tokens / self.decode_seconds if self.decode_seconds > 0 else float("inf")

    def to_json(self) -> dict:
        """JSON form printed by ``lora-edge generate --json``."""
        return {"prompt_ids": self.prompt_ids, "new_ids": self.new_ids,
                "prefill_tokens_per_second": round(self.prefill_tokens_per_second, 2),
                "decode_tokens_per_second": round(self.decode_tokens_per_second, 2),
                "prefill_seconds": round(self.prefill_seconds, 6), "decode_seconds": round(self.decode_seconds, 6)}


@dataclass
class BoundAdapter:
    """A hot-swap ``.onnx_adapter`` for runs with IO binding: its tensors, bound as graph inputs.

    ONNX Runtime applies ``RunOptions.add_active_adapter`` in ``session.run``
    only, not in ``run_with_iobinding``, so the bound decode loop feeds the
    adapter's tensors itself (ONNX Runtime values, no copy per step).
    """

    path: Path
    parameters: dict
    arrays: dict = field(default_factory=dict)  # numpy arrays the parameters were made from (kept alive)

    def packed_for(self, packs: list) -> "BoundAdapter":
        """This adapter as a graph with packed LoRA inputs takes it (runtime/packed_lora.py); itself when
        ``packs`` is empty or none of its tensors is packed there."""
        import onnxruntime

        from lora_edge.runtime.packed_lora import member_names, pack_tensors

        if not packs or not member_names(packs) & set(self.parameters):
            return self
        tensors = pack_tensors(packs, {name: value.numpy() for name, value in self.parameters.items()}, self.path)
        return BoundAdapter(self.path, {name: onnxruntime.OrtValue.ortvalue_from_numpy(array)
                                        for name, array in tensors.items()}, tensors)

    @classmethod
    def load(cls, path: str | Path) -> "BoundAdapter":
        """Read an ``.onnx_adapter`` file's tensors (raises AdapterMismatchError when it cannot be read)."""
        import onnxruntime

        try:
            parameters = onnxruntime.AdapterFormat.read_adapter(str(path)).get_parameters()
        except Exception as exc:  # ORT raises its own error types for a corrupt file
            raise AdapterMismatchError(f"cannot read the adapter file ({first_line(exc, 160)})",
                                       path, "re-run lora-edge export") from None
        return cls(Path(path), dict(parameters))


class DecoderRunner:
    """One ONNX Runtime session of a ``causal-lm`` graph, stepped with an explicit KV cache.

    ``max_positions`` is the model's context length (None: unchecked).
    """

    def __init__(self, session: "onnxruntime.InferenceSession", max_positions: int | None = None):
        self.session = session
        self.max_positions = max_positions
        inputs = {item.name: item for item in session.get_inputs()}
        missing = [name for name in (INPUT_IDS, ATTENTION_MASK, POSITION_IDS) if name not in inputs]
        first_past = PAST_NAME.format(layer=0, kind="key")
        if missing or first_past not in inputs:
            raise ExportError(f"the graph is not a causal-lm graph with a KV cache (it has no input "
                              f"'{(missing or [first_past])[0]}')", "--graph",
                              "export it with lora-edge export --task causal-lm")
        self.num_layers = sum(1 for name in inputs if name.startswith("past_key_values.") and name.endswith(".key"))
        self.past_names = [PAST_NAME.format(layer=i, kind=kind) for i in range(self.num_layers) for kind in KV_KINDS]
        self.present_names = [PRESENT_NAME.format(layer=i, kind=kind)
                              for i in range(self.num_layers) for kind in KV_KINDS]
        past = inputs[first_past]
        self.num_kv_heads, self.head_dim = int(past.shape[1]), int(past.shape[3])
        self.cache_dtype = _ORT_FLOAT_TYPES.get(past.type, "float32")
        self.output_names = [LOGITS] + self.present_names
        metadata = session.get_modelmeta().custom_metadata_map
        self.shared_cache = metadata.get(SHARED_CACHE_KEY) == SHARED_BUFFER
        self.chunk_rows = int(metadata.get(CHUNKED_BATCH_KEY) or 0) or None
        logits = next(item for item in session.get_outputs() if item.name == LOGITS)
        self.vocab_size = logits.shape[-1] if isinstance(logits.shape[-1], int) else None
        self.logits_dtype = _ORT_FLOAT_TYPES.get(logits.type, "float32")
        # graphs with the optional logits_to_keep input compute the LM head for the last position only when fed 1
        self.keeps_last_logits = takes_logits_to_keep(session)
        self._keep_last = None  # its OrtValue, made on first use
        self._bindings: dict = {}  # (id(buffers), id(adapter)) -> (IO binding, buffers, adapter): shared caches
        # graphs with packed LoRA inputs (runtime/packed_lora.py): per-target adapters are packed once, on first use
        self.packs = packs_of(metadata)
        self._packed: dict = {}  # id(adapter as given) -> (it, as packed)

    def check_step(self, input_ids: "np.ndarray", past_length: int) -> None:
        """Raise DataError for a step the graph's attention kernel refuses (decoder_io.py, CHUNKED_BATCH_KEY)."""
        batch, new = input_ids.shape
        if self.chunk_rows and past_length > 0 and new > 1 and batch > self.chunk_rows:
            raise DataError(f"this graph (GroupQueryAttention) takes several new tokens after a past for "
                            f"{self.chunk_rows} row at a time, got a batch of {batch}", "--graph",
                            "feed the rows one at a time, or quantize the bundle with --no-fuse")

    def empty_past(self, batch: int) -> list["np.ndarray"]:
        """Zero-length past tensors: the cache of a prefill step."""
        import numpy as np

        return [np.zeros((batch, self.num_kv_heads, 0, self.head_dim), dtype=self.cache_dtype)
                for _ in self.past_names]

    def step(self, input_ids: "np.ndarray", attention_mask: "np.ndarray", position_ids: "np.ndarray",
             past: list["np.ndarray"], adapter: "onnxruntime.LoraAdapter | None" = None, last_only: bool = False
             ) -> tuple["np.ndarray", list["np.ndarray"]]:
        """Run one prefill or decode step; returns (logits [batch, sequence, vocab], presents).

        ``last_only``: the caller reads the last position's logits only; a graph with
        ``logits_to_keep`` then returns [batch, 1, vocab] (others every position).
        """
        import numpy as np

        self.check_step(input_ids, int(past[0].shape[2]))
        feeds = {INPUT_IDS: input_ids, ATTENTION_MASK: attention_mask, POSITION_IDS: position_ids,
                 **dict(zip(self.past_names, past))}
        if last_only and self.keeps_last_logits:
            feeds[LOGITS_TO_KEEP] = np.array(1, dtype=np.int64)
        try:
            outputs = run(self.session, feeds, adapter=adapter, output_names=self.output_names)
        except Exception as exc:  # ORT raises its own classes; an adapter that does not fit is the usual cause
            error = self._adapter_error(exc, adapter, self.packs)
            if error is exc:
                raise
            raise error from exc
        return outputs[0], outputs[1:]

    def bound_step(self, input_ids: "np.ndarray", attention_mask: "np.ndarray", position_ids: "np.ndarray",
                   past: list | None, adapter: BoundAdapter | None = None, capacity: int | None = None
                   ) -> tuple["np.ndarray", list["onnxruntime.OrtValue"]]:
        """One step with the cache kept inside ONNX Runtime: (last-position logits [batch, vocab], presents).

        ``past`` is None for prefill, else the presents (``OrtValue``) of the
        previous call. The presents are bound as ONNX Runtime outputs and fed
        back as the next step's past without ever becoming numpy arrays, so
        the loop copies no cache; only the last position's logits leave (a graph
        with ``logits_to_keep`` computes no others). A graph
        with a shared cache (decoder_io.py, ``SHARED_CACHE_KEY``) gets one buffer
        per cache tensor of ``capacity`` positions (default: this step's total +
        ``CACHE_HEADROOM``; grown when a step needs more), bound as both past and
        present, so the attention kernel appends in place and nothing is copied.
        """
        import numpy as np

        total = attention_mask.shape[1]
        self.check_step(input_ids, total - input_ids.shape[1])
        adapter = self.graph_adapter(adapter)
        step_logits = None  # a preallocated [batch, 1, vocab] array the logits of a one-token step land in
        if self.shared_cache:
            past = self._cache_buffers(past, len(input_ids), total, capacity)
            binding, step_logits = self._shared_binding(past, adapter)
            if (input_ids.shape[1] == 1 or self.keeps_last_logits) and step_logits is not None:
                binding.bind_ortvalue_output(LOGITS, step_logits[1])
            else:  # unallocated: ORT sizes it (a bound output would keep the last run's shape)
                binding.bind_output(LOGITS, "cpu")
                step_logits = None
        else:
            binding = self._fresh_binding(past, len(input_ids), adapter)
        for name, value in ((INPUT_IDS, input_ids), (ATTENTION_MASK, attention_mask), (POSITION_IDS, position_ids)):
            binding.bind_cpu_input(name, np.ascontiguousarray(value, dtype=np.int64))
        try:
            self.session.run_with_iobinding(binding)
        except Exception as exc:  # ORT raises its own classes; an adapter that does not fit is the usual cause
            raise self._adapter_error(exc, adapter, self.packs) from exc
        if step_logits is not None:  # no get_outputs(): it wraps every bound output (the whole cache) per call
            return step_logits[0][:, -1, :].copy(), past
        outputs = binding.get_outputs()
        logits = outputs[0].numpy()[:, -1, :]
        return logits, (past if self.shared_cache else list(outputs[1:]))

    def _fresh_binding(self, past: list | None, batch: int, adapter: BoundAdapter | None):
        """An IO binding of ``past`` (empty when None), the adapter and fresh outputs (logits first)."""
        binding = self.session.io_binding()
        binding.bind_output(LOGITS, "cpu")  # first: get_outputs() lists outputs in the order they were bound
        self._bind_keep_last(binding)
        if past is None:
            for name, value in zip(self.past_names, self.empty_past(batch)):
                binding.bind_cpu_input(name, value)
        else:
            for name, value in zip(self.past_names, past):
                binding.bind_ortvalue_input(name, value)
        for name, value in (adapter.parameters.items() if adapter is not None else ()):
            binding.bind_ortvalue_input(name, value)
        for name in self.present_names:
            binding.bind_output(name, "cpu")
        return binding

    def _shared_binding(self, buffers: list, adapter: BoundAdapter | None) -> tuple:
        """(IO binding, step logits) of shared cache ``buffers`` (each past its present) and the adapter, made once.

        Step logits: a [batch, 1, vocab] numpy array and its OrtValue that one-token steps write
        their logits to (None when the graph's vocabulary axis is not fixed).

        Binding every cache tensor costs ~2 x layers Python calls; a decode loop
        keeps the same buffers, so only the token inputs are bound again per step.
        """
        import numpy as np
        import onnxruntime

        key = (id(buffers), id(adapter))
        if key in self._bindings:
            return self._bindings[key][:2]
        binding = self.session.io_binding()
        binding.bind_output(LOGITS, "cpu")  # first: get_outputs() lists outputs in the order they were bound
        self._bind_keep_last(binding)
        for past_name, present_name, value in zip(self.past_names, self.present_names, buffers):
            binding.bind_ortvalue_input(past_name, value)
            binding.bind_ortvalue_output(present_name, value)
        for name, value in (adapter.parameters.items() if adapter is not None else ()):
            binding.bind_ortvalue_input(name, value)
        step_logits = None
        if isinstance(self.vocab_size, int):
            array = np.empty((int(buffers[0].shape()[0]), 1, self.vocab_size), dtype=self.logits_dtype)
            step_logits = (array, onnxruntime.OrtValue.ortvalue_from_numpy(array))
        # holding the buffers and the adapter keeps their ids unique; two bindings serve a caller that alternates
        # a prefill and a decode step over its own buffers (the profiler)
        self._bindings = {**dict(list(self._bindings.items())[-1:]), key: (binding, step_logits, buffers, adapter)}
        return binding, step_logits

    def _bind_keep_last(self, binding) -> None:
        """Bind ``logits_to_keep = 1`` when the graph has it (an OrtValue: a defaulted input refuses numpy binds)."""
        import numpy as np
        import onnxruntime

        if not self.keeps_last_logits:
            return
        if self._keep_last is None:
            self._keep_last = onnxruntime.OrtValue.ortvalue_from_numpy(np.array(1, dtype=np.int64))
        binding.bind_ortvalue_input(LOGITS_TO_KEEP, self._keep_last)

    def _cache_buffers(self, past: list | None, batch: int, total: int, capacity: int | None
                       ) -> list["onnxruntime.OrtValue"]:
        """The shared cache buffers for a step reaching ``total`` positions: ``past``, or new / grown ones.

        New buffers are zeros; a grown buffer keeps the ``total`` - new positions
        already written (one copy, only when a step outgrows the capacity).
        """
        import numpy as np
        import onnxruntime

        held = int(past[0].shape()[2]) if past is not None else 0
        if past is not None and held >= total:
            return past
        size = max(total, capacity or 0, total + CACHE_HEADROOM if capacity is None else 0, 2 * held)
        shape = (batch, self.num_kv_heads, size, self.head_dim)
        buffers = []
        for index in range(len(self.past_names)):
            array = np.zeros(shape, dtype=self.cache_dtype)
            if past is not None:
                array[:, :, :held] = past[index].numpy()
            buffers.append(onnxruntime.OrtValue.ortvalue_from_numpy(array))
        return buffers

    def release_cache(self) -> None:
        """Drop the shared cache buffers and IO bindings kept for the next step (a generation is over).

        Kept, a runner held its last two generations' caches: three 256-position
        generations of SmolLM2-135M int4 peaked at 260 MB, 237 MB released. The
        next generation makes and binds new ones.
        """
        self._bindings = {}

    def graph_adapter(self, adapter: BoundAdapter | None) -> BoundAdapter | None:
        """``adapter`` as this graph takes it: packed for a graph with packed LoRA inputs (once per adapter)."""
        if adapter is None or not self.packs:
            return adapter
        if id(adapter) not in self._packed:  # holding the adapter keeps its id unique
            self._packed = {**dict(list(self._packed.items())[-3:]), id(adapter): (adapter, adapter.packed_for(self.packs))}
        return self._packed[id(adapter)][1]

    @staticmethod
    def _adapter_error(exc: Exception, adapter, packs: list) -> Exception:
        """AdapterMismatchError when an active adapter is the likely cause of a run failure, else ``exc``."""
        if adapter is not None and packs and not isinstance(adapter, BoundAdapter) and "input name" in str(exc):
            return AdapterMismatchError(f"this graph takes packed LoRA inputs and the adapter is per target "
                                        f"({first_line(exc, 160)})", "--adapter",
                                        "use the graph's own adapter file (the bundle records it), or run it "
                                        "bound (BoundAdapter), which packs it")
        if adapter is not None and ("lora" in str(exc).lower() or "shape" in str(exc).lower()):
            return AdapterMismatchError(f"the adapter does not fit this graph ({first_line(exc, 200)})",
                                        "--adapter", "use an adapter trained on this bundle's base model")
        return exc

    def check_context(self, prompt_lengths: list[int], max_new_tokens: int) -> int:
        """Return ``max_new_tokens`` when every prompt and its new tokens fit the model's context.

        Raises DataError for a prompt that alone fills the context, ConfigError when
        ``max_new_tokens`` would run past it (saying how many tokens fit).
        """
        longest = max(prompt_lengths)
        if self.max_positions is None:
            return max_new_tokens
        if longest >= self.max_positions:
            raise DataError(f"the prompt is {longest} tokens, the model's context is {self.max_positions}",
                            "--prompt", f"shorten the prompt below {self.max_positions} tokens")
        room = self.max_positions - longest
        if max_new_tokens > room:
            raise ConfigError(f"a {longest}-token prompt + {max_new_tokens} new tokens runs past the model's "
                              f"context of {self.max_positions}", "--max-new-tokens",
                              f"ask for at most {room} new tokens, or shorten the prompt")
        return max_new_tokens


def left_pad(prompts: list[list[int]], pad_token_id: int) -> tuple["np.ndarray", "np.ndarray"]:
    """Left-pad token id lists into (input_ids, attention_mask), int64 [batch, longest]."""
    import numpy as np

    if not prompts or any(len(ids) == 0 for ids in prompts):
        raise DataError("a prompt is empty", "--prompt", "give at least one token of text")
    width = max(len(ids) for ids in prompts)
    input_ids = np.full((len(prompts), width), pad_token_id, dtype=np.int64)
    attention_mask = np.zeros((len(prompts), width), dtype=np.int64)
    for row, ids in enumerate(prompts):
        input_ids[row, width - len(ids):] = ids
        attention_mask[row, width - len(ids):] = 1
    return input_ids, attention_mask


def positions_from_mask(attention_mask: "np.ndarray") -> "np.ndarray":
    """``cumsum(mask) - 1`` with padding at 0: the position ids transformers' generate uses."""
    import numpy as np

    positions = np.cumsum(attention_mask, axis=1) - 1
    return np.where(attention_mask == 0, 0, positions).astype(np.int64)


def choose_tokens(logits: "np.ndarray", sampling: SamplingSpec, rng: "np.random.Generator") -> "np.ndarray":
    """Next token per row from last-position logits [batch, vocab]: argmax, or temperature + top-p sampling."""
    import numpy as np

    if sampling.greedy:
        return logits.argmax(axis=-1).astype(np.int64)
    scaled = logits.astype(np.float64) / sampling.temperature
    scaled -= scaled.max(axis=-1, keepdims=True)
    probs = np.exp(scaled)
    probs /= probs.sum(axis=-1, keepdims=True)
    chosen = np.empty(len(probs), dtype=np.int64)
    for row, p in enumerate(probs):
        kept = nucleus(p, sampling.top_p)
        weights = p[kept] / p[kept].sum()
        chosen[row] = kept[rng.choice(len(kept), p=weights)]
    return chosen


def nucleus(p: "np.ndarray", top_p: float, candidates: int = 1024) -> "np.ndarray":
    """Token ids of the smallest most-likely set whose probability reaches ``top_p`` (at least one token).

    Sorting the whole vocabulary per token is slow on large vocabularies, so the
    top ``candidates`` are sorted first and the full sort runs only when they
    hold less than ``top_p`` of the mass.
    """
    import numpy as np

    if top_p >= 1.0:
        return np.arange(len(p))
    order = None
    if len(p) > candidates:
        top = np.argpartition(-p, candidates)[:candidates]
        top = top[np.argsort(-p[top], kind="stable")]
        if p[top].sum() >= top_p:
            order = top
    if order is None:
        order = np.argsort(-p, kind="stable")
    keep = int(np.searchsorted(np.cumsum(p[order]), top_p, side="left")) + 1
    return order[:keep]


def generate(runner: DecoderRunner, prompts: list[list[int]], max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
             sampling: SamplingSpec | None = None, eos_token_id: int | list[int] | None = None,
             pad_token_id: int = 0, adapter: "BoundAdapter | onnxruntime.LoraAdapter | None" = None,
             on_tokens: Callable[[list[int | None]], None] | None = None) -> GenerationResult:
    """Generate up to ``max_new_tokens`` tokens after each prompt (a left-padded batch) on ONNX Runtime.

    Mirrors ``transformers`` ``generate``: position ids from the attention mask,
    a row stops at an EOS token (later steps feed it ``pad_token_id``), the loop
    ends when every row has stopped. ``adapter`` (a loaded ``.onnx_adapter``) is
    activated on every run of a hot-swap graph; as a :class:`BoundAdapter` (or
    with no adapter) the cache stays in ONNX Runtime between steps
    (:meth:`DecoderRunner.bound_step`), an ``onnxruntime.LoraAdapter`` runs
    through numpy feeds (``session.run``); ``on_tokens`` receives each
    step's token per row (None for rows that have stopped), for streaming.
    Raises DataError when a prompt does not fit the model's context.
    """
    import numpy as np

    sampling = sampling or SamplingSpec()
    if max_new_tokens < 1:
        raise ConfigError(f"max-new-tokens is {max_new_tokens}", "--max-new-tokens", "ask for at least 1 token")
    max_new_tokens = runner.check_context([len(ids) for ids in prompts], max_new_tokens)
    eos = set([eos_token_id] if isinstance(eos_token_id, int) else (eos_token_id or []))
    rng = np.random.default_rng(sampling.seed)
    input_ids, attention_mask = left_pad(prompts, pad_token_id)
    position_ids = positions_from_mask(attention_mask)
    batch = len(prompts)
    new_ids: list[list[int]] = [[] for _ in prompts]
    running = np.ones(batch, dtype=bool)
    step = _step_function(runner, adapter, input_ids.shape[1] + max_new_tokens)

    start = time.perf_counter()
    logits, past = step(input_ids, attention_mask, position_ids, None)
    prefill_seconds = time.perf_counter() - start
    steps, decode_start = 0, time.perf_counter()
    while True:
        tokens = choose_tokens(logits, sampling, rng)
        tokens = np.where(running, tokens, pad_token_id)
        for row in np.flatnonzero(running):
            new_ids[row].append(int(tokens[row]))
        if on_tokens is not None:
            on_tokens([int(t) if alive else None for t, alive in zip(tokens, running)])
        running &= ~np.isin(tokens, list(eos))
        if not running.any() or steps + 1 >= max_new_tokens:  # every running row holds steps + 1 tokens
            break
        attention_mask = np.concatenate([attention_mask, np.ones((batch, 1), dtype=np.int64)], axis=1)
        position_ids = position_ids[:, -1:] + 1
        logits, past = step(tokens[:, None], attention_mask, position_ids, past)
        steps += 1
    decode_seconds = time.perf_counter() - decode_start
    runner.release_cache()
    return GenerationResult([list(map(int, ids)) for ids in prompts], new_ids, prefill_seconds, decode_seconds,
                            steps)


def _step_function(runner: DecoderRunner, adapter, capacity: int) -> Callable:
    """``step(ids, mask, positions, past or None) -> (last logits, presents)`` for ``adapter``'s kind.

    ``capacity``: the most positions the generation reaches (sizes a shared cache once).
    """
    if adapter is None or isinstance(adapter, BoundAdapter):
        return lambda ids, mask, positions, past: runner.bound_step(ids, mask, positions, past, adapter, capacity)

    def numpy_step(ids, mask, positions, past):
        logits, presents = runner.step(ids, mask, positions, runner.empty_past(len(ids)) if past is None else past,
                                       adapter, last_only=True)
        return logits[:, -1, :], presents

    return numpy_step
