"""Tiny random models and adapters, built locally from transformers configs (never downloaded).

Recipes name them as ``model = "tiny:<arch>"`` (e.g. ``tiny:llama``, ``tiny:bert``)
so that a whole export can run in seconds without a model download; the tests
build the same models through the fixtures in ``tests/conftest.py``. Every model
shares the embedded MiniLM's WordPiece tokenizer. Builders are deterministic
(fixed seeds): the same architecture gives the same weights in every process.
"""

from __future__ import annotations

from pathlib import Path

from lora_edge.core.choices import TINY_DECODERS, TINY_ENCODERS, TINY_PREFIX, tiny_arch
from lora_edge.core.cache import default_model_path

VOCAB_SIZE = 30522  # the MiniLM WordPiece vocabulary
TINY_LABELS = ["negative", "neutral", "positive"]
MODEL_SEED = 1234

# Default LoRA targets per architecture (attention projections).
LORA_TARGETS = {
    "bert": ["query", "value"], "roberta": ["query", "value"], "distilbert": ["q_lin", "v_lin"],
    "llama": ["q_proj", "v_proj"], "qwen2": ["q_proj", "v_proj"], "mistral": ["q_proj", "v_proj"],
    "gpt2": ["c_attn"],
}


def tiny_config(arch: str):
    from transformers import (BertConfig, DistilBertConfig, GPT2Config, LlamaConfig, MistralConfig,
                              Qwen2Config, RobertaConfig)

    small = dict(vocab_size=VOCAB_SIZE)
    if arch == "bert":
        return BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                          max_position_embeddings=128, pad_token_id=0, **small)
    if arch == "roberta":
        return RobertaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                             max_position_embeddings=130, pad_token_id=0, bos_token_id=101, eos_token_id=102,
                             **small)
    if arch == "distilbert":
        return DistilBertConfig(dim=32, n_layers=2, n_heads=4, hidden_dim=64, max_position_embeddings=128,
                                pad_token_id=0, **small)
    decoder = dict(bos_token_id=101, eos_token_id=102, pad_token_id=0, **small)
    if arch == "gpt2":
        return GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=128, **decoder)
    common = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128, **decoder)
    if arch == "llama":
        return LlamaConfig(**common)
    if arch == "qwen2":
        return Qwen2Config(**common)
    if arch == "mistral":
        return MistralConfig(sliding_window=None, **common)
    raise ValueError(f"unknown tiny architecture {arch}")


def build_tiny_model(arch: str, directory: Path, labels: list[str] | None = None, head: bool = True,
                     config_overrides: dict | None = None) -> Path:
    """Write a tiny random model of ``arch`` (with tokenizer) to ``directory`` and return it.

    Encoders get a sequence-classification head with ``labels``, or, with
    ``head=False``, no head at all (like the embedded MiniLM), so that training
    creates one sized for its own label set. Decoders always get a causal-LM head.
    ``config_overrides`` sets config attributes (e.g. more layers, for a model deep enough to stamp layers).
    """
    import torch
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    config = tiny_config(arch)
    for name, value in (config_overrides or {}).items():
        setattr(config, name, value)
    torch.manual_seed(MODEL_SEED)
    if arch in TINY_ENCODERS and head:
        labels = labels or TINY_LABELS
        config.num_labels = len(labels)
        config.id2label = dict(enumerate(labels))
        config.label2id = {name: i for i, name in enumerate(labels)}
        model = AutoModelForSequenceClassification.from_config(config)
    elif arch in TINY_ENCODERS:
        model = AutoModel.from_config(config)
    else:
        model = AutoModelForCausalLM.from_config(config)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer = AutoTokenizer.from_pretrained(str(default_model_path()), local_files_only=True)
    if arch in TINY_DECODERS:
        tokenizer.bos_token, tokenizer.eos_token = "[CLS]", "[SEP]"
        tokenizer.padding_side = "left"
    tokenizer.save_pretrained(directory)
    return directory


def build_random_adapter(model_dir: Path, out_dir: Path, arch: str, rank: int = 4, alpha: float = 8.0,
                         seed: int = 0, **lora_kwargs) -> Path:
    """Write a PEFT LoRA adapter with random (non-zero) A and B for the model in ``model_dir``.

    Classification adapters also save the classifier head (``modules_to_save``),
    perturbed so that the head differs from the base model's.
    """
    import torch
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    encoder = arch in TINY_ENCODERS
    loader = AutoModelForSequenceClassification if encoder else AutoModelForCausalLM
    base = loader.from_pretrained(str(model_dir), local_files_only=True)
    head = {"bert": ["classifier"], "roberta": ["classifier"], "distilbert": ["pre_classifier", "classifier"]}
    kwargs = dict(r=rank, lora_alpha=alpha, target_modules=LORA_TARGETS[arch], init_lora_weights=False,
                  task_type=TaskType.SEQ_CLS if encoder else TaskType.CAUSAL_LM,
                  modules_to_save=head.get(arch) if encoder else None, fan_in_fan_out=(arch == "gpt2"))
    kwargs.update(lora_kwargs)
    torch.manual_seed(seed)
    peft_model = get_peft_model(base, LoraConfig(**kwargs))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "modules_to_save" in name:
                param.add_(0.1 * torch.randn_like(param))
    peft_model.save_pretrained(out_dir, safe_serialization=True)
    return out_dir


def is_tiny_spec(model: str) -> bool:
    """True for a ``tiny:<arch>`` model name."""
    return str(model).startswith(TINY_PREFIX)


def ensure_tiny_model(model: str, cache_dir: Path) -> Path:
    """Build the ``tiny:<arch>`` model under ``cache_dir`` once (encoders headless) and return its directory.

    The directory is reused when it already holds a model: builds are deterministic.
    """
    arch = tiny_arch(model)
    directory = Path(cache_dir) / f"tiny-{arch}"
    if not (directory / "config.json").is_file():
        from lora_edge.core.bundle import atomic_directory

        with atomic_directory(directory, force=True, wait=True) as staging:  # parallel builders take turns
            build_tiny_model(arch, staging, head=False)
    return directory
