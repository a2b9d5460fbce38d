"""Decoder LLMs with a KV cache: the wrapper module that is exported, and the causal-LM graph I/O.

A Hugging Face causal LM keeps its key/value cache in a ``Cache`` object,
which ``torch.export`` cannot take as a graph input. :class:`KVCacheDecoder`
owns the cache instead: its forward takes the past keys and values as flat
tensors, builds a :class:`transformers.DynamicCache` from them, runs the model
and returns the logits plus every layer's grown keys and values.

The graph I/O contract (names, shapes, padding) is in :mod:`lora_edge.core.decoder_io`.

Sliding-window attention (Mistral, Qwen2 with ``use_sliding_window``): the
graph keeps the whole past and transformers' mask applies the window, so a
sliding-window model stays exact at any length (tested past the window); the
price is a cache that is not trimmed to the window.

Padded positions: their attention rows are fully masked, and ONNX Runtime and
PyTorch fill such rows differently, so the wrapper zeroes the logits and the
new keys/values of padded tokens: the graph is one well-defined function and
can be verified against PyTorch on padded batches.
"""

from __future__ import annotations

import contextlib
import functools
from typing import TYPE_CHECKING, Iterator

from lora_edge.core.decoder_io import (ATTENTION_MASK, BATCH, INPUT_IDS, PAST, POSITION_IDS, SEQUENCE, TOTAL, DecoderShape)
from lora_edge.core.errors import ExportError

if TYPE_CHECKING:
    import torch

    from lora_edge.export.exporter import GraphIO

# fp32 graph vs PyTorch: bound on |diff| / (largest |output|, at least 1). SmolLM2-135M (30 layers) exports
# at 1.8e-4 of its logit scale (4e-3 absolute on logits in the twenties) from rounding alone; a graph that
# misses an adapter or a mask is off by 1e-2 of the scale or more.
FP32_RELATIVE_TOLERANCE = 1e-3
# Attention layer types whose cache is one growing key/value pair per layer: what this graph I/O carries.
SUPPORTED_LAYER_TYPES = ("full_attention", "sliding_attention")


def check_supported(config) -> None:
    """Raise ExportError when a config has layers whose cache is not one key/value pair per layer."""
    text_config = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    if getattr(text_config, "is_encoder_decoder", False):
        raise ExportError(f"{type(config).__name__} is an encoder-decoder model", "the model's config.json",
                          "export a decoder-only causal LM (Llama, Qwen2, Mistral, GPT-2, ...)")
    for index, layer_type in enumerate(getattr(text_config, "layer_types", None) or []):
        if layer_type not in SUPPORTED_LAYER_TYPES:
            raise ExportError(f"decoder layer {index} is of type '{layer_type}', whose cache is not one growing "
                              "key/value pair per layer", "the model's config.json: layer_types",
                              f"causal-lm graphs carry only {', '.join(SUPPORTED_LAYER_TYPES)} layers")
    if getattr(text_config, "kv_sharing_modes", None):
        raise ExportError("the model shares key/value caches between layers", "the model's config.json: "
                          "kv_sharing_modes", "causal-lm graphs carry one cache per layer")


def _kv_layers(cache) -> list:
    """The per-layer caches of a transformers Cache (the model may wrap it, e.g. EncoderDecoderCache)."""
    cache = getattr(cache, "self_attention_cache", cache)
    return list(cache.layers)


@functools.cache
def _padding_layer_class() -> type:
    """Build the cache layer class of :class:`KVCacheDecoder` on first use (it subclasses a transformers class)."""
    import torch
    from transformers.cache_utils import DynamicLayer

    class PaddingZeroingLayer(DynamicLayer):
        """A DynamicLayer holding the given past, which stores the keys/values of padded new tokens as zeros.

        Plain (non-sliding) layers: the whole past is kept and the attention mask
        applies any sliding window. Zeroing touches only the new tokens, so a decode
        step costs nothing extra; padded keys are masked out of attention anyway.
        """

        def __init__(self, past_key, past_value, is_real):
            super().__init__()
            # The given past as it is: ``update`` would concatenate it to an empty tensor, 3 traced ops per
            # tensor that the graph optimizer removes again (torch.export's time grows with the ops it traces).
            self.lazy_initialization(past_key, past_value)  # its empty tensors are not read: not traced
            self.keys, self.values = past_key, past_value
            self.keep = is_real[:, None, :, None]  # broadcast over [batch, heads, sequence, head_dim]

        def update(self, key_states, value_states, *args, **kwargs):
            """Append the new tokens' keys and values (padded ones as zeros)."""
            key_states = torch.where(self.keep, key_states, 0.0)
            value_states = torch.where(self.keep, value_states, 0.0)
            return super().update(key_states, value_states, *args, **kwargs)

    return PaddingZeroingLayer


