"""The profiler: report fields and their sanity, no silent provider fallback, decoders, trace parsing.

Runs are kept small (tens, not hundreds): these tests check what is recorded
and how, never how fast anything is.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from lora_edge.cli import main
from lora_edge.core.errors import ProviderUnavailableError
from lora_edge.runtime.feeds import build_feeds
from lora_edge.runtime.measure import PeakMemory, latency_stats, summarize_trace, time_interleaved
from lora_edge.profile.profiler import profile_bundle, select_graphs
from lora_edge.profile.report import NOT_MEASURED, ProfileReport, read_profile
from lora_edge.runtime.session import CPU, available_providers
from profile_bundles import copy_bundle, export_tiny_bundle, synthetic_bundle

RUNS = dict(runs=12, warmup=2, target_interval_pct=0)  # exactly 12 runs: no rounds added


def _missing_provider() -> str:
    """A provider this host lacks: CUDA on CPU-only hosts (the usual case), else Core ML."""
    return "CUDAExecutionProvider" if "CUDAExecutionProvider" not in available_providers() else "CoreMLExecutionProvider"


def _device_file(tmp_path: Path, provider: str, name: str = "test-gpu") -> Path:
    path = tmp_path / f"{name}.toml"
    path.write_text(f'name = "{name}"\ndescription = "asks for {provider}"\nprecisions = ["fp32"]\n'
                    f'intra_op_threads = 1\n\n[[providers]]\nname = "{provider}"\n\n[[providers]]\n'
                    f'name = "CPUExecutionProvider"\n')
    return path


@pytest.fixture(scope="module")
def tiny_bundle(tiny_model, tiny_adapter, tmp_path_factory):
    """A real exported bundle (tiny BERT + random adapter, merged and hotswap fp32)."""
    return export_tiny_bundle(tiny_model("bert"), tiny_adapter("bert"), tmp_path_factory.mktemp("b") / "bundle")


@pytest.fixture(scope="module")
def tiny_report(tiny_bundle, tmp_path_factory):
    bundle = copy_bundle(tiny_bundle, tmp_path_factory.mktemp("p") / "bundle")
    from lora_edge.profile.eager import eager_baselines

    return profile_bundle(bundle, "host-cpu", batch=2, seq=16, baselines=eager_baselines, quiet=True, **RUNS)


def test_profile_fields_are_present_and_sane(tiny_report):
    report = tiny_report
    names = [graph.name for graph in report.graphs]
    assert set(names) == {"merged.fp32", "hotswap.fp32"}
    for graph in report.graphs:
        assert graph.measured, graph.reason
        stats = graph.latency_ms
        assert 0 < stats["min"] <= stats["p50"] <= stats["p90"] <= stats["p99"] <= stats["max"]
        assert stats["runs"] == RUNS["runs"] and stats["std"] >= 0
        assert graph.throughput["items_per_s"] == pytest.approx(2 / (stats["mean"] / 1e3))
        assert "tokens_per_s" not in graph.throughput  # encoders: items only
        assert graph.session_create_s > 0
        assert graph.providers_registered[0] == CPU and graph.providers_used == [CPU]
        assert graph.size["total_mb"] == pytest.approx((Path(report.bundle) / graph.file).stat().st_size / 2**20)
        assert graph.memory["rss_added_mb"] >= 0
        ops = graph.top_ops
        assert ops and all(op["provider"] == CPU for op in ops)
        assert [op["ms_per_run"] for op in ops] == sorted((op["ms_per_run"] for op in ops), reverse=True)
        assert sum(op["percent"] for op in ops) <= 100.0 + 1e-6
        assert any(op["op_type"] in ("MatMul", "FusedMatMul", "Gemm", "Attention") for op in ops)
    hotswap = report.graph("hotswap.fp32")
    assert hotswap.adapter == "tiny" and hotswap.size["adapter_mb"] > 0  # timed with its adapter active
    assert report.host["onnxruntime"] and CPU in report.host["available_providers"]
    assert report.host["usable_cores"] >= 1 and report.host["intra_op_threads_used"] >= 1


def test_eager_baselines_run_beside_the_graphs(tiny_report):
    eager = {graph.name: graph for graph in tiny_report.eager}
    assert set(eager) == {"pytorch.unmerged", "pytorch.merged"}
    for graph in eager.values():
        assert graph.measured, graph.reason
        assert graph.latency_ms["p50"] <= graph.latency_ms["p90"] <= graph.latency_ms["p99"]
        assert graph.providers_used == ["torch-cpu"]
    # FLOPs of one item (batch 1 of the shape): 2 layers of a 32-wide BERT at seq 16, plus attention
    assert tiny_report.model["flops_per_item"] > 2 * 16 * 2 * (4 * 32 * 32 + 2 * 32 * 64)


def test_profile_reports_are_written_and_say_where_timings_come_from(tiny_report):
    bundle = Path(tiny_report.bundle)
    loaded = read_profile(bundle)
    assert loaded.to_json() == json.loads(json.dumps(tiny_report.to_json()))
    text = (bundle / "reports" / "profile.md").read_text()
    assert "measured on this host" in text and "host-cpu" in text
    assert "| merged.fp32 | measured |" in text
    assert not list((bundle / "reports").glob(".*tmp*")), "no temporary files left behind"


def test_unavailable_provider_is_not_measured_and_fails(tmp_path, capsys):
    provider = _missing_provider()
    bundle = synthetic_bundle(tmp_path / "bundle")
    device = _device_file(tmp_path, provider)
    with pytest.raises(SystemExit) as exit_info:
        main(["profile", str(bundle), "--device", str(device), "--runs", "3", "--warmup", "1"])
    assert exit_info.value.code == ProviderUnavailableError.exit_code
    error = capsys.readouterr().err
    assert f"{provider} is not available on this host" in error and "--allow-fallback" in error
    report = read_profile(bundle)
    assert [graph.status for graph in report.graphs] == [NOT_MEASURED, NOT_MEASURED]
    assert all(graph.latency_ms is None and graph.reason == f"{provider} is not available on this host"
               for graph in report.graphs)


def test_allow_fallback_measures_and_records_it(tmp_path, capsys):
    provider = _missing_provider()
    bundle = synthetic_bundle(tmp_path / "bundle")
    main_args = ["profile", str(bundle), "--device", str(_device_file(tmp_path, provider)), "--runs", "5",
                 "--warmup", "1", "--allow-fallback", "--json"]
    try:
        main(main_args)
    except SystemExit as exc:  # click's standalone_mode=False returns; a non-zero exit is a failure
        assert exc.code == 0
    printed = json.loads(capsys.readouterr().out)
    for graph in printed["graphs"]:
        assert graph["status"] == "measured"
        assert provider in graph["fallback"] and "--allow-fallback" in graph["fallback"]
        assert graph["providers_used"] == [CPU]
    assert "fallback" in (bundle / "reports" / "profile.md").read_text()


def test_decoder_graph_gets_a_zero_length_past_and_tokens_per_second(tmp_path):
    bundle = synthetic_bundle(tmp_path / "bundle", forms=("merged", "branched"), decoder=True)
    report = profile_bundle(bundle, "host-cpu", batch=2, seq=8, quiet=True, **RUNS)
    graph = report.graphs[0]
    assert graph.measured and graph.decoder
    assert graph.throughput["tokens_per_s"] == pytest.approx(graph.throughput["items_per_s"] * 8)
    for graph in report.graphs:  # prefill and decode step, both timed in the same interleaved rounds
        speed = graph.decoder_speed()
        assert all(value > 0 for value in speed.values()), speed
        assert speed["ttft_ms"] == graph.latency_ms["p50"] and speed["decode_ms"] == graph.decode_latency_ms["p50"]
        assert speed["prefill_tokens_per_s"] == pytest.approx(2 * 8 * 1e3 / speed["ttft_ms"])
        assert speed["decode_tokens_per_s"] == pytest.approx(2 * 1e3 / speed["decode_ms"])
        assert graph.decode_latency_ms["runs"] == 12 and len(graph.decode_rounds_ms) == len(graph.rounds_ms) == 3
        assert graph.memory["rss_added_mb"] > 0
    written = read_profile(bundle)
    assert written.graphs[1].decoder_speed() == report.graphs[1].decoder_speed()
    markdown = (bundle / "reports" / "profile.md").read_text()
    assert "TTFT ms" in markdown and "decode tok/s" in markdown and "after a past of 8 tokens" in markdown
    import onnxruntime

    session = onnxruntime.InferenceSession(str(bundle / graph.file), providers=[CPU])
    feeds = build_feeds(session, batch=2, seq=8, vocab_size=100)
    assert feeds["past_key_values.0.key"].shape == (2, 2, 0, 32)
    assert feeds["attention_mask"].shape == (2, 8) and feeds["position_ids"].tolist()[1] == list(range(8))
    present = session.run(["present.0.key"], feeds)[0]
    assert present.shape == (2, 2, 8, 32)


def test_classifiers_have_no_decoder_speed(tiny_report):
    for graph in tiny_report.graphs:
        assert not graph.decoder and graph.decode_latency_ms is None
        assert set(graph.decoder_speed().values()) == {None}
    assert "decode" not in (Path(tiny_report.bundle) / "reports" / "profile.md").read_text()


def test_the_decode_step_runs_after_a_past_of_seq_tokens(tmp_path):
    import onnxruntime

    from lora_edge.profile.profiler import decoder_phases

    bundle = synthetic_bundle(tmp_path / "bundle", forms=("merged",), decoder=True)
    session = onnxruntime.InferenceSession(str(bundle / "onnx" / "merged.fp32.onnx"), providers=[CPU])
    phases = decoder_phases(session, batch=2, seq=8, vocab_size=100)
    assert (phases.past_length, phases.present_length) == (8, 9)
    logits, presents = phases.decode()
    assert logits.shape == (2, 100) and presents[0].shape() == [2, 2, 9, 32]
    logits, presents = phases.prefill()
    assert presents[0].shape() == [2, 2, 8, 32]
    # the numpy feeds of the same step (the memory probe's): last token, position 8, the prefill's presents
    from lora_edge.runtime.feeds import decode_step_feeds

    feeds = build_feeds(session, batch=2, seq=8, vocab_size=100)
    outputs = dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds)))
    step = decode_step_feeds(feeds, outputs)
    assert step["input_ids"].tolist() == feeds["input_ids"][:, -1:].tolist()
    assert step["attention_mask"].shape == (2, 9) and step["position_ids"].tolist() == [[8], [8]]
    assert step["past_key_values.0.value"] is outputs["present.0.value"]
    assert session.run(["present.0.key"], step)[0].shape == (2, 2, 9, 32)


def test_a_context_too_short_for_the_decode_step_fails_clearly(tmp_path, capsys):
    from lora_edge.core.errors import ConfigError

    # the graph has 8 positions: a prefill of 8 fits, the decode step at position 8 does not
    bundle = synthetic_bundle(tmp_path / "bundle", forms=("merged",), decoder=True, positions=8)
    report = profile_bundle(bundle, "host-cpu", batch=1, seq=8, quiet=True, runs=2, warmup=0,
                            target_interval_pct=0)
    assert report.graphs[0].status == "failed" and "indices" in report.graphs[0].reason
    with pytest.raises(ProviderUnavailableError, match="merged.fp32 failed to run"):
        report.check_measured()
    report = profile_bundle(bundle, "host-cpu", batch=1, seq=7, quiet=True, runs=2, warmup=0,
                            target_interval_pct=0)
    assert report.graphs[0].measured and report.graphs[0].decode_latency_ms["runs"] == 2
    # with the context in config.json, --seq is refused before anything runs or is written
    config = bundle / "onnx" / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "max_position_embeddings": 8}))
    (bundle / "reports" / "profile.json").unlink()
    with pytest.raises(ConfigError, match="needs 9 positions, the model has 8"):
        profile_bundle(bundle, "host-cpu", batch=1, seq=8, quiet=True, runs=2, warmup=0)
    with pytest.raises(SystemExit) as exit_info:
        main(["profile", str(bundle), "--device", "host-cpu", "--seq", "8", "--no-eager"])
    assert exit_info.value.code == ConfigError.exit_code
    assert "error: --seq 8 leaves no room for the decode step" in capsys.readouterr().err
    assert not (bundle / "reports" / "profile.json").exists()


def test_hotswap_decoder_is_timed_with_its_adapter_active(tmp_path_factory, tiny_model, tiny_adapter):
    """The hot-swap decode step profile times computes what the merged graph computes (adapter bound)."""
    import onnxruntime

    from decoder_bundles import bundle_for, shared_root
    from lora_edge.core.choices import Form
    from lora_edge.core.manifest import find_graph, hotswap_adapter_file
    from lora_edge.profile.profiler import decoder_phases

    bundle, _ = bundle_for("gpt2", Form.MERGED, shared_root(tmp_path_factory), tiny_model, tiny_adapter)
    steps = {}
    for name, with_adapter in (("merged.fp32", False), ("hotswap.fp32", True), ("hotswap.fp32", False)):
        record = find_graph(bundle, name)
        session = onnxruntime.InferenceSession(str(bundle / record.file), providers=[CPU])
        adapter = hotswap_adapter_file(bundle, record, "a") if with_adapter else None
        steps[name, with_adapter] = decoder_phases(session, 1, 8, 100, adapter).decode()[0]
    np.testing.assert_allclose(steps["hotswap.fp32", True], steps["merged.fp32", False], atol=1e-4)
    assert np.abs(steps["hotswap.fp32", False] - steps["merged.fp32", False]).max() > 1e-3


def test_graph_selection_follows_the_device_precisions(tmp_path):
    from lora_edge.profile.devices import load_device
    from lora_edge.core.errors import BundleError

    bundle = synthetic_bundle(tmp_path / "bundle")
    records, notes = select_graphs(bundle, load_device("host-cpu"))
    assert [r.name for r in records] == ["merged.fp32", "branched.fp32"] and not notes
    records, notes = select_graphs(bundle, load_device("raspberry-pi-5"))  # int8/int4 only: profile all, say so
    assert len(records) == 2 and "no graph in the device's precisions" in notes[0]
    with pytest.raises(BundleError, match="use one of: merged.fp32, branched.fp32"):
        select_graphs(bundle, load_device("host-cpu"), ["merged.int8"])


def test_latency_stats_on_fixed_times():
    stats = latency_stats([0.001 * value for value in range(1, 101)])  # 1..100 ms
    assert stats["p50"] == pytest.approx(50.5) and stats["p90"] == pytest.approx(90.1)
    assert stats["p99"] == pytest.approx(99.01) and stats["mean"] == pytest.approx(50.5)
    assert stats["min"] == pytest.approx(1) and stats["max"] == pytest.approx(100)


def test_time_interleaved_runs_each_runner_in_shuffled_rounds():
    calls = []
    runners = {name: (lambda name=name: calls.append(name)) for name in "abc"}
    times = time_interleaved(runners, runs=25, warmup=2, block=10)
    assert {name: len(values) for name, values in times.items()} == {"a": 25, "b": 25, "c": 25}
    visits = calls[6:]  # after 2 warm-up calls each; each visit: 1 untimed run + up to 10 timed
    sizes = [11] * 6 + [6] * 3  # rounds of 10, 10 and the remaining 5
    blocks, start = [], 0
    for size in sizes:
        blocks.append(visits[start:start + size])
        start += size
    assert start == len(visits) and all(len(set(block)) == 1 for block in blocks)
    rounds = [{block[0] for block in blocks[i:i + 3]} for i in (0, 3, 6)]
    assert rounds == [set("abc")] * 3  # every runner once per round
    assert len({tuple(block[0] for block in blocks[i:i + 3]) for i in (0, 3, 6)}) > 1  # order shuffled


def test_peak_memory_sees_an_allocation():
    with PeakMemory() as memory:
        block = np.ones(64 * 2**20 // 8)  # 64 MB, touched
        del block
    assert memory.added_mb >= 48, memory.method


def _event(cat, name, ts, dur, **args):
    return {"cat": cat, "name": name, "ts": ts, "dur": dur, "args": args}


def test_trace_summary_skips_warmup_and_groups_by_op_and_provider():
    events = [_event("Session", "model_run", 0, 100), _event("Node", "warm_kernel_time", 10, 90, op_name="MatMul",
                                                               provider="CUDAExecutionProvider")]
    for run in range(2):
        start = 1000 * (run + 1)
        events += [_event("Session", "model_run", start, 500),
                   _event("Node", "mm1_kernel_time", start + 1, 300, op_name="MatMul", provider="CUDAExecutionProvider"),
                   _event("Node", "mm2_kernel_time", start + 2, 100, op_name="MatMul", provider="CUDAExecutionProvider"),
                   _event("Node", "shape_kernel_time", start + 3, 100, op_name="Shape", provider=CPU),
                   _event("Node", "mm1_fence_before", start + 4, 7, op_name="MatMul")]
    summary = summarize_trace(events, skip_runs=1)
    assert summary.runs == 2
    assert summary.top_ops[0] == {"op_type": "MatMul", "provider": "CUDAExecutionProvider", "ms_per_run": 0.4,
                                  "percent": 80.0, "nodes": 2}
    assert summary.cpu_nodes == [{"op_type": "Shape", "provider": CPU, "ms_per_run": 0.1, "percent": 20.0, "nodes": 1}]
    assert summary.providers_used == [CPU, "CUDAExecutionProvider"]


def test_report_round_trips_through_json(tiny_report):
    again = ProfileReport.from_json(json.loads(json.dumps(tiny_report.to_json())))
    assert again.graph("hotswap.fp32").latency_ms == tiny_report.graph("hotswap.fp32").latency_ms


def test_compare_on_the_exported_bundle_puts_overhead_beside_the_adapter_flops(tiny_report):
    from lora_edge.profile.compare import compare_bundle
    from lora_edge.core.flops import adapter_flops_per_token

    bundle = Path(tiny_report.bundle)
    comparison = compare_bundle(bundle, "host-cpu", batch=2, seq=16, quiet=True)  # re-uses the profile
    rows = {row["graph"]: row for row in comparison.rows}
    per_token = adapter_flops_per_token(bundle / "adapter" / "adapter_model.safetensors")
    assert per_token == 4 * 2 * 4 * (32 + 32)  # query and value in 2 layers, 32 wide, rank 4
    expected = 100 * per_token * 16 / tiny_report.model["flops_per_item"]
    assert rows["hotswap.fp32"]["extra_flops_pct"] == pytest.approx(expected)
    assert rows["pytorch.unmerged"]["extra_flops_pct"] == pytest.approx(expected)
    assert rows["merged.fp32"]["extra_flops_pct"] == 0
    hotswap, merged = tiny_report.graph("hotswap.fp32"), tiny_report.graph("merged.fp32")
    from lora_edge.runtime.interleave import paired_ratio_stats

    assert len(hotswap.rounds_ms) == len(merged.rounds_ms) == 3  # 12 runs: rounds of 5, 5 and 2
    assert [len(visit) for visit in hotswap.visits_ms] == [len(visit) for visit in merged.visits_ms] == [5, 5, 2]
    assert rows["hotswap.fp32"]["overhead_pct"] == pytest.approx(  # the forms took turns: runs pair by index
        paired_ratio_stats(hotswap.visits_ms, merged.visits_ms).overhead_pct)
    assert tiny_report.settings["rounds"] == 3 and set(tiny_report.settings["load_average"]) == {"before", "after"}


def test_each_graph_memory_is_measured_from_a_clean_start(tmp_path):
    # two graphs with a 40 MB embedding each: the second must not look smaller because the
    # first one's freed pages were reused (each is measured in a fresh process)
    bundle = synthetic_bundle(tmp_path / "bundle", vocab=20000, hidden=512)
    report = profile_bundle(bundle, "host-cpu", batch=1, seq=8, quiet=True, runs=3, warmup=1)
    weights_mb = 20000 * 512 * 4 / 2**20
    for graph in report.graphs:
        assert "fresh process" in graph.memory["method"]
        assert weights_mb * 0.9 <= graph.memory["rss_added_mb"] <= weights_mb * 4, graph.memory


def test_a_graph_that_failed_to_run_is_a_provider_error_not_an_internal_one(tmp_path):
    """A device whose providers cannot run a graph is the user's choice of device: exit 7, never 70."""
    from lora_edge.core.errors import ProviderUnavailableError
    from lora_edge.profile.report import FAILED, GraphProfile

    report = ProfileReport(str(tmp_path), {}, {}, {}, "",
                           graphs=[GraphProfile("merged.fp32", status=FAILED, reason="NOT_IMPLEMENTED: Op X")])
    with pytest.raises(ProviderUnavailableError, match="merged.fp32 failed to run: NOT_IMPLEMENTED"):
        report.check_measured()


def test_benchmark_session_options_and_in_memory_graphs_go_through_create_session(tmp_path):
    """Session config entries and the optimized-graph path reach ORT; a serialized graph runs like its file."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from lora_edge.runtime.session import SessionSettings, create_session, graph_outputs

    weight = numpy_helper.from_array(np.arange(16, dtype=np.float32).reshape(4, 4), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], [weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    path = tmp_path / "g.onnx"
    onnx.save(model, str(path))
    settings = SessionSettings(config_entries={"session.intra_op.allow_spinning": "0"},
                               optimized_model_path=str(tmp_path / "optimized.onnx"))
    session = create_session(path, settings)
    assert session.get_session_options().get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert (tmp_path / "optimized.onnx").is_file()
    x = np.ones((1, 4), np.float32)
    (from_bytes,) = graph_outputs(model.SerializeToString(), {"x": x, "unused": x})  # undeclared feeds dropped
    (from_file,) = graph_outputs(path, {"x": x})
    assert np.array_equal(from_bytes, x @ np.arange(16, dtype=np.float32).reshape(4, 4))
    assert np.array_equal(from_bytes, from_file)
    assert graph_outputs(path, None) == []  # only loaded
