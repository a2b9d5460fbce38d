"""Recipes end to end: `lora-edge run` trains, exports, quantizes, profiles, gates and reports; exits with the gate."""

from __future__ import annotations

import json
import platform
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from cli_runner import exit_code_of
from lora_edge.core.errors import ConfigError
from lora_edge.core.choices import Task
from lora_edge.core.recipe import load_recipe


@pytest.mark.slow
def test_run_tiny_bert_recipe_end_to_end(tmp_path, capsys):
    from lora_edge.core.manifest import Manifest

    recipe = load_recipe("tiny-bert")
    assert exit_code_of("run", "tiny-bert", "--out", str(tmp_path)) == 0
    out = capsys.readouterr()
    bundle = tmp_path / "tiny-bert"
    for stage in ("[1/6] train", "[2/6] export", "[3/6] quantize", "[4/6] profile", "[5/6] check", "[6/6] report"):
        assert stage in out.err  # progress per stage
    assert "gate: PASSED" in out.out and str(bundle / "reports" / "report.md") in out.out

    manifest = Manifest.read(bundle)
    assert manifest.recipe["name"] == "tiny-bert" and manifest.model.task is Task.SEQ_CLS
    expected = {f"{form}.{precision}" for form in recipe.export.forms for precision in recipe.export.precisions}
    assert {g.name for g in manifest.graphs} == expected
    assert manifest.adapters[0].data["test"].endswith("test.jsonl")  # training recorded its data

    # The gate ran every graph (hot-swap with the adapter file and with none) on the recorded test split.
    check = json.loads((bundle / "reports" / "check.json").read_text())
    assert check["passed"] and check["summary"]["failed"] == 0
    targets = {r["target"]: r for r in check["results"]}
    for name in expected:
        key = f"{name}[intent]" if name.startswith("hotswap.") else name
        assert targets[key]["examples"] == recipe.check.max_examples and "test split" in targets[key]["data"]
        assert targets[key]["metrics"]["accuracy_drop"]["status"] == "passed"
    assert targets["merged.fp32"]["metrics"]["max_abs_diff"]["value"] <= 1e-4
    cases = ET.parse(bundle / "reports" / "check.junit.xml").getroot().findall(".//testcase")
    assert len(cases) == sum(len(r["metrics"]) for r in check["results"])

    # Profiled on the recipe's device, reports kept per device; report.md pulls the stages together.
    profile = json.loads((bundle / "reports" / "devices" / "host-cpu" / "profile.json").read_text())
    measured = {g["name"] for g in profile["graphs"] if g["status"] == "measured"}
    assert measured == expected
    report = (bundle / "reports" / "report.md").read_text()
    for section in ("## Stages", "## Training", "## Graphs", "## Latency on host-cpu", "## Accuracy gate"):
        assert section in report
    assert "accuracy gate PASSED" in report
    assert (bundle / "reports" / "devices" / "host-cpu" / "latency.png").stat().st_size > 1000
    assert (bundle / "reports" / "training.intent.png").stat().st_size > 1000

    # The bundle is never overwritten silently; the refusal comes before any work.
    assert exit_code_of("run", "tiny-bert", "--out", str(tmp_path)) == 9


def test_run_exits_with_the_gate_code(monkeypatch, tmp_path, capsys):
    """`lora-edge run` prints the summary, then exits 1 when the gate failed (0 when it passed)."""
    import lora_edge.pipeline.runner as pipeline
    from lora_edge.check.gate import CheckReport
    from lora_edge.check.metrics import FAILED, PASSED, MetricResult, TargetResult

    def fake_run(recipe, out=None, force=False, retrain=False, progress=None, status=PASSED, **options):
        report = CheckReport(str(tmp_path), "seq-cls", "cpu", "now")
        target = TargetResult("merged.int4", "merged.int4", "onnx/merged.int4.onnx", "merged", "int4", "a", "seq-cls")
        target.metrics = [MetricResult("top1_agreement", status, 0.5, 0.95, "min")]
        report.targets = [target]
        result = pipeline.RunResult(load_recipe("tiny-bert"), tmp_path)
        result.check, result.report = report, tmp_path / "report.md"
        return result

    monkeypatch.setattr(pipeline, "run_recipe", fake_run)
    assert exit_code_of("run", "tiny-bert") == 0
    monkeypatch.setattr(pipeline, "run_recipe", lambda *a, **k: fake_run(*a, **k, status=FAILED))
    assert exit_code_of("run", "tiny-bert") == 1
    err = capsys.readouterr().err
    assert "merged.int4: top1_agreement = 0.5" in err and "at least 0.95" in err


