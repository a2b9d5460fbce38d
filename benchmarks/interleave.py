"""Interleaved timing shared by the benchmark scripts (imported as a sibling module)."""

from __future__ import annotations

import time
from typing import Callable


def interleaved_times(calls: dict[str, Callable[[], object]], runs: int, warmup: int,
                      gap_s: float = 0.0) -> dict[str, list[float]]:
    """Run every call once per round, rotating the order; return each call's run times in ms.

    A ``gap_s`` pause before each timed run lets ORT's idle intra-op threads of the
    previous session stop spinning, so they do not steal the cores from the next one.
    """
    for call in calls.values():
        for _ in range(warmup):
            call()
    names = list(calls)
    times = {name: [] for name in names}
    for round_index in range(runs):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            if gap_s:
                time.sleep(gap_s)
            start = time.perf_counter()
            calls[name]()
            times[name].append((time.perf_counter() - start) * 1e3)
    return times
