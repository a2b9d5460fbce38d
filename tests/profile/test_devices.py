"""Device targets: the shipped files load, malformed files name the bad field, settings come out right."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lora_edge.core.choices import Precision
from lora_edge.cli import main
from lora_edge.profile.devices import (PROVIDERS, devices_dir, list_devices, load_device, provider_option_strings)
from lora_edge.core.errors import ConfigError

SHIPPED = ["host-cpu", "jetson-orin", "raspberry-pi-5", "t4-server", "x86-laptop-avx2", "x86-server-avx512"]

VALID = '''name = "board"
description = "a test board"
intra_op_threads = 2
precisions = ["int8-dynamic", "fp32"]

[[providers]]
name = "CPUExecutionProvider"
'''


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "board.toml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("name", SHIPPED)
def test_each_shipped_device_loads_and_converts_to_session_settings(name):
    device = load_device(name)
    assert device.name == name == Path(device.source).stem
    settings = device.session_settings()
    assert [provider for provider, _ in settings.providers] == device.provider_names
    assert all(isinstance(value, str) for _, options in settings.providers for value in options.values())
    assert settings.intra_op_threads == device.intra_op_threads and not settings.allow_fallback
    assert device.precisions and all(isinstance(p, Precision) for p in device.precisions)


def test_shipped_devices_describe_their_hardware():
    assert list_devices() == SHIPPED
    assert "avx512_vnni" in load_device("x86-server-avx512").cpu_features
    laptop = load_device("x86-laptop-avx2")
    assert laptop.intra_op_threads == 4 and "avx512f" not in laptop.cpu_features
    pi = load_device("raspberry-pi-5")
    assert (pi.cpu_arch, pi.intra_op_threads) == ("arm64", 4)
    assert pi.precisions[:2] == [Precision.INT8_DYNAMIC, Precision.INT4]
    orin = load_device("jetson-orin")
    assert orin.provider_names[:2] == ["TensorrtExecutionProvider", "CUDAExecutionProvider"] and orin.uses_gpu
    assert orin.precisions[0] is Precision.FP16
    t4 = load_device("t4-server")
    assert t4.provider_names[0] == "CUDAExecutionProvider"
    assert {Precision.FP16, Precision.INT8_STATIC} <= set(t4.precisions)
    assert not load_device("host-cpu").uses_gpu


def test_devices_directory_at_the_top_level_is_the_packaged_one():
    top_level = Path(__file__).resolve().parents[2] / "devices"
    assert top_level.resolve() == devices_dir().resolve()


def test_device_options_override_the_provider_defaults(tmp_path):
    orin = load_device("jetson-orin")
    trt = dict(orin.session_settings(cache_dir=tmp_path).providers[0][1])
    assert trt["trt_fp16_enable"] == "1"                 # the device's own option, bool as ORT parses it
    assert trt["trt_engine_cache_enable"] == "1"         # registry default
    assert trt["trt_engine_cache_path"] == str(tmp_path)  # filled in: engines never land in the working dir
    assert provider_option_strings({"a": False, "b": 3}) == {"a": "0", "b": "3"}
    cuda = dict(load_device("t4-server").session_settings().providers[0][1])
    assert cuda["device_id"] == "0" and cuda["cudnn_conv_algo_search"] == "HEURISTIC"


def test_a_device_file_given_by_path_loads(tmp_path):
    device = load_device(str(_write(tmp_path, VALID)))
    assert device.name == "board" and device.precisions == [Precision.INT8_DYNAMIC, Precision.FP32]
    assert device.session_settings().providers == [("CPUExecutionProvider", {})]
    shorthand = load_device(str(_write(tmp_path, VALID.replace('"CPUExecutionProvider"', '"cpu"'))))
    assert shorthand.provider_names == ["CPUExecutionProvider"]


@pytest.mark.parametrize("change, field", [
    (('name = "CPUExecutionProvider"', 'name = "NPUExecutionProvider"'), "providers[0].name"),
    (("intra_op_threads = 2", "intra_op_threads = -1"), "intra_op_threads"),
    (("intra_op_threads = 2", 'intra_op_threads = "four"'), "intra_op_threads"),
    (('precisions = ["int8-dynamic", "fp32"]', 'precisions = ["int3"]'), "precisions"),
    (('description = "a test board"', 'descripton = "typo"'), "descripton"),
    (('name = "board"', 'name = "my board!"'), "name"),
    (("intra_op_threads = 2", 'graph_optimization_level = "max"'), "graph_optimization_level"),
    (("intra_op_threads = 2", "latency_budget_ms = -5"), "latency_budget_ms"),
    (("intra_op_threads = 2", 'cpu_arch = "riscv"'), "cpu_arch"),
    (("intra_op_threads = 2", "[tolerances.fp16]\nmax_abs_dif = 0.1\n"), "tolerances.fp16.max_abs_dif"),
    (("intra_op_threads = 2", "[tolerances.int9]\nmax_abs_diff = 0.1\n"), "tolerances.int9"),
    (('[[providers]]\nname = "CPUExecutionProvider"\n', ""), "providers"),
])
def test_malformed_device_file_names_the_field(tmp_path, change, field):
    old, new = change
    text = VALID.replace(old, new)
    if new.startswith("[tolerances"):  # tables go after the top-level keys
        text = VALID.replace(old, "") + "\n" + new
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as error:
        load_device(str(path))
    assert f"{path}: {field}" in error.value.format_message()


def test_malformed_device_file_fails_the_cli_with_one_line(tmp_path, capsys):
    path = _write(tmp_path, VALID.replace("intra_op_threads = 2", "intra_op_threads = -1"))
    with pytest.raises(SystemExit) as exit_info:
        main(["devices", "show", str(path)])
    assert exit_info.value.code == ConfigError.exit_code
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and f"{path}: intra_op_threads" in error
    path.write_text("name = [unclosed")
    with pytest.raises(SystemExit):
        main(["devices", "show", str(path)])
    assert "not valid TOML" in capsys.readouterr().err


def test_unknown_device_lists_the_shipped_ones():
    with pytest.raises(ConfigError, match="use one of: host-cpu, jetson-orin"):
        load_device("pi-zero")
    with pytest.raises(ConfigError, match="does not exist"):
        load_device("missing/board.toml")


def test_devices_cli_list_and_show(capsys):
    main(["devices", "list", "--json"])
    listed = json.loads(capsys.readouterr().out)
    assert [item["name"] for item in listed] == SHIPPED
    main(["devices", "show", "t4-server"])
    shown = capsys.readouterr().out
    assert "CUDAExecutionProvider" in shown and "cudnn_conv_algo_search=HEURISTIC" in shown
    main(["devices", "list"])
    assert "raspberry-pi-5" in capsys.readouterr().out


def test_host_mismatches_name_architecture_and_missing_features():
    pi = load_device("raspberry-pi-5")
    notes = pi.host_mismatches("x86_64", {"avx2", "asimd"})
    assert "the device is arm64, this host is x86_64" in notes[0] and "asimddp" in notes[1]
    assert pi.host_mismatches("aarch64", {"asimd", "asimddp", "fphp", "asimdhp"}) == []


def test_missing_providers_against_a_given_list():
    orin = load_device("jetson-orin")
    assert orin.missing_providers(["CPUExecutionProvider"]) == ["TensorrtExecutionProvider", "CUDAExecutionProvider"]
    assert orin.missing_providers(list(PROVIDERS)) == []
