"""One config per stage: CLI options generated from the dataclasses carry their help and default, and validate there."""

from __future__ import annotations

import dataclasses
import enum
import inspect

import click
from click.testing import CliRunner
import pytest

from lora_edge.cli import (CHECK_OPTIONS, EXPORT_OPTIONS, LORA_OPTIONS, MEASURE_OPTIONS, QUANTIZE_OPTIONS,
                           SWEEP_LORA_OPTIONS, TASK_OPTION, TRAIN_OPTIONS, cli, main)
from lora_edge.core.config_fields import click_options, config_field, field_default, format_default
from lora_edge.core.errors import ConfigError

# command -> the generated option sets it carries
GENERATED = {
    "train": [TASK_OPTION, LORA_OPTIONS, TRAIN_OPTIONS],
    "sweep": [TASK_OPTION, SWEEP_LORA_OPTIONS, TRAIN_OPTIONS],
    "export": [EXPORT_OPTIONS],
    "quantize": [QUANTIZE_OPTIONS],
    "profile": [MEASURE_OPTIONS],
    "compare": [MEASURE_OPTIONS],
    "check": [CHECK_OPTIONS],
}


def _params(command: str) -> dict[str, click.Parameter]:
    return {param.name: param for param in cli.commands[command].params}


@pytest.mark.parametrize("command", sorted(GENERATED))
def test_every_generated_option_shows_the_fields_help_and_default(command):
    params = _params(command)
    for options in GENERATED[command]:
        for spec in options.fields:
            param = params[spec.name]
            assert options.option_name(spec.name) in param.opts, (command, spec.name)
            shown = format_default(field_default(spec))
            if isinstance(field_default(spec), bool):
                shown = options.option_name(spec.name).removeprefix("--") if field_default(spec) else None
            expected = spec.metadata["help"]
            if shown is not None and options.show_defaults:
                expected += f"  [default: {shown}]"
            assert param.help == expected, (command, spec.name)
            assert param.default is None  # unset options are left out: the dataclass's default applies


@pytest.mark.parametrize("command", sorted(GENERATED))
def test_no_options_build_the_dataclass_defaults(command, tmp_path):
    args = {"train": ["--out", "o"], "sweep": ["--out", "o"], "export": ["--adapter", "a", "--out", "o"],
            "quantize": ["b"], "profile": ["b", "--device", "d"], "compare": ["b", "--device", "d"],
            "check": ["b"]}[command]
    context = cli.commands[command].make_context(command, args)
    values = dict(context.params)
    for options in GENERATED[command]:
        if options is CHECK_OPTIONS:  # check's options only replace the recorded recipe's values
            assert options.given(values) == {}
            continue
        fixed = {"rank": 1} if options is SWEEP_LORA_OPTIONS else {}
        if options is TASK_OPTION:
            assert options.value(values, "task") == field_default(options.fields[0])
            continue
        built = options.build(values, **fixed)
        assert built == dataclasses.replace(options.spec_class(), **fixed), command


@pytest.mark.parametrize("args, option", [
    (["quantize", "{tmp}", "--block-size", "20"], "--block-size"),
    (["quantize", "{tmp}", "--calib-method", "median"], "--calib-method"),
    (["quantize", "{tmp}", "--calib-size", "0"], "--calib-size"),
    (["quantize", "{tmp}", "--calibration", "{tmp}/none.jsonl"], "--calibration"),
    (["profile", "{tmp}", "--device", "host-cpu", "--runs", "0"], "--runs"),
    (["compare", "{tmp}", "--device", "host-cpu", "--seq", "0"], "--seq"),
    (["export", "--adapter", "a", "--out", "{tmp}/o", "--forms", "merged,folded"], "--forms"),
    (["export", "--adapter", "a", "--out", "{tmp}/o", "--precisions", "int3"], "--precisions"),
    (["export", "--adapter", "a", "--out", "{tmp}/o", "--opset", "-1"], "--opset"),
    (["export", "--adapter", "a", "--out", "{tmp}/o", "--task", "qa"], "--task"),
    (["merge", "--adapter", "a", "--out", "{tmp}/o", "--task", "qa"], "--task"),
    (["train", "--out", "{tmp}/o", "--dropout", "1.5"], "--dropout"),
    (["train", "--out", "{tmp}/o", "--lr", "0"], "--lr"),
    (["train", "--out", "{tmp}/o", "--layers", "1,x"], "--layers"),
    (["train", "--out", "{tmp}/o", "--init", "zeros"], "--init"),
    (["train", "--out", "{tmp}/o", "--task", "qa"], "--task"),
    (["sweep", "--out", "{tmp}/o", "--batch-size", "0"], "--batch-size"),
    (["check", "{tmp}", "--max-examples", "-1"], "--max-examples"),
])
def test_a_bad_value_is_a_config_error_naming_the_option(tmp_path, capsys, args, option):
    with pytest.raises(SystemExit) as exited:
        main([arg.replace("{tmp}", str(tmp_path)) for arg in args])
    err = capsys.readouterr().err
    assert exited.value.code == ConfigError.exit_code, err
    assert err.startswith("error: ") and f"in {option}," in err and err.count("\n") == 1, err
    assert not (tmp_path / "o").exists()


