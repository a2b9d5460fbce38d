"""Merge / branch / unmerge at the torch level: the math against the adapter file, and the forward against PEFT."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from export_helpers import ADAPTER_NAME, TEST_BATCHES, feeds_for, labeled_adapter, torch_logits
from lora_edge.core.adapters import AdapterRef, load_reference, read_adapter_config
from lora_reference import lora_scaling
from lora_edge.core.errors import AdapterMismatchError
from lora_edge.export.merge import (PEFT_PREFIX, LoraBranch, branch_adapter, count_branches, lora_pairs, merge_adapter,
                             unmerge_adapter)
from lora_edge.core.choices import Task
from lora_edge.core.models import load_base_model, load_tokenizer


def _reference(model_dir, adapter_dir, task=None):
    return load_reference(model_dir, AdapterRef("a", adapter_dir), task)


def _expected_weights(model_dir, adapter_dir, task, transpose=False):
    """W + s·B·A per targeted module, computed independently from the files and lora_scaling()."""
    config = read_adapter_config(adapter_dir)
    tensors = load_file(str(adapter_dir / "adapter_model.safetensors"))
    base = load_base_model(model_dir, task, labels=["a", "b", "c"] if task is Task.SEQ_CLS else None)
    expected = {}
    for key, lora_A in tensors.items():
        if ".lora_A." not in key:
            continue
        module = key.removeprefix(PEFT_PREFIX).split(".lora_A.")[0]
        lora_B = tensors[key.replace("lora_A", "lora_B")]
        _, scale = lora_scaling(config, module)
        delta = scale * (lora_B.double() @ lora_A.double())
        weight = base.get_submodule(module).weight.detach().double()
        expected[module] = (weight + (delta.T if transpose else delta), scale)
    return expected


def test_forms_match_peft_and_leave_the_reference_untouched(tiny_model, tiny_adapter):
    reference = _reference(tiny_model("bert"), tiny_adapter("bert"))
    tokenizer = load_tokenizer(tiny_model("bert"))
    names = ["input_ids", "attention_mask", "token_type_ids"]
    before = [torch_logits(reference, feeds_for(tokenizer, texts, names)) for texts in TEST_BATCHES]
    merged, branched = merge_adapter(reference), branch_adapter(reference)
    for texts, want in zip(TEST_BATCHES, before):
        feeds = feeds_for(tokenizer, texts, names)
        assert abs(torch_logits(merged, feeds) - want).max() <= 1e-5
        assert abs(torch_logits(branched, feeds) - want).max() <= 1e-5
        assert abs(torch_logits(reference, feeds) - want).max() == 0.0, "the reference must not change"
    assert not any("lora" in name for name, _ in merged.named_parameters())
    assert count_branches(branched) == len(lora_pairs(reference)) == 4


def test_merge_math_with_rslora_and_rank_alpha_patterns(tiny_model, tiny_adapter):
    adapter = tiny_adapter("bert", rank=4, alpha=8.0, seed=5, use_rslora=True,
                           rank_pattern={"value": 2}, alpha_pattern={"query": 3.0})
    reference = _reference(tiny_model("bert"), adapter)
    expected = _expected_weights(tiny_model("bert"), adapter, Task.SEQ_CLS)
    scales = {module.rsplit(".", 1)[-1]: scale for module, (_, scale) in expected.items()}
    assert scales == pytest.approx({"query": 3.0 / 4 ** 0.5, "value": 8.0 / 2 ** 0.5}), "patterns and rsLoRA apply"
    pairs = {pair.module: pair for pair in lora_pairs(reference)}
    merged = merge_adapter(reference)
    for module, (weight, scale) in expected.items():
        assert pairs[module].scale == pytest.approx(scale)
        assert pairs[module].rank == (2 if module.endswith("value") else 4)
        assert (merged.get_submodule(module).weight.double() - weight).abs().max() <= 1e-6
    tokenizer = load_tokenizer(tiny_model("bert"))
    feeds = feeds_for(tokenizer, TEST_BATCHES[2], ["input_ids", "attention_mask", "token_type_ids"])
    assert abs(torch_logits(merged, feeds) - torch_logits(reference, feeds)).max() <= 1e-5


def test_gpt2_conv1d_merge_branch_and_unmerge(tiny_model, tiny_adapter):
    model_dir, adapter = tiny_model("gpt2"), tiny_adapter("gpt2")
    reference = _reference(model_dir, adapter, Task.CAUSAL_LM)
    expected = _expected_weights(model_dir, adapter, Task.CAUSAL_LM, transpose=True)
    merged, branched = merge_adapter(reference), branch_adapter(reference)
    for module, (weight, _) in expected.items():
        assert weight.shape == (32, 96), "Conv1D stores its weight [in, out]"
        assert (merged.get_submodule(module).weight.double() - weight).abs().max() <= 1e-6
    ids = torch.tensor([[101, 2023, 2003, 1037, 3231, 102], [101, 7592, 2088, 999, 102, 0]])
    mask = (ids != 0).long()
    with torch.no_grad():
        want = reference(input_ids=ids, attention_mask=mask).logits
        assert (merged(input_ids=ids, attention_mask=mask).logits - want).abs().max() <= 1e-5
        assert (branched(input_ids=ids, attention_mask=mask).logits - want).abs().max() <= 1e-5
    assert count_branches(branched) == 2
    base = load_base_model(model_dir, Task.CAUSAL_LM).state_dict()
    restored = unmerge_adapter(merged, reference).state_dict()
    assert max((restored[k] - base[k]).abs().max().item() for k in base) <= 1e-6


def test_unmerge_restores_weights_and_heads(tiny_model, tiny_adapter):
    reference = _reference(tiny_model("distilbert"), tiny_adapter("distilbert"))
    base = load_base_model(tiny_model("distilbert"), Task.SEQ_CLS, labels=["a", "b", "c"]).state_dict()
    merged = merge_adapter(reference)
    changed = merged.state_dict()
    assert (changed["classifier.weight"] - base["classifier.weight"]).abs().max() > 1e-3, "adapter head in use"
    restored = unmerge_adapter(merged, reference).state_dict()
    assert max((restored[k] - base[k]).abs().max().item() for k in base) <= 1e-6


def test_branch_stores_transposed_factors_with_scale_in_b(tiny_model, tiny_adapter):
    adapter = tiny_adapter("bert")
    reference = _reference(tiny_model("bert"), adapter)
    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    branch = branch_adapter(reference).get_submodule("bert.encoder.layer.1.attention.self.value")
    assert isinstance(branch, LoraBranch) and branch.rank == 4
    key = f"{PEFT_PREFIX}bert.encoder.layer.1.attention.self.value"
    assert torch.equal(branch.lora_A, tensors[f"{key}.lora_A.weight"].T)
    assert torch.allclose(branch.lora_B, 2.0 * tensors[f"{key}.lora_B.weight"].T)  # alpha 8 / r 4


def test_lora_bias_is_refused(tiny_model, tiny_adapter):
    reference = _reference(tiny_model("bert"), tiny_adapter("bert", seed=2, lora_bias=True))
    with pytest.raises(AdapterMismatchError, match="lora_bias"):
        merge_adapter(reference)


def test_merge_cli_writes_a_loadable_hf_model(tiny_model, tiny_adapter, tmp_path, capsys):
    from transformers import AutoModelForSequenceClassification

    from lora_edge.cli import main

    import json
    import shutil

    adapter = labeled_adapter(tiny_adapter("roberta"), tmp_path / ADAPTER_NAME)
    base = shutil.copytree(tiny_model("roberta"), tmp_path / "base")  # a base that pads to a fixed length, as MiniLM
    tokenizer_json = json.loads((base / "tokenizer.json").read_text())
    tokenizer_json["padding"] = {"strategy": {"Fixed": 128}, "direction": "Right", "pad_to_multiple_of": None,
                                 "pad_id": 1, "pad_type_id": 0, "pad_token": "<pad>"}
    (base / "tokenizer.json").write_text(json.dumps(tokenizer_json))
    out = tmp_path / "merged"
    main(["merge", "--model", str(base), "--adapter", str(adapter), "--out", str(out)])
    assert (out / "model.safetensors").is_file() and not (out / "adapter_config.json").exists()
    assert json.loads((out / "tokenizer.json").read_text())["padding"] is None  # no fixed padding in the copy
    merged = AutoModelForSequenceClassification.from_pretrained(str(out), local_files_only=True).eval()
    assert [merged.config.id2label[i] for i in range(3)] == ["negative", "neutral", "positive"]
    reference = _reference(tiny_model("roberta"), adapter)
    feeds = feeds_for(load_tokenizer(out), TEST_BATCHES[1], ["input_ids", "attention_mask"])
    assert abs(torch_logits(merged, feeds) - torch_logits(reference, feeds)).max() <= 1e-5
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(["merge", "--model", str(tiny_model("roberta")), "--adapter", str(adapter), "--out", str(out)])
    assert exit_info.value.code == 9
    err = capsys.readouterr().err
    assert [line for line in err.splitlines() if line.startswith("error: ")] == [err.strip().splitlines()[-1]]
    assert "--force" in err and "Traceback" not in err and "Loading weights" not in err, "fails before loading"
