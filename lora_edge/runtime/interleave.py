"""Interleaved timing and within-round ratios: how lora-edge compares graphs on a machine that is not quiet.

One loop serves ``profile``, ``compare`` and the benchmark scripts
(benchmarks/latency.py, forms_latency.py, decoder_latency.py):

* :func:`time_rounds` visits every call once per round, in an order shuffled
  each round (a fixed seed), with a short pause before each visit so the
  previous session's idle ORT threads stop spinning, one untimed run and then
  ``runs`` timed runs; each round's median is kept per call. Calls that are
  compared with each other can be visited back to back (``groups``), and
  rounds can be added until a condition holds (``until``: e.g.
  :func:`intervals_narrow`) or a cap is reached;
* :func:`ratio_stats` takes the ratio of two calls *within* each round (a busy
  neighbour slows both sides of a round alike), its median over rounds, the
  interquartile range and a bootstrap interval of that median;
  :func:`paired_ratio_stats` does the same with the ratio of each pair of runs
  timed in turns (``alternate``), the bootstrap still resampling rounds;
* :func:`verdict` says whether one call is faster, slower, equivalent within
  a margin, or not distinguishable from the other at this noise: only an
  interval that lies wholly beyond ``margin`` on one side gives a direction,
  and only one wholly inside it says equivalent.

Nothing here imports torch or onnxruntime.
"""

from __future__ import annotations

import os
import random
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable

FASTER, SLOWER, SAME, EQUIVALENT = "faster", "slower", "not distinguishable", "equivalent"
# Overheads (in %) whose interval lies inside +-VERDICT_MARGIN_PCT are called equivalent, never faster or slower:
# the margin is how large an overhead must be to matter; how noisy it is, the interval says (benchmarks/README.md).
VERDICT_MARGIN_PCT = 1.0
BOOTSTRAP_SAMPLES = 2000
CHECK_SAMPLES = 500  # bootstrap samples of the check that decides whether to add rounds (it runs every few rounds)


def load_average() -> list[float] | None:
    """The 1, 5 and 15 minute load averages (rounded), or None where the OS has none."""
    try:
        return [round(value, 2) for value in os.getloadavg()]
    except (AttributeError, OSError):
        return None


ROUND_STATISTICS = ("median", "min")


@dataclass
class RoundTimes:
    """Run times of interleaved calls: every timed run, each visit's runs and each round's figure, in seconds.

    ``per_round`` holds one figure per call and round: the median of that
    visit's timed runs, or their minimum (``statistic``), the visit least
    slowed by a neighbour taking the cores away.
    """

    times: dict[str, list[float]] = field(default_factory=dict)
    per_round: dict[str, list[float]] = field(default_factory=dict)
    cpu_times: dict[str, list[float]] = field(default_factory=dict)  # process CPU time (all threads) per run
    visits: dict[str, list[list[float]]] = field(default_factory=dict)  # each visit's timed runs, in order
    load_before: list[float] | None = None
    load_after: list[float] | None = None
    statistic: str = "median"
    alternate: bool = False       # a unit's calls took turns one run at a time (runs paired by index)
    seconds: float = 0.0          # wall time of the timed rounds
    stopped_early: bool = False   # ``until`` said the figures were good enough before ``max_rounds``

    @property
    def rounds(self) -> int:
        """How many rounds every call took part in."""
        return min((len(values) for values in self.per_round.values()), default=0)


def visit_units(names: list[str], groups: list[list[str]] | None) -> list[list[str]]:
    """The calls visited back to back in a round: each group (in the given order), then every other call alone.

    A call named in two groups stays in the first; names not among ``names`` are dropped.
    """
    placed: set[str] = set()
    units = []
    for group in groups or []:
        unit = [name for name in group if name in names and name not in placed]
        placed.update(unit)
        if unit:
            units.append(unit)
    return units + [[name] for name in names if name not in placed]


def _visit(call: Callable[[], object], count: int, visit_warmup: int, gap_s: float,
           cpu_times: list[float]) -> list[float]:
    """One visit: a pause, ``visit_warmup`` untimed runs, then ``count`` timed runs (wall seconds returned)."""
    if gap_s:
        time.sleep(gap_s)
    for _ in range(visit_warmup):
        call()
    wall = []
    for _ in range(count):
        began, cpu_began = time.perf_counter(), time.process_time()
        call()
        wall.append(time.perf_counter() - began)
        cpu_times.append(time.process_time() - cpu_began)
    return wall


