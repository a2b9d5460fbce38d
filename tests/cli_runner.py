"""Run the `lora-edge` CLI in-process, as a user's shell would, and return its exit code."""

from __future__ import annotations


def exit_code_of(*args: str) -> int:
    """Run ``lora-edge ARGS`` through the console-script entry point; return the exit code."""
    from lora_edge.cli import main

    try:
        main(list(args))
    except SystemExit as exit_:
        return exit_.code
    return 0
