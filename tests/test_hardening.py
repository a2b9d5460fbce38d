"""Bad input is refused with a one-line error of its kind (never exit 70), and staging never outlives its writer."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cli_runner import exit_code_of
from export_helpers import tiny_bundle
from lora_edge.core.bundle import (atomic_directory, atomic_file, bundle_lock, host_tag, remove_stale_staging,
                              require_writable_file_path)
from lora_edge.core.errors import AdapterMismatchError, BundleError, ConfigError, DataError, LoraEdgeError


@pytest.fixture(scope="module")
def bundle(tmp_path_factory, tiny_model, tiny_adapter):
    return tiny_bundle(tmp_path_factory, tiny_model, tiny_adapter, "bert")


@pytest.fixture
def copy(bundle, tmp_path):
    """A private copy of the shared bundle, to break."""
    target = tmp_path / "bundle"
    shutil.copytree(bundle, target)
    return target


def _refused(capsys, code: int, *args: str) -> str:
    """Run the CLI, expect exit ``code`` and one `error:` line without a traceback; return stderr."""
    assert exit_code_of(*map(str, args)) == code
    err = capsys.readouterr().err
    assert "error: " in err and "Traceback" not in err and "internal error" not in err
    return err


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


# --- the classes issue 13 names -------------------------------------------------------------------------------

def test_corrupt_graph_is_a_bundle_error_naming_the_file(copy, capsys):
    graph = copy / "onnx" / "merged.fp32.onnx"
    graph.write_bytes(b"\x08\x07not a protobuf" * 20)
    err = _refused(capsys, BundleError.exit_code, "infer", copy, "--text", "hi")
    assert str(graph) in err
    err = _refused(capsys, BundleError.exit_code, "quantize", copy, "--precisions", "int8-dynamic")
    assert str(graph) in err and not list((copy / "onnx").glob("*int8*"))


def test_missing_graph_file_is_a_bundle_error(copy, capsys):
    (copy / "onnx" / "merged.fp32.onnx").unlink()
    assert "graph file is missing" in _refused(capsys, BundleError.exit_code, "infer", copy, "--text", "hi")


def test_corrupt_onnx_adapter_is_a_bundle_error_naming_the_file(copy, capsys):
    adapter_file = next((copy / "onnx" / "adapters").glob("*.onnx_adapter"))
    adapter_file.write_bytes(b"garbage" * 30)
    err = _refused(capsys, BundleError.exit_code, "infer", copy, "--graph", "hotswap.fp32", "--adapter",
                   adapter_file.stem, "--text", "hi")
    assert str(adapter_file) in err


@pytest.mark.parametrize("manifest", ["[]", '{"graphs": {"a": 1}}', '{"graphs": [{"name": "x"}]}', "\udcff"])
def test_malformed_manifest_is_a_bundle_error(copy, capsys, manifest):
    (copy / "manifest.json").write_text(manifest, errors="surrogateescape")
    _refused(capsys, BundleError.exit_code, "infer", copy, "--text", "hi")


def test_junit_path_under_a_file_is_refused_before_the_gate(copy, tmp_path, capsys):
    regular = tmp_path / "regular"
    regular.write_text("x")
    err = _refused(capsys, ConfigError.exit_code, "check", copy, "--junit", regular / "check.xml")
    assert "--junit" in err and not (copy / "reports").exists()


@pytest.mark.parametrize("opset", ["7", "17", "24", "99"])
def test_an_opset_the_exporter_cannot_honour_is_refused(tiny_model, tiny_adapter, tmp_path, capsys, opset):
    out = tmp_path / "out"
    err = _refused(capsys, ConfigError.exit_code, "export", "--model", tiny_model("bert"), "--adapter",
                   tiny_adapter("bert"), "--forms", "merged", "--opset", opset, "--out", out)
    assert "--opset" in err and not out.exists()


def test_evaluation_labels_outside_the_label_map_are_a_data_error(copy, tmp_path, capsys):
    data = tmp_path / "eval.jsonl"
    data.write_text("".join(json.dumps({"text": f"text {i}", "label": "not-a-label"}) + "\n" for i in range(4)))
    err = _refused(capsys, DataError.exit_code, "check", copy, "--data", data)
    assert "not-a-label" in err


def test_causal_lm_on_an_encoder_only_model_is_refused(tiny_model, tmp_path, capsys):
    data = tmp_path / "lm.txt"
    data.write_text("".join(f"some text number {i} to continue\n" for i in range(30)))
    out = tmp_path / "out"
    err = _refused(capsys, ConfigError.exit_code, "train", "--model", tiny_model("bert"), "--data", data, "--task",
                   "causal-lm", "--max-steps", "1", "--quiet", "--out", out)
    assert "encoder-only" in err and not out.exists()


def test_require_task_support_accepts_what_models_can_do(tiny_model):
    from lora_edge.core.model_tasks import require_task_support

    require_task_support(tiny_model("bert"), "seq-cls")
    require_task_support(tiny_model("llama"), "causal-lm")
    require_task_support(tiny_model("llama"), "seq-cls")


# --- siblings found by the corpus ---------------------------------------------------------------------------------

@pytest.mark.parametrize("command", ["export", "merge"])
def test_out_under_a_regular_file_is_a_config_error(command, tiny_model, tiny_adapter, tmp_path, capsys):
    regular = tmp_path / "regular"
    regular.write_text("x")
    extra = ["--forms", "merged"] if command == "export" else []
    _refused(capsys, ConfigError.exit_code, command, "--model", tiny_model("bert"), "--adapter",
             tiny_adapter("bert"), *extra, "--out", regular / "out")


@pytest.mark.parametrize("config", ["[1, 2]", '{"r": "8", "lora_alpha": 16}', '{"r": 0, "lora_alpha": 16}',
                                    '{"r": 4, "lora_alpha": 8, "rank_pattern": {"(": 2}}',
                                    '{"r": 4, "lora_alpha": 8, "task_type": ["SEQ_CLS"]}'])
def test_adapter_config_with_wrong_types_is_refused(tiny_adapter, tmp_path, config):
    from lora_edge.core.adapters import adapter_task, read_adapter_config

    adapter = shutil.copytree(tiny_adapter("bert"), tmp_path / "adapter")
    (adapter / "adapter_config.json").write_text(config)
    with pytest.raises(AdapterMismatchError):
        adapter_task(read_adapter_config(adapter), adapter)


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".toml"])
def test_files_that_are_not_utf8_are_refused(tmp_path, suffix):
    from lora_edge.core.data import read_examples
    from lora_edge.profile.devices import load_device_file
    from lora_edge.core.choices import Task
    from lora_edge.core.recipe import load_recipe

    path = tmp_path / f"bad{suffix}"
    path.write_bytes(b"text,label\n\xff\xfe\x80,a\n")
    load = (lambda: read_examples(path, Task.SEQ_CLS)) if suffix != ".toml" else (lambda: load_recipe(path))
    with pytest.raises(LoraEdgeError):
        load()
    if suffix == ".toml":
        with pytest.raises(ConfigError):
            load_device_file(path)


def test_json_commands_report_errors_as_json_on_stdout(bundle, capsys):
    assert exit_code_of("infer", str(bundle), "--graph", "nope", "--text", "hi", "--json") == BundleError.exit_code
    captured = capsys.readouterr()
    payload = json.loads(captured.out)
    assert payload["code"] == BundleError.exit_code and "nope" in payload["error"]
    assert payload["type"] == "BundleError" and captured.err.startswith("error: ")


def test_json_usage_errors_are_json_too(capsys):
    """A malformed command line keeps click's usage code (2), apart from ConfigError, and is JSON too."""
    assert exit_code_of("devices", "show", "--json") == 2
    assert json.loads(capsys.readouterr().out) == {"error": "Missing argument 'NAME'.", "code": 2, "type": "UsageError"}