@functools.cache
def _module_class() -> type:
    """Build the KV-cache wrapper class on first use, so importing this module does not import torch."""
    import torch

    PaddingZeroingLayer = _padding_layer_class()

    class KVCacheDecoder(torch.nn.Module):
        """A causal LM with its KV cache as flat tensors: the module exported to a ``causal-lm`` graph.

        ``model`` may be a plain causal LM (base or merged), a PeftModel, a model
        with :class:`~lora_edge.export.merge.LoraBranch` layers (branched, hot-swap) or any
        module whose forward takes ``input_ids, attention_mask, position_ids, cache,
        use_cache`` like a transformers causal LM. It is held as ``self.model``
        and never modified.
        """

        def __init__(self, model, shape: DecoderShape):
            super().__init__()
            self.model = model
            self.shape = shape

        def forward(self, *inputs):
            """Graph inputs in :attr:`DecoderShape.input_names` order -> (logits, present.0.key, ...)."""
            from transformers import DynamicCache

            if len(inputs) != len(self.shape.input_names):
                raise ValueError(f"expected {len(self.shape.input_names)} inputs, got {len(inputs)}")
            input_ids, attention_mask, position_ids, *past = inputs
            # [batch, sequence] True where a new token is real (not left padding); narrow() keeps the
            # graph's output axis named `sequence` (a negative slice would make it an expression of the total)
            sequence = input_ids.shape[1]
            is_real = attention_mask.narrow(1, attention_mask.shape[1] - sequence, sequence) > 0
            cache = DynamicCache()
            cache.layer_class_to_replicate = None
            cache.layers = [PaddingZeroingLayer(key, value, is_real) for key, value in zip(past[0::2], past[1::2])]
            with _failing_module(self, tracing=_is_fake(input_ids)):
                outputs = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                     cache=cache, use_cache=True)
            presents = []
            for layer in _kv_layers(outputs.cache):
                presents += [layer.keys, layer.values]
            # Padded positions' outputs mean nothing (their attention rows are fully masked, and ONNX Runtime
            # and PyTorch fill such rows differently): zero them so the graph is one well-defined function.
            logits = torch.where(is_real.unsqueeze(-1), outputs.logits, 0.0)
            return (logits, *presents)

    return KVCacheDecoder


def __getattr__(name: str):
    """``KVCacheDecoder`` (the torch module class) is built lazily: generation on ONNX Runtime needs no torch."""
    if name == "KVCacheDecoder":
        return _module_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def wrap_decoder(model, config=None) -> "torch.nn.Module":
    """Wrap a causal LM in the KV-cache module that is exported; eval mode.

    ``config`` defaults to the model's own (``model.config``; PEFT forwards it).
    Raises ExportError when the architecture's cache does not fit the graph I/O.
    """
    config = config if config is not None else model.config
    check_supported(config)
    return _module_class()(model, DecoderShape.from_config(config)).eval()


def _model_dtype(model) -> "torch.dtype":
    import torch

    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def example_inputs(shape: DecoderShape, batch: int = 2, sequence: int = 3, past: int = 4, dtype=None,
                   seed: int = 0) -> tuple:
    """Random forward() inputs of a step with a non-empty past (no padding): for tracing.

    Sizes are >= 2 and differ from each other so that the exporter neither
    specialises a dynamic dimension nor ties two of them together.
    """
    import torch

    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, shape.vocab_size, (batch, sequence), generator=generator)
    attention_mask = torch.ones(batch, past + sequence, dtype=torch.long)
    position_ids = torch.arange(past, past + sequence).unsqueeze(0).expand(batch, sequence).contiguous()
    return (input_ids, attention_mask, position_ids, *_random_past(shape, batch, past, dtype, generator))


def _random_past(shape: DecoderShape, batch: int, length: int, dtype, generator) -> list:
    import torch

    return [torch.randn(batch, shape.num_kv_heads, length, shape.head_dim, generator=generator).to(dtype or torch.float32)
            for _ in shape.past_names]


def verify_inputs(shape: DecoderShape, prompts: list[list[int]], pad_token_id: int, dtype=None) -> list[tuple]:
    """Inputs on which an exported graph must match PyTorch: the ways generation calls it.

    1. prefill of left-padded prompts (empty past); 2. a one-token decode step
    after a padded past; 3. several new tokens after a past (chunked prefill);
    4. a single unpadded prompt. The past of 2 and 3 is seeded random data, so the
    inputs are the same whatever model the graph was exported from.
    """
    import torch

    generator = torch.Generator().manual_seed(1)
    width = max(len(ids) for ids in prompts)
    ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = torch.tensor(prompt)
        mask[row, width - len(prompt):] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0) * mask
    empty = [torch.zeros(len(prompts), shape.num_kv_heads, 0, shape.head_dim, dtype=dtype or torch.float32)
             for _ in shape.past_names]
    cases = [(ids, mask, positions, *empty)]
    for new_tokens in (1, 3):
        batch = min(2, len(prompts))
        step_ids = ids[:batch, -new_tokens:]
        step_mask = torch.cat([mask[:batch], torch.ones(batch, new_tokens, dtype=torch.long)], dim=1)
        step_positions = positions[:batch, -1:] + torch.arange(1, new_tokens + 1)
        past = _random_past(shape, batch, width, dtype, generator)
        cases.append((step_ids, step_mask, step_positions, *past))
    single = torch.tensor([prompts[0]])
    cases.append((single, torch.ones_like(single), torch.arange(single.shape[1]).unsqueeze(0),
                  *[t[:1] for t in empty]))
    return cases


