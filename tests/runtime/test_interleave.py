"""The interleaved timing loop, within-round ratios, their intervals and the verdicts, on fixed inputs."""

from __future__ import annotations

import pytest

from lora_edge.runtime.interleave import (EQUIVALENT, FASTER, SAME, SLOWER, RoundTimes, half_width_pct,
                                         intervals_narrow, pair_stats, paired_ratio_stats, ratio_stats, split_runs,
                                         time_rounds, verdict, visit_units)


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
    assert verdict(ratio_stats([10.05] * 30, base)) == EQUIVALENT  # +0.5%, interval [0.5, 0.5]: inside +-1%
    assert verdict(ratio_stats([10.05] * 30, base), margin_pct=0.1) == SLOWER
    to_json = ratio_stats([11.0] * 30, base).to_json()
    assert to_json["overhead_pct"] == pytest.approx(10.0) and to_json["interval_pct"] == pytest.approx([10.0, 10.0])


def test_a_verdict_names_a_direction_or_an_equivalence_only_from_the_whole_interval():
    import random

    rng = random.Random(5)
    base = [10.0] * 40

    def rounds(mean_pct, noise_pct):
        return [10.0 * (1 + (mean_pct + rng.gauss(0, noise_pct)) / 100) for _ in base]

    tight_zero, tight_two = ratio_stats(rounds(0.0, 0.3), base), ratio_stats(rounds(2.5, 0.3), base)
    straddling = ratio_stats(rounds(1.0, 0.3), base)  # the interval holds +1%: neither side can be claimed
    wide = ratio_stats(rounds(0.0, 6.0), base)
    assert verdict(tight_zero) == EQUIVALENT and verdict(tight_two) == SLOWER
    assert straddling.interval_pct[0] < 1.0 < straddling.interval_pct[1] and verdict(straddling) == SAME
    assert verdict(wide) == SAME and half_width_pct(wide) > 1.0 > half_width_pct(tight_zero)
    assert verdict(ratio_stats(rounds(-2.5, 0.3), base)) == FASTER


def test_groups_are_visited_back_to_back_in_shuffled_orders():
    visits = []
    calls = {name: (lambda name=name: visits.append(name)) for name in "abcde"}
    assert visit_units(list(calls), [["a", "b"], ["c", "d", "x"], ["d"]]) == [["a", "b"], ["c", "d"], ["e"]]
    timed = time_rounds(calls, rounds=8, runs=2, warmup=0, gap_s=0.0, visit_warmup=0, seed=2,
                        groups=[["a", "b"], ["c", "d"]])
    blocks = [visits[i] for i in range(0, len(visits), 2)]  # one entry per visit (2 timed runs each)
    rounds = [blocks[i:i + 5] for i in range(0, len(blocks), 5)]
    assert len(rounds) == 8 and all(sorted(order) == list("abcde") for order in rounds)
    for order in rounds:  # each group's calls are neighbours in every round
        assert abs(order.index("a") - order.index("b")) == 1 and abs(order.index("c") - order.index("d")) == 1
    assert len({tuple(order) for order in rounds}) > 1  # the order still changes from round to round
    assert all(len(timed.visits[name]) == 8 and all(len(v) == 2 for v in timed.visits[name]) for name in calls)


