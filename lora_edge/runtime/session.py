"""ONNX Runtime sessions: one place that creates them, checks providers and runs hot-swap adapters.

Every stage that runs a graph (infer, generate, check, profile, the checks of
export's and quantize's rewrites, the benchmarks) creates its session here, so
provider handling is the same everywhere: the providers a
caller asks for are checked against the ones the session really uses, and a
missing one is an error, never a silent CPU fallback (unless the caller allows it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lora_edge.core.errors import BundleError, ProviderUnavailableError

if TYPE_CHECKING:
    import numpy as np
    import onnxruntime

CPU = "CPUExecutionProvider"
# ORT's "Initializer ... appears in graph inputs" warnings are expected for hot-swap
# graphs (docs/ARCHITECTURE.md, "Facts"); warnings and below are hidden from users by default.
DEFAULT_LOG_SEVERITY = 3


@dataclass
class SessionSettings:
    """How to build a session: providers in order (each with options), threads, optimization level."""

    providers: list[tuple[str, dict[str, Any]]] = field(default_factory=lambda: [(CPU, {})])
    intra_op_threads: int = 0  # 0 lets ORT choose
    inter_op_threads: int = 0
    graph_optimization_level: str = "all"  # disable | basic | extended | all
    enable_profiling: bool = False
    profile_prefix: str | None = None
    allow_fallback: bool = False
    log_severity: int = DEFAULT_LOG_SEVERITY
    config_entries: dict[str, str] = field(default_factory=dict)  # add_session_config_entry, e.g. spinning
    optimized_model_path: str | None = None  # where ORT writes the graph it optimized (benchmarks read it)
    # weights memory-mapped from the graph file, pages read only while loading dropped (runtime/mapped_graph.py)
    map_weights: bool = False
    # ORT's CPU memory arena; off, each tensor comes from malloc and goes back to it (decoder_settings)
    cpu_arena: bool = True


OPTIMIZATION_LEVELS = {"disable": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC",
                       "extended": "ORT_ENABLE_EXTENDED", "all": "ORT_ENABLE_ALL"}


def available_providers() -> list[str]:
    """Execution providers this host's onnxruntime build offers."""
    import onnxruntime

    return list(onnxruntime.get_available_providers())


def missing_providers(settings: SessionSettings) -> list[str]:
    """Requested providers this host does not offer."""
    have = set(available_providers())
    return [name for name, _ in settings.providers if name not in have]


def create_session(graph: str | Path | bytes, settings: SessionSettings | None = None,
                   ) -> "onnxruntime.InferenceSession":
    """Create an InferenceSession for ``graph`` (a file, or a serialized model) with ``settings``.

    Raises ProviderUnavailableError when a requested provider is missing on this
    host, or the session did not take it, unless ``settings.allow_fallback``.
    """
    import onnxruntime

    settings = settings or SessionSettings()
    missing = missing_providers(settings)
    if missing and not settings.allow_fallback:
        raise ProviderUnavailableError(f"{missing[0]} is not available on this host", _where(graph),
                                       "install onnxruntime-gpu on a host with that device, or pass --allow-fallback")
    options = onnxruntime.SessionOptions()
    options.log_severity_level = settings.log_severity
    options.enable_cpu_mem_arena = settings.cpu_arena
    options.intra_op_num_threads = settings.intra_op_threads
    options.inter_op_num_threads = settings.inter_op_threads
    options.graph_optimization_level = getattr(onnxruntime.GraphOptimizationLevel,
                                               OPTIMIZATION_LEVELS[settings.graph_optimization_level])
    if settings.enable_profiling:
        options.enable_profiling = True
        if settings.profile_prefix:
            options.profile_file_prefix = settings.profile_prefix
    for key, value in settings.config_entries.items():
        options.add_session_config_entry(key, value)
    if settings.optimized_model_path:
        options.optimized_model_filepath = settings.optimized_model_path
    requested = [(name, opts) for name, opts in settings.providers if name not in missing]
    if not any(name == CPU for name, _ in requested):
        requested.append((CPU, {}))
    names = [name for name, _ in requested]
    provider_options = [opts for _, opts in requested]
    if settings.map_weights and not isinstance(graph, bytes):
        session = _open_mapped(onnxruntime, Path(graph), options, names, provider_options)
    else:
        session = _open_session(onnxruntime, graph, options, names, provider_options)
    wanted = [name for name, _ in settings.providers]
    dropped = [name for name in wanted if name not in session.get_providers()]
    if dropped and not settings.allow_fallback:
        raise ProviderUnavailableError(f"the session did not take {dropped[0]}", _where(graph),
                                       "check the provider options and drivers, or pass --allow-fallback")
    return session