def dynamic_axes(shape: DecoderShape) -> dict[str, dict[int, str]]:
    """Input name -> {axis: dim name}: batch, sequence, past and total (past + sequence) lengths."""
    axes = {INPUT_IDS: {0: BATCH, 1: SEQUENCE}, ATTENTION_MASK: {0: BATCH, 1: TOTAL},
            POSITION_IDS: {0: BATCH, 1: SEQUENCE}}
    axes.update({name: {0: BATCH, 2: PAST} for name in shape.past_names})
    return axes


def causal_lm_graph_io(model, context) -> "GraphIO":
    """Graph-I/O builder of ``Task.CAUSAL_LM`` (the exporter's registry): KV-cache wrapper + I/O + checks.

    ``context`` is the exporter's ExportContext (tokenizer, config, sample texts).
    """
    from lora_edge.export.exporter import GraphIO
    from lora_edge.export.last_logits import add_logits_to_keep

    wrapper = wrap_decoder(model, context.config)
    shape = wrapper.shape
    dtype = _model_dtype(model)
    tokenizer = context.tokenizer
    prompts = [list(ids)[: context.max_length] for ids in
               tokenizer(list(context.sample_texts[:3]), add_special_tokens=True)["input_ids"]]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return GraphIO(module=wrapper, example_inputs=example_inputs(shape, dtype=dtype),
                   input_names=shape.input_names, output_names=shape.output_names,
                   dynamic_axes=dynamic_axes(shape), verify_inputs=verify_inputs(shape, prompts, pad, dtype),
                   dim_min={PAST: 0, SEQUENCE: 1, TOTAL: 1},
                   relative_tolerance=FP32_RELATIVE_TOLERANCE, edit_graph=add_logits_to_keep)


def _register() -> None:
    from lora_edge.export.exporter import register_graph_io
    from lora_edge.core.choices import Task

    register_graph_io(Task.CAUSAL_LM, causal_lm_graph_io)


_register()


# ---------------------------------------------------------------------------------------------------------
# Which module failed to export, and why.

# Frames of these libraries are the tracer's, not the model's.
_TRACER_PATHS = ("/torch/", "/lora_edge/export/decoder.py", "/contextlib.py")


def _is_fake(tensor) -> bool:
    """True while torch.export traces (non-strict tracing runs the forward on fake tensors)."""
    from torch._subclasses.fake_tensor import FakeTensor

    return isinstance(tensor, FakeTensor)


@contextlib.contextmanager
def _failing_module(wrapper, tracing: bool) -> Iterator[None]:
    """While tracing, turn a failure inside the model into an ExportError naming the innermost module.

    Forward hooks keep the stack of running submodules (removed again on exit, so
    the model is not modified); the modules whose forward did not return are the
    ones that failed. Outside tracing this does nothing.
    """
    if not tracing:
        yield
        return
    names = {module: name.removeprefix("model.") for name, module in wrapper.named_modules() if name}
    stack: list[str] = []

    def enter(module, _args) -> None:
        stack.append(names[module])

    def leave(_module, _args, _output) -> None:  # must return None: a value would replace the output
        if stack:
            stack.pop()

    handles = []
    for module in names:
        handles.append(module.register_forward_pre_hook(enter))
        handles.append(module.register_forward_hook(leave))
    try:
        yield
    except ExportError:
        raise
    except Exception as exc:
        raise describe_export_failure(wrapper, stack, exc) from exc
    finally:
        for handle in handles:
            handle.remove()


def describe_export_failure(wrapper, stack: list[str], exc: BaseException) -> ExportError:
    """An ExportError naming the innermost module whose forward failed and the tracer's reason."""
    module_name = stack[-1] if stack else ""
    module = wrapper.model.get_submodule(module_name) if module_name else None
    where = f"module '{module_name}' ({type(module).__name__})" if module is not None else "the model's forward"
    reason = _first_reason(str(exc)) or exc.__class__.__name__
    line = _user_line(exc)
    if line:
        reason += f" (at {line})"
    return ExportError(f"{exc.__class__.__name__} while tracing for ONNX: {reason}", where,
                       "this module's code does not trace with torch.export; use a supported causal LM "
                       "(Llama, Qwen2, Mistral, GPT-2, ...) or a newer transformers")


def _user_line(exc: BaseException) -> str:
    """``file:line in function`` of the innermost model-code frame where the tracer failed ('' if none)."""
    import traceback

    frames = [frame for frame in traceback.extract_tb(exc.__traceback__)
              if not any(part in frame.filename for part in _TRACER_PATHS)]
    if not frames:
        return ""
    frame = frames[-1]
    return f"{frame.filename.split('/site-packages/')[-1]}:{frame.lineno} in {frame.name}"


def _first_reason(text: str) -> str:
    """The first non-empty line of a tracer error, shortened."""
    for line in text.splitlines():
        if line.strip():
            return line.strip()[:240]
    return ""
