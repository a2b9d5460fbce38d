"""Merged vs unmerged comparison: overhead and FLOPs arithmetic on fixed inputs, and the written reports."""

from __future__ import annotations

import json

import pytest

from lora_edge.profile.compare import (comparison_rows, compare_bundle, extra_flops_percent, overhead_percent)
from lora_edge.core.flops import adapter_flops_per_token, lora_pair_flops, lora_shapes, model_flops
from lora_edge.profile.report import GraphProfile, read_profile
from profile_bundles import synthetic_bundle, synthetic_rank_bundle


def _graph(name, form, precision, p50, kind="onnx", adapter="a", rss=10.0, size=None, status="measured"):
    return GraphProfile(name=name, kind=kind, form=form, precision=precision, adapter=adapter, status=status,
                        latency_ms=None if status != "measured" else {"p50": p50, "p90": p50 * 1.5},
                        memory={"rss_added_mb": rss}, size=size)


def test_lora_pair_flops_on_a_known_shape():
    # BERT-base query projection, r = 8: x·Aᵀ is 8·768 MACs, (x·Aᵀ)·Bᵀ is 768·8 MACs, per token
    assert lora_pair_flops(768, 768, 8) == 2 * (8 * 768 + 768 * 8) == 24576
    assert lora_pair_flops(768, 3072, 16, tokens=128) == 2 * 128 * 16 * (768 + 3072)
    # against the base layer's 2·768·768 per token: 1/48 extra
    assert lora_pair_flops(768, 768, 8) / (2 * 768 * 768) == pytest.approx(1 / 48)


def test_adapter_flops_come_from_its_ranks_and_layer_shapes(tmp_path):
    # synthetic adapter in PEFT's layout: 2 layers of 64 -> 64, rank 8
    weights = synthetic_bundle(tmp_path / "bundle", forms=("branched",), rank=8, hidden=64) / "adapter" / \
        "adapter_model.safetensors"
    shapes = lora_shapes(weights)
    assert [shape[0] for shape in shapes] == ["base_model.model.layer.0.dense", "base_model.model.layer.1.dense"]
    assert all(shape[1:] == (64, 64, 8) for shape in shapes)
    assert adapter_flops_per_token(weights) == 2 * lora_pair_flops(64, 64, 8) == 2 * 2 * 8 * (64 + 64)


def test_model_flops_counts_a_linear_exactly():
    import torch

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(8, 16)

        def forward(self, input_ids):
            return self.linear(input_ids)

    assert model_flops(Net(), {"input_ids": torch.ones(2, 3, 8)}) == 2 * (2 * 3) * 8 * 16


def test_overhead_and_extra_flops_arithmetic():
    assert overhead_percent(11.0, 10.0) == pytest.approx(10.0)
    assert overhead_percent(9.0, 10.0) == pytest.approx(-10.0)
    assert overhead_percent(None, 10.0) is None and overhead_percent(5.0, None) is None
    assert extra_flops_percent(1000, seq=128, base_flops_per_item=12_800_000) == pytest.approx(1.0)
    assert extra_flops_percent(1000, seq=128, base_flops_per_item=None) is None


def test_comparison_rows_on_fixed_measurements():
    graphs = [_graph("merged.fp32", "merged", "fp32", 10.0, size={"total_mb": 90.0}),
              _graph("branched.fp32", "branched", "fp32", 10.5, size={"total_mb": 90.5}),
              _graph("hotswap.fp32", "hotswap", "fp32", 12.0, size={"total_mb": 90.4, "adapter_mb": 0.6}),
              _graph("merged.int8-dynamic", "merged", "int8-dynamic", 4.0),
              _graph("branched.int8-dynamic", "branched", "int8-dynamic", 4.2),
              _graph("hotswap.int4", "hotswap", "int4", None, status="not measured")]
    eager = [_graph("pytorch.unmerged", "unmerged", "fp32", 30.0, kind="pytorch"),
             _graph("pytorch.merged", "merged", "fp32", 20.0, kind="pytorch")]
    rows = {row["graph"]: row for row in comparison_rows(graphs, eager, seq=100, adapter_flops={"a": 2000},
                                                         base_flops_per_item=10_000_000)}
    assert rows["merged.fp32"]["overhead_pct"] is None and rows["merged.fp32"]["extra_flops_pct"] == 0
    assert rows["branched.fp32"]["overhead_pct"] == pytest.approx(5.0)
    assert rows["branched.fp32"]["vs_merged"] == "merged.fp32"
    assert rows["branched.fp32"]["extra_flops_pct"] == pytest.approx(2.0)  # 2000 · 100 / 1e7
    assert rows["hotswap.fp32"]["overhead_pct"] == pytest.approx(20.0)
    assert rows["hotswap.fp32"]["size_mb"] == pytest.approx(91.0)  # graph + its .onnx_adapter
    assert rows["branched.int8-dynamic"]["overhead_pct"] == pytest.approx(5.0)  # against merged int8, not fp32
    assert rows["branched.int8-dynamic"]["vs_merged"] == "merged.int8-dynamic"
    assert rows["hotswap.int4"]["p50_ms"] is None and rows["hotswap.int4"]["overhead_pct"] is None
    assert rows["hotswap.int4"]["status"].startswith("not measured")
    assert rows["pytorch.unmerged"]["overhead_pct"] == pytest.approx(50.0)
    assert rows["pytorch.unmerged"]["extra_flops_pct"] == pytest.approx(2.0)
    assert rows["merged.fp32"]["speedup_vs_eager"] == pytest.approx(2.0)  # 20 ms eager merged / 10 ms
    assert rows["merged.int8-dynamic"]["speedup_vs_eager"] == pytest.approx(5.0)
    assert rows["merged.fp32"]["rss_mb"] == 10.0


