"""Shared fixtures: tiny random models and adapters, built once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


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
