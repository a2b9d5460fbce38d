"""Recipes: the shipped TOML files load; a bad field is named with its file and dotted path; thresholds merge."""

from __future__ import annotations

from pathlib import Path

import pytest

from lora_edge.core import toml_compat
from lora_edge.core.errors import ConfigError
from lora_edge.core.recipe import (DEFAULT_THRESHOLDS, CheckSpec, Recipe, Thresholds, list_recipes, load_recipe,
                              recipe_from_dict, recipes_dir, resolve_thresholds)

MINIMAL = """
name = "job"
model = "tiny:bert"

[[adapters]]
name = "intent"
[adapters.training]
data = "intent"
[adapters.training.lora]
rank = 4
[adapters.training.train]
max_steps = 10

[export]
forms = ["merged", "hotswap"]
precisions = ["int4", "fp32"]

[check.thresholds.int4]
top1_agreement = 0.9
"""


def load_text(text: str, source: str = "export/job.toml") -> Recipe:
    return recipe_from_dict(toml_compat.loads(text), source)


def test_minimal_recipe_fills_defaults_and_orders_precisions():
    recipe = load_text(MINIMAL)
    assert recipe.adapters[0].training.lora.rank == 4
    assert recipe.adapters[0].training.train.max_steps == 10
    assert recipe.export.precisions == ["fp32", "int4"]  # fp32 first: the others are made from it
    assert recipe.export.quantized_precisions == ["int4"]
    assert recipe.bundle_dir == Path("runs") / "job"
    # The recipe's thresholds override only the metric they name.
    int4 = recipe.check.thresholds_for("int4")
    assert int4.top1_agreement == 0.9
    assert int4.max_abs_diff == DEFAULT_THRESHOLDS["int4"].max_abs_diff
    assert recipe.to_json()["check"]["thresholds"] == {"int4": {"top1_agreement": 0.9}}


@pytest.mark.parametrize("old, new, where", [
    ("top1_agreement = 0.9", "top1_agreement = 1.5", "export/job.toml: check.thresholds.int4.top1_agreement"),
    ("top1_agreement = 0.9", "top1 = 0.9", "export/job.toml: check.thresholds.int4.top1"),
    ("[check.thresholds.int4]", "[check.thresholds.int5]", "export/job.toml: check.thresholds.int5"),
    ("rank = 4", "rank = 0", "export/job.toml: adapters[0].training.lora.rank"),
    ("rank = 4", 'rank = "four"', "export/job.toml: adapters[0].training.lora.rank"),
    ("max_steps = 10", "max_steps = 10\nlearning_rate = -1.0", "export/job.toml: adapters[0].training.train.learning_rate"),
    ('data = "intent"', 'data = "intent"\nbogus = 1', "export/job.toml: adapters[0].training.bogus"),
    ('precisions = ["int4", "fp32"]', 'precisions = ["int3"]', "export/job.toml: export.precisions"),
    ('forms = ["merged", "hotswap"]', 'forms = ["folded"]', "export/job.toml: export.forms"),
    ('model = "tiny:bert"', 'model = "tiny:bort"', "export/job.toml: model"),
    ('name = "job"', 'name = "a job"', "export/job.toml: name"),
    ('name = "job"', 'name = "job"\ntask = "translation"', "export/job.toml: task"),
    ('name = "intent"', 'name = "intent"\npath = "somewhere"', "export/job.toml: adapters[0].path"),
    ("[export]", "[export]\nblock_size = 20", "export/job.toml: export.block_size"),
    ("[export]", "[profile]\nruns = 0\n[export]", "export/job.toml: profile.runs"),
])
def test_bad_field_is_named_with_file_and_dotted_path(old, new, where):
    assert old in MINIMAL
    with pytest.raises(ConfigError) as info:
        load_text(MINIMAL.replace(old, new, 1))
    assert info.value.where == where
    assert info.value.fix  # every error says how to fix it


