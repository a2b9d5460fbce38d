"""Names a user gives (adapters, recipes, devices): one rule, checked in one place.

A name becomes part of file names (``onnx/adapters/<name>.onnx_adapter``,
``<form>.<adapter>.<precision>.onnx``), graph names and command lines, so it
is letters, digits, ``-`` and ``_`` only: no dots (they separate the parts of
a graph name), no path separators, no spaces.
"""

from __future__ import annotations

from lora_edge.core.errors import ConfigError

NAME_RULE = "letters, digits, - and _"


def is_simple_name(name: object) -> bool:
    """True for a non-empty string of letters, digits, ``-`` and ``_``."""
    return isinstance(name, str) and bool(name) and name.replace("-", "").replace("_", "").isalnum()


def require_name(name: object, what: str, where: str, fix: str) -> str:
    """``name`` when :func:`is_simple_name`, else ConfigError ``<what> '<name>' must be letters, digits, - and _``."""
    if not is_simple_name(name):
        raise ConfigError(f"{what} {name!r} must be {NAME_RULE}", where, fix)
    return name
