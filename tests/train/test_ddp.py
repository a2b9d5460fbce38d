"""`torchrun --nproc-per-node 2 -m lora_edge train`: DDP on CPU (gloo), one writer, a loadable adapter."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from lora_edge.core.adapters import AdapterRef, load_reference
from lora_edge.core.data import encode_texts
from lora_edge.core.models import load_tokenizer
from lora_edge.train.trainer import checkpoint_dir, load_metrics


@pytest.mark.slow
def test_torchrun_two_cpu_processes(tiny_model, tmp_path):
    model = tiny_model("bert")
    splits = {}
    for split, n in (("train", 64), ("validation", 12), ("test", 18)):
        splits[split] = tmp_path / f"{split}.jsonl"
        splits[split].write_text("".join(json.dumps({"text": f"{'good' if i % 2 else 'bad'} item {i} {split}",
                                                     "label": "pos" if i % 2 else "neg"}) + "\n" for i in range(n)))
    out = tmp_path / "adapter"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "lora_edge", "train", "--model", str(model), "--data", str(splits["train"]),
               "--validation", str(splits["validation"]), "--test", str(splits["test"]), "--out", str(out),
               "--rank", "2", "--max-steps", "4", "--batch-size", "4", "--quiet", "--json"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    summary = json.loads(run.stdout[run.stdout.index("{"):])  # only rank 0 prints
    assert run.stdout.count('"out"') == 1 and summary["steps"] == 4

    metrics = load_metrics(out)
    assert metrics["train"]["world_size"] == 2
    # 4 steps x 4 examples x 2 ranks = half an epoch of the 64 training examples: the data was sharded
    assert metrics["train"]["epochs"] == pytest.approx(0.5)
    assert metrics["test"]["examples"] == 18 and metrics["validation"]["examples"] == 12  # gathered, no repeats
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no staging left over
    assert not checkpoint_dir(out).exists()

    reference = load_reference(model, AdapterRef.parse(str(out)))
    with torch.no_grad():
        logits = reference(**encode_texts(load_tokenizer(model), ["good item", "bad item"], 128)).logits
    assert logits.shape == (2, 2) and torch.isfinite(logits).all()
