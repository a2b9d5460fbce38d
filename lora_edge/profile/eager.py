"""Eager PyTorch baselines for the profiler: the PEFT model with the adapter unmerged, and merged.

They answer "what did export buy me": the same inputs, threads and timing
loop as the ONNX graphs, on the PyTorch model a user would otherwise deploy.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from lora_edge.profile.devices import DeviceTarget
from lora_edge.core.errors import LoraEdgeError
from lora_edge.core.manifest import AdapterRecord, GraphRecord, Manifest
from lora_edge.runtime.measure import PeakMemory, latency_stats, time_interleaved
from lora_edge.profile.report import FAILED, NOT_MEASURED, GraphProfile

if TYPE_CHECKING:
    import torch

    from lora_edge.core.adapters import AdapterRef
    from lora_edge.core.choices import Task

EAGER_FORMS = ("unmerged", "merged")


def _adapter_entries(manifest: Manifest, records: list[GraphRecord]) -> list[AdapterRecord]:
    """The adapters the profiled graphs use (each once), else the bundle's first adapter."""
    used = {record.adapter for record in records if record.adapter}
    chosen = [entry for entry in manifest.adapters if entry.name in used]
    return chosen or list(manifest.adapters[:1])


def _inputs(batch: int, seq: int, vocab: int, device: str) -> dict[str, "torch.Tensor"]:
    """Token ids (fixed seed) and a full attention mask; the model's defaults fill the rest."""
    import torch

    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(5, max(6, vocab), (batch, seq), generator=generator)
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device)}


def _torch_device(device: DeviceTarget, allow_fallback: bool) -> tuple[str | None, str | None]:
    """(torch device, fallback note) for a device target; (None, reason) when it cannot run here."""
    import torch

    if not device.uses_gpu:
        return "cpu", None
    if torch.cuda.is_available():
        return "cuda", None
    if allow_fallback:
        return "cpu", "torch has no CUDA on this host; measured on the CPU (--allow-fallback)"
    return None, "torch has no CUDA on this host"


def eager_baselines(bundle: Path, manifest: Manifest, device: DeviceTarget, batch: int, seq: int, runs: int,
                    warmup: int, allow_fallback: bool, records: list[GraphRecord]) -> tuple[list[GraphProfile], dict]:
    """Time the PyTorch reference (unmerged) and its merged copy; also count the model's FLOPs per item.

    Returns (profiles, model facts). A baseline that cannot run (no model
    directory on this host, no CUDA for a GPU device) is reported, not raised.
    """
    import peft  # noqa: F401  imported up front: import costs are not the model's memory
    import torch
    import transformers  # noqa: F401

    from lora_edge.core.adapters import AdapterRef
    from lora_edge.core.choices import Task
    from lora_edge.core.model_source import resolve_model_path
    from lora_edge.core.models import load_config

    entries = _adapter_entries(manifest, records)
    several = len(entries) > 1
    names = {entry.name: [f"pytorch.{entry.name}.{form}" if several else f"pytorch.{form}"
                          for form in EAGER_FORMS] for entry in entries}
    profiles = [GraphProfile(name=name, kind="pytorch", form=form, precision="fp32", adapter=entry.name,
                             providers_requested=["torch"])
                for entry in entries for name, form in zip(names[entry.name], EAGER_FORMS)]
    torch_device, reason = _torch_device(device, allow_fallback)
    if torch_device is None:
        return _not_measured(profiles, reason), {}
    try:
        model_path = resolve_model_path(manifest.model.source())
    except LoraEdgeError as exc:
        return _not_measured(profiles, f"base model not found ({exc.what})"), {}
    task = manifest.model.task
    vocab = int(load_config(model_path).get("vocab_size", 1000))
    inputs = _inputs(batch, seq, vocab, torch_device)
    threads = torch.get_num_threads()
    if device.intra_op_threads:
        torch.set_num_threads(device.intra_op_threads)
    facts: dict = {"task": task.value, "path": str(model_path), "batch": batch, "seq": seq}
    by_name = {profile.name: profile for profile in profiles}
    try:
        runners = {}
        for entry in entries:
            adapter = AdapterRef(entry.name, Path(bundle) / entry.bundle_dir)
            runners.update(_load_runners(model_path, adapter, task, names[entry.name], inputs, torch_device,
                                         by_name, facts))
        times = time_interleaved(runners, runs, warmup)
    except Exception as exc:  # a baseline is context, not the product: record why it is missing
        for profile in profiles:
            if profile.latency_ms is None:
                profile.status, profile.reason = FAILED, f"{exc.__class__.__name__}: {str(exc)[:200]}"
        return profiles, facts
    finally:
        torch.set_num_threads(threads)
    for name, profile in by_name.items():
        profile.latency_ms = latency_stats(times[name])
        profile.throughput = {"items_per_s": batch / (profile.latency_ms["mean"] / 1e3)}
        if task is Task.CAUSAL_LM:
            profile.throughput["tokens_per_s"] = batch * seq / (profile.latency_ms["mean"] / 1e3)
        profile.providers_registered = profile.providers_used = [f"torch-{torch_device}"]
        profile.fallback = reason
    return profiles, facts


def _not_measured(profiles: list[GraphProfile], reason: str) -> list[GraphProfile]:
    for profile in profiles:
        profile.status, profile.reason = NOT_MEASURED, reason
    return profiles


def _load_runners(model_path: Path, adapter: "AdapterRef", task: "Task", names: list[str], inputs: dict,
                  torch_device: str, by_name: dict[str, GraphProfile], facts: dict) -> dict:
    """Runners of one adapter's unmerged reference and merged copy (``names``), each run once.

    The memory each adds is recorded on its profile; the model's FLOPs per item
    go into ``facts`` the first time.
    """
    from lora_edge.core.adapters import load_reference
    from lora_edge.core.flops import model_flops
    from lora_edge.export.merge import merge_adapter

    runners = {}
    unmerged_name, merged_name = names
    with PeakMemory() as memory:
        reference = load_reference(model_path, adapter, task).to(torch_device)
        runners[unmerged_name] = _runner(reference, inputs, torch_device)
        runners[unmerged_name]()
    by_name[unmerged_name].memory = {"rss_added_mb": memory.added_mb, "method": memory.method}
    with PeakMemory() as memory:
        merged = merge_adapter(reference)
        runners[merged_name] = _runner(merged, inputs, torch_device)
        runners[merged_name]()
    by_name[merged_name].memory = {"rss_added_mb": memory.added_mb, "method": memory.method}
    if "flops_per_item" not in facts:
        facts["flops_per_item"] = model_flops(merged, inputs) / inputs["input_ids"].shape[0]
    return runners


def _runner(model: "torch.nn.Module", inputs: dict, torch_device: str):
    """One synchronous forward pass of ``model`` on ``inputs``, without autograd."""
    import torch

    def run_once() -> None:
        with torch.inference_mode():
            model(**inputs)
        if torch_device == "cuda":
            torch.cuda.synchronize()

    return run_once