def _one_round(calls: dict[str, Callable[[], object]], units: list[list[str]], shuffle: random.Random,
               result: RoundTimes, runs: int, total: int | None, visit_warmup: int, gap_s: float) -> None:
    """Visit every unit once in a shuffled order; inside a unit, its calls one after the other, shuffled too.

    With ``result.alternate``, a unit's calls take turns one run at a time instead (:func:`_alternating_visit`).
    """
    shuffle.shuffle(units)
    for unit in units:
        shuffle.shuffle(unit)
        counts = {name: runs if total is None else min(runs, total - len(result.times[name])) for name in unit}
        unit = [name for name in unit if counts[name] > 0]
        if result.alternate and len(unit) > 1:
            walls = _alternating_visit(calls, unit, min(counts[name] for name in unit), shuffle, visit_warmup,
                                       gap_s, result.cpu_times)
        else:
            walls = {name: _visit(calls[name], counts[name], visit_warmup, gap_s, result.cpu_times[name])
                     for name in unit}
        for name, wall in walls.items():
            _keep_visit(result, name, wall)


def _alternating_visit(calls: dict[str, Callable[[], object]], unit: list[str], count: int, shuffle: random.Random,
                       visit_warmup: int, gap_s: float, cpu_times: dict[str, list[float]]) -> dict[str, list[float]]:
    """One visit of a unit whose calls take turns: ``count`` cycles of one run each, in a new order every cycle.

    The i-th runs of the calls are then a few tens of milliseconds apart, so a
    load that changes within the visit (a neighbour starting, a level the
    scheduler settles in for a few hundred milliseconds) falls on both sides of
    the i-th ratio instead of on one call's whole visit.
    """
    if gap_s:
        time.sleep(gap_s)
    for name in unit:
        for _ in range(visit_warmup):
            calls[name]()
    walls: dict[str, list[float]] = {name: [] for name in unit}
    order = list(unit)
    for _ in range(count):
        shuffle.shuffle(order)
        for name in order:
            began, cpu_began = time.perf_counter(), time.process_time()
            calls[name]()
            walls[name].append(time.perf_counter() - began)
            cpu_times[name].append(time.process_time() - cpu_began)
    return walls


def _keep_visit(result: RoundTimes, name: str, wall: list[float]) -> None:
    """Record one visit's timed runs and its round figure (median or minimum)."""
    reduce = min if result.statistic == "min" else statistics.median
    result.times[name].extend(wall)
    result.visits[name].append(wall)
    result.per_round[name].append(reduce(wall))


def time_rounds(calls: dict[str, Callable[[], object]], rounds: int, runs: int = 1, warmup: int = 1,
                gap_s: float = 0.02, seed: int = 0, total: int | None = None, visit_warmup: int = 1, *,
                groups: list[list[str]] | None = None, statistic: str = "median",
                until: Callable[[RoundTimes], bool] | None = None, max_rounds: int | None = None,
                check_every: int = 5, alternate: bool = False) -> RoundTimes:
    """Interleaved timing: each round visits every call once in a shuffled order and times ``runs`` runs.

    ``warmup`` untimed runs per call come first; each visit then pauses
    ``gap_s`` (idle intra-op threads of the previous session stop spinning and
    would otherwise steal the cores), runs ``visit_warmup`` times untimed (caches
    warm for this graph) and times ``runs`` runs (fewer in the last rounds when ``total``
    caps the timed runs per call). ``groups`` are calls visited back to back
    (in a shuffled order) so that the calls a ratio is taken between see the
    same moment of the machine's load, not moments a whole round apart;
    with ``alternate`` a group's calls take turns one run at a time inside
    its visit (their i-th runs are then paired: :func:`paired_ratio_stats`).
    After ``rounds`` rounds, while ``until`` (checked every ``check_every``
    rounds) is false, rounds are added up to ``max_rounds``. A call that raises
    stops the loop.
    """
    if rounds < 1 or runs < 1:
        raise ValueError(f"rounds and runs must be >= 1, got {rounds} and {runs}")
    if statistic not in ROUND_STATISTICS:
        raise ValueError(f"statistic must be one of {ROUND_STATISTICS}, got {statistic!r}")
    result = RoundTimes(times={name: [] for name in calls}, per_round={name: [] for name in calls},
                        cpu_times={name: [] for name in calls}, visits={name: [] for name in calls},
                        load_before=load_average(), statistic=statistic, alternate=alternate)
    for call in calls.values():
        for _ in range(warmup):
            call()
    units = visit_units(list(calls), groups)
    shuffle = random.Random(seed)
    began = time.perf_counter()
    limit = max(rounds, max_rounds or rounds) if until is not None else rounds
    for index in range(limit):
        if index >= rounds and (index - rounds) % check_every == 0 and until(result):
            result.stopped_early = True
            break
        _one_round(calls, units, shuffle, result, runs, total, visit_warmup, gap_s)
    result.seconds = time.perf_counter() - began
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
    return _clustered_stats([[a / b] for a, b in zip(numerator, denominator)], confidence, samples, seed)


