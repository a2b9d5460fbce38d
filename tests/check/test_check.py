"""The accuracy gate: passes honest bundles, fails drifted ones, and says why (JSON, JUnit, Markdown)."""

from __future__ import annotations

import json
import math
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest

from cli_runner import exit_code_of
from lora_edge.check.metrics import FAILED, PASSED, SKIPPED, LogitComparison, classification_scores, judge
from lora_edge.core.errors import LoraEdgeError
from lora_edge.core.recipe import DEFAULT_THRESHOLDS, CheckSpec, Thresholds

LABELS = ["LABEL_0", "LABEL_1", "LABEL_2"]  # what a tiny random adapter's head is called
TEXTS = ["turn the lights on", "what's the weather like in Paris tomorrow?", "hi", "play some jazz please",
         "set an alarm for seven", "call my sister", "lights off in the kitchen", "how hot is it outside",
         "remind me to buy milk", "what time is it in tokyo", "pause the music", "volume up a bit"]


# --- the arithmetic, on fixed inputs --------------------------------------------------------------

def test_logit_comparison_on_fixed_rows():
    reference = np.array([[1.0, 2.0, 3.0], [3.0, 1.0, 0.0]])
    graph = np.array([[1.0, 2.5, 3.0], [0.0, 1.0, 3.0]])  # row 2 flips its top class
    comparison = LogitComparison()
    comparison.update(graph[:1], reference[:1])  # batch by batch gives the same as all at once
    comparison.update(graph[1:], reference[1:])
    got = comparison.results()
    assert got["max_abs_diff"] == pytest.approx(3.0)
    assert got["mean_abs_diff"] == pytest.approx((0.5 + 3 + 0 + 3) / 6)
    row1 = 15.0 / (math.sqrt(16.25) * math.sqrt(14.0))
    assert got["cosine_min"] == pytest.approx(1.0 / 10.0)  # row 2: (0*3 + 1 + 0) / (sqrt(10) * sqrt(10))
    assert got["cosine"] == pytest.approx((row1 + 0.1) / 2)  # the gate holds the mean over rows
    assert got["top1_agreement"] == pytest.approx(0.5)
    nan = LogitComparison()
    nan.update(np.array([[np.nan, 0.0]]), np.array([[1.0, 0.0]]))
    assert math.isinf(nan.results()["max_abs_diff"]) and nan.results()["cosine"] == -1.0


def test_classification_scores_and_verdicts():
    reference = np.array([[2.0, 0.0], [0.0, 2.0], [2.0, 0.0], [0.0, 2.0]])
    graph = np.array([[2.0, 0.0], [0.0, 2.0], [0.0, 2.0], [0.0, 2.0]])
    scores = classification_scores(graph, reference, [0, 1, 0, 1], 2)
    assert scores["reference_accuracy"] == 1.0 and scores["accuracy"] == 0.75
    assert scores["accuracy_drop"] == pytest.approx(25.0)
    assert scores["macro_f1_drop"] == pytest.approx(100 * (1 - (2 / 3 + 0.8) / 2))
    thresholds = Thresholds(max_abs_diff=0.1, cosine=0.9)
    assert judge("max_abs_diff", 0.1, thresholds).status == PASSED
    assert judge("max_abs_diff", 0.2, thresholds).status == FAILED
    assert judge("cosine", 0.8, thresholds).status == FAILED
    assert judge("cosine", float("nan"), thresholds).status == FAILED
    skipped = judge("top1_agreement", 0.5, thresholds, threshold_where="check.thresholds.int4")
    assert skipped.status == SKIPPED and "check.thresholds.int4" in skipped.reason
    assert judge("accuracy_drop", None, thresholds, "no labeled data").reason == "no labeled data"


# --- on real bundles ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def bundle(tmp_path_factory, tiny_model, tiny_adapter):
    """A tiny-BERT bundle with two adapters: merged per adapter, one hot-swap graph, and int4 copies."""
    from lora_edge.core.adapters import AdapterRef
    from lora_edge.export.bundle import export_bundle
    from lora_edge.quantize.quantizer import quantize_bundle

    precisions = ["fp32", "int4"] if _has_quantizer() else ["fp32"]
    out = tmp_path_factory.mktemp("check") / "bundle"
    adapters = [AdapterRef("A", tiny_adapter("bert", rank=4, seed=0)),
                AdapterRef("B", tiny_adapter("bert", rank=2, seed=1))]
    export_bundle(tiny_model("bert"), adapters, ["merged", "hotswap"], out, precisions=precisions,
                  progress=lambda message: None, quantize=quantize_bundle)
    return out


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "eval.jsonl"
    path.write_text("".join(json.dumps({"text": t, "label": LABELS[i % 3]}) + "\n" for i, t in enumerate(TEXTS)))
    return path