def test_bad_recipe_is_a_usage_error_naming_the_field(tmp_path, capsys):
    path = tmp_path / "bad.toml"
    path.write_text('name = "x"\n[[adapters]]\npath = "a"\n[check.thresholds.int4]\ncosine = 2.0\n')
    assert exit_code_of("run", str(path)) == ConfigError.exit_code
    assert f"{path}: check.thresholds.int4.cosine" in capsys.readouterr().err


def test_host_devices_are_the_cpu_targets_this_host_can_run():
    import os

    from lora_edge.profile.devices import load_device
    from lora_edge.pipeline.runner import expand_devices, host_device_problem

    notes = []
    devices = expand_devices(["host", "host-cpu"], notes.append)
    assert "host-cpu" in devices and len(devices) == len(set(devices))
    for name in devices:
        device = load_device(name)
        assert not device.uses_gpu and not device.missing_providers()
        assert device.cpu_arch in ("any", {"x86_64": "x86_64", "aarch64": "arm64", "arm64": "arm64"}.get(
            platform.machine().lower(), platform.machine()))
        assert device.intra_op_threads <= len(os.sched_getaffinity(0))
    assert "jetson-orin" not in devices and "t4-server" not in devices
    assert any("jetson-orin" in note for note in notes)  # every target left out is said, with why
    # The reasons, on fixed host facts: 2 cores, AVX2 only.
    server, laptop = load_device("x86-server-avx512"), load_device("x86-laptop-avx2")
    assert "avx512" in host_device_problem(server, {"avx2", "fma"}, 64)
    assert "4 threads" in host_device_problem(laptop, {"avx2", "fma"}, 2)
    assert host_device_problem(laptop, {"avx2", "fma"}, 4) is None or platform.machine() not in ("x86_64", "AMD64")


def test_trained_adapter_is_reused_when_nothing_changed(monkeypatch, tmp_path):
    import lora_edge.train.trainer as train
    from lora_edge.pipeline.runner import TRAINING_RECORD, training_record, train_adapters

    recipe = load_recipe("tiny-bert")
    recipe.output = str(tmp_path)
    calls = []

    def fake_train(model, data, out, task, lora, spec, force=False, progress=True):
        calls.append(spec.max_steps)
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "adapter_model.safetensors").write_bytes(b"weights")
        (Path(out) / "metrics.json").write_text(json.dumps({"test": {"accuracy": 0.5}}))

    monkeypatch.setattr(train, "train_adapter", fake_train)
    refs, metrics = train_adapters(recipe, "model-dir", retrain=False, progress=lambda m: None)
    assert calls == [30] and refs[0].name == "intent" and metrics["intent"]["test"]["accuracy"] == 0.5
    record = json.loads((refs[0].path / TRAINING_RECORD).read_text())
    assert record == training_record(recipe, "model-dir", recipe.adapters[0])
    train_adapters(recipe, "model-dir", retrain=False, progress=lambda m: None)
    assert calls == [30]  # same model, task and training block: re-used
    recipe.adapters[0].training.train.max_steps = 31
    train_adapters(recipe, "model-dir", retrain=False, progress=lambda m: None)
    train_adapters(recipe, "model-dir", retrain=True, progress=lambda m: None)
    assert calls == [30, 31, 31]  # a changed block, or --retrain, trains again


def test_ci_template_runs_a_recipe_and_publishes_the_gates_junit():
    import fnmatch

    import yaml

    from lora_edge.check.report import CHECK_JUNIT

    template = Path(__file__).resolve().parents[2] / "examples" / "ci" / "export-check.yml"
    workflow = yaml.safe_load(template.read_text())
    steps = workflow["jobs"]["export-check"]["steps"]
    run = next(step["run"] for step in steps if "lora-edge run" in step.get("run", ""))
    assert '--out runs' in run
    published = next(step["with"]["files"] for step in steps if "publish-unit-test-result" in step.get("uses", ""))
    # The glob matches where `lora-edge run --out runs` puts the gate's JUnit file for any recipe.
    recipe = load_recipe(workflow["env"]["RECIPE"].split("'")[1])
    assert fnmatch.fnmatch(f"runs/{recipe.name}/reports/{CHECK_JUNIT}", published)
