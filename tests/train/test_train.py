"""The trainer: PEFT-format output that PEFT loads, honest metrics, determinism, resume, refusals."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch

from lora_edge.core.adapters import AdapterRef, load_reference, read_adapter_config
from lora_edge.core.data import DataFiles, LabelMap, encode_texts, read_examples
from lora_edge.core.errors import BundleError, ConfigError, DataError, TrainingError
from lora_edge.core.choices import Task
from lora_edge.core.models import load_tokenizer
from lora_edge.core.recipe import LoraSpec, TrainSpec
from lora_edge.train.trainer import checkpoint_dir, head_module_names, load_metrics, train_adapter

WORDS = {"positive": ["great", "lovely", "excellent", "happy", "wonderful", "superb"],
         "negative": ["awful", "terrible", "horrible", "sad", "dreadful", "bad"],
         "neutral": ["table", "window", "paper", "street", "number", "minute"]}
FILLERS = ["the", "a", "this", "my", "was", "is", "so", "very", "really", "it"]
FAST = dict(batch_size=8, learning_rate=1e-2, eval_steps=5, warmup=0)


def _toy_rows(rng: random.Random, n: int) -> list[dict]:
    rows = []
    for i in range(n):
        label = list(WORDS)[i % 3]
        words = rng.sample(FILLERS, 3) + [rng.choice(WORDS[label])]
        rng.shuffle(words)
        rows.append({"text": " ".join(words) + f" {i}", "label": label})
    return rows


@pytest.fixture(scope="module")
def toy_data(tmp_path_factory) -> DataFiles:
    """A 3-class keyword task: train/validation/test JSONL files."""
    root = tmp_path_factory.mktemp("toy-data")
    rng = random.Random(0)
    files = {}
    for split, n in (("train", 96), ("validation", 24), ("test", 24)):
        files[split] = root / f"{split}.jsonl"
        files[split].write_text("".join(json.dumps(row) + "\n" for row in _toy_rows(rng, n)))
    return DataFiles(files["train"], files["validation"], files["test"])


def _train(model, data, out, task="seq-cls", lora=None, **spec):
    return train_adapter(model, data, out, task, lora or LoraSpec(rank=4), TrainSpec(**{**FAST, **spec}),
                         progress=False)


def _logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits


@pytest.fixture(scope="module")
def lively_bert(tiny_model, tmp_path_factory) -> Path:
    """The tiny BERT re-initialised with larger weights: its outputs depend on the input.

    (At the usual initializer_range 0.02 a 32-wide random BERT gives nearly the
    same [CLS] vector for every text, so every prediction would be one class.)
    """
    from transformers import AutoConfig, AutoModelForSequenceClassification

    source = tiny_model("bert")
    config = AutoConfig.from_pretrained(str(source))
    config.initializer_range = 0.2
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("lively-bert")
    AutoModelForSequenceClassification.from_config(config).save_pretrained(out)
    load_tokenizer(source).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def bert_run(lively_bert, toy_data, tmp_path_factory):
    """One tiny-BERT training run shared by the output checks below."""
    out = tmp_path_factory.mktemp("bert-run") / "adapter"
    return _train(lively_bert, toy_data, out, max_steps=20), lively_bert


def test_adapter_loads_in_peft_with_the_same_logits(bert_run, toy_data):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    result, model_dir = bert_run
    labels = json.loads((result.out / "label_map.json").read_text())["labels"]
    base = AutoModelForSequenceClassification.from_pretrained(str(model_dir), num_labels=len(labels),
                                                              ignore_mismatched_sizes=True)
    peft_model = PeftModel.from_pretrained(base, str(result.out)).eval()
    reference = load_reference(model_dir, AdapterRef.parse(str(result.out)))
    tokenizer = load_tokenizer(model_dir)
    batch = encode_texts(tokenizer, [ex.text for ex in read_examples(toy_data.test, Task.SEQ_CLS)][:16], 128)
    ours, theirs = _logits(reference, batch), _logits(peft_model, batch)
    assert (ours - theirs).abs().max().item() <= 1e-6
    # the adapter changed the model: the trained head and LoRA layers are in the file
    config = read_adapter_config(result.out)
    assert config["task_type"] == "SEQ_CLS" and "classifier" in config["modules_to_save"]
    assert config["target_modules"] and sorted(config["target_modules"]) == ["query", "value"]


def test_metrics_json_is_honest(bert_run, toy_data):
    """Re-predict the test split with the PyTorch reference: the confusion matrix must match metrics.json."""
    result, model_dir = bert_run
    metrics = load_metrics(result.out)
    labels = LabelMap.load(result.out).labels
    assert metrics["labels"] == list(labels) == sorted(WORDS)
    reference = load_reference(model_dir, AdapterRef.parse(str(result.out)))
    tokenizer = load_tokenizer(model_dir)
    examples = read_examples(toy_data.test, Task.SEQ_CLS)
    predicted = _logits(reference, encode_texts(tokenizer, [ex.text for ex in examples], 128)).argmax(-1).tolist()
    matrix = [[0] * len(labels) for _ in labels]
    for example, guess in zip(examples, predicted):
        matrix[labels.index(example.label)][guess] += 1
    assert metrics["test"]["confusion_matrix"]["matrix"] == matrix
    assert metrics["test"]["accuracy"] == pytest.approx(sum(matrix[i][i] for i in range(3)) / len(examples))
    assert len(set(predicted)) >= 2, "degenerate check: every prediction is one class"
    for split in ("validation", "test"):
        assert {"accuracy", "precision", "recall", "macro_f1", "per_class"} <= set(metrics[split])
    assert metrics["train"]["steps"] == result.global_step == 20
    assert len([e for e in metrics["history"] if "loss" in e]) >= 10  # the curve has points
    assert [e["step"] for e in metrics["history"] if "eval_accuracy" in e] == [5, 10, 15, 20]
    assert DataFiles.from_json(json.loads((result.out / "data.json").read_text())).test == toy_data.test.resolve()


def test_training_plot_is_a_real_chart(bert_run):
    from matplotlib.image import imread

    image = imread(bert_run[0].out / "training.png")
    assert image.shape[0] == 400 and image.shape[1] == 1000
    assert image[..., :3].std() > 0.05  # not a blank canvas


def test_same_seed_same_bytes_other_seed_other_bytes(tiny_model, toy_data, tmp_path):
    model = tiny_model("bert")
    runs = [_train(model, toy_data, tmp_path / name, max_steps=4, seed=seed)
            for name, seed in (("a", 1), ("b", 1), ("c", 2))]
    data = [(run.out / "adapter_model.safetensors").read_bytes() for run in runs]
    assert data[0] == data[1]
    assert data[0] != data[2]


def test_out_exists_refused_then_forced(tiny_model, toy_data, tmp_path):
    out = tmp_path / "adapter"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    with pytest.raises(BundleError, match="already exists"):
        _train(tiny_model("bert"), toy_data, out, max_steps=2)
    assert (out / "keep.txt").exists()
    train_adapter(tiny_model("bert"), toy_data, out, "seq-cls", LoraSpec(rank=2), TrainSpec(max_steps=2, **FAST),
                  force=True, progress=False)
    assert not (out / "keep.txt").exists() and read_adapter_config(out)["r"] == 2


def test_interrupted_run_resumes_to_the_same_adapter(tiny_model, toy_data, tmp_path, monkeypatch):
    from transformers import Trainer

    model = tiny_model("bert")
    straight = _train(model, toy_data, tmp_path / "straight", max_steps=8, eval_steps=2)

    original, calls = Trainer.training_step, {"n": 0}

    def interrupt_at_step_5(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    out = tmp_path / "resumed"
    monkeypatch.setattr(Trainer, "training_step", interrupt_at_step_5)
    with pytest.raises(TrainingError, match="interrupted"):
        _train(model, toy_data, out, max_steps=8, eval_steps=2)
    monkeypatch.setattr(Trainer, "training_step", original)
    assert not out.exists() and (checkpoint_dir(out) / "checkpoint-4").is_dir()

    with pytest.raises(BundleError, match="--resume"):
        _train(model, toy_data, out, max_steps=8, eval_steps=2)
    with pytest.raises(ConfigError, match="lora"):
        train_adapter(model, toy_data, out, "seq-cls", LoraSpec(rank=8), TrainSpec(max_steps=8, **{**FAST, "eval_steps": 2}),
                      resume=True, progress=False)
    resumed = train_adapter(model, toy_data, out, "seq-cls", LoraSpec(rank=4),
                            TrainSpec(max_steps=8, **{**FAST, "eval_steps": 2}), resume=True, progress=False)
    assert resumed.global_step == 8 and not checkpoint_dir(out).exists()
    assert (out / "adapter_model.safetensors").read_bytes() == (straight.out / "adapter_model.safetensors").read_bytes()
    with pytest.raises(TrainingError, match="no checkpoint"):
        train_adapter(model, toy_data, tmp_path / "fresh", "seq-cls", LoraSpec(rank=4), TrainSpec(max_steps=2),
                      resume=True, progress=False)


def test_unknown_target_is_a_config_error(tiny_model, toy_data, tmp_path):
    with pytest.raises(ConfigError) as error:
        _train(tiny_model("bert"), toy_data, tmp_path / "x", lora=LoraSpec(targets="q_proj"), max_steps=1)
    assert "--targets" in str(error.value) and "query" in str(error.value)
    assert not (tmp_path / "x").exists()


def test_evaluation_labels_must_be_known(tiny_model, toy_data, tmp_path):
    test = tmp_path / "test.jsonl"
    test.write_text(toy_data.test.read_text() + json.dumps({"text": "what", "label": "surprised"}) + "\n")
    with pytest.raises(DataError, match="surprised"):
        _train(tiny_model("bert"), DataFiles(toy_data.train, toy_data.validation, test), tmp_path / "x", max_steps=1)


def test_distilbert_head_and_rslora_patterns(tiny_model, toy_data, tmp_path):
    """A two-module head (pre_classifier + classifier) is saved; rsLoRA and rank patterns reach PEFT."""
    lora = LoraSpec(rank=4, alpha=8, targets="auto", rslora=True, rank_pattern={"layer.0.attention.v_lin": 2})
    result = _train(tiny_model("distilbert"), toy_data, tmp_path / "d", lora=lora, max_steps=3)
    config = read_adapter_config(result.out)
    assert config["use_rslora"] and config["rank_pattern"] == {"layer.0.attention.v_lin": 2}
    assert {"pre_classifier", "classifier"} <= set(config["modules_to_save"])
    from safetensors.torch import load_file

    weights = load_file(str(result.out / "adapter_model.safetensors"))
    assert any("pre_classifier" in key for key in weights)
    assert weights["base_model.model.distilbert.transformer.layer.0.attention.v_lin.lora_A.weight"].shape[0] == 2
    assert weights["base_model.model.distilbert.transformer.layer.1.attention.v_lin.lora_A.weight"].shape[0] == 4


def test_head_module_names(tiny_model):
    from transformers import AutoModelForSequenceClassification

    names = {arch: head_module_names(AutoModelForSequenceClassification.from_pretrained(str(tiny_model(arch))))
             for arch in ("bert", "distilbert")}
    assert names == {"bert": ["classifier"], "distilbert": ["pre_classifier", "classifier"]}


def test_pissa_adapter_is_converted_for_the_original_base(lively_bert, toy_data, tmp_path):
    """PiSSA rewrites the base weights while training; the saved adapter must fit the unmodified base."""
    result = _train(lively_bert, toy_data, tmp_path / "p", lora=LoraSpec(rank=2, init="pissa"), max_steps=6)
    assert read_adapter_config(result.out)["r"] == 4  # PEFT's conversion stores the difference at rank 2r
    reference = load_reference(lively_bert, AdapterRef.parse(str(result.out)))
    tokenizer = load_tokenizer(lively_bert)
    examples = read_examples(toy_data.test, Task.SEQ_CLS)
    predicted = _logits(reference, encode_texts(tokenizer, [ex.text for ex in examples], 128)).argmax(-1)
    labels = LabelMap.load(result.out).labels
    truth = torch.tensor([labels.index(ex.label) for ex in examples])
    assert (predicted == truth).float().mean().item() == pytest.approx(result.metrics["test"]["accuracy"])


def test_causal_lm_on_a_text_file(tiny_model, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    corpus = tmp_path / "corpus.txt"
    rng = random.Random(1)
    corpus.write_text("".join(" ".join(rng.choice(FILLERS) for _ in range(8)) + "\n" for _ in range(60)))
    model = tiny_model("llama")
    result = _train(model, DataFiles(corpus), tmp_path / "lm", task="causal-lm", lora=LoraSpec(rank=4, targets="auto"),
                    max_steps=6, learning_rate=5e-3)
    metrics = result.metrics
    assert metrics["labels"] is None and not (result.out / "label_map.json").exists()
    for split in ("validation", "test"):
        assert math.isfinite(metrics[split]["loss"])
        assert metrics[split]["perplexity"] == pytest.approx(math.exp(metrics[split]["loss"]))
    assert read_adapter_config(result.out)["task_type"] == "CAUSAL_LM"
    reference = load_reference(model, AdapterRef.parse(str(result.out)))
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(model)), str(result.out)).eval()
    batch = encode_texts(load_tokenizer(model), ["the very minute it was", "my paper"], 128)
    assert (_logits(reference, batch) - _logits(peft_model, batch)).abs().max().item() <= 1e-6


@pytest.mark.slow
def test_default_intent_adapter_reaches_90_percent(intent_adapter):
    """The shipped task on the default model: >= 90% test accuracy, and metrics.json agrees with a re-check."""
    metrics = load_metrics(intent_adapter)
    assert metrics["test"]["accuracy"] >= 0.90
    assert metrics["test"]["examples"] >= 300 and len(metrics["labels"]) == 15
    reference = load_reference(Path(metrics["model"]["path"]), AdapterRef.parse(str(intent_adapter)))
    tokenizer = load_tokenizer(Path(metrics["model"]["path"]))
    examples = read_examples(DataFiles.from_json(json.loads((intent_adapter / "data.json").read_text())).test,
                             Task.SEQ_CLS)[:48]
    labels = LabelMap.load(intent_adapter).labels
    predicted = _logits(reference, encode_texts(tokenizer, [ex.text for ex in examples], 128)).argmax(-1).tolist()
    correct = sum(labels[p] == ex.label for p, ex in zip(predicted, examples))
    assert correct / len(examples) >= 0.85, "the adapter on disk does not behave like metrics.json says"
    matrix = metrics["test"]["confusion_matrix"]["matrix"]
    assert sum(map(sum, matrix)) == metrics["test"]["examples"]
