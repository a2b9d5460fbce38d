"""Write tiny GGUF files for tests with gguf-py's GGUFWriter, the way llama.cpp's converter lays them out.

A tiny random llama (byte-level BPE vocabulary of 256 bytes + ChatML control
tokens) is saved both as a Hugging Face directory and as an F32 GGUF, so a test
can compare the conversion against the original weights exactly. Q and K
projections are stored with llama.cpp's row permutation, as real GGUF files
are; transformers undoes it on load.
"""

from __future__ import annotations

from pathlib import Path

MERGES = ["Ġ t", "h e"]
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def byte_vocab() -> list[str]:
    """The 256 byte-level symbols (GPT-2 spelling), two merged tokens, then the ChatML control tokens."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return [bytes_to_unicode()[b] for b in range(256)] + [m.replace(" ", "") for m in MERGES] + SPECIALS


def tiny_llama(directory: Path, vocab_size: int, seed: int = 7):
    """A tiny random LlamaForCausalLM (untied head) saved to ``directory``; returns the model."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         rms_norm_eps=1e-5, bos_token_id=0, eos_token_id=vocab_size - 1, pad_token_id=0,
                         tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # norms away from 1, so a lost norm weight shows
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(0.1 * torch.randn_like(param))
    model.save_pretrained(directory, safe_serialization=True)
    return model


def _permute(weights, n_head: int):
    """llama.cpp's Q/K row order (convert_hf_to_gguf.LlamaModel.permute)."""
    return weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:]).swapaxes(1, 2) \
        .reshape(weights.shape)


def write_gguf(model, path: Path, architecture: str = "llama", chat_template: str | None = CHATML) -> Path:
    """Write ``model`` (a tiny llama) as an F32 GGUF with a byte-level tokenizer; ``architecture`` is written as is."""
    import gguf

    config = model.config
    tokens = byte_vocab()
    assert len(tokens) == config.vocab_size
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_name("tiny llama")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(float(getattr(config, "rope_theta", None) or config.rope_parameters["rope_theta"]))
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.NORMAL] * (len(tokens) - len(SPECIALS))
                           + [gguf.TokenType.CONTROL] * len(SPECIALS))
    writer.add_token_merges(MERGES)
    writer.add_bos_token_id(config.vocab_size - 3)
    writer.add_eos_token_id(config.vocab_size - 1)
    if chat_template:
        writer.add_chat_template(chat_template)
    names = gguf.TensorNameMap(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    for name, tensor in model.state_dict().items():
        data = tensor.detach().float().numpy().copy()
        if name.endswith("q_proj.weight"):
            data = _permute(data, config.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            data = _permute(data, config.num_key_value_heads)
        writer.add_tensor(names.get_name(name, try_suffixes=(".weight", ".bias")), data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