def decoder_settings(intra_op_threads: int = 0) -> SessionSettings:
    """Settings of a CPU decoding session (``lora-edge generate``, the LLM benchmark): mapped weights, no arena.

    The weights are mapped from the graph file (:func:`_open_mapped`).
    A decode step's tensors are a few KB (the KV cache and the logits are bound
    buffers), which malloc serves as fast; the arena's chunks kept ~6 MB more
    resident over a few generations. SmolLM2-135M int4 (88.5 MB) peaks at
    204 MB in the LLM benchmark's decode worker, 261 MB before these settings
    (benchmarks/README.md, "Peak RSS of int4 decode").
    """
    return SessionSettings(intra_op_threads=intra_op_threads, inter_op_threads=1 if intra_op_threads else 0,
                           map_weights=True, cpu_arena=False)


# ONNX Runtime's errors that mean "this file is not a graph it can load" (a bundle problem, not a bug).
UNLOADABLE_GRAPH_ERRORS = ("NoSuchFile", "InvalidProtobuf", "InvalidGraph")


def _where(graph: str | Path | bytes) -> str:
    return "a graph in memory" if isinstance(graph, bytes) else str(graph)


def _open_session(onnxruntime, graph, options, names: list[str], provider_options: list[dict]):
    """``InferenceSession(graph)``; a missing, corrupt or invalid graph file raises BundleError naming it.

    A serialized graph (bytes) is one lora-edge just built: its load errors are raised as they are.
    """
    if isinstance(graph, bytes):
        return onnxruntime.InferenceSession(graph, sess_options=options, providers=names,
                                            provider_options=provider_options)
    if not Path(graph).is_file():
        raise BundleError("graph file is missing", graph, "re-run lora-edge export (or quantize) for this graph")
    try:
        return onnxruntime.InferenceSession(str(graph), sess_options=options, providers=names,
                                            provider_options=provider_options)
    except Exception as exc:
        if exc.__class__.__name__ not in UNLOADABLE_GRAPH_ERRORS:
            raise
        raise _unloadable(exc, graph) from None


def _unloadable(exc: Exception, graph) -> BundleError:
    """The BundleError for a graph file ONNX Runtime refused (its message's first line)."""
    detail = str(exc).split(" failed:", 1)[-1].strip().splitlines()[0][:160]
    return BundleError(f"ONNX Runtime cannot load the graph ({detail})", graph,
                       "re-run lora-edge export (or quantize) for this graph")


def _open_mapped(onnxruntime, graph: Path, options, names: list[str], provider_options: list[dict]):
    """A session of ``graph`` whose large initializers ONNX Runtime maps from the file (runtime/mapped_graph.py).

    After loading, the pages of the file that loading read (originals that
    prepacking copied but ONNX Runtime keeps, e.g. MatMulNBits scales, or an
    embedding table shared with the LM head, of which a step reads a row) are
    dropped from the RSS; a kernel that reads one again gets it from the file.
    The file must not be rewritten in place while the session lives (lora-edge
    replaces files by rename, which leaves the mapped one intact). A file the
    walk cannot read is opened the ordinary way (which reports what is wrong).
    """
    from lora_edge.runtime.mapped_graph import MalformedGraph, mapped_twin

    resolved = graph.resolve()  # the twin names the file itself, in its own folder (not a link to it)
    try:
        twin = mapped_twin(resolved)
    except (MalformedGraph, OSError):
        return _open_session(onnxruntime, graph, options, names, provider_options)
    options.add_session_config_entry("session.model_external_initializers_file_folder_path", str(resolved.parent))
    try:
        session = onnxruntime.InferenceSession(twin, sess_options=options, providers=names,
                                               provider_options=provider_options)
    except Exception as exc:
        if exc.__class__.__name__ not in UNLOADABLE_GRAPH_ERRORS:
            raise
        raise _unloadable(exc, graph) from None
    del twin
    release_freed_memory()
    drop_clean_mapped_pages([resolved])
    return session


