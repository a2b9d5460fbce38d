"""Interleaved timing for the benchmark scripts: the package's one loop (lora_edge.interleave), re-exported.

Scripts run as ``benchmarks/<name>.py`` import this sibling; new code imports
:mod:`lora_edge.interleave` directly.
"""

from __future__ import annotations

from typing import Callable

from lora_edge.interleave import RoundTimes, ratio_stats, time_rounds, verdict  # noqa: F401  (re-exported)


def interleaved_times(calls: dict[str, Callable[[], object]], runs: int, warmup: int,
                      gap_s: float = 0.0) -> dict[str, list[float]]:
    """Each call's run times in ms: ``runs`` shuffled rounds of one timed run per call, after ``warmup`` runs."""
    timed = time_rounds(calls, rounds=runs, runs=1, warmup=warmup, gap_s=gap_s, visit_warmup=0)
    return {name: [seconds * 1e3 for seconds in values] for name, values in timed.times.items()}
