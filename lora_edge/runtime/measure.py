"""Measuring graphs on this host: inputs, timing loops, memory, size on disk, ORT traces, host facts.

The building blocks of :mod:`lora_edge.profile.profiler`, kept apart so that each can
be tested on fixed inputs. Nothing here imports torch.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from lora_edge.core.decoder_io import LOGITS_TO_KEEP, takes_logits_to_keep
from lora_edge.runtime.feeds import build_feeds, decode_step_feeds, is_past_input
from lora_edge.runtime.session import CPU

if TYPE_CHECKING:
    import numpy as np
    import onnxruntime

# CPU flags worth showing in a report: the vector/matrix extensions ONNX Runtime's
# MLAS kernels pick their int8/fp16/fp32 paths by.
NOTABLE_CPU_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni",
                     "avx512_bf16", "avx512_fp16", "avx_vnni", "amx_tile", "amx_int8", "amx_bf16",
                     "asimd", "asimddp", "asimdhp", "fphp", "i8mm", "bf16", "sve", "sve2")
BYTES_PER_MB = 1024 * 1024


# --- host ------------------------------------------------------------------------------------

def cpu_info(cpuinfo: str | None = None) -> dict:
    """CPU model, architecture and flags of this host, from /proc/cpuinfo where there is one."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            cpuinfo = ""
    model, flags = platform.processor() or "unknown", set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("model name", "hardware") and model in ("unknown", "", platform.machine()):
            model = value.strip()
        elif key in ("flags", "features") and not flags:  # x86 says flags, arm64 says Features
            flags = set(value.split())
    return {"model": model, "machine": platform.machine(), "flags": flags}


def gpu_facts() -> list[dict]:
    """Name, driver and memory of each NVIDIA GPU (nvidia-smi), or [] where there is none."""
    query = "index,name,driver_version,memory.total"
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=20, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    gpus = []
    for line in out.strip().splitlines():
        index, name, driver, memory = [part.strip() for part in line.split(",")]
        gpus.append({"index": int(index), "name": name, "driver": driver, "memory_mb": float(memory)})
    return gpus


def host_facts(intra_op_threads: int) -> dict:
    """What a measurement depends on: CPU, cores, threads used, onnxruntime and its providers."""
    import onnxruntime
    import psutil

    cpu = cpu_info()
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    physical = psutil.cpu_count(logical=False) or usable
    return {
        "cpu_model": cpu["model"], "machine": cpu["machine"],
        "cpu_flags": [flag for flag in NOTABLE_CPU_FLAGS if flag in cpu["flags"]],
        "logical_cores": os.cpu_count(), "physical_cores": physical, "usable_cores": usable,
        # ORT's intra-op pool defaults to one thread per physical core when the device says 0
        "intra_op_threads_used": intra_op_threads or min(physical, usable),
        "memory_total_mb": round(psutil.virtual_memory().total / BYTES_PER_MB),
        "onnxruntime": onnxruntime.__version__, "available_providers": list(onnxruntime.get_available_providers()),
        "gpus": gpu_facts() if "CUDAExecutionProvider" in onnxruntime.get_available_providers() else [],
        "python": platform.python_version(), "platform": platform.platform(),
    }


# --- memory ----------------------------------------------------------------------------------

def rss_bytes() -> int:
    """Resident set size of this process."""
    import psutil

    return psutil.Process().memory_info().rss