def test_without_json_stdout_stays_empty_on_error(bundle, capsys):
    assert exit_code_of("infer", str(bundle), "--graph", "nope", "--text", "hi") == BundleError.exit_code
    assert capsys.readouterr().out == ""


# --- staging, locks, modes ----------------------------------------------------------------------------------------

def test_stale_staging_of_dead_processes_is_removed_by_the_next_writer(tmp_path):
    dead, alive, host = _dead_pid(), os.getppid(), host_tag()
    stale_dir = tmp_path / f".bundle.tmp-{dead}.{host}-0a1b2c3d"
    stale_file = tmp_path / f".manifest.json.tmp-{dead}.{host}-deadbeef"
    old_dir = tmp_path / f".bundle.old-{dead}.{host}-0a1b2c3d"
    live_dir = tmp_path / f".bundle.tmp-{alive}.{host}-0a1b2c3d"
    other_host = tmp_path / f".bundle.tmp-{dead}.{'0' * 8 if host != '0' * 8 else '1' * 8}-0a1b2c3d"
    user_dir = tmp_path / ".bundle.tmp-notapid"
    for directory in (stale_dir, old_dir, live_dir, other_host, user_dir):
        directory.mkdir()
        (directory / "graph.onnx").write_text("partial")
    stale_file.write_text("partial")
    with atomic_directory(tmp_path / "bundle") as staging:
        (staging / "manifest.json").write_text("{}")
    assert not stale_dir.exists() and not stale_file.exists() and not old_dir.exists()
    assert live_dir.exists() and user_dir.exists() and other_host.exists()  # live, foreign or not ours: kept
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live_dir.name, other_host.name, user_dir.name,
                                                                 "bundle"])


