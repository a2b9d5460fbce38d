"""A bundle's tokenizer without transformers or torch: ``tokenizer.json`` through the ``tokenizers`` package.

The device side of lora-edge (``infer``, ``generate``, ``profile`` of an
existing bundle) needs only onnxruntime, ``tokenizers`` and numpy, so it runs
where torch is not installed and starts in a fraction of the time.
:class:`BundleTokenizer` answers the small part of transformers' tokenizer API
those commands use -- ``tokenizer(texts, padding=..., truncation=...,
max_length=..., return_tensors="np")``, ``decode``, the pad/EOS ids -- with the
same ids (tests compare it with ``AutoTokenizer`` on the same files).

The bundle's ``tokenizer.json`` carries no fixed padding
(:func:`portable_tokenizer_json` strips it at export): the base model's file
pads every input to 128 tokens, so a user loading it as it is would compute
every input at full length. lora-edge pads explicitly, per call.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Sequence

from lora_edge.core.errors import ModelError, first_line

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"  # where transformers >= 4.43 saves a tokenizer's chat template
# What transformers' BERT-style tokenizers return; a graph takes the subset it declares.
OUTPUT_NAMES = ("input_ids", "token_type_ids", "attention_mask")


def _token_content(value) -> str | None:
    """A special token as tokenizer_config.json stores it: a string or ``{"content": ...}``."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def portable_tokenizer_json(data: dict, max_positions: int | None = None) -> dict:
    """``tokenizer.json`` contents without fixed padding, and truncation no longer than the model's positions.

    Padding is dropped (each runtime pads as it needs: longest in a batch, left
    for decoders); a truncation length beyond ``max_positions`` would index past
    the position table, so it is lowered to it.
    """
    data = dict(data)
    data["padding"] = None
    truncation = data.get("truncation")
    if truncation and max_positions and truncation.get("max_length", 0) > max_positions:
        data["truncation"] = {**truncation, "max_length": int(max_positions)}
    return data


def make_portable(directory: Path, max_positions: int | None = None) -> bool:
    """Rewrite ``directory/tokenizer.json`` with :func:`portable_tokenizer_json`; True when it changed."""
    path = Path(directory) / TOKENIZER_FILE
    if not path.is_file():
        return False
    data = json.loads(path.read_text(encoding="utf-8"))
    fixed = portable_tokenizer_json(data, max_positions)
    if fixed == data:
        return False
    path.write_text(json.dumps(fixed, ensure_ascii=False, indent=2), encoding="utf-8")
    return True