def _read_hwm() -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _reset_hwm() -> bool:
    """Reset the kernel's peak-RSS counter (Linux >= 4.0); False where that is not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return _read_hwm() is not None


class PeakMemory:
    """Peak resident memory added inside a ``with`` block, in MB (``.added_mb``).

    Uses the kernel's high-water mark where it can be reset (exact); otherwise
    samples RSS every few milliseconds (may miss short spikes). Collect garbage
    before a series of measurements (``gc.collect()``: slow with torch loaded),
    so that freeing it does not hide memory a block adds.
    """

    def __init__(self, sample_interval_s: float = 0.002):
        self.interval = sample_interval_s
        self.added_mb = 0.0
        self.method = ""
        self._stop = threading.Event()
        self._peak = 0

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._peak = max(self._peak, rss_bytes())
            self._stop.wait(self.interval)

    def __enter__(self) -> "PeakMemory":
        self._base = rss_bytes()
        self._peak = self._base
        self._kernel = _reset_hwm()
        self.method = "kernel peak RSS (VmHWM)" if self._kernel else "sampled RSS"
        if not self._kernel:
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._kernel:
            self._peak = max(self._peak, _read_hwm() or 0, rss_bytes())
        else:
            self._stop.set()
            self._thread.join()
            self._peak = max(self._peak, rss_bytes())
        self.added_mb = max(0.0, (self._peak - self._base) / BYTES_PER_MB)


def gpu_memory_used_mb(device_id: int = 0) -> float | None:
    """Memory in use on one GPU (whole device, nvidia-smi), or None without one.

    Whole-device rather than per-process: process ids are often hidden inside
    containers, and a profiling host runs one job at a time.
    """
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits",
                              f"--id={device_id}"], capture_output=True, text=True, timeout=20, check=True).stdout
        return float(out.strip().splitlines()[0])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None


def warm_up_runtime(settings) -> None:
    """Create and run one throw-away session of a one-node graph with ``settings``.

    ONNX Runtime's first session in a process sets up its environment, thread
    pools and kernel registries; doing that here keeps those one-time megabytes
    and milliseconds out of the first measured graph's numbers.
    """
    import numpy as np
    import onnx
    from onnx import TensorProto, helper

    from lora_edge.runtime.session import create_session

    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "warm_up",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    with tempfile.TemporaryDirectory(prefix="lora-edge-warmup-") as workdir:
        path = Path(workdir) / "warm_up.onnx"
        onnx.save(model, str(path))
        session = create_session(path, dataclasses.replace(settings, allow_fallback=True, enable_profiling=False))
        session.run(None, {"x": np.ones((1, 8), dtype=np.float32)})


def session_memory(graph: Path, settings, batch: int, seq: int, vocab_size: int, adapter_file: Path | None = None,
                   gpu_device_id: int | None = None, timeout_s: float = 600) -> dict:
    """Memory one session of ``graph`` adds when created and run once, measured in a fresh process.

    A decoder graph also runs one decode step after its prefill (the prefill's
    presents as its past) inside the measurement: its peak includes the KV cache.

    In a process that already created and freed other sessions, a new session
    reuses freed heap pages and looks smaller than it is; a fresh interpreter
    (with ONNX Runtime initialised by a throw-away session first) gives each
    graph the same clean start. Returns ``rss_added_mb`` (and ``gpu_added_mb``
    on a GPU) and the method, or ``error`` when the probe failed.
    """
    import lora_edge

    request = {"graph": str(graph), "settings": dataclasses.asdict(settings), "batch": batch, "seq": seq,
               "vocab_size": vocab_size, "adapter_file": str(adapter_file) if adapter_file else None,
               "gpu_device_id": gpu_device_id}
    package_root = str(Path(lora_edge.__file__).resolve().parent.parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))}
    try:
        child = "from lora_edge.runtime.measure import memory_probe_child; memory_probe_child()"
        done = subprocess.run([sys.executable, "-c", child],
                              input=json.dumps(request), capture_output=True, text=True, env=env, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"rss_added_mb": None, "error": f"memory probe took over {timeout_s:.0f} s"}
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {"rss_added_mb": None, "error": f"memory probe failed: {last[:200]}"}
    return json.loads(lines[-1])


def memory_probe_child() -> None:
    """Child side of :func:`session_memory`: read the request on stdin, print the result as JSON."""
    from lora_edge.runtime.session import SessionSettings, create_session, load_lora_adapter

    request = json.loads(sys.stdin.read())
    settings_record = request["settings"]
    settings_record["providers"] = [(name, options) for name, options in settings_record["providers"]]
    settings = SessionSettings(**settings_record)
    gpu_id = request["gpu_device_id"]
    warm_up_runtime(settings)  # ORT's one-time set-up (and the CUDA context) is not the graph's memory
    gpu_before = gpu_memory_used_mb(gpu_id) if gpu_id is not None else None
    with PeakMemory() as memory:
        session = create_session(request["graph"], settings)
        adapter = load_lora_adapter(request["adapter_file"]) if request["adapter_file"] else None
        feeds = build_feeds(session, request["batch"], request["seq"], vocab_size=request["vocab_size"])
        if takes_logits_to_keep(session):  # as generate runs a decoder: the last position's logits only
            import numpy as np

            feeds[LOGITS_TO_KEEP] = np.array(1, dtype=np.int64)
        runner = GraphRunner(session, feeds, adapter, gpu_id)
        runner()
        if is_decoder(session):  # a decoder's peak includes the cache of a decode step after the prompt
            names = [output.name for output in session.get_outputs()]
            presents = dict(zip(names, session.run(None, feeds, runner.run_options)))
            GraphRunner(session, decode_step_feeds(feeds, presents), adapter, gpu_id)()
    result = {"rss_added_mb": memory.added_mb, "method": f"{memory.method}, fresh process"}
    if gpu_before is not None:
        gpu_after = gpu_memory_used_mb(gpu_id)
        result["gpu_added_mb"] = None if gpu_after is None else max(0.0, gpu_after - gpu_before)
    print(json.dumps(result))


# --- graphs ----------------------------------------------------------------------------------

def graph_size(path: Path) -> dict:
    """Size on disk of a graph and the external-data files it references, in MB."""
    import onnx

    from lora_edge.core.bundle import load_graph

    path = Path(path)
    model = load_graph(path, load_external_data=False)
    external = set()
    for tensor in model.graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            external.update(entry.value for entry in tensor.external_data if entry.key == "location")
    external_bytes = sum((path.parent / name).stat().st_size for name in external if (path.parent / name).is_file())
    graph_mb = path.stat().st_size / BYTES_PER_MB
    return {"graph_mb": graph_mb, "external_data_mb": external_bytes / BYTES_PER_MB,
            "total_mb": graph_mb + external_bytes / BYTES_PER_MB, "external_files": sorted(external)}


def is_decoder(session: "onnxruntime.InferenceSession") -> bool:
    """True for graphs that take a KV cache (past_key_values inputs)."""
    return any(is_past_input(node.name) for node in session.get_inputs())


class GraphRunner:
    """Runs one session on fixed inputs, synchronously, the way a device would.

    On CUDA-memory providers the inputs are bound on the GPU once and the
    outputs stay there (IO binding), so timings measure the graph, not
    host-device copies.
    """

    def __init__(self, session: "onnxruntime.InferenceSession", feeds: dict[str, "np.ndarray"],
                 adapter: "onnxruntime.LoraAdapter | None" = None, gpu_device_id: int | None = None):
        import onnxruntime

        self.session = session
        self.adapter = adapter  # RunOptions keeps no reference: a collected adapter breaks later runs
        self.run_options = None
        if adapter is not None:
            self.run_options = onnxruntime.RunOptions()
            self.run_options.add_active_adapter(adapter)
        self.io_binding = gpu_device_id is not None
        if self.io_binding:
            self.binding = session.io_binding()
            for name, value in feeds.items():
                self.binding.bind_ortvalue_input(name, onnxruntime.OrtValue.ortvalue_from_numpy(value, "cuda",
                                                                                                 gpu_device_id))
            for output in session.get_outputs():
                self.binding.bind_output(output.name, "cuda", gpu_device_id)
        self.feeds = feeds

    def __call__(self) -> None:
        if self.io_binding:
            self.session.run_with_iobinding(self.binding, self.run_options)
            self.binding.synchronize_outputs()
        else:
            self.session.run(None, self.feeds, self.run_options)


# --- timing ----------------------------------------------------------------------------------

def latency_stats(seconds: list[float]) -> dict:
    """Mean, p50, p90, p99, std, min and max of run times, in milliseconds."""
    import numpy as np

    if not seconds:
        raise ValueError("no run times to summarise")
    ms = np.asarray(seconds, dtype=np.float64) * 1e3
    p50, p90, p99 = np.percentile(ms, [50, 90, 99])
    return {"mean": float(ms.mean()), "p50": float(p50), "p90": float(p90), "p99": float(p99),
            "std": float(ms.std()), "min": float(ms.min()), "max": float(ms.max()), "runs": int(ms.size)}


def time_interleaved(runners: dict[str, Callable[[], None]], runs: int, warmup: int,
                     block: int = 10) -> dict[str, list[float]]:
    """Run times (seconds) of each runner: ``runs`` timed runs after ``warmup``, in interleaved rounds.

    The loop is :func:`lora_edge.runtime.interleave.time_rounds` (rounds of ``block``
    runs per runner, shuffled order, no pause); callers that want the per-round
    medians and within-round ratios use it directly.
    """
    from lora_edge.runtime.interleave import split_runs, time_rounds

    rounds, per_round = split_runs(runs, block)
    return time_rounds(runners, rounds, per_round, warmup, gap_s=0.0, total=runs).times


# --- ORT profiling traces ----------------------------------------------------------------------

@dataclass
class TraceSummary:
    """What an ORT profiling trace says about the runs it recorded."""

    runs: int
    top_ops: list[dict] = field(default_factory=list)        # by op type and provider, most time first
    providers_used: list[str] = field(default_factory=list)  # providers that ran at least one node
    cpu_nodes: list[dict] = field(default_factory=list)      # op types that ran on the CPU provider


def summarize_trace(events: list[dict], skip_runs: int = 0, top: int = 10) -> TraceSummary:
    """Aggregate node times of a trace by (op type, provider), ignoring the first ``skip_runs`` runs."""
    windows = sorted((e["ts"], e["ts"] + e["dur"]) for e in events
                     if e.get("cat") == "Session" and e.get("name") == "model_run")[skip_runs:]
    if not windows:
        return TraceSummary(runs=0)
    first = windows[0][0]
    total_us: dict[tuple[str, str], float] = defaultdict(float)
    nodes: dict[tuple[str, str], set[str]] = defaultdict(set)
    for event in events:
        if event.get("cat") != "Node" or event["ts"] < first or not event["name"].endswith("_kernel_time"):
            continue
        args = event.get("args", {})
        key = (args.get("op_name", "?"), args.get("provider", "?"))
        total_us[key] += event["dur"]
        nodes[key].add(event["name"].removesuffix("_kernel_time"))
    runs, grand = len(windows), sum(total_us.values()) or 1.0
    rows = [{"op_type": op, "provider": provider, "ms_per_run": us / runs / 1e3, "percent": 100.0 * us / grand,
             "nodes": len(nodes[(op, provider)])} for (op, provider), us in total_us.items()]
    rows.sort(key=lambda row: row["ms_per_run"], reverse=True)
    cpu_rows = [row for row in rows if row["provider"] == CPU]
    providers = sorted({provider for _, provider in total_us})
    return TraceSummary(runs=runs, top_ops=rows[:top], providers_used=providers, cpu_nodes=cpu_rows)


def trace_session(graph: Path, settings, feeds: dict, adapter=None, gpu_device_id: int | None = None,
                  runs: int = 20, warmup: int = 2) -> TraceSummary:
    """Run a separate, profiled session of ``graph`` and summarise its trace (then delete the trace).

    A separate session keeps profiling overhead out of the timed runs.
    """
    from lora_edge.runtime.session import create_session

    with tempfile.TemporaryDirectory(prefix="lora-edge-trace-") as workdir:
        traced = dataclasses.replace(settings, enable_profiling=True, profile_prefix=str(Path(workdir) / "trace"))
        session = create_session(graph, traced)
        runner = GraphRunner(session, feeds, adapter, gpu_device_id)
        for _ in range(warmup + runs):
            runner()
        trace_file = session.end_profiling()
        events = json.loads(Path(trace_file).read_text())
    return summarize_trace(events, skip_runs=warmup)
