"""Shared fixtures: tiny random models and adapters, built once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # `pytest -n 2` on 2 cores: one intra-op thread per worker. Two 2-thread workers oversubscribe the
    # cores and torch's spinning OpenMP threads then run some steps 30x slower.
    os.environ.setdefault("OMP_NUM_THREADS", "1")


def _has_cuda_provider() -> bool:
    try:
        import onnxruntime
    except ImportError:
        return False
    return "CUDAExecutionProvider" in onnxruntime.get_available_providers()


def pytest_collection_modifyitems(config, items):
    """Skip GPU tests cleanly where this host has no CUDA provider."""
    if _has_cuda_provider():
        return
    skip = pytest.mark.skip(reason="no CUDAExecutionProvider on this host (needs a GPU and onnxruntime-gpu)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """Factory: ``tiny_model("bert")`` -> directory of a tiny random model, built once per session."""
    from tiny_models import build_tiny_model

    cache: dict[str, Path] = {}

    def make(arch: str) -> Path:
        if arch not in cache:
            cache[arch] = build_tiny_model(arch, tmp_path_factory.mktemp(f"tiny-{arch}"))
        return cache[arch]

    return make


@pytest.fixture(scope="session")
def tiny_adapter(tmp_path_factory, tiny_model):
    """Factory: ``tiny_adapter("bert", rank=4, seed=0, **lora_kwargs)`` -> PEFT adapter directory (cached)."""
    from tiny_models import build_random_adapter

    cache: dict[tuple, Path] = {}

    def make(arch: str, rank: int = 4, alpha: float = 8.0, seed: int = 0, **lora_kwargs) -> Path:
        key = (arch, rank, alpha, seed, tuple(sorted((k, repr(v)) for k, v in lora_kwargs.items())))
        if key not in cache:
            out = tmp_path_factory.mktemp(f"adapter-{arch}-r{rank}")
            cache[key] = build_random_adapter(tiny_model(arch), out, arch, rank, alpha, seed, **lora_kwargs)
        return cache[key]

    return make


@pytest.fixture(scope="session")
def intent_adapter(tmp_path_factory) -> Path:
    """The default model + LoRA r=8 on query,value, trained on the shipped intent task (default schedule).

    Trained once per test run and shared by all pytest-xdist workers: the adapter
    lives in the run's common temp directory and a file lock lets one worker train
    while the others wait for it. Returns the adapter directory (PEFT files,
    label_map.json, data.json with the test split, metrics.json).
    """
    import fcntl

    from lora_edge.core.data import default_intent_files
    from lora_edge.core.recipe import LoraSpec, TrainSpec
    from lora_edge.train.trainer import METRICS_FILE, train_adapter

    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    out = shared / "intent-adapter"
    with open(shared / "intent-adapter.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if not (out / METRICS_FILE).is_file():  # written last, atomically with the rest of the directory
            train_adapter("default", default_intent_files(), out, "seq-cls",
                          LoraSpec(rank=8, targets=["query", "value"]), TrainSpec(), force=True, progress=False)
    return out
