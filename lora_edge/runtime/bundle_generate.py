"""`lora-edge generate`: a bundle's causal-LM graph, its tokenizer and chat template, one call.

The bundle side of generation (which graph, which adapter, the tokenizer's
special ids and chat template, streaming text); the decode loop itself is
:mod:`lora_edge.runtime.generate`, which knows graphs, not bundles.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from lora_edge.core.decoder_io import DEFAULT_MAX_NEW_TOKENS
from lora_edge.core.errors import AdapterMismatchError, ConfigError
from lora_edge.runtime.generate import BoundAdapter, DecoderRunner, GenerationResult, SamplingSpec, generate

if TYPE_CHECKING:
    import onnxruntime

    from lora_edge.core.manifest import Manifest


class TextStream:
    """Turns a stream of token ids into text pieces, for printing as tokens arrive.

    Decodes everything produced so far and emits only the new suffix, holding
    back text that ends in an incomplete character (U+FFFD), so multi-token
    words and byte-level BPE pieces print correctly.
    """

    def __init__(self, tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self.printed = ""

    def push(self, token_id: int) -> str:
        """Add one token; return the text that is now complete and not yet printed."""
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=self.skip_special_tokens)
        if text.endswith("\ufffd") or not text.startswith(self.printed):
            return ""
        piece, self.printed = text[len(self.printed):], text
        return piece


def encode_prompts(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of each text, with the tokenizer's special tokens (as transformers' generate sees them)."""
    return [list(ids) for ids in tokenizer(list(texts), add_special_tokens=True)["input_ids"]]


# --- generation from a bundle (``lora-edge generate``) ------------------------------------------------------

@dataclass
class BundleGeneration:
    """What ``lora-edge generate`` produced: the graph and adapter used, the result and the decoded texts."""

    graph: str
    adapter: str | None
    result: GenerationResult
    texts: list[str]

    def to_json(self) -> dict:
        """JSON form: graph, adapter, prompt ids, new token ids, texts and tokens/s."""
        return {"graph": self.graph, "adapter": self.adapter, **self.result.to_json(), "texts": self.texts}


def special_ids(config: dict, tokenizer) -> tuple[int | list[int] | None, int]:
    """(EOS id(s), pad id) as transformers' generate takes them: the model config first, then the tokenizer."""
    eos = config.get("eos_token_id", tokenizer.eos_token_id)
    pad = config.get("pad_token_id")
    if pad is None:
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (
            eos[0] if isinstance(eos, list) and eos else eos)
    return eos, int(pad or 0)


def adapter_for_run(bundle: Path, record, manifest: "Manifest", adapter: str | None, session):
    """(name, :class:`BoundAdapter` or None) for a run of ``record``: a bundle adapter's name or an .onnx_adapter file.

    Merged and branched graphs carry their adapter (``adapter`` must be it or
    None). Hot-swap graphs take a bundle adapter by name, ``none`` for the base
    model, or a path to an ``.onnx_adapter`` file, which is checked against the
    graph first (an adapter of another base model is refused naming the tensor).
    """
    from lora_edge.core.choices import Form
    from lora_edge.core.manifest import choose_adapter
    from lora_edge.core.manifest import require_adapter_file

    if record.form is Form.HOTSWAP and adapter and adapter.endswith(".onnx_adapter"):
        path = Path(adapter)
        if not path.is_file():
            raise AdapterMismatchError(f"adapter file '{path}' does not exist", "--adapter",
                                       "give a bundle adapter name or an existing .onnx_adapter file")
        return path.stem, fitting_adapter(session, path)
    chosen = choose_adapter(record, manifest, adapter)
    if record.form is Form.HOTSWAP and chosen is not None:
        return chosen, fitting_adapter(session, require_adapter_file(Path(bundle), record, chosen))
    return chosen, None


def fitting_adapter(session: "onnxruntime.InferenceSession", adapter_file: Path) -> BoundAdapter:
    """The ``.onnx_adapter`` file as the graph takes it (packed for a graph with packed LoRA inputs), checked.

    Raises AdapterMismatchError unless every tensor is a graph input of its shape:
    the LoRA rank axis is free; every other axis must match (a different base
    model shows here as another hidden size or a module the graph lacks).
    """
    from lora_edge.runtime.packed_lora import member_names, packs_of

    inputs = {item.name: item.shape for item in session.get_inputs()}
    inputs.update({item.name: item.shape for item in session.get_overridable_initializers()})
    packs = packs_of(session.get_modelmeta().custom_metadata_map)
    adapter = BoundAdapter.load(adapter_file)
    packed_away = member_names(packs)
    for name in adapter.parameters:
        if name not in inputs and name not in packed_away:
            raise AdapterMismatchError(f"adapter tensor '{name}' has no input in the graph (adapter trained on "
                                       "another base model?)", adapter_file,
                                       "use an adapter exported for this bundle's base model")
    adapter = adapter.packed_for(packs)
    for name, value in adapter.parameters.items():
        want, got = inputs[name], list(value.shape())
        fixed = [(w, g) for w, g in zip(want, got) if isinstance(w, int)]
        if len(want) != len(got) or any(w != g for w, g in fixed):
            raise AdapterMismatchError(f"adapter tensor '{name}' has shape {got}, the graph expects {want} "
                                       "(adapter trained on another base model?)", adapter_file,
                                       "use an adapter exported for this bundle's base model")
    return adapter


