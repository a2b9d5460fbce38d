"""CLI basics: --help lists every command without importing torch; one-line errors with exit codes; --debug."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from lora_edge.cli import cli, main
from lora_edge.core.errors import BundleError, ConfigError, DataError, ModelError

HEAVY_MODULES = ("torch", "transformers", "peft", "onnxruntime", "onnx")

HELP_PROBE = textwrap.dedent("""
    import contextlib, io, json, sys
    import click
    from lora_edge.cli import cli, main

    def run(args):
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            try:
                main(args)
            except SystemExit as exc:
                assert not exc.code, (args, exc.code)
        return out.getvalue()

    top = run(["--help"])
    per_command = {}
    for name, command in cli.commands.items():
        per_command[name] = run([name, "--help"])
        if isinstance(command, click.Group):
            for sub in command.commands:
                per_command[f"{name} {sub}"] = run([name, sub, "--help"])
    print(json.dumps({"top": top, "commands": per_command,
                      "imported": [m for m in %r if m in sys.modules]}))
""" % (HEAVY_MODULES,))


def _exit(args: list[str], capsys) -> tuple[int, str, str]:
    """Run the CLI in-process; return (exit code, stdout, stderr)."""
    with pytest.raises(SystemExit) as exited:
        main(args)
    captured = capsys.readouterr()
    return exited.value.code, captured.out, captured.err


def test_help_lists_every_command_and_imports_no_heavy_module():
    probe = subprocess.run([sys.executable, "-c", HELP_PROBE], capture_output=True, text=True, check=True)
    result = json.loads(probe.stdout)
    assert result["imported"] == [], f"`lora-edge --help` imported {result['imported']}"
    lines = result["top"].splitlines()
    for name in cli.commands:
        line = next((line for line in lines if line.strip().split(" ")[0] == name), None)
        assert line is not None, f"command {name} missing from --help"
        assert len(line.split(None, 1)) == 2, f"command {name} has no one-line description"
    assert set(result["commands"]) >= set(cli.commands)
    assert all("Usage:" in text for text in result["commands"].values())
    assert "Exit codes:" in result["top"] and "DataError" in result["top"]
    for option in ("--rank", "--alpha", "--targets", "--init", "--rslora", "--epochs", "--max-steps", "--lr",
                   "--batch-size", "--grad-accum", "--seed", "--resume", "--data", "--validation", "--test"):
        assert option in result["commands"]["train"], option
    assert "--ranks" in result["commands"]["sweep"]


def test_missing_data_file_is_one_line_exit_3(tmp_path, capsys):
    code, out, err = _exit(["train", "--data", str(tmp_path / "nope.jsonl"), "--out", str(tmp_path / "o")], capsys)
    assert code == DataError.exit_code == 3
    assert err.startswith("error: ") and err.count("\n") == 1 and "nope.jsonl" in err
    assert "Traceback" not in err and not (tmp_path / "o").exists()


def test_bad_row_names_file_and_line(tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "hi", "label": "a"}\n{"text": "yo", "label": "b"}\n{"text": "oops"}\n')
    code, _, err = _exit(["train", "--data", str(data), "--out", str(tmp_path / "o")], capsys)
    assert code == 3 and f"{data}:3" in err and err.count("\n") == 1


@pytest.mark.parametrize("args, code, fragment", [
    (["train", "--epochs", "2", "--max-steps", "5"], ConfigError.exit_code, "--max-steps"),
    (["train", "--rank", "0"], ConfigError.exit_code, "rank"),
    (["train", "--data", "default", "--validation", "v.jsonl"], DataError.exit_code, "--validation"),
    (["sweep", "--ranks", "1,x"], ConfigError.exit_code, "--ranks"),
    (["sweep", "--ranks", "2,2"], ConfigError.exit_code, "--ranks"),
    (["train", "--model", "/no/such/model"], ModelError.exit_code, "/no/such/model"),
])
def test_usage_errors_have_distinct_codes(tmp_path, capsys, args, code, fragment):
    got, _, err = _exit(args + ["--out", str(tmp_path / "o")], capsys)
    assert got == code and err.startswith("error: ") and fragment in err and err.count("\n") == 1


def test_existing_out_is_refused(tmp_path, capsys):
    (tmp_path / "o").mkdir()
    code, _, err = _exit(["train", "--out", str(tmp_path / "o")], capsys)
    assert code == BundleError.exit_code and "--force" in err


def test_train_json_output(tiny_model, tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": f"word{i % 7} thing {i}", "label": "ab"[i % 2]}) + "\n"
                            for i in range(40)))
    main(["train", "--model", str(tiny_model("bert")), "--data", str(data), "--out", str(tmp_path / "o"),
          "--rank", "2", "--max-steps", "2", "--batch-size", "8", "--quiet", "--json"])
    summary = json.loads(capsys.readouterr().out)
    assert summary["steps"] == 2 and summary["out"] == str(tmp_path / "o")
    assert 0 <= summary["test_accuracy"] <= 1 and summary["adapter_bytes"] == (tmp_path / "o" /
                                                                              "adapter_model.safetensors").stat().st_size


def test_debug_shows_the_traceback(tmp_path):
    args = ["train", "--data", str(tmp_path / "nope.jsonl"), "--out", str(tmp_path / "o")]
    plain = subprocess.run([sys.executable, "-m", "lora_edge", *args], capture_output=True, text=True)
    debug = subprocess.run([sys.executable, "-m", "lora_edge", "--debug", *args], capture_output=True, text=True)
    assert plain.returncode == 3 and "Traceback" not in plain.stderr
    assert debug.returncode != 0 and "Traceback" in debug.stderr and "DataError" in debug.stderr