def test_remove_stale_staging_keeps_this_process_staging(tmp_path):
    mine = tmp_path / f".x.tmp-{os.getpid()}.{host_tag()}-abcd"
    mine.mkdir()
    assert remove_stale_staging(tmp_path) == [] and mine.exists()


def test_a_failed_block_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError), atomic_directory(tmp_path / "bundle"):
        raise RuntimeError("boom")
    with pytest.raises(RuntimeError), atomic_file(tmp_path / "file.json") as staging:
        staging.write_text("partial")
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_a_second_writer_fails_clearly_while_the_first_holds_the_bundle(tmp_path):
    with atomic_directory(tmp_path / "bundle") as staging:
        (staging / "a").write_text("first")
        with pytest.raises(BundleError, match="another lora-edge process"):
            with atomic_directory(tmp_path / "bundle", force=True):
                pass
    assert (tmp_path / "bundle" / "a").read_text() == "first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]  # the lock file went with its holder


def test_a_killed_holder_releases_the_lock(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; sys.path.insert(0, sys.argv[1]);"
                               "from lora_edge.core.bundle import bundle_lock; from pathlib import Path;"
                               "cm = bundle_lock(Path(sys.argv[2])); cm.__enter__(); print('held', flush=True);"
                               "time.sleep(60)", str(Path(__file__).parents[1]), str(tmp_path / "bundle")],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(BundleError):
            with bundle_lock(tmp_path / "bundle"):
                pass
    finally:
        holder.kill()
        holder.wait()
    with bundle_lock(tmp_path / "bundle"):
        pass


def test_written_files_and_directories_get_the_umask_modes(tmp_path):
    previous = os.umask(0o022)
    try:
        with atomic_directory(tmp_path / "bundle") as staging:
            (staging / "reports").mkdir()
        with atomic_file(tmp_path / "bundle" / "manifest.json") as staging:
            staging.write_text("{}")
    finally:
        os.umask(previous)
    assert (tmp_path / "bundle").stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "bundle" / "manifest.json").stat().st_mode & 0o777 == 0o644


def test_require_writable_file_path(tmp_path):
    (tmp_path / "file").write_text("x")
    require_writable_file_path(tmp_path / "new" / "deeper" / "report.xml", "--junit")
    for bad in (tmp_path, tmp_path / "file" / "report.xml"):
        with pytest.raises(ConfigError):
            require_writable_file_path(bad, "--junit")


@pytest.mark.parametrize("variable", ["WORLD_SIZE", "RANK"])
def test_a_junk_torchrun_variable_is_a_config_error(monkeypatch, variable):
    from lora_edge.core.errors import env_int

    monkeypatch.setenv(variable, "two")
    with pytest.raises(ConfigError, match=variable):
        env_int(variable, 0)
    monkeypatch.setenv(variable, "3")
    assert env_int(variable, 0) == 3


def test_a_library_error_becomes_one_line_of_an_error_message():
    from lora_edge.core.errors import first_line

    assert first_line(RuntimeError("\n  bad node 'x'\n  at file.cc:12\n")) == "bad node 'x'"
    assert first_line(RuntimeError("a" * 500), 160) == "a" * 160
    assert first_line(KeyError()) == "KeyError"  # an empty message (str(exc).splitlines()[0] raised IndexError)


@pytest.mark.parametrize("name", ["my adapter", "a.b", "x/y", "", "v1!"])
def test_every_user_given_name_follows_one_rule(name, tmp_path):
    from lora_edge.core.adapters import AdapterRef
    from lora_edge.core.recipe import AdapterSource

    with pytest.raises(ConfigError, match="must be letters, digits, - and _"):
        AdapterRef.parse(f"{name}={tmp_path}" if name else str(tmp_path / "a b"))
    with pytest.raises(ConfigError, match="must be letters, digits, - and _"):
        AdapterSource(path=str(tmp_path / "a b"), name=name)
    assert AdapterRef.parse(f"intent_v-2={tmp_path}").name == "intent_v-2"


def test_quantize_of_a_bundle_being_written_fails_clearly(copy):
    from lora_edge.quantize.quantizer import quantize_bundle

    before = (copy / "manifest.json").read_text()
    with bundle_lock(copy):  # another export/quantize of this bundle is under way
        with pytest.raises(BundleError, match="another lora-edge process"):
            quantize_bundle(copy, ["int8-dynamic"], progress=lambda message: None)
    assert (copy / "manifest.json").read_text() == before
    assert not list((copy / "onnx").glob("*int8*"))


def test_profile_seq_longer_than_the_model_is_refused_up_front(bundle, capsys):
    err = _refused(capsys, ConfigError.exit_code, "profile", bundle, "--device", "host-cpu", "--seq", "100000",
                   "--no-eager", "--graphs", "merged.fp32")
    assert "--seq" in err and "128" in err
