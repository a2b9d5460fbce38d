"""The project's named choices: what a model does (Task), deployment forms (Form), precisions (Precision).

They are parsed once where a user types them (the CLI's option types, a
recipe's or device file's fields) and travel as members from there. This
module imports nothing heavy: the CLI's option types and the recipe's
defaults are built from it when ``lora-edge --help`` runs.
"""

from __future__ import annotations

import enum

from lora_edge.core.errors import parse_enum


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
