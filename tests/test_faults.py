"""kill -9 in the middle of an export or a quantization, then the same command again: a complete, verified
bundle and no staging left behind."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cli_runner import exit_code_of
from export_helpers import tiny_bundle

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _cli(*args) -> list[str]:
    return [sys.executable, "-m", "lora_edge", *map(str, args)]


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
            "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def _kill_when(command: list[str], ready, timeout: float = 240.0) -> None:
    """Start ``command``; SIGKILL it as soon as ``ready()`` is true (it must still be running then)."""
    process = subprocess.Popen(command, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout
    try:
        while not ready():
            assert process.poll() is None, "the command ended before it could be killed mid-way"
            assert time.monotonic() < deadline, "the command never reached the point to kill it at"
            time.sleep(0.02)
        process.send_signal(signal.SIGKILL)
    finally:
        process.kill()
        process.wait()


def _staged_graphs(directory: Path, prefix: str) -> bool:
    """True once a staging directory named ``prefix``* under ``directory`` holds a written graph."""
    return any(staging.is_dir() and any(staging.rglob("*.onnx"))
               for staging in directory.glob(prefix + "*"))


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if ".tmp-" in p.name or ".old-" in p.name
                  or p.name.endswith(".lock"))


def _verify(bundle: Path, capsys, graphs: list[str]) -> None:
    manifest = json.loads((bundle / "manifest.json").read_text())
    listed = {g["name"]: g for g in manifest["graphs"]}
    for name in graphs:
        assert name in listed and (bundle / listed[name]["file"]).is_file()
        assert exit_code_of("infer", str(bundle), "--graph", name, "--text", "turn the lights off", "--json") == 0
        assert json.loads(capsys.readouterr().out)[0]["label"]


def test_export_killed_mid_way_then_run_again(tiny_model, tiny_adapter, tmp_path, capsys):
    out = tmp_path / "bundle"
    command = _cli("export", "--model", tiny_model("bert"), "--adapter", f"tiny={tiny_adapter('bert')}",
                   "--forms", "merged,hotswap", "--out", out)
    _kill_when(command, lambda: _staged_graphs(tmp_path, ".bundle.tmp-"))
    assert not out.exists()  # nothing half-written at the bundle path
    assert any(".tmp-" in name for name in _leftovers(tmp_path))  # the killed run's staging is still there

    assert subprocess.run(command, env=_env(), capture_output=True).returncode == 0
    assert _leftovers(tmp_path) == []  # the second run removed the dead run's staging
    _verify(out, capsys, ["merged.fp32", "hotswap.fp32"])


def test_quantize_killed_mid_way_then_run_again(tmp_path_factory, tiny_model, tiny_adapter, tmp_path, capsys):
    bundle = shutil.copytree(tiny_bundle(tmp_path_factory, tiny_model, tiny_adapter, "bert"), tmp_path / "bundle")
    before = (bundle / "manifest.json").read_text()
    command = _cli("quantize", bundle, "--precisions", "int8-dynamic,int4")
    _kill_when(command, lambda: _staged_graphs(bundle / "onnx", ".quantize.tmp-"))
    assert (bundle / "manifest.json").read_text() == before  # the manifest never lists a graph half made

    assert subprocess.run(command, env=_env(), capture_output=True).returncode == 0
    assert _leftovers(bundle / "onnx") == [] and _leftovers(tmp_path) == []
    _verify(bundle, capsys, ["merged.int8-dynamic", "branched.int4", "hotswap.int8-dynamic"])