def load_lora_adapter(adapter_file: str | Path) -> "onnxruntime.LoraAdapter":
    """Load an ``.onnx_adapter`` file for use with :func:`run`; BundleError when missing or corrupt."""
    import onnxruntime

    if not Path(adapter_file).is_file():
        raise BundleError("adapter file is missing", adapter_file, "re-run lora-edge export")
    adapter = onnxruntime.LoraAdapter()
    try:
        adapter.Load(str(adapter_file))
    except RuntimeError:  # ORT's message is a C++ source location; the file is what matters
        raise BundleError("not a valid .onnx_adapter file (ONNX Runtime cannot parse it)", adapter_file,
                          "re-run lora-edge export, or give an adapter file written by it") from None
    return adapter


def run(session: "onnxruntime.InferenceSession", feeds: dict[str, "np.ndarray"],
        adapter: "onnxruntime.LoraAdapter | None" = None, output_names: list[str] | None = None) -> list["np.ndarray"]:
    """Run ``session`` on ``feeds`` (only the inputs the graph declares), activating ``adapter`` if given.

    Inputs with a default (ONNX Runtime's overridable initializers, e.g. a decoder's
    ``logits_to_keep``) count as declared: a feed for one replaces the default.
    """
    import onnxruntime

    declared = {i.name for i in session.get_inputs()} | {i.name for i in session.get_overridable_initializers()}
    feeds = {name: value for name, value in feeds.items() if name in declared}
    run_options = None
    if adapter is not None:
        run_options = onnxruntime.RunOptions()
        run_options.add_active_adapter(adapter)
    return session.run(output_names, feeds, run_options)


def graph_outputs(graph: str | Path | bytes, feeds: dict[str, "np.ndarray"] | None) -> list["np.ndarray"]:
    """Outputs of ``graph`` on ``feeds`` (only the inputs it declares) in a default CPU session.

    For checking a graph lora-edge wrote or rewrote against another one; with
    ``feeds`` None the graph is only loaded (an empty list is returned).
    """
    session = create_session(graph)
    return [] if feeds is None else run(session, feeds)


def relative_difference(expected: list["np.ndarray"], actual: list["np.ndarray"]) -> float:
    """Largest |expected - actual| over the outputs, each divided by its output's scale (largest |value|, >= 1).

    Outputs of different shapes differ infinitely.
    """
    import numpy as np

    worst = 0.0
    for want, got in zip(expected, actual, strict=True):
        if want.shape != got.shape:
            return float("inf")
        scale = max(1.0, float(np.max(np.abs(want), initial=0.0)))
        diff = float(np.max(np.abs(want.astype(np.float64) - got.astype(np.float64)), initial=0.0))
        worst = max(worst, diff / scale)
    return worst


def check_settings() -> SessionSettings:
    """A CPU session for checking a graph's outputs: without prepacked GEMM weights, without constant folding.

    Prepacking makes a second copy of the weights, which only speed needs: a check
    session of SmolLM2-135M peaks 190 MB lower without it and opens 35% faster.
    Constant folding writes each ``Transpose(W)`` of an exported fp32 decoder out
    as a new tensor (fresh pages for every weight); without it ORT multiplies by
    the transposed weight in place (``FusedMatMul``): a SmolLM2-135M check session
    opens in 0.23 s instead of 0.40 s, its runs as fast.
    """
    return SessionSettings(config_entries={"session.disable_prepacking": "1",
                                           "optimization.disable_specified_optimizers": "ConstantFolding"})


def outputs_on(graph: str | bytes, feed_sets: list[dict]) -> list[list]:
    """The outputs of ``graph`` (a file or a serialized model) on each feed dict, from ONE session.

    A session costs far more than a run (0.3-0.7 s for MiniLM-L6 on 2 cores, 2 s for SmolLM2-135M) and
    holds a copy of the weights (:func:`check_settings`: not two).
    """
    session = create_session(graph, check_settings())
    return [run(session, feeds) for feeds in feed_sets]


# Outputs of graph files on check feeds, remembered for a later check of the same file in this process
# (:func:`remember_outputs`): graph file identity and feed digest -> the outputs of each feed dict.
_REMEMBERED: dict[tuple, list] = {}