def encode_chat_prompts(tokenizer, texts: list[str], system: str | None = None) -> list[list[int]]:
    """Each text as the user's turn of a chat (after ``system``), rendered by the bundle's chat template."""
    head = [{"role": "system", "content": system}] if system else []
    rendered = [tokenizer.apply_chat_template(head + [{"role": "user", "content": text}]) for text in texts]
    return [list(ids) for ids in tokenizer(rendered, add_special_tokens=False)["input_ids"]]


def generate_from_bundle(bundle: Path, graph: str, prompts: list[str], adapter: str | None = None,
                         max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, sampling: SamplingSpec | None = None,
                         on_text: Callable[[str], None] | None = None, settings=None,
                         chat: bool | None = None, system: str | None = None) -> BundleGeneration:
    """Generate text after each prompt with graph ``graph`` of ``bundle`` (``lora-edge generate``).

    Uses the tokenizer and config.json beside the graphs. ``chat``: each prompt
    is a user turn rendered by the bundle's chat template (after ``system``);
    None = when the bundle has a template, as an instruct model expects; False =
    the plain text. ``on_text`` receives the text of a single prompt's
    completion piece by piece as tokens arrive. Errors: BundleError (unknown
    graph), ConfigError (not a causal-lm graph, bad options), ModelError (chat
    asked of a bundle without a template), DataError (a prompt longer than the
    context), AdapterMismatchError.
    """
    from lora_edge.core.bundle import ONNX_DIR
    from lora_edge.core.decoder_io import context_length
    from lora_edge.core.manifest import find_task_graph
    from lora_edge.core.choices import Task
    from lora_edge.core.models import load_config
    from lora_edge.runtime.session import create_session, decoder_settings
    from lora_edge.runtime.tokenizer import load_bundle_tokenizer

    bundle = Path(bundle)
    manifest, record = find_task_graph(bundle, graph, Task.CAUSAL_LM)
    if not prompts:
        raise ConfigError("no prompt given", "--prompt", "pass --prompt \"...\"")
    onnx_dir = bundle / ONNX_DIR
    tokenizer = load_bundle_tokenizer(onnx_dir)
    config = load_config(onnx_dir)
    session = create_session(bundle / record.file, settings or decoder_settings())
    chosen, lora = adapter_for_run(bundle, record, manifest, adapter, session)
    runner = DecoderRunner(session, context_length(config))
    eos, pad = special_ids(config, tokenizer)
    stream = TextStream(tokenizer) if on_text is not None and len(prompts) == 1 else None

    def on_tokens(tokens: list[int | None]) -> None:
        if stream is not None and tokens[0] is not None:
            piece = stream.push(tokens[0])
            if piece:
                on_text(piece)

    use_chat = bool(tokenizer.chat_template) if chat is None else chat
    if system and not use_chat:
        raise ConfigError("--system needs the chat template", "--system", "drop --raw, or drop --system")
    ids = encode_chat_prompts(tokenizer, prompts, system) if use_chat else encode_prompts(tokenizer, prompts)
    result = generate(runner, ids, max_new_tokens, sampling, eos, pad, lora, on_tokens)
    texts = [tokenizer.decode(ids, skip_special_tokens=True) for ids in result.new_ids]
    return BundleGeneration(record.name, chosen, result, texts)


def format_generation(output: BundleGeneration, streamed: bool) -> str:
    """The texts ``lora-edge generate`` prints after the run (a streamed single text is already out)."""
    if streamed and len(output.texts) == 1:
        return ""
    return "\n".join(f"[{i}] {text}" for i, text in enumerate(output.texts))


def format_speed(output: BundleGeneration) -> str:
    """One line: tokens generated, prefill and decode tokens/s, graph and adapter."""
    result = output.result
    return (f"-- {sum(map(len, result.new_ids))} new tokens, prefill {result.prefill_tokens_per_second:.0f} "
            f"tokens/s, decode {result.decode_tokens_per_second:.0f} tokens/s ({output.graph}"
            + (f", adapter {output.adapter})" if output.adapter else ")"))