def _has_quantizer() -> bool:
    import importlib.util

    return importlib.util.find_spec("lora_edge.quantize.quantizer") is not None


def _copy(bundle: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy, ignore=shutil.ignore_patterns("reports"))
    return copy


def _by_target(report) -> dict:
    return {result.target: result for result in report.targets}


def test_honest_bundle_passes_with_task_metrics(bundle, data_file, tmp_path, capsys):
    junit = tmp_path / "junit.xml"
    assert exit_code_of("check", str(bundle), "--data", str(data_file), "--junit", str(junit), "--json") == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["passed"] and payload["summary"]["failed"] == 0
    results = {r["target"]: r for r in payload["results"]}
    expected = {"merged.A.fp32", "merged.B.fp32", "hotswap.fp32[A]", "hotswap.fp32[B]", "hotswap.fp32[base]"}
    assert expected <= set(results)
    for name in ("merged.A.fp32", "hotswap.fp32[A]", "hotswap.fp32[B]"):
        metrics = results[name]["metrics"]
        assert metrics["max_abs_diff"]["value"] <= 1e-4 and metrics["top1_agreement"]["value"] == 1.0
        assert metrics["accuracy_drop"]["status"] == PASSED  # the task metric ran on the labeled data
        assert results[name]["scores"]["accuracy"] == results[name]["scores"]["reference_accuracy"]
    # JUnit: one testcase per target and metric, none failed.
    cases = ET.parse(junit).getroot().findall(".//testcase")
    assert len(cases) == sum(len(r["metrics"]) for r in payload["results"])
    assert not [c for c in cases if c.find("failure") is not None]
    if _has_quantizer():
        int4 = results["merged.A.int4"]["metrics"]
        assert int4["max_abs_diff"]["value"] > DEFAULT_THRESHOLDS["fp32"].max_abs_diff  # int4 really differs


def test_without_data_uses_generated_inputs_and_lists_task_metric_as_skipped(bundle):
    from lora_edge.check.gate import check_bundle

    report = check_bundle(bundle, CheckSpec(generated_examples=8), write=False)
    assert report.passed
    merged = _by_target(report)["merged.A.fp32"]
    assert "generated" in merged.data and merged.examples == 8
    statuses = {m.metric: (m.status, m.reason) for m in merged.metrics}
    assert statuses["max_abs_diff"][0] == PASSED
    assert statuses["accuracy_drop"][0] == SKIPPED and "no labeled data" in statuses["accuracy_drop"][1]


def test_one_perturbed_weight_fails_the_gate(bundle, data_file, tmp_path):
    import onnx
    from onnx import numpy_helper

    copy = _copy(bundle, tmp_path)
    path = copy / "onnx" / "merged.A.fp32.onnx"
    model = onnx.load(str(path))
    # One element of one hidden-layer weight matrix (not the embedding tables).
    weights = [init for init in model.graph.initializer if len(init.dims) == 2 and 30522 not in init.dims
               and min(init.dims) >= 32]
    target = weights[0]
    array = numpy_helper.to_array(target).copy()
    array.flat[0] += 0.5
    target.CopyFrom(numpy_helper.from_array(array, target.name))
    onnx.save(model, str(path))

    assert exit_code_of("check", str(copy), "--data", str(data_file)) == 1
    report = json.loads((copy / "reports" / "check.json").read_text())
    assert not report["passed"]
    failed = {(r["target"], name) for r in report["results"] for name, m in r["metrics"].items()
              if m["status"] == FAILED}
    assert ("merged.A.fp32", "max_abs_diff") in failed
    assert {target for target, _ in failed} == {"merged.A.fp32"}  # every other graph still passes
    junit = ET.parse(copy / "reports" / "check.junit.xml").getroot()
    failure = junit.find(".//testcase[@classname='merged.A.fp32'][@name='max_abs_diff']/failure")
    message = failure.get("message")
    assert "merged.A.fp32" in message and "max_abs_diff" in message and "threshold for fp32" in message
    assert "FAILED" in (copy / "reports" / "check.md").read_text()


