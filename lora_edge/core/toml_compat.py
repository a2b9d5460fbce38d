"""TOML reading on every supported Python: ``tomllib`` from 3.11, its backport ``tomli`` on 3.10.

Every module that reads TOML (recipes, device files) imports ``loads`` and
``TOMLDecodeError`` from here, so a 3.10 install never fails at import time.
"""

from __future__ import annotations

try:
    import tomllib as _toml
except ModuleNotFoundError:  # Python 3.10: the same parser, published as tomli (a declared dependency there)
    import tomli as _toml

loads = _toml.loads
TOMLDecodeError = _toml.TOMLDecodeError
PARSER = _toml.__name__
