"""The project's named choices: what a model does (Task), deployment forms (Form), precisions (Precision),
the shipped data sets' names (``--data intent``) and the tiny test models' (``--model tiny:bert``).

They are parsed once where a user types them (the CLI's option types, a
recipe's or device file's fields) and travel as members from there. This
module imports nothing heavy: the CLI's option types and the recipe's
defaults are built from it when ``lora-edge --help`` runs.
"""

from __future__ import annotations

import enum

from lora_edge.core.errors import ConfigError, parse_enum

SHIPPED_INTENT_DATA = "intent"  # the voice-assistant intent task shipped with the package
SHIPPED_DATA_NAMES = ("default", SHIPPED_INTENT_DATA)  # --data values that mean the shipped intent task
SHIPPED_CHAT_DATA = "commands"  # --data value for the shipped command-parsing chat task

TINY_PREFIX = "tiny:"  # --model tiny:<arch>: a tiny random model built on first use (tests, demos)
TINY_ENCODERS = ("bert", "roberta", "distilbert")
TINY_DECODERS = ("llama", "qwen2", "gpt2", "mistral")


class StrChoice(str, enum.Enum):
    """A setting with named string values: compares, prints and formats as its value.

    ``f"{Form.MERGED}.{Precision.FP32}"`` is ``merged.fp32`` on every Python
    (3.11 changed ``format()`` of str-mixin enums to ``Form.MERGED``), so a
    typed value can go wherever its string went.
    """

    def __str__(self) -> str:
        return str(self.value)

    def __format__(self, spec: str) -> str:
        return format(str(self.value), spec)


class Task(StrChoice):
    """What a model is used for; decides the head and the exported graph's outputs."""

    SEQ_CLS = "seq-cls"
    CAUSAL_LM = "causal-lm"

    @classmethod
    def parse(cls, value: "str | Task", where: str = "--task") -> "Task":
        """Turn a user string into a Task, or raise a ConfigError listing the valid names."""
        return parse_enum(cls, value, where, what="task")


class Form(StrChoice):
    """The three deployment forms of an adapter (docs/ARCHITECTURE.md)."""

    MERGED = "merged"      # B·A folded into W: one graph per adapter, no runtime cost
    BRANCHED = "branched"  # explicit low-rank MatMul pair beside each base linear
    HOTSWAP = "hotswap"    # LoRA weights are graph inputs; adapters are .onnx_adapter files


class Precision(StrChoice):
    """Numeric precision of a graph's base weights (LoRA pairs stay float)."""

    FP32 = "fp32"
    FP16 = "fp16"
    INT8_DYNAMIC = "int8-dynamic"
    INT8_STATIC = "int8-static"
    INT4 = "int4"


def tiny_arch(model: str, where: str = "model") -> str:
    """The architecture of a ``tiny:<arch>`` name, or a ConfigError listing the valid ones."""
    arch = str(model)[len(TINY_PREFIX):]
    if arch not in TINY_ENCODERS + TINY_DECODERS:
        valid = ", ".join(TINY_PREFIX + name for name in TINY_ENCODERS + TINY_DECODERS)
        raise ConfigError(f"unknown tiny model '{model}'", where, f"use one of: {valid}")
    return arch
