"""CLI conventions: --json and --quiet, bars only on a terminal, a configuration error's own exit code."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cli_runner import exit_code_of

ROOT = Path(__file__).resolve().parents[2]


def _lora_edge(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """Run the CLI in a fresh process, stdout and stderr piped (not a terminal), as CI does."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    for name in ("TQDM_DISABLE", "HF_HUB_DISABLE_PROGRESS_BARS"):
        env.pop(name, None)
    return subprocess.run([sys.executable, "-m", "lora_edge", *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=600)


def test_configuration_errors_and_usage_errors_exit_apart(tmp_path, capsys):
    from lora_edge.core.errors import ConfigError, exit_codes

    codes = list(exit_codes().values())
    assert len(codes) == len(set(codes)) and 2 not in codes  # 2 is click's usage error alone
    assert exit_code_of("infer") == 2  # missing argument
    assert exit_code_of("demo", "--bogus") == 2  # unknown option
    assert exit_code_of("train", "--rank", "0", "--out", str(tmp_path / "o")) == ConfigError.exit_code == 11
    assert "2 command-line usage" in _help()


def _help() -> str:
    from click.testing import CliRunner

    from lora_edge.cli import cli

    return CliRunner().invoke(cli, ["--help"]).output


@pytest.mark.slow
def test_training_progress_is_plain_lines_off_a_terminal(tiny_model, tmp_path):
    """No carriage-return bars in a piped stderr (a CI log), but periodic ``step N: ...`` lines."""
    from lora_edge.core.data import default_intent_files

    data = default_intent_files()
    result = _lora_edge(["train", "--model", str(tiny_model("bert")), "--data", str(data.train), "--validation",
                         str(data.validation), "--test", str(data.test), "--max-steps", "6", "--batch-size", "8",
                         "--rank", "2", "--out", str(tmp_path / "plain")], tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "\r" not in result.stderr
    assert sum(line.startswith("step ") for line in result.stderr.splitlines()) >= 3, result.stderr


def test_export_json_and_quiet(tiny_model, tiny_adapter, tmp_path, capsys):
    from lora_edge.core.manifest import list_graphs

    out = tmp_path / "bundle"
    assert exit_code_of("export", "--model", str(tiny_model("bert")), "--adapter", f"a={tiny_adapter('bert')}",
                        "--forms", "merged", "--out", str(out), "--json", "--quiet") == 0
    captured = capsys.readouterr()
    printed = json.loads(captured.out)
    assert printed["bundle"] == str(out)
    assert [g["name"] for g in printed["graphs"]] == [g.name for g in list_graphs(out)] == ["merged.fp32"]
    assert not [line for line in captured.err.splitlines() if line.startswith(("loading", "exporting", "wrote"))]


def test_merge_json(tiny_model, tiny_adapter, tmp_path, capsys):
    out = tmp_path / "merged"
    assert exit_code_of("merge", "--model", str(tiny_model("bert")), "--adapter", f"a={tiny_adapter('bert')}",
                        "--out", str(out), "--json") == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["out"] == str(out) and (out / "config.json").is_file() and printed["adapter"]["name"] == "a"


@pytest.mark.parametrize("command", [["demo"], ["run", "tiny-bert"]])
def test_demo_and_run_take_json_and_quiet(command, monkeypatch, capsys, tmp_path):
    """The flags reach the pipeline: quiet=True (no progress), and the summary as JSON on stdout."""
    import lora_edge.pipeline.runner as pipeline
    from lora_edge.core.recipe import load_recipe

    seen = {}

    def fake_run_recipe(recipe, out=None, force=False, retrain=False, progress=None, quiet=False):
        seen.update(recipe=recipe, quiet=quiet)
        return pipeline.RunResult(load_recipe("tiny-bert"), tmp_path / "bundle")

    monkeypatch.setattr(pipeline, "run_recipe", fake_run_recipe)
    monkeypatch.setattr("lora_edge.check.gate.gate", lambda report, path: None)
    assert exit_code_of(*command, "--json", "--quiet") == 0
    assert seen["quiet"] is True
    assert json.loads(capsys.readouterr().out)["bundle"] == str(tmp_path / "bundle")