def test_compare_bundle_writes_table_and_chart_from_the_profile(tmp_path, capsys):
    from lora_edge.cli import main

    bundle = synthetic_bundle(tmp_path / "bundle", forms=("merged", "branched"), rank=8, hidden=64)
    main(["compare", str(bundle), "--device", "host-cpu", "--batch", "1", "--seq", "16", "--runs", "10",
          "--warmup", "2", "--target-interval-pct", "0", "--json"])
    printed = json.loads(capsys.readouterr().out)
    written = json.loads((bundle / "reports" / "compare.json").read_text())
    assert printed == written
    profile = read_profile(bundle)
    rows = {row["graph"]: row for row in written["rows"]}
    merged, branched = profile.graph("merged.fp32"), profile.graph("branched.fp32")
    # the forms took turns (runs 10 = 2 rounds of 5): the overhead is the median ratio of each branched run to
    # the merged run beside it, its interval between the medians of the two rounds' ratios
    assert len(branched.visits_ms) == len(merged.visits_ms) == 2 and profile.settings["spinning"] is False
    assert [len(visit) for visit in branched.visits_ms] == [5, 5] and profile.settings["runs_alternate"] is True
    assert branched.rounds_ms == pytest.approx([sorted(visit)[2] for visit in branched.visits_ms], abs=1e-3)
    pairs = [[b / m for b, m in zip(*visits)] for visits in zip(branched.visits_ms, merged.visits_ms)]
    everything = sorted(ratio for ratios in pairs for ratio in ratios)
    assert rows["branched.fp32"]["overhead_pct"] == pytest.approx(100 * ((everything[4] + everything[5]) / 2 - 1))
    low, high = rows["branched.fp32"]["overhead_interval_pct"]
    assert 100 * (min(everything) - 1) - 1e-9 <= low <= high <= 100 * (max(everything) - 1) + 1e-9
    assert rows["branched.fp32"]["verdict"] in ("faster", "slower", "equivalent", "not distinguishable")
    assert rows["merged.fp32"]["verdict"] is None
    assert set(written["load_average"]) == {"before", "after"} and written["rounds"] == 2
    assert written["stopped"] == "fixed runs" and rows["branched.fp32"]["converged"] is None
    assert rows["merged.fp32"]["size_mb"] == pytest.approx(merged.size["total_mb"])
    # the synthetic model has no model directory: base FLOPs unknown, said so rather than invented
    assert written["base_flops_per_item"] is None and rows["branched.fp32"]["extra_flops_pct"] is None
    markdown = (bundle / "reports" / "compare.md").read_text()
    assert "| branched.fp32 | measured |" in markdown and "latency.png" in markdown
    assert "Load average" in markdown and "take turns one run at a time" in markdown
    png = (bundle / "reports" / "latency.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 5000

    created = profile.created
    main(["compare", str(bundle), "--device", "host-cpu", "--batch", "1", "--seq", "16"])  # re-uses the profile
    assert read_profile(bundle).created == created and "using" in capsys.readouterr().err

    # rounds are added while the interval is wider than the target: up to the run cap here (4 rounds of 5)
    from lora_edge.profile.profiler import profile_bundle

    profile_bundle(bundle, "host-cpu", batch=1, seq=16, runs=10, warmup=1, max_runs=20, target_interval_pct=0.0001,
                   time_budget_s=600, quiet=True)  # no eager baselines: compare re-uses this profile
    main(["compare", str(bundle), "--device", "host-cpu", "--batch", "1", "--seq", "16", "--json"])
    written = json.loads(capsys.readouterr().out)
    rows = {row["graph"]: row for row in written["rows"]}
    assert written["rounds"] == 4 and written["stopped"] == "run cap" and written["target_interval_pct"] == 0.0001
    assert len(read_profile(bundle).graph("branched.fp32").rounds_ms) == 4
    assert rows["branched.fp32"]["converged"] is False and rows["merged.fp32"]["converged"] is None
    markdown = (bundle / "reports" / "compare.md").read_text()
    assert "stopped after" in markdown and "run cap" in markdown and "Wider than that" in markdown
    assert "branched.fp32." in markdown.split("Wider than that")[1].split("\n")[0]
    # the time budget ends the rounds even before --runs, but not before 10 rounds
    report = profile_bundle(bundle, "host-cpu", batch=1, seq=16, runs=100, warmup=0, time_budget_s=0, quiet=True)
    assert report.settings["rounds"] == 10 and report.settings["stopped"] == "time budget, before --runs"
    # ... and, after --runs, the rounds added to reach an interval (here out of reach) stop at the budget too
    report = profile_bundle(bundle, "host-cpu", batch=1, seq=16, runs=5, warmup=0, max_runs=100000,
                            target_interval_pct=0.0001, time_budget_s=1.5, quiet=True)
    assert 1 < report.settings["rounds"] < 20000 and report.settings["stopped"] == "time budget"


def test_measure_settings_are_validated_and_the_run_cap_follows_the_runs(capsys):
    from lora_edge.cli import main
    from lora_edge.core.errors import ConfigError
    from lora_edge.core.recipe import MeasureSpec

    assert MeasureSpec(runs=40).run_cap == 200 and MeasureSpec(runs=40, max_runs=60).run_cap == 60
    assert MeasureSpec(runs=40, max_runs=10).run_cap == 40 and MeasureSpec(runs=40, target_interval_pct=0).run_cap == 40
    for bad in (dict(target_interval_pct=-1.0), dict(time_budget_s=float("inf")), dict(max_runs=-1),
                dict(target_interval_pct="1"), dict(spinning="no")):
        with pytest.raises(ConfigError):
            MeasureSpec(**bad)
    with pytest.raises(SystemExit) as exit_info:
        main(["compare", "nowhere", "--device", "host-cpu", "--target-interval-pct", "-1"])
    assert exit_info.value.code == ConfigError.exit_code
    assert capsys.readouterr().err.strip().startswith("error: target_interval_pct must be a number >= 0")


def _paired(name, form, rounds):
    return GraphProfile(name=name, form=form, precision="fp32", adapter="a",
                        latency_ms={"p50": sorted(rounds)[len(rounds) // 2], "p90": max(rounds)}, rounds_ms=rounds)


def test_converged_says_whether_each_interval_reached_the_target_and_the_note_names_the_others():
    import random

    from lora_edge.profile.compare import Comparison, noise_line

    rng = random.Random(11)
    merged = [10.0 + rng.random() for _ in range(40)]
    graphs = [_paired("merged.fp32", "merged", merged),
              _paired("branched.fp32", "branched", [m * (1.001 + rng.gauss(0, 0.001)) for m in merged]),
              _paired("hotswap.fp32", "hotswap", [m * (1.05 + rng.gauss(0, 0.05)) for m in merged])]
    rows = comparison_rows(graphs, [], seq=16, adapter_flops={"a": 0}, base_flops_per_item=None, target_pct=1.0)
    by_name = {row["graph"]: row for row in rows}
    assert by_name["branched.fp32"]["converged"] is True and by_name["branched.fp32"]["verdict"] == "equivalent"
    assert by_name["hotswap.fp32"]["converged"] is False and by_name["merged.fp32"]["converged"] is None
    comparison = Comparison(bundle="b", device="host-cpu", note="", seq=16, base_flops_per_item=None, rows=rows,
                            rounds=40, target_interval_pct=1.0, stopped="time budget", timing_s=90.0)
    line = noise_line(comparison)
    assert "stopped after 90 s: time budget" in line and "Wider than that" in line
    assert line.split("Wider than that")[1].count("hotswap.fp32") == 1 and "branched.fp32" not in line
    assert "'equivalent' when it lies inside ±1%" in line
    untargeted = comparison_rows(graphs, [], seq=16, adapter_flops={"a": 0}, base_flops_per_item=None)
    assert all(row["converged"] is None for row in untargeted)


def test_overheads_come_from_paired_runs_when_the_forms_took_turns_else_from_rounds():
    # the machine's speed changes from one pair of runs to the next (levels 10, 13, 30 ms): hot-swap is +3% in
    # every pair of runs timed in turns; runs that were not (paired by index anyway) spread by over 20 points
    levels = [[10.0, 13.0, 30.0, 13.0, 10.0], [30.0, 30.0, 10.0, 13.0, 10.0]] * 10
    hotswap_runs = [[1.03 * level for level in visit] for visit in levels]
    reordered = [sorted(visit) for visit in hotswap_runs]  # the per-visit medians of an unpaired design
    merged = GraphProfile(name="merged.fp32", form="merged", precision="fp32", adapter="a",
                          latency_ms={"p50": 13.0, "p90": 30.0}, rounds_ms=[13.0, 13.0] * 10, visits_ms=levels)
    hotswap = GraphProfile(name="hotswap.fp32", form="hotswap", precision="fp32", adapter="a",
                           latency_ms={"p50": 13.4, "p90": 31.0}, rounds_ms=[1.03 * 13.0] * 20,
                           visits_ms=hotswap_runs)
    row = comparison_rows([merged, hotswap], [], seq=16, adapter_flops={"a": 0}, base_flops_per_item=None,
                          target_pct=1.0)[1]
    assert row["overhead_pct"] == pytest.approx(3.0) and row["overhead_interval_pct"] == pytest.approx([3.0, 3.0])
    assert row["verdict"] == "slower" and row["converged"] is True
    hotswap.visits_ms = reordered  # runs that did not take turns cannot be paired by index
    row = comparison_rows([merged, hotswap], [], seq=16, adapter_flops={"a": 0}, base_flops_per_item=None)[1]
    assert row["overhead_iqr_pct"][1] - row["overhead_iqr_pct"][0] > 20
    merged.visits_ms = hotswap.visits_ms = []  # a profile written before runs alternated: one ratio per round
    row = comparison_rows([merged, hotswap], [], seq=16, adapter_flops={"a": 0}, base_flops_per_item=None)[1]
    assert row["overhead_pct"] == pytest.approx(3.0) and row["overhead_iqr_pct"] == pytest.approx([3.0, 3.0])


def test_compare_fails_like_profile_when_a_provider_is_missing(tmp_path):
    from lora_edge.core.errors import ProviderUnavailableError
    from lora_edge.runtime.session import available_providers

    if "CUDAExecutionProvider" in available_providers():
        pytest.skip("this host has the CUDA provider")
    bundle = synthetic_bundle(tmp_path / "bundle", forms=("merged",))
    with pytest.raises(ProviderUnavailableError, match="CUDAExecutionProvider is not available on this host"):
        compare_bundle(bundle, "t4-server", runs=2, warmup=0, quiet=True)
    assert not (bundle / "reports" / "compare.json").exists()


def test_sweep_gains_latency_columns_per_rank(tmp_path):
    from lora_edge.profile.sweep import add_sweep_latency
    from lora_edge.core.choices import Task
    from lora_edge.profile.sweep import SweepRow, SweepTable

    exported = []

    def synthetic_export(model, adapters, out):  # stands in for export_bundle: one bundle, an adapter per rank
        exported.append(sorted(adapters))
        return synthetic_rank_bundle(out, tuple(sorted(adapters)))

    rows = [SweepRow(rank=rank, adapter=f"r{rank}", trainable_params=rank * 100, adapter_bytes=rank * 1000,
                     train_seconds=1.0, validation_accuracy=0.9, validation_macro_f1=0.88) for rank in (2, 16)]
    table = SweepTable(Task.SEQ_CLS, rows, [("rank", "rank")], settings={"model": "unused"})
    add_sweep_latency(table, tmp_path, "host-cpu", seq=8, runs=6, warmup=1, quiet=True, export=synthetic_export)
    assert exported == [[2, 16]]  # one export serves every rank
    saved = json.loads((tmp_path / "sweep.json").read_text())
    keys = [column["key"] for column in saved["columns"]]
    assert keys == ["rank", "merged_p50_ms", "branched_p50_ms", "branched_overhead_pct", "extra_flops_pct"]
    assert "merged p50 ms (host-cpu)" in (tmp_path / "sweep.md").read_text()
    for row in saved["rows"]:
        assert row["merged_p50_ms"] > 0 and row["branched_p50_ms"] > 0
        # within-round ratios of 6 runs (2 rounds of 5, then 1): the overhead is a ratio, not a p50 difference
        assert -90 < row["branched_overhead_pct"] < 1000
    assert saved["settings"]["latency"]["device"] == "host-cpu"


def _decoder(name, form, prefill_rounds, decode_rounds, batch=1, seq=16):
    """A measured decoder graph with fixed per-round medians (prefill and decode step)."""
    prefill, decode = sorted(prefill_rounds)[len(prefill_rounds) // 2], sorted(decode_rounds)[len(decode_rounds) // 2]
    return GraphProfile(name=name, form=form, precision="fp32", adapter="a", decoder=True,
                        latency_ms={"p50": prefill, "p90": prefill}, rounds_ms=list(prefill_rounds),
                        decode_latency_ms={"p50": decode}, decode_rounds_ms=list(decode_rounds),
                        throughput={"prefill_tokens_per_s": batch * seq * 1e3 / prefill,
                                    "decode_tokens_per_s": batch * 1e3 / decode})


def test_decoder_rows_put_decode_overhead_beside_the_adapter_flops_per_token():
    graphs = [_decoder("merged.fp32", "merged", [10.0, 10.0, 10.0], [2.0, 2.0, 2.0]),
              _decoder("hotswap.fp32", "hotswap", [11.0, 11.0, 11.0], [2.4, 2.4, 2.4])]
    rows = {row["graph"]: row for row in comparison_rows(graphs, [], seq=16, adapter_flops={"a": 5000},
                                                         base_flops_per_item=1_600_000)}
    hotswap, merged = rows["hotswap.fp32"], rows["merged.fp32"]
    assert hotswap["overhead_pct"] == pytest.approx(10.0) and hotswap["verdict"] == "slower"  # the prefill's
    assert hotswap["decode_overhead_pct"] == pytest.approx(20.0) and hotswap["decode_verdict"] == "slower"
    assert hotswap["decode_overhead_interval_pct"] == pytest.approx([20.0, 20.0])
    assert hotswap["ttft_ms"] == 11.0 and hotswap["decode_ms"] == 2.4
    assert hotswap["decode_tokens_per_s"] == pytest.approx(1e3 / 2.4)
    assert hotswap["adapter_flops_per_token"] == 5000
    assert hotswap["extra_flops_pct"] == pytest.approx(5.0)  # 5000 per token over 1.6e6 / 16 per token
    assert merged["adapter_flops_per_token"] == 0 and merged["decode_overhead_pct"] is None
    assert "decode_ms" not in comparison_rows(
        [GraphProfile(name="merged.fp32", form="merged", precision="fp32", latency_ms={"p50": 1.0, "p90": 1.0})],
        [], seq=16, adapter_flops={}, base_flops_per_item=None)[0]  # classifiers: no decoder columns


def test_compare_on_a_decoder_bundle_has_decode_rows_with_flops(tmp_path, tmp_path_factory, tiny_model, tiny_adapter,
                                                                capsys):
    from decoder_bundles import adapter_dirs, bundle_for, shared_root
    from lora_edge.core.choices import Form
    from lora_edge.cli import main
    from profile_bundles import copy_bundle

    shared, _ = bundle_for("gpt2", Form.MERGED, shared_root(tmp_path_factory), tiny_model, tiny_adapter)
    bundle = copy_bundle(shared, tmp_path / "bundle")  # compare writes reports
    main(["compare", str(bundle), "--device", "host-cpu", "--batch", "1", "--seq", "8", "--runs", "10",
          "--warmup", "1", "--json"])
    written = json.loads((bundle / "reports" / "compare.json").read_text())
    rows = {row["graph"]: row for row in written["rows"]}
    flops = adapter_flops_per_token(adapter_dirs("gpt2", tiny_adapter)["a"] / "adapter_model.safetensors")
    assert flops > 0 and written["base_flops_per_item"] > 0
    for name in ("branched.fp32", "hotswap.fp32"):
        row = rows[name]
        assert row["vs_merged"] == "merged.fp32" and row["adapter_flops_per_token"] == flops
        assert row["extra_flops_pct"] == pytest.approx(100 * flops * 8 / written["base_flops_per_item"])
        assert row["decode_ms"] > 0 and row["decode_tokens_per_s"] == pytest.approx(1e3 / row["decode_ms"])
        assert row["decode_overhead_pct"] is not None and row["overhead_pct"] is not None
        assert row["decode_verdict"] in ("faster", "slower", "not distinguishable")
        low, high = row["decode_overhead_interval_pct"]
        assert low <= high
    assert rows["merged.fp32"]["adapter_flops_per_token"] == 0 and rows["merged.fp32"]["decode_verdict"] is None
    markdown = (bundle / "reports" / "compare.md").read_text()
    assert "decode overhead %" in markdown and "adapter MFLOP/token" in markdown and "TTFT ms" in markdown
    capsys.readouterr()
