"""How the CLI talks while it works: progress bars on a terminal only, plain lines elsewhere, nothing with --quiet.

tqdm (transformers' weight loading, the Trainer, the Hub) redraws its bar with
carriage returns; in a CI log or a pipe every redraw becomes another copy of
the line (a demo's stderr held 314). :func:`configure_progress` runs before
any of those libraries is imported and, when stderr is not a terminal (or
--quiet was given), turns tqdm off through its environment defaults
(``TQDM_DISABLE``, ``HF_HUB_DISABLE_PROGRESS_BARS``). lora-edge's own progress
is already plain lines (``stage: what``), and training still logs a
``step N: loss ...`` line per logging step, so a log shows periodic progress
without bars.
"""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Callable, TextIO

# How every stage reports progress: a sink taking one plain line (stderr_lines, silent, a list's append).
Progress = Callable[[str], None]
# Environment defaults read by tqdm (at import: any TQDM_<ARG> sets that argument's default) and the Hub.
NO_BARS_ENV = {"TQDM_DISABLE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}


def wants_bars(stream: TextIO | None = None, quiet: bool = False) -> bool:
    """True when progress bars belong on ``stream`` (default stderr): a terminal, and not --quiet."""
    stream = stream if stream is not None else sys.stderr
    return not quiet and bool(getattr(stream, "isatty", lambda: False)())


def configure_progress(quiet: bool = False, stream: TextIO | None = None) -> bool:
    """Turn progress bars off for this process unless ``stream`` is a terminal (and not quiet); return wants_bars.

    Must run before tqdm is imported (the CLI calls it first thing); a value
    the user already set in the environment is kept.
    """
    bars = wants_bars(stream, quiet)
    if not bars:
        for name, value in NO_BARS_ENV.items():
            os.environ.setdefault(name, value)
    return bars


def silent(message: str) -> None:
    """The progress sink of --quiet: drops every message."""


def stderr_lines(message: str) -> None:
    """The default progress sink: one plain line on stderr."""
    print(message, file=sys.stderr, flush=True)


def progress_sink(quiet: bool) -> Progress:
    """:func:`silent` with --quiet, else :func:`stderr_lines`."""
    return silent if quiet else stderr_lines


@contextlib.contextmanager
def quiet_transformers(progress_bars: bool = False):
    """Hide transformers' load reports and deprecation warnings, and its progress bars unless asked.

    A headless base such as MiniLM gets a "newly initialized classifier" report on
    every load; lora-edge reports its own progress, so these only add noise.
    """
    import warnings

    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    bars_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    if not progress_bars:
        hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars_enabled:
            hf_logging.enable_progress_bar()