def test_load_recipe_reports_missing_file_and_bad_toml(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_recipe(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("name = \n")
    with pytest.raises(ConfigError, match="not valid TOML") as info:
        load_recipe(bad)
    assert str(bad) in info.value.where


def test_threshold_precedence_defaults_then_device_then_recipe():
    device = ({"int8-dynamic": {"max_abs_diff": 3.0, "cosine": 0.5}}, "devices/x.toml: tolerances")
    recipe = ({"int8-dynamic": {"cosine": 0.9, "accuracy_drop": False}}, "check.thresholds")
    merged = resolve_thresholds("int8-dynamic", device, recipe)
    assert merged.max_abs_diff == 3.0  # from the device
    assert merged.cosine == 0.9  # the recipe has the last word
    assert merged.accuracy_drop is None  # false turns a gate off
    assert merged.top1_agreement == DEFAULT_THRESHOLDS["int8-dynamic"].top1_agreement
    with pytest.raises(ConfigError) as info:
        resolve_thresholds("int4", ({"int4": {"cosine": "high"}}, "devices/x.toml: tolerances"))
    assert info.value.where == "devices/x.toml: tolerances.int4.cosine"


def test_defaults_get_looser_as_precision_drops():
    order = ["fp32", "fp16", "int8-dynamic", "int4"]
    for tighter, looser in zip(order, order[1:]):
        a, b = DEFAULT_THRESHOLDS[tighter], DEFAULT_THRESHOLDS[looser]
        assert a.max_abs_diff <= b.max_abs_diff and a.mean_abs_diff <= b.mean_abs_diff
        assert a.cosine >= b.cosine and a.top1_agreement >= b.top1_agreement
        assert a.accuracy_drop <= b.accuracy_drop
    assert Thresholds.bound("cosine") == "min" and Thresholds.bound("max_abs_diff") == "max"


def test_check_spec_validates_its_own_fields():
    with pytest.raises(ConfigError) as info:
        CheckSpec(batch_size=0)
    assert info.value.where == "check.batch_size"


@pytest.mark.parametrize("name", ["demo", "tiny-bert", "tiny-llama", "smollm2-commands"])
def test_shipped_recipes_load(name):
    assert name in list_recipes()
    recipe = load_recipe(name)
    assert recipe.source == str(recipes_dir() / f"{name}.toml")
    assert recipe.adapters and recipe.export.forms
    # The shipped recipes also load through the top-level export/ link.
    top_level = Path(__file__).resolve().parents[2] / "export" / f"{name}.toml"
    assert load_recipe(top_level).to_json() == {**recipe.to_json(), "source": str(top_level)}


def test_toml_reading_falls_back_to_tomli_where_tomllib_is_missing(monkeypatch, tmp_path):
    """Python 3.10 has no tomllib: devices and recipes must still load (through tomli)."""
    import importlib
    import sys

    pytest.importorskip("tomli")
    from lora_edge.profile.devices import list_devices, load_device

    monkeypatch.setitem(sys.modules, "tomllib", None)  # `import tomllib` now raises ModuleNotFoundError
    try:
        importlib.reload(toml_compat)
        assert toml_compat.PARSER == "tomli"
        assert load_device(list_devices()[0]).name == list_devices()[0]
        from lora_edge.profile.devices import load_device_file

        (tmp_path / "bad.toml").write_text("[broken")
        with pytest.raises(ConfigError, match="not valid TOML"):
            load_device_file(tmp_path / "bad.toml")
    finally:
        monkeypatch.delitem(sys.modules, "tomllib")
        importlib.reload(toml_compat)
    assert toml_compat.PARSER == "tomllib"


def test_training_block_takes_the_shipped_commands_task():
    from lora_edge.core.data import command_files
    from lora_edge.core.recipe import TrainingSpec

    from lora_edge.pipeline.runner import training_data_files

    assert training_data_files(TrainingSpec(data="commands")).files == command_files().files
    recipe = load_recipe("smollm2-commands")
    assert recipe.task == "causal-lm" and recipe.adapters[0].training.data == "commands"


def test_lora_layers_put_adapters_in_those_blocks_only(tiny_model):
    """``layers`` becomes PEFT's layers_to_transform: the named blocks get LoRA, the others none."""
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import AutoModelForCausalLM

    from lora_edge.core.recipe import LoraSpec
    from lora_edge.train.trainer import resolve_lora

    base = AutoModelForCausalLM.from_pretrained(tiny_model("llama"))
    kwargs = resolve_lora(LoraSpec(rank=2, targets=["q_proj", "down_proj"], layers=[1]), base.config.model_type)
    model = get_peft_model(base, LoraConfig(task_type=TaskType.CAUSAL_LM, **kwargs))
    adapted = sorted(name.split(".layers.")[1].rsplit(".lora_A", 1)[0] for name, _ in model.named_modules()
                     if name.endswith("lora_A.default"))
    assert adapted == ["1.mlp.down_proj", "1.self_attn.q_proj"]
    assert LoraSpec().peft_config_kwargs()["layers_to_transform"] is None  # default: every block


@pytest.mark.parametrize("layers", [[-1], ["top"], 3])
def test_lora_layers_must_be_block_indices(layers):
    from lora_edge.core.recipe import LoraSpec

    with pytest.raises(ConfigError) as info:
        LoraSpec(layers=layers)
    assert info.value.where == "lora.layers"