def test_swapped_adapter_file_fails_the_gate(bundle, tmp_path):
    from lora_edge.check.gate import check_bundle

    copy = _copy(bundle, tmp_path)
    adapters = copy / "onnx" / "adapters"
    shutil.copy(adapters / "B.onnx_adapter", adapters / "A.onnx_adapter")
    report = check_bundle(copy, CheckSpec(generated_examples=16))
    assert not report.passed
    results = _by_target(report)
    swapped = [t for t in results if t.startswith("hotswap.") and t.endswith("[A]")]
    assert swapped and all(results[name].status == FAILED for name in swapped)  # at every precision
    failed = {m.metric for m in results["hotswap.fp32[A]"].metrics if m.status == FAILED}
    assert {"max_abs_diff", "mean_abs_diff", "cosine"} <= failed
    assert results["hotswap.fp32[B]"].status == PASSED and results["merged.A.fp32"].status == PASSED

    # The bundle's copy of the adapter swapped for another one is caught by its recorded sha256.
    copy2 = tmp_path / "second"
    shutil.copytree(bundle, copy2, ignore=shutil.ignore_patterns("reports"))
    shutil.copy(copy2 / "adapters" / "B" / "adapter_model.safetensors",
                copy2 / "adapters" / "A" / "adapter_model.safetensors")
    report = check_bundle(copy2, CheckSpec(generated_examples=4), write=False)
    integrity = {r.target: r.status for r in report.integrity}
    assert integrity == {"adapter:A": FAILED, "adapter:B": PASSED}
    assert not report.passed and "adapter:A: sha256" in report.failures()[0]
    # The reference then comes from the recorded source adapter, so the graphs themselves still pass.
    assert all(r.status == PASSED for r in report.targets if r.adapter == "A")


@pytest.mark.skipif(not _has_quantizer(), reason="needs lora_edge.quantize.quantizer (int4 graphs)")
def test_int4_graph_held_to_fp32_thresholds_fails(bundle, data_file):
    from lora_edge.check.gate import check_bundle

    honest = check_bundle(bundle, CheckSpec(data=str(data_file)), write=False)
    assert all(r.status == PASSED for r in honest.targets if r.precision == "int4")
    fp32 = DEFAULT_THRESHOLDS["fp32"].to_json()
    strict = check_bundle(bundle, CheckSpec(data=str(data_file), thresholds={"int4": fp32}), write=False)
    assert not strict.passed
    int4 = [r for r in strict.targets if r.precision == "int4"]
    assert int4 and all(r.status == FAILED for r in int4 if r.adapter is not None)
    assert all(r.status == PASSED for r in strict.targets if r.precision == "fp32")
    assert any("max_abs_diff" in message and "int4" in message for message in strict.failures())


def test_graph_whose_provider_is_missing_is_skipped_with_the_reason(bundle, tmp_path):
    import onnxruntime

    from lora_edge.check.gate import check_bundle, gate
    from lora_edge.core.errors import ProviderUnavailableError

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this host has CUDA")
    device = tmp_path / "gpu.toml"
    device.write_text('name = "gpu"\nprecisions = ["fp32"]\n[[providers]]\nname = "CUDAExecutionProvider"\n'
                      '[tolerances.fp32]\nmax_abs_diff = 0.5\n')
    report = check_bundle(bundle, CheckSpec(device=str(device), generated_examples=4), write=False)
    assert report.targets and all(r.status == SKIPPED for r in report.targets)
    reasons = {m.reason for r in report.targets for m in r.metrics}
    assert all("CUDAExecutionProvider is not available" in reason for reason in reasons)
    assert report.targets[0].thresholds["max_abs_diff"] == 0.5  # the device's tolerance applied
    with pytest.raises(ProviderUnavailableError):
        gate(report, "reports/check.md")  # nothing ran: not a pass


@pytest.mark.gpu
def test_check_runs_every_graph_on_a_cuda_device(bundle, data_file):
    """On a GPU host the gate runs the graphs on the device's CUDA provider, with its tolerances."""
    from lora_edge.check.gate import check_bundle

    report = check_bundle(bundle, CheckSpec(data=str(data_file), device="t4-server"), write=False)
    ran = [r for r in report.targets if r.status != SKIPPED]
    assert ran and all("CUDAExecutionProvider" in r.providers for r in ran)
    fp32 = [r for r in ran if r.precision == "fp32" and r.adapter is not None]
    assert fp32 and all(r.status == PASSED for r in fp32), report.failures()


