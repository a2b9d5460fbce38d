"""Typed specs for each stage, validated on construction, and (later) whole recipes from TOML.

Every field carries its help text in ``metadata["help"]`` (shown by the CLI and
the docs) and is checked in ``__post_init__``; a bad value raises a
:class:`~lora_edge.errors.ConfigError` that names the field.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field, fields
from typing import Any

from lora_edge.errors import ConfigError

ALL_LINEAR = "all-linear"


class LoraInit(str, enum.Enum):
    """How the LoRA A/B matrices start (PEFT's ``init_lora_weights``)."""

    DEFAULT = "default"
    GAUSSIAN = "gaussian"
    PISSA = "pissa"

    def peft_value(self) -> bool | str:
        """The value PEFT's LoraConfig expects for ``init_lora_weights``."""
        return True if self is LoraInit.DEFAULT else self.value


def _field(default: Any, help: str, **kwargs) -> Any:
    """A dataclass field with help text in its metadata."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help}, **kwargs)
    return field(default=default, metadata={"help": help}, **kwargs)


def field_help(spec_class: type) -> dict[str, str]:
    """Map each field of a spec dataclass to its help text."""
    return {f.name: f.metadata.get("help", "") for f in fields(spec_class)}


def parse_enum(enum_class: type[enum.Enum], value: Any, where: str) -> Any:
    """Turn a string into a member of ``enum_class``, or raise a ConfigError listing the choices."""
    if isinstance(value, enum_class):
        return value
    try:
        return enum_class(value)
    except ValueError:
        valid = ", ".join(member.value for member in enum_class)
        raise ConfigError(f"unknown value '{value}'", where, f"use one of: {valid}") from None


@dataclass
class LoraSpec:
    """The LoRA adapter to train: which layers, what rank, how it is scaled and initialised."""

    rank: int = _field(8, "LoRA rank r: the inner dimension of B·A.")
    alpha: float = _field(16.0, "LoRA alpha: the update is scaled by alpha/r (alpha/sqrt(r) with rslora).")
    dropout: float = _field(0.05, "Dropout on the LoRA branch input during training, in [0, 1).")
    targets: list[str] | str = _field(["query", "value"],
                                      "Module names to adapt (suffix match), or 'all-linear'.")
    init: LoraInit = _field(LoraInit.DEFAULT, "Initialisation of A/B: default, gaussian or pissa.")
    rslora: bool = _field(False, "Use rank-stabilised scaling alpha/sqrt(r).")
    rank_pattern: dict[str, int] = _field({}, "Per-module rank overrides, {module-name regex: rank}.")
    alpha_pattern: dict[str, float] = _field({}, "Per-module alpha overrides, {module-name regex: alpha}.")

    def __post_init__(self):
        if not isinstance(self.rank, int) or self.rank < 1:
            raise ConfigError(f"rank must be a positive integer, got {self.rank!r}", "lora.rank", "use e.g. 8")
        if not isinstance(self.alpha, (int, float)) or self.alpha <= 0:
            raise ConfigError(f"alpha must be positive, got {self.alpha!r}", "lora.alpha", "use e.g. 16")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout!r}", "lora.dropout", "use e.g. 0.05")
        if isinstance(self.targets, str) and self.targets != ALL_LINEAR:
            self.targets = [t.strip() for t in self.targets.split(",") if t.strip()]
        if not self.targets:
            raise ConfigError("no target modules given", "lora.targets", "name modules like query,value or all-linear")
        self.init = parse_enum(LoraInit, self.init, "lora.init")
        for name, value in self.rank_pattern.items():
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"rank for '{name}' must be a positive integer", "lora.rank_pattern", "fix the value")

    def peft_config_kwargs(self) -> dict:
        """Keyword arguments for ``peft.LoraConfig`` (task type and modules_to_save excluded)."""
        return dict(r=self.rank, lora_alpha=self.alpha, lora_dropout=self.dropout,
                    target_modules=self.targets, init_lora_weights=self.init.peft_value(),
                    use_rslora=self.rslora, rank_pattern=dict(self.rank_pattern),
                    alpha_pattern=dict(self.alpha_pattern))


@dataclass
class TrainSpec:
    """How to train: schedule, batch, seed. Either epochs or max_steps bounds the run."""

    epochs: float = _field(3.0, "Training epochs (ignored when max_steps > 0).")
    max_steps: int = _field(-1, "Stop after this many optimizer steps; -1 trains for `epochs`.")
    learning_rate: float = _field(5e-4, "Peak learning rate (linear decay, AdamW).")
    batch_size: int = _field(32, "Examples per device per step.")
    grad_accum: int = _field(1, "Gradient accumulation steps.")
    max_length: int = _field(64, "Token length examples are truncated to.")
    seed: int = _field(0, "Seed for data order, initialisation and splits; same seed, same adapter bytes.")
    eval_steps: int = _field(0, "Evaluate every N steps; 0 evaluates once per epoch.")

    def __post_init__(self):
        checks = {"epochs": self.epochs > 0 or self.max_steps > 0, "learning_rate": self.learning_rate > 0,
                  "batch_size": self.batch_size >= 1, "grad_accum": self.grad_accum >= 1,
                  "max_length": self.max_length >= 8, "eval_steps": self.eval_steps >= 0}
        for name, ok in checks.items():
            if not ok:
                raise ConfigError(f"invalid {name} = {getattr(self, name)!r}", f"train.{name}",
                                  f"see --help: {field_help(TrainSpec)[name]}")