class BundleTokenizer:
    """``tokenizer.json`` + ``tokenizer_config.json`` as the subset of a transformers tokenizer lora-edge uses."""

    def __init__(self, backend, config: dict, chat_template: str | None = None):
        self.backend = backend
        self.config = config
        self.chat_template = chat_template or config.get("chat_template") or None
        self.padding_side = config.get("padding_side", "right")
        self.truncation_side = config.get("truncation_side", "right")
        self.eos_token = _token_content(config.get("eos_token"))
        pad = _token_content(config.get("pad_token"))
        self.pad_token = pad if pad is not None else self.eos_token  # decoders without one pad with EOS
        self.pad_token_type_id = int(config.get("pad_token_type_id", 0))

    @property
    def eos_token_id(self) -> int | None:
        return self.backend.token_to_id(self.eos_token) if self.eos_token else None

    @property
    def pad_token_id(self) -> int | None:
        return self.backend.token_to_id(self.pad_token) if self.pad_token else None

    def _encode(self, texts: list[str], add_special_tokens: bool, truncation: bool, max_length: int | None):
        backend = self.backend
        if truncation and max_length:
            backend.enable_truncation(max_length, direction=self.truncation_side)
        else:
            backend.no_truncation()
        backend.no_padding()
        return backend.encode_batch(texts, add_special_tokens=add_special_tokens)

    def __call__(self, texts: str | Sequence[str], add_special_tokens: bool = True, padding: bool | str = False,
                 truncation: bool = False, max_length: int | None = None, return_tensors: str | None = None) -> dict:
        """Encode ``texts`` like transformers: lists of ids, or with ``return_tensors="np"`` padded int64 arrays.

        ``padding``: False, True/"longest" (to the batch's longest) or
        "max_length" (to ``max_length``), on the tokenizer's padding side.
        """
        single = isinstance(texts, str)
        encodings = self._encode([texts] if single else list(texts), add_special_tokens, truncation, max_length)
        columns = {"input_ids": [e.ids for e in encodings], "token_type_ids": [e.type_ids for e in encodings],
                   "attention_mask": [e.attention_mask for e in encodings]}
        if padding or return_tensors == "np":
            width = max_length if padding == "max_length" and max_length else max(map(len, columns["input_ids"]))
            columns = self._pad(columns, width)
        if return_tensors == "np":
            import numpy as np

            return {name: np.asarray(rows, dtype=np.int64) for name, rows in columns.items()}
        if return_tensors is not None:
            raise ValueError(f"BundleTokenizer returns lists or numpy arrays, not {return_tensors!r}")
        return {name: rows[0] for name, rows in columns.items()} if single else columns

    def _pad(self, columns: dict[str, list[list[int]]], width: int) -> dict[str, list[list[int]]]:
        fill = {"input_ids": self.pad_token_id or 0, "token_type_ids": self.pad_token_type_id, "attention_mask": 0}
        left = self.padding_side == "left"
        padded = {}
        for name, rows in columns.items():
            extra = [[fill[name]] * (width - len(row)) for row in rows]
            padded[name] = [pad + row if left else row + pad for row, pad in zip(rows, extra)]
        return padded

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """Text of ``ids`` (transformers' ``decode`` with its defaults for these files)."""
        text = self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)
        if self.config.get("clean_up_tokenization_spaces"):
            for before, after in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                                  (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
                text = text.replace(before, after)
        return text

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The chat template rendered as transformers renders it (sandboxed jinja2, trimmed blocks), as text.

        Raises ModelError when the bundle's tokenizer has no chat template.
        """
        if not self.chat_template:
            raise ModelError("the bundle's tokenizer has no chat template", "tokenizer_config.json",
                             "pass --raw to continue the prompt as plain text")
        return _compiled_template(self.chat_template).render(
            messages=messages, add_generation_prompt=add_generation_prompt,
            bos_token=_token_content(self.config.get("bos_token")) or "", eos_token=self.eos_token or "")


@functools.lru_cache(maxsize=4)
def _compiled_template(source: str):
    """A chat template compiled the way transformers compiles it (``ImmutableSandboxedEnvironment``), once."""
    from jinja2 import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str):
        raise TemplateError(message)

    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                extensions=["jinja2.ext.loopcontrols"])
    environment.globals["raise_exception"] = raise_exception
    try:
        return environment.from_string(source)
    except TemplateError as exc:
        raise ModelError(f"the chat template does not compile ({exc})", CHAT_TEMPLATE_FILE,
                         "re-export the bundle from a model with a valid chat template, or pass --raw") from None


def load_bundle_tokenizer(directory: str | Path) -> BundleTokenizer:
    """The tokenizer stored in ``directory`` (a bundle's ``onnx/``): needs ``tokenizer.json``, not transformers."""
    from tokenizers import Tokenizer

    directory = Path(directory)
    path = directory / TOKENIZER_FILE
    if not path.is_file():
        raise ModelError("the bundle has no tokenizer.json", directory,
                         "re-export the bundle (lora-edge export) with a model that has a fast tokenizer")
    try:
        backend = Tokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises bare Exceptions for malformed files
        raise ModelError(f"cannot read tokenizer.json ({first_line(exc)})", path,
                         "re-export the bundle (lora-edge export)") from None
    config_path = directory / TOKENIZER_CONFIG
    config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
    template_path = directory / CHAT_TEMPLATE_FILE
    template = template_path.read_text(encoding="utf-8") if template_path.is_file() else None
    return BundleTokenizer(backend, config, template)
