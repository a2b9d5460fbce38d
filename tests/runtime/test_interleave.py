"""The interleaved timing loop, within-round ratios, their intervals and the verdicts, on fixed inputs."""

from __future__ import annotations

import pytest

from lora_edge.runtime.interleave import FASTER, SAME, SLOWER, ratio_stats, split_runs, time_rounds, verdict


def test_time_rounds_visits_every_call_once_per_round_in_shuffled_orders():
    visits = []
    calls = {name: (lambda name=name: visits.append(name)) for name in "abcd"}
    timed = time_rounds(calls, rounds=6, runs=3, warmup=1, gap_s=0.0, seed=1)
    assert timed.rounds == 6
    assert all(len(timed.times[name]) == 18 and len(timed.per_round[name]) == 6 for name in calls)
    assert all(len(timed.cpu_times[name]) == 18 for name in calls)
    rounds = visits[4:]  # after one warm-up call each; a visit is one untimed and three timed runs
    blocks = [rounds[i:i + 4] for i in range(0, len(rounds), 4)]
    assert all(len(set(block)) == 1 for block in blocks)
    orders = [tuple(block[0] for block in blocks[i:i + 4]) for i in range(0, len(blocks), 4)]
    assert all(sorted(order) == list("abcd") for order in orders)
    assert len(set(orders)) > 1
    assert timed.load_before is None or len(timed.load_before) == 3


def test_time_rounds_caps_the_total_and_split_runs():
    assert split_runs(200, 5) == (40, 5) and split_runs(12, 5) == (3, 5) and split_runs(3, 5) == (1, 3)
    calls = {"a": lambda: None, "b": lambda: None}
    timed = time_rounds(calls, rounds=3, runs=5, warmup=0, gap_s=0.0, total=12)
    assert [len(timed.times[name]) for name in calls] == [12, 12] and timed.rounds == 3
    with pytest.raises(ValueError):
        time_rounds(calls, rounds=0)


def test_ratio_stats_take_ratios_within_each_round():
    # the machine slows down 3x halfway: per-graph medians move, the within-round ratio does not
    merged = [10.0] * 10 + [30.0] * 10
    branched = [10.5] * 10 + [31.5] * 10
    stats = ratio_stats(branched, merged)
    assert stats.ratio == pytest.approx(1.05) and stats.overhead_pct == pytest.approx(5.0)
    assert stats.interval == pytest.approx((1.05, 1.05)) and stats.iqr == pytest.approx((1.05, 1.05))
    assert stats.rounds == 20
    with pytest.raises(ValueError):
        ratio_stats([1.0], [1.0, 2.0])


def test_bootstrap_interval_widens_with_noise_and_holds_the_median():
    import random

    rng = random.Random(3)
    base = [10.0 + rng.random() for _ in range(40)]
    quiet = [b * (1.03 + rng.gauss(0, 0.002)) for b in base]
    noisy = [b * (1.02 + rng.gauss(0, 0.08)) for b in base]
    narrow, wide = ratio_stats(quiet, base), ratio_stats(noisy, base)
    assert narrow.interval[0] <= narrow.ratio <= narrow.interval[1]
    assert wide.interval[0] <= wide.ratio <= wide.interval[1]
    assert (wide.interval[1] - wide.interval[0]) > 5 * (narrow.interval[1] - narrow.interval[0])
    assert verdict(narrow) == SLOWER
    assert verdict(wide) == SAME  # +2% is inside this noise
    assert ratio_stats(base, noisy).interval == ratio_stats(base, noisy).interval  # seeded: repeatable


def test_verdicts_need_the_whole_interval_beyond_the_margin():
    base = [10.0] * 30
    assert verdict(ratio_stats([9.0] * 30, base)) == FASTER
    assert verdict(ratio_stats([10.05] * 30, base)) == SAME  # +0.5%: below the 1% margin
    assert verdict(ratio_stats([10.05] * 30, base), margin_pct=0.1) == SLOWER
    to_json = ratio_stats([11.0] * 30, base).to_json()
    assert to_json["overhead_pct"] == pytest.approx(10.0) and to_json["interval_pct"] == pytest.approx([10.0, 10.0])