class Colour(str, enum.Enum):
    RED = "red"
    BLUE = "blue"


@dataclasses.dataclass
class Example:
    """A config with one field of each kind the generator handles."""

    count: int = config_field(3, "How many.")
    scale: float = config_field(0.5, "How much.")
    loud: bool = config_field(False, "Shout.")
    checked: bool = config_field(True, "Check the result.")
    colour: Colour = config_field(Colour.RED, "Which colour.")
    names: list[str] = config_field(["a", "b"], "Names.")
    indices: list[int] = config_field([], "Indices.", item=int)
    label: str = config_field("", "A label.", option="--tag")

    def __post_init__(self):
        self.colour = Colour(self.colour)
        if self.count < 0:
            raise ConfigError(f"count must be >= 0, got {self.count}", "example.count", "give 0 or more")


def _run(args: list[str], **kwargs) -> Example:
    options = click_options(Example, **kwargs)
    seen = {}

    @click.command()
    @options
    def command(**values):
        seen["spec"] = options.build(values)
        assert not values  # every generated option was consumed

    result = CliRunner().invoke(command, args, standalone_mode=False, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return seen["spec"]


def test_options_parse_into_typed_fields():
    assert _run([]) == Example()
    spec = _run(["--count", "7", "--scale", "2", "--loud", "--no-checked", "--colour", "blue", "--names", "x, y",
                 "--indices", "4,5", "--tag", "t"])
    assert spec == Example(7, 2.0, True, False, Colour.BLUE, ["x", "y"], [4, 5], "t")
    assert spec.colour is Colour.BLUE


def test_include_exclude_and_rename():
    options = click_options(Example, include=["count", "label"], rename={"count": "--n"})
    assert [options.option_name(f.name) for f in options.fields] == ["--n", "--tag"]
    assert _run(["--n", "2"], include=["count"], rename={"count": "--n"}) == Example(count=2)
    with pytest.raises(ValueError, match="no field"):
        click_options(Example, include=["missing"])


def test_dataclass_validation_names_the_option():
    with pytest.raises(ConfigError) as info:
        _run(["--n", "-1"], include=["count"], rename={"count": "--n"})
    assert info.value.where == "--n" and "count must be >= 0" in info.value.what
    with pytest.raises(ConfigError) as info:
        _run(["--colour", "green"])
    assert info.value.where == "--colour" and "red, blue" in info.value.fix


def test_one_default_for_the_measurement_settings():
    from lora_edge.profile.compare import compare_bundle
    from lora_edge.profile.sweep import rank_latency_rows
    from lora_edge.profile.profiler import profile_bundle
    from lora_edge.core.recipe import MeasureSpec, ProfileSpec

    for function in (profile_bundle, compare_bundle, rank_latency_rows):
        parameters = inspect.signature(function).parameters
        assert not {"batch", "seq", "runs", "warmup"} & set(parameters), function.__name__
        assert parameters["measure"].default is None
    assert ProfileSpec().measure_settings() == MeasureSpec()


def test_a_list_of_choices_lists_the_valid_ones(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["export", "--adapter", "a", "--out", str(tmp_path / "o"), "--forms", "merged,folded"])
    assert "unknown form 'folded', in --forms, use one of: merged, branched, hotswap" in capsys.readouterr().err


def test_typed_choices_print_as_their_values():
    import json

    from lora_edge.core.choices import Form, Precision
    from lora_edge.core.choices import Task

    assert f"{Form.MERGED}.{Precision.INT8_DYNAMIC}" == "merged.int8-dynamic" == ".".join([Form.MERGED, "int8-dynamic"])
    assert str(Task.CAUSAL_LM) == "causal-lm" and Task.CAUSAL_LM == "causal-lm"
    assert json.dumps({"task": Task.SEQ_CLS, "forms": [Form.HOTSWAP]}) == '{"task": "seq-cls", "forms": ["hotswap"]}'