def _remember_key(graph: str | Path, feed_sets: list[dict]) -> tuple:
    """(the file's resolved path, device, inode, size, mtime; a digest of the feeds' names, types, shapes, values)."""
    import hashlib
    import os

    stat = os.stat(graph)
    digest = hashlib.sha256()
    for feeds in feed_sets:
        for name in sorted(feeds):
            value = feeds[name]
            digest.update(f"{name}|{value.dtype.str}|{value.shape};".encode())
            digest.update(value.tobytes())
        digest.update(b"/")
    return (str(Path(graph).resolve()), stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, digest.hexdigest())


def remember_outputs(graph: str | Path, feed_sets: list[dict], outputs: list[list]) -> None:
    """Keep ``outputs`` (of :func:`outputs_on`'s form) of the graph file ``graph`` on ``feed_sets`` for
    :func:`remembered_outputs`.

    A session of an LLM graph costs seconds: export's verification session runs
    the quantize stage's check feeds too, so that stage does not open the same
    file again. A rewritten or replaced file is another key (its inode, size or
    mtime differ); :func:`forget_outputs` drops them all.
    """
    _REMEMBERED[_remember_key(graph, feed_sets)] = outputs


def remembered_outputs(graph: str | Path, feed_sets: list[dict]) -> list[list] | None:
    """What :func:`remember_outputs` kept for this very file and these feeds, else None."""
    if not _REMEMBERED:
        return None
    try:
        return _REMEMBERED.get(_remember_key(graph, feed_sets))
    except OSError:
        return None


def forget_outputs() -> None:
    """Drop every remembered output (the export that remembered them is over)."""
    _REMEMBERED.clear()


def release_freed_memory() -> None:
    """Hand freed heap back to the OS: glibc keeps it, and protobuf copies, ORT's optimizer and sessions
    leave holes that the next graph does not fit in (measured: an export + quantize of MiniLM-L6's three
    forms peaked 1.6 GB without this, 1.06 GB with a trim at each step)."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


MADV_DONTNEED = 4  # <sys/mman.h> on Linux


def drop_clean_mapped_pages(files: list[Path]) -> int:
    """Like :func:`drop_mapped_pages`, but only mappings of ``files`` that no one wrote to; returns the bytes
    advised.

    A mapping without anonymous (copy-on-write) pages holds the file's bytes
    only, so dropping its pages loses nothing: a later read gets the same
    bytes from the file. Mappings with a written page are left alone.
    Linux only (``/proc/self/smaps``, ``madvise``); elsewhere a no-op.
    """
    import ctypes

    targets = {str(Path(file).resolve()) for file in files}
    try:
        with open("/proc/self/smaps") as smaps:
            lines = smaps.readlines()
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
    except OSError:
        return 0
    clean, current = [], None
    for line in lines:
        fields = line.split(maxsplit=5)
        if "-" in fields[0] and len(fields) >= 5 and ":" in fields[3]:  # a mapping's header line
            current = None
            if len(fields) == 6 and fields[5].strip() in targets:
                current = [int(value, 16) for value in fields[0].split("-")]
                clean.append(current)
        elif current is not None and fields[0] == "Anonymous:" and int(fields[1]) > 0:
            clean.remove(current)
            current = None
    dropped = 0
    for start, end in clean:
        if libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), MADV_DONTNEED) == 0:
            dropped += end - start
    return dropped


def drop_mapped_pages(files: list[Path]) -> int:
    """Drop this process's resident pages of memory mappings of ``files``; returns the bytes advised.

    Loading a model memory-maps its safetensors (privately, read-write), and
    after the export has released the model that mapping stays resident
    (513 MB on SmolLM2-135M) though no Python object holds a tensor of it any
    more (the holder is native). Call this only once nothing reads those
    tensors: a dropped page comes back from the file on the next read, so a
    page someone had written to would read as the file's again. Linux only
    (``/proc/self/maps``, ``madvise``); elsewhere a no-op.
    """
    import ctypes

    targets = {str(Path(file).resolve()) for file in files}
    try:
        with open("/proc/self/maps") as maps:
            lines = maps.readlines()
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
    except OSError:
        return 0
    dropped = 0
    for line in lines:
        fields = line.split(maxsplit=5)
        if len(fields) < 6 or fields[5].strip() not in targets:
            continue
        start, end = (int(value, 16) for value in fields[0].split("-"))
        if libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), MADV_DONTNEED) == 0:
            dropped += end - start
    return dropped