def paired_ratio_stats(numerator: list[list[float]], denominator: list[list[float]], confidence: float = 0.95,
                       samples: int = BOOTSTRAP_SAMPLES, seed: int = 0) -> RatioStats:
    """Ratios of runs timed side by side (the i-th runs of two calls' visits in a round, taken in turns).

    The figure is the median of every such ratio, not of one ratio per round:
    two runs tens of milliseconds apart share the machine's load far more
    often than two whole visits do, and the median of many short pairs
    ignores the few a load change fell between. Ratios of one round are not
    independent (a round sees one stretch of load), so the bootstrap resamples
    whole rounds: a run whose load changed from round to round gets a wider
    interval, as it should. ``numerator[k]`` and ``denominator[k]`` are round
    k's runs, in the order they were timed.
    """
    if len(numerator) != len(denominator) or not numerator:
        raise ValueError(f"need the same, non-zero number of rounds on both sides ({len(numerator)} vs "
                         f"{len(denominator)})")
    rounds = [[a / b for a, b in zip(runs, peer)] for runs, peer in zip(numerator, denominator)]
    if not all(rounds):
        raise ValueError("every round needs at least one run on both sides")
    return _clustered_stats(rounds, confidence, samples, seed)


def _clustered_stats(rounds: list[list[float]], confidence: float, samples: int, seed: int) -> RatioStats:
    """Median, IQR and bootstrap interval of the median of every ratio, resampling whole rounds."""
    ratios = sorted(ratio for ratios in rounds for ratio in ratios)
    rng = random.Random(seed)
    medians = sorted(_median([ratio for ratios in rng.choices(rounds, k=len(rounds)) for ratio in ratios])
                     for _ in range(samples))
    tail = (1.0 - confidence) / 2
    return RatioStats(ratio=_median(ratios), iqr=(_quantile(ratios, 0.25), _quantile(ratios, 0.75)),
                      interval=(_quantile(medians, tail), _quantile(medians, 1.0 - tail)), rounds=len(rounds),
                      confidence=confidence)


def verdict(stats: RatioStats, margin_pct: float = VERDICT_MARGIN_PCT) -> str:
    """The overhead's verdict from its interval and a margin (in points).

    faster / slower when the whole interval lies beyond -margin / +margin;
    equivalent when the whole interval lies inside [-margin, +margin]; else not
    distinguishable (the interval straddles a margin). A direction or an
    equivalence is only claimed when the interval alone supports it, so two
    runs disagree only when one interval is wrong, not when a figure moves a
    little inside its interval.
    """
    low, high = stats.interval_pct
    if low > margin_pct:
        return SLOWER
    if high < -margin_pct:
        return FASTER
    if -margin_pct <= low and high <= margin_pct:
        return EQUIVALENT
    return SAME


def half_width_pct(stats: RatioStats) -> float:
    """Half the width of the overhead's interval, in points: what adding rounds tries to bring under a target."""
    low, high = stats.interval_pct
    return (high - low) / 2.0


def pair_stats(timed: RoundTimes, numerator: str, denominator: str, samples: int = BOOTSTRAP_SAMPLES
               ) -> RatioStats | None:
    """The overhead statistics of two timed calls: paired runs when they took turns, else per-round figures.

    None when either call has no rounds (it was not timed) or their rounds differ in number.
    """
    rounds, peer = timed.per_round.get(numerator), timed.per_round.get(denominator)
    if not rounds or not peer or len(rounds) != len(peer):
        return None
    if timed.alternate:
        return paired_ratio_stats(timed.visits[numerator], timed.visits[denominator], samples=samples)
    return ratio_stats(rounds, peer, samples=samples)


def intervals_narrow(timed: RoundTimes, pairs: list[tuple[str, str]], target_pct: float) -> bool:
    """True when every pair's (numerator, denominator) overhead interval is at most +-``target_pct`` points.

    Pairs whose calls have no rounds (a call that was not timed) are skipped.
    """
    for numerator, denominator in pairs:
        stats = pair_stats(timed, numerator, denominator, samples=CHECK_SAMPLES)
        if stats is not None and half_width_pct(stats) > target_pct:
            return False
    return True
