"""The lora-edge exception family.

Every error a user can cause is a :class:`LoraEdgeError` subclass that carries
its own process exit code, so the CLI never maps exceptions with if/elif
chains. An error holds three parts, kept apart from their formatting:

* ``what`` -- what is wrong ("adapter targets modules the base model lacks"),
* ``where`` -- the file, field, line or key it concerns,
* ``fix`` -- what the user should do about it.

:meth:`LoraEdgeError.format_message` joins them into the one line the CLI prints:
``error: <what>, <where>, <how to fix>``.
"""

from __future__ import annotations

import enum
from pathlib import Path
from typing import Any


class LoraEdgeError(Exception):
    """Base class: an error the user can act on. Exit code 70 (internal) unless overridden."""

    exit_code = 70
    kind = "error"

    def __init__(self, what: str, where: str | Path | None = None, fix: str | None = None):
        self.what = what
        self.where = str(where) if where is not None else None
        self.fix = fix
        super().__init__(self.format_message())

    def format_message(self) -> str:
        """Return the single line shown to users: ``<what>, <where>, <fix>``."""
        parts = [self.what]
        if self.where:
            parts.append(f"in {self.where}")
        if self.fix:
            parts.append(self.fix)
        return ", ".join(parts)


class CheckFailedError(LoraEdgeError):
    """The accuracy gate ran and at least one graph failed a threshold."""

    exit_code = 1


class ConfigError(LoraEdgeError):
    """A bad option value, recipe or device file: a field is missing or invalid.

    Exit 11, apart from click's 2 for malformed command lines (unknown option, missing argument).
    """

    exit_code = 11


class DataError(LoraEdgeError):
    """An input data file is missing, malformed or unusable (empty, single-class, bad row)."""

    exit_code = 3


class AdapterMismatchError(LoraEdgeError):
    """A model and an adapter do not belong together, or an adapter file is corrupt."""

    exit_code = 4


class ExportError(LoraEdgeError):
    """A model could not be exported to ONNX, or an exported graph failed verification."""

    exit_code = 5


class QuantizationError(LoraEdgeError):
    """A graph could not be quantized to the requested precision."""

    exit_code = 6


class ProviderUnavailableError(LoraEdgeError):
    """A device asks for an ONNX Runtime execution provider this host does not have."""

    exit_code = 7


class ModelError(LoraEdgeError):
    """A base model directory is missing, incomplete, or holds only pickled weights."""

    exit_code = 8


class BundleError(LoraEdgeError):
    """A bundle is missing, incomplete, or already exists where a new one would go."""

    exit_code = 9


class TrainingError(LoraEdgeError):
    """Training could not run or diverged (non-finite loss)."""

    exit_code = 10


def parse_enum(enum_class: type[enum.Enum], value: Any, where: str, what: str = "value") -> Any:
    """Turn user input into a member of ``enum_class``, or raise a ConfigError listing the choices."""
    if isinstance(value, enum_class):
        return value
    try:
        return enum_class(value)
    except ValueError:
        valid = ", ".join(str(member.value) for member in enum_class)
        raise ConfigError(f"unknown {what} '{value}'", where, f"use one of: {valid}") from None


def env_int(name: str, default: int) -> int:
    """An integer environment variable (torchrun's RANK, WORLD_SIZE), or a ConfigError naming it."""
    import os

    value = os.environ.get(name, "").strip()
    if not value:
        return default
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"environment variable {name}={value!r} is not an integer", name,
                          f"unset {name} or set it to an integer (torchrun sets it for you)") from None


def first_line(exc: BaseException, limit: int = 200) -> str:
    """The first line of ``exc``'s message, cut to ``limit`` characters, for the ``what`` of an error.

    Library errors (ONNX Runtime, transformers, tokenizers) carry multi-line
    messages or C++ locations; one line keeps ``error: what, where, fix`` one
    line. An empty message gives the exception's class name.
    """
    lines = str(exc).strip().splitlines()
    return (lines[0] if lines else exc.__class__.__name__)[:limit]


def exit_codes() -> dict[str, int]:
    """Map every error class name to its exit code (documented in ``lora-edge --help``)."""
    classes = [CheckFailedError, ConfigError, DataError, AdapterMismatchError, ExportError,
               QuantizationError, ProviderUnavailableError, ModelError, BundleError,
               TrainingError, LoraEdgeError]
    return {cls.__name__: cls.exit_code for cls in classes}
