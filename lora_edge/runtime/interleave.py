"""Interleaved timing and within-round ratios: how lora-edge compares graphs on a machine that is not quiet.

One loop serves ``profile``, ``compare`` and the benchmark scripts
(benchmarks/latency.py, forms_latency.py, decoder_latency.py):

* :func:`time_rounds` visits every call once per round, in an order shuffled
  each round (a fixed seed), with a short pause before each visit so the
  previous session's idle ORT threads stop spinning, one untimed run and then
  ``runs`` timed runs; each round's median is kept per call;
* :func:`ratio_stats` takes the ratio of two calls *within* each round (a busy
  neighbour slows both sides of a round alike), its median over rounds, the
  interquartile range and a bootstrap interval of that median;
* :func:`verdict` says whether one call is faster, slower, or not
  distinguishable from the other at this noise: only an interval that lies
  wholly beyond ``margin`` on one side gives a direction, so two runs on a busy
  machine agree unless an effect sits right at the margin.

Nothing here imports torch or onnxruntime.
"""

from __future__ import annotations

import os
import random
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable

FASTER, SLOWER, SAME = "faster", "slower", "not distinguishable"
# Overheads (in %) inside +-VERDICT_MARGIN_PCT are called not distinguishable even when the interval is narrow:
# back-to-back runs on a shared 2-core machine move a within-round ratio by ~1 point (benchmarks/README.md).
VERDICT_MARGIN_PCT = 1.0
BOOTSTRAP_SAMPLES = 2000


def load_average() -> list[float] | None:
    """The 1, 5 and 15 minute load averages (rounded), or None where the OS has none."""
    try:
        return [round(value, 2) for value in os.getloadavg()]
    except (AttributeError, OSError):
        return None


@dataclass
class RoundTimes:
    """Run times of interleaved calls: every timed run and each round's median, in seconds."""

    times: dict[str, list[float]] = field(default_factory=dict)
    per_round: dict[str, list[float]] = field(default_factory=dict)
    cpu_times: dict[str, list[float]] = field(default_factory=dict)  # process CPU time (all threads) per run
    load_before: list[float] | None = None
    load_after: list[float] | None = None

    @property
    def rounds(self) -> int:
        """How many rounds every call took part in."""
        return min((len(values) for values in self.per_round.values()), default=0)


def time_rounds(calls: dict[str, Callable[[], object]], rounds: int, runs: int = 1, warmup: int = 1,
                gap_s: float = 0.02, seed: int = 0, total: int | None = None, visit_warmup: int = 1) -> RoundTimes:
    """Interleaved timing: each round visits every call once in a shuffled order and times ``runs`` runs.

    ``warmup`` untimed runs per call come first; each visit then pauses
    ``gap_s`` (idle intra-op threads of the previous session stop spinning and
    would otherwise steal the cores), runs ``visit_warmup`` times untimed (caches
    warm for this graph) and times ``runs`` runs (fewer in the last rounds when ``total``
    caps the timed runs per call). A call that raises stops the loop.
    """
    if rounds < 1 or runs < 1:
        raise ValueError(f"rounds and runs must be >= 1, got {rounds} and {runs}")
    result = RoundTimes(times={name: [] for name in calls}, per_round={name: [] for name in calls},
                        cpu_times={name: [] for name in calls}, load_before=load_average())
    for call in calls.values():
        for _ in range(warmup):
            call()
    order = list(calls)
    shuffle = random.Random(seed)
    for _ in range(rounds):
        shuffle.shuffle(order)
        for name in order:
            call = calls[name]
            count = runs if total is None else min(runs, total - len(result.times[name]))
            if count <= 0:
                continue
            if gap_s:
                time.sleep(gap_s)
            for _ in range(visit_warmup):
                call()
            round_times = []
            for _ in range(count):
                began, cpu_began = time.perf_counter(), time.process_time()
                call()
                round_times.append(time.perf_counter() - began)
                result.cpu_times[name].append(time.process_time() - cpu_began)
            result.times[name].extend(round_times)
            result.per_round[name].append(statistics.median(round_times))
    result.load_after = load_average()
    return result


def split_runs(runs: int, per_round: int = 5) -> tuple[int, int]:
    """(rounds, runs per round) for ``runs`` timed runs per call: rounds of ``per_round`` runs, the last capped."""
    per = max(1, min(per_round, runs))
    return -(-runs // per), per


def _median(values: list[float]) -> float:
    return statistics.median(values)


def _quantile(sorted_values: list[float], q: float) -> float:
    """Linear-interpolated quantile of already sorted values (numpy's default method)."""
    position = q * (len(sorted_values) - 1)
    low = int(position)
    high = min(low + 1, len(sorted_values) - 1)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (position - low)


@dataclass
class RatioStats:
    """One call over another, from the ratios of their medians within each round."""

    ratio: float                    # median over rounds
    iqr: tuple[float, float]        # 25th and 75th percentile of the per-round ratios
    interval: tuple[float, float]   # bootstrap interval of the median ratio
    rounds: int
    confidence: float = 0.95

    @property
    def overhead_pct(self) -> float:
        """(ratio - 1) in percent: how much slower (negative: faster) the first call is."""
        return 100.0 * (self.ratio - 1.0)

    @property
    def interval_pct(self) -> tuple[float, float]:
        """The bootstrap interval as overheads in percent."""
        return 100.0 * (self.interval[0] - 1.0), 100.0 * (self.interval[1] - 1.0)

    def to_json(self) -> dict:
        """Plain numbers for reports."""
        return {"ratio": self.ratio, "overhead_pct": self.overhead_pct, "iqr": list(self.iqr),
                "interval": list(self.interval), "interval_pct": list(self.interval_pct), "rounds": self.rounds,
                "confidence": self.confidence}


def ratio_stats(numerator: list[float], denominator: list[float], confidence: float = 0.95,
                samples: int = BOOTSTRAP_SAMPLES, seed: int = 0) -> RatioStats:
    """Within-round ratios of two calls' per-round medians: median, IQR and a bootstrap interval of the median.

    The bootstrap resamples rounds (with replacement, ``samples`` times, fixed
    seed) and takes the central ``confidence`` share of the resampled medians.
    """
    if len(numerator) != len(denominator) or not numerator:
        raise ValueError(f"need the same, non-zero number of rounds on both sides ({len(numerator)} vs "
                         f"{len(denominator)})")
    ratios = [a / b for a, b in zip(numerator, denominator)]
    ordered = sorted(ratios)
    rng = random.Random(seed)
    medians = sorted(_median(rng.choices(ratios, k=len(ratios))) for _ in range(samples))
    tail = (1.0 - confidence) / 2
    return RatioStats(ratio=_median(ratios), iqr=(_quantile(ordered, 0.25), _quantile(ordered, 0.75)),
                      interval=(_quantile(medians, tail), _quantile(medians, 1.0 - tail)), rounds=len(ratios),
                      confidence=confidence)


def verdict(stats: RatioStats, margin_pct: float = VERDICT_MARGIN_PCT) -> str:
    """faster / slower when the whole interval lies beyond -margin / +margin percent; else not distinguishable."""
    low, high = stats.interval_pct
    if low > margin_pct:
        return SLOWER
    if high < -margin_pct:
        return FASTER
    return SAME