def test_the_round_figure_is_the_visits_median_or_minimum():
    import itertools

    ticks = itertools.count()
    calls = {"a": lambda: sum(range(1000 * (next(ticks) % 4 + 1)))}  # run times vary inside each visit
    for statistic, reduce in (("median", lambda v: sorted(v)[len(v) // 2]), ("min", min)):
        timed = time_rounds(calls, rounds=4, runs=3, warmup=0, gap_s=0.0, statistic=statistic)
        assert timed.per_round["a"] == [reduce(visit) for visit in timed.visits["a"]]
        assert timed.statistic == statistic
    with pytest.raises(ValueError):
        time_rounds(calls, rounds=1, statistic="mean")


def test_rounds_are_added_until_the_condition_holds_or_the_cap():
    calls = {"a": lambda: None, "b": lambda: None}
    seen = []

    def until(timed):
        seen.append(timed.rounds)
        return timed.rounds >= 12

    timed = time_rounds(calls, rounds=5, runs=1, warmup=0, gap_s=0.0, until=until, max_rounds=100, check_every=5)
    assert seen == [5, 10, 15] and timed.rounds == 15 and timed.stopped_early and timed.seconds > 0
    capped = time_rounds(calls, rounds=5, runs=1, warmup=0, gap_s=0.0, until=lambda _: False, max_rounds=8)
    assert capped.rounds == 8 and not capped.stopped_early
    fixed = time_rounds(calls, rounds=5, runs=1, warmup=0, gap_s=0.0, max_rounds=8)  # no condition: no rounds added
    assert fixed.rounds == 5


def test_intervals_narrow_only_when_every_pair_is_within_the_target():
    import random

    rng = random.Random(7)
    merged = [10.0 + rng.random() for _ in range(40)]
    timed = RoundTimes(per_round={"merged": merged,
                                  "quiet": [m * (1.05 + rng.gauss(0, 0.002)) for m in merged],
                                  "noisy": [m * (1.05 + rng.gauss(0, 0.05)) for m in merged]})
    assert intervals_narrow(timed, [("quiet", "merged")], target_pct=1.0)
    assert not intervals_narrow(timed, [("quiet", "merged"), ("noisy", "merged")], target_pct=1.0)
    assert intervals_narrow(timed, [("noisy", "merged")], target_pct=50.0)
    assert intervals_narrow(timed, [("untimed", "merged")], target_pct=1.0)  # a call without rounds is skipped


def test_alternating_calls_take_turns_one_run_at_a_time_inside_their_group():
    visits = []
    calls = {name: (lambda name=name: visits.append(name)) for name in "abc"}
    timed = time_rounds(calls, rounds=6, runs=4, warmup=0, gap_s=0.0, visit_warmup=1, seed=3,
                        groups=[["a", "b", "c"]], alternate=True)
    assert timed.alternate and timed.rounds == 6
    assert all(len(timed.visits[name]) == 6 and all(len(v) == 4 for v in timed.visits[name]) for name in calls)
    assert all(timed.per_round[name] == [sorted(v)[1] / 2 + sorted(v)[2] / 2 for v in timed.visits[name]]
               for name in calls)
    orders = []
    for start in range(0, len(visits), 15):  # a round: one untimed run each, then 4 cycles of one run each
        round_ = visits[start:start + 15]
        assert sorted(round_[:3]) == list("abc")
        cycles = [tuple(round_[i:i + 3]) for i in range(3, 15, 3)]
        assert all(sorted(cycle) == list("abc") for cycle in cycles)
        orders.extend(cycles)
    assert len(visits) == 6 * 15 and len(set(orders)) > 2  # the order inside a cycle changes


def test_paired_ratios_cancel_a_load_that_changes_inside_a_visit():
    import random

    rng = random.Random(11)
    merged, branched = [], []
    for _ in range(20):  # the machine's speed jumps between levels from one pair of runs to the next
        levels = [rng.choice((10.0, 13.0, 30.0)) for _ in range(5)]
        merged.append(levels)
        branched.append([1.04 * level for level in levels])
    stats = paired_ratio_stats(branched, merged)
    assert stats.overhead_pct == pytest.approx(4.0) and stats.interval_pct == pytest.approx((4.0, 4.0))
    # one figure per call and visit (its median) mixes the levels: the per-round ratio moves far from +4%
    per_round = ratio_stats([sorted(v)[2] for v in branched], [sorted(v)[2] for v in merged])
    assert per_round.overhead_pct == pytest.approx(4.0)  # same levels in the same order: the medians pair too
    shuffled = [rng.sample(v, len(v)) for v in branched]  # the same runs in another order (a coarse visit)
    assert paired_ratio_stats(shuffled, merged).iqr[1] - paired_ratio_stats(shuffled, merged).iqr[0] > 0.1
    with pytest.raises(ValueError):
        paired_ratio_stats([[1.0]], [[1.0], [2.0]])
    with pytest.raises(ValueError):
        paired_ratio_stats([[]], [[1.0]])


def test_the_paired_interval_resamples_rounds_not_runs():
    # five identical ratios per round, rounds alternating +0% and +10%: 10 rounds of evidence, not 50 runs
    merged = [[10.0] * 5 for _ in range(10)]
    branched = [[10.0 if k % 2 else 11.0] * 5 for k in range(10)]
    paired = paired_ratio_stats(branched, merged)
    assert paired.rounds == 10
    assert paired.interval == pytest.approx(ratio_stats([v[0] for v in branched], [v[0] for v in merged]).interval)
    assert half_width_pct(paired) > 2.0 and verdict(paired) == SAME


def test_pair_stats_pairs_runs_only_when_the_calls_took_turns():
    visits = {"a": [[10.0, 30.0, 10.0]] * 4, "m": [[10.0, 10.0, 30.0]] * 4}
    per_round = {name: [sorted(v)[1] for v in runs] for name, runs in visits.items()}
    turns = RoundTimes(per_round=per_round, visits=visits, alternate=True)
    apart = RoundTimes(per_round=per_round, visits=visits)
    assert pair_stats(turns, "a", "m").ratio == pytest.approx(1.0)  # median of 1, 3 and 1/3
    assert pair_stats(apart, "a", "m").ratio == pytest.approx(1.0)  # median of 10/10 per round
    assert pair_stats(turns, "a", "x") is None
    # the pairs show the spread between runs that one figure per visit hides
    assert pair_stats(turns, "a", "m").iqr == pytest.approx((1.0 / 3.0, 3.0))
    assert pair_stats(apart, "a", "m").iqr == pytest.approx((1.0, 1.0))