@pytest.fixture(scope="module")
def decoder_bundle(tmp_path_factory, tiny_model, tiny_adapter):
    """A tiny-Llama hot-swap bundle serving two adapters (one graph: the cheapest decoder bundle to export)."""
    from lora_edge.core.adapters import AdapterRef
    from lora_edge.export.bundle import export_bundle

    out = tmp_path_factory.mktemp("check-llama") / "bundle"
    adapters = [AdapterRef("a", tiny_adapter("llama", alpha=32.0)),
                AdapterRef("b", tiny_adapter("llama", rank=2, alpha=32.0, seed=7))]
    export_bundle(tiny_model("llama"), adapters, ["hotswap"], out, task="causal-lm", progress=lambda message: None)
    return out


def test_causal_lm_gate_uses_next_token_logits_and_perplexity(decoder_bundle, tmp_path):
    from lora_edge.check.gate import check_bundle

    texts = tmp_path / "texts.jsonl"
    texts.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    report = check_bundle(decoder_bundle, CheckSpec(data=str(texts)), write=False)
    assert report.passed, report.failures()
    results = _by_target(report)
    assert set(results) == {"hotswap.fp32[a]", "hotswap.fp32[b]", "hotswap.fp32[base]"}
    for name in ("hotswap.fp32[a]", "hotswap.fp32[b]"):
        metrics = {m.metric: m for m in results[name].metrics}
        assert set(metrics) == {"max_abs_diff", "mean_abs_diff", "cosine", "top1_agreement", "perplexity_increase",
                                "greedy_agreement", "exact_match_drop"}
        assert metrics["top1_agreement"].value == 1.0 and metrics["perplexity_increase"].status == PASSED
        # greedy continuations of every text's first half: the graph's decode loop gives PyTorch's tokens
        assert metrics["greedy_agreement"].value == 1.0 and results[name].scores["greedy_prompts"] == len(TEXTS)
        assert metrics["exact_match_drop"].status == SKIPPED and "chat rows" in metrics["exact_match_drop"].reason
        assert results[name].scores["perplexity"] == pytest.approx(results[name].scores["reference_perplexity"],
                                                                   rel=1e-4)
    assert results["hotswap.fp32[a]"].scores["perplexity"] != results["hotswap.fp32[b]"].scores["perplexity"]

    # The same gate catches a decoder adapter file swapped for another adapter's.
    copy = _copy(decoder_bundle, tmp_path)
    shutil.copy(copy / "onnx" / "adapters" / "b.onnx_adapter", copy / "onnx" / "adapters" / "a.onnx_adapter")
    swapped = _by_target(check_bundle(copy, CheckSpec(data=str(texts)), write=False))
    failed = {m.metric for m in swapped["hotswap.fp32[a]"].metrics if m.status == FAILED}
    assert {"max_abs_diff", "perplexity_increase", "greedy_agreement"} <= failed
    assert swapped["hotswap.fp32[b]"].status == PASSED


def test_causal_lm_gate_scores_exact_match_on_chat_rows(decoder_bundle, tmp_path):
    """Chat rows: the gate renders them with the chat template and compares greedy answers' exact match."""
    from lora_edge.check.gate import check_bundle
    from gguf_helpers import CHATML

    copy = _copy(decoder_bundle, tmp_path)
    config_file = copy / "onnx" / "tokenizer_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "chat_template": CHATML}))
    rows = tmp_path / "chat.jsonl"
    rows.write_text("".join(json.dumps({"messages": [{"role": "user", "content": t},
                                                     {"role": "assistant", "content": "ok"}]}) + "\n"
                            for t in TEXTS[:6]))
    report = check_bundle(copy, CheckSpec(data=str(rows), greedy_tokens=6), write=False)
    assert report.passed, report.failures()
    results = _by_target(report)
    scores = results["hotswap.fp32[a]"].scores
    assert scores["greedy_prompts"] == 6 and scores["greedy_agreement"] == 1.0
    assert scores["exact_match"] == scores["reference_exact_match"] and scores["exact_match_drop"] == 0.0
    base = {m.metric: m for m in results["hotswap.fp32[base]"].metrics}
    assert base["greedy_agreement"].value == 1.0 and base["exact_match_drop"].status == SKIPPED
    # no template: chat rows are refused with the template named
    config_file.write_text(json.dumps({k: v for k, v in json.loads(config_file.read_text()).items()
                                       if k != "chat_template"}))
    (copy / "onnx" / "chat_template.jinja").unlink(missing_ok=True)
    with pytest.raises(LoraEdgeError, match="chat template"):
        check_bundle(copy, CheckSpec(data=str(rows)), write=False)
