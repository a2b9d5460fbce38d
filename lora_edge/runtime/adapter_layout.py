"""Hot-swap adapter files in lora-edge's layout and Olive's, converted onto a hot-swap graph's inputs.

An ``.onnx_adapter`` file (ONNX Runtime's ``AdapterFormat``) maps graph input
names to tensors. The same LoRA adapter is laid out three ways:

* **lora-edge** (``hotswap.py``): PEFT's file keys as names
  (``base_model.model.<module>.lora_A.weight``) and PEFT's layout, A ``[r, in]``
  and s·B ``[out, r]`` with each layer's own scale (rank/alpha patterns,
  rsLoRA), heads (``modules_to_save``) as PEFT stores them.
* **Olive's converter** (``olive convert-adapters``, olive/cli/convert_adapters.py,
  olive-ai 0.13.0): every PEFT tensor transposed (A ``[in, r]``, s·B ``[r, out]``,
  heads too), names with ``base_model.model.model`` replaced by ``model`` (a
  decoder's ``model.layers.0...``; encoder names stay PEFT's), B scaled by the
  adapter's global ``lora_alpha / r`` (``/ sqrt(r)`` with rsLoRA; rank and alpha
  patterns are not applied), float32 or float16. With ``--quantize_int4`` it
  writes ``.quant.weight`` / ``.quant.scale`` / ``.quant.zero_point`` tensors
  instead. This is the layout of graphs Olive's ``ExtractAdapters`` pass finds
  as MatMul weights (olive/passes/onnx/extract_adapters.py, TorchScript path).
* **Olive-built graphs** name their inputs after the parameters they found:
  with torch 2.13's exporter (``use_dynamo_exporter``) ``model.layers.0.self_attn
  .q_proj.lora_A.default.weight`` in PEFT's layout (seen with olive-ai 0.13.0).

A tensor's identity is therefore its module path and factor
(:func:`canonical_name`), and its layout is told by its shape against the
graph's input: as it is, or transposed. :func:`convert_adapter_file` maps a file
in any of these layouts onto the inputs of the graph it is for (ours or an
Olive-built one; docs/ARCHITECTURE.md, "The three deployment forms"), and
writes what that graph takes, or Olive's converter layout. Anything that does
not fit the graph is refused before a file is written. numpy and ONNX Runtime
only: no torch.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from lora_edge.core.bundle import MANIFEST_FILE, atomic_file, require_writable_file_path
from lora_edge.core.manifest import find_graph
from lora_edge.core.errors import AdapterMismatchError, BundleError, ConfigError, first_line, parse_enum
from lora_edge.runtime.packed_lora import PACKED_LORA_KEY, pack_tensors

if TYPE_CHECKING:
    import numpy as np

PEFT_PREFIX = "base_model.model."
OLIVE_INT4_SUFFIXES = (".quant.weight", ".quant.scale", ".quant.zero_point")
BUNDLE_GRAPH = "hotswap.fp32"  # the graph `--graph BUNDLE` means
ORT_FLOAT_TYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64"}


class Layout(str, enum.Enum):
    """How an adapter file names and lays out its tensors (what ``--from`` and ``--layout`` name)."""

    LORA_EDGE = "lora-edge"
    OLIVE = "olive"


AUTO = "auto"  # --from auto: tell the layout from the tensors' shapes
GRAPH = "graph"  # --layout graph: what the graph takes


def olive_name(name: str) -> str:
    """The name ``olive convert-adapters`` gives a PEFT key (olive/cli/convert_adapters.py: the same replace)."""
    return name.replace("base_model.model.model", "model")


def canonical_name(name: str) -> str:
    """The module path + factor a tensor belongs to, whichever writer named it.

    PEFT's key (``base_model.model.model.layers.0.q.lora_A.weight``), Olive's
    converter's (``model.layers.0.q.lora_A.weight``) and an Olive-built graph's
    (``model.layers.0.q.lora_A.default.weight``) all give ``model.layers.0.q.lora_A.weight``.
    """
    name = olive_name(name).removeprefix(PEFT_PREFIX)
    return name.replace(".lora_A.default.", ".lora_A.").replace(".lora_B.default.", ".lora_B.")


@dataclass(frozen=True)
class AdapterInput:
    """One adapter input of a hot-swap graph: its name, shape (None on a dynamic axis) and float dtype."""

    name: str
    shape: tuple[int | None, ...]
    dtype: str

    def fits(self, shape: tuple[int, ...]) -> bool:
        """True when a tensor of ``shape`` can be fed here (the dynamic axes take any size)."""
        return len(shape) == len(self.shape) and all(want is None or want == got
                                                     for want, got in zip(self.shape, shape))

    def describe(self) -> str:
        """The shape for messages: ``[r, 32]`` (``r`` on a dynamic axis)."""
        return "[" + ", ".join("r" if dim is None else str(dim) for dim in self.shape) + "]"


def is_lora_edge_graph(inputs: dict[str, AdapterInput]) -> bool:
    """True for our hot-swap graphs (every adapter input is a PEFT key, in PEFT's layout)."""
    return all(name.startswith(PEFT_PREFIX) for name in inputs)


@dataclass(frozen=True)
class ConvertResult:
    """What :func:`convert_adapter_file` wrote: the file, the layouts read and written, tensor counts."""

    out: Path
    source: Path
    graph: Path
    read_layout: str
    layout: str
    tensors: int
    transposed: int
    renamed: int

    def to_json(self) -> dict:
        return {"out": str(self.out), "source": str(self.source), "graph": str(self.graph),
                "read_layout": self.read_layout, "layout": self.layout, "tensors": self.tensors,
                "transposed": self.transposed, "renamed": self.renamed}

    def summary(self) -> str:
        return (f"{self.out}: {self.tensors} tensors, read as {self.read_layout}, written as {self.layout} "
                f"({self.transposed} transposed, {self.renamed} renamed)")


def resolve_graph(graph: Path) -> Path:
    """``--graph``: an ``.onnx`` file, or a bundle directory (its ``hotswap.fp32`` graph)."""
    graph = Path(graph)
    if graph.is_dir():
        if not (graph / MANIFEST_FILE).is_file():
            raise ConfigError(f"'{graph}' is a directory but not a lora-edge bundle", "--graph",
                              "give a hot-swap .onnx graph or a bundle directory")
        return graph / find_graph(graph, BUNDLE_GRAPH).file
    if not graph.is_file():
        raise BundleError("graph file is missing", graph, "give a hot-swap .onnx graph or a bundle directory")
    return graph


def graph_adapter_inputs(graph: Path) -> dict[str, AdapterInput]:
    """A hot-swap graph's adapter inputs: inputs with same-named defaults that are PEFT keys or LoRA factors."""
    from lora_edge.runtime.session import SessionSettings, create_session

    session = create_session(graph, SessionSettings(graph_optimization_level="disable"))
    if PACKED_LORA_KEY in session.get_modelmeta().custom_metadata_map:
        raise ConfigError("the graph takes packed LoRA inputs (a CPU-quantized hot-swap decoder), not per-target "
                          "tensors", graph, "convert against the bundle's hotswap.fp32 graph: lora-edge packs an "
                          "adapter for this graph itself (quantize writes its file, generate packs a PEFT-layout one)")
    inputs = {item.name: AdapterInput(item.name, tuple(d if isinstance(d, int) else None for d in item.shape),
                                      ORT_FLOAT_TYPES.get(item.type, item.type))
              for item in session.get_overridable_initializers()
              if item.name.startswith(PEFT_PREFIX) or ".lora_A." in item.name or ".lora_B." in item.name}
    if not inputs:
        raise ConfigError("the graph has no adapter inputs (not a hot-swap graph)", graph,
                          "give a hotswap.<precision>.onnx graph of the adapter's base model")
    return inputs


def read_onnx_adapter(path: Path) -> dict[str, "np.ndarray"]:
    """The tensors of an ``.onnx_adapter`` file (name -> numpy array)."""
    return read_adapter_file(path)[0]


def read_adapter_file(path: Path) -> tuple[dict[str, "np.ndarray"], tuple[int, int]]:
    """(tensors, (adapter version, model version)) of an ``.onnx_adapter`` file; AdapterMismatchError if unreadable."""
    import onnxruntime

    if not Path(path).is_file():
        raise AdapterMismatchError("adapter file does not exist", path, "give an existing .onnx_adapter file")
    try:
        adapter = onnxruntime.AdapterFormat.read_adapter(str(path))
    except Exception as exc:  # ORT raises its own error types for a corrupt file
        raise AdapterMismatchError(f"not a readable .onnx_adapter file ({first_line(exc, 160)})", path,
                                   "give a file written by lora-edge export or olive convert-adapters") from None
    tensors = {name: value.numpy().copy() for name, value in adapter.get_parameters().items()}
    return tensors, (adapter.get_adapter_version(), adapter.get_model_version())


def write_onnx_adapter(path: Path, tensors: dict[str, "np.ndarray"], adapter_version: int = 1,
                       model_version: int = 1) -> Path:
    """Write ``tensors`` (graph input name -> array) as an ONNX Runtime ``.onnx_adapter`` file, atomically."""
    import numpy as np
    import onnxruntime

    arrays = {name: np.ascontiguousarray(tensor) for name, tensor in tensors.items()}  # kept alive for export
    adapter = onnxruntime.AdapterFormat()
    adapter.set_adapter_version(adapter_version)
    adapter.set_model_version(model_version)
    adapter.set_parameters({name: onnxruntime.OrtValue.ortvalue_from_numpy(array) for name, array in arrays.items()})
    with atomic_file(Path(path)) as staging:
        adapter.export_adapter(str(staging))
    return Path(path)


def write_packed_adapter(packs: list, adapter_file: Path, out: Path) -> Path:
    """Write the per-target ``.onnx_adapter`` file ``adapter_file`` packed for a graph with ``packs``
    (runtime/packed_lora.py) to ``out``, keeping its versions."""
    tensors, versions = read_adapter_file(adapter_file)
    return write_onnx_adapter(out, pack_tensors(packs, tensors, adapter_file), *versions)


def match_inputs(tensors: dict[str, "np.ndarray"], inputs: dict[str, AdapterInput],
                 where: Path) -> dict[str, str]:
    """File name -> graph input name, matched by :func:`canonical_name`; refuses what the graph lacks."""
    by_canonical = {canonical_name(name): name for name in inputs}
    names = {}
    for name in tensors:
        if name.endswith(OLIVE_INT4_SUFFIXES):
            raise AdapterMismatchError(f"tensor '{name}' is an int4-quantized LoRA factor (olive convert-adapters "
                                       "--quantize_int4)", where, "convert the PEFT adapter again without "
                                       "--quantize_int4: hot-swap graphs take float factors")
        target = name if name in inputs else by_canonical.get(canonical_name(name))
        if target is None:
            raise AdapterMismatchError(f"adapter tensor '{name}' has no input in the graph (an adapter of another "
                                       "base model, or of modules this graph was not exported for)", where,
                                       "convert it against the hot-swap graph of its own base model and targets")
        names[name] = target
    return names


def detect_transposed(tensors: dict[str, "np.ndarray"], names: dict[str, str], inputs: dict[str, AdapterInput],
                      where: Path) -> bool:
    """Whether the file holds the graph's inputs transposed, told from each tensor's shape against its input.

    A tensor that fits only one way decides; every one that decides must agree.
    Square and 1-D tensors fit both ways and say nothing.
    """
    votes: dict[bool, str] = {}
    for name, tensor in tensors.items():
        slot = inputs[names[name]]
        as_is, transposed = slot.fits(tensor.shape), slot.fits(tensor.shape[::-1])
        if not (as_is or transposed):
            raise AdapterMismatchError(f"adapter tensor '{name}' has shape {list(tensor.shape)}, the graph's input "
                                       f"'{slot.name}' takes {slot.describe()} (nor does it fit transposed)", where,
                                       "use an adapter of this graph's base model and LoRA targets")
        if as_is != transposed:
            votes.setdefault(transposed, name)
    if len(votes) == 2:
        raise AdapterMismatchError(f"tensor '{votes[False]}' fits the graph as it is but '{votes[True]}' only "
                                   "transposed: the file mixes layouts", where,
                                   "re-create the file with lora-edge export or olive convert-adapters")
    if not votes and any(tensor.ndim > 1 for tensor in tensors.values()):
        raise AdapterMismatchError("every tensor fits the graph both as it is and transposed (square or 1-D), "
                                   "so the file's layout cannot be told", where,
                                   "name it: --from lora-edge or --from olive")
    return bool(votes) and next(iter(votes))


def check_pairs(tensors: dict[str, "np.ndarray"], where: Path, peft_layout: bool) -> None:
    """Tensors are finite and every LoRA layer has both factors, of one rank when the layout is PEFT's (known)."""
    import numpy as np

    for name, tensor in tensors.items():
        if np.issubdtype(tensor.dtype, np.floating) and not np.isfinite(tensor).all():
            raise AdapterMismatchError(f"tensor '{name}' holds NaN or Inf values", where, "re-create the adapter")
    for name in tensors:
        for factor, other in ((".lora_A.", ".lora_B."), (".lora_B.", ".lora_A.")):
            partner = name.replace(factor, other)
            if factor in name and partner not in tensors:
                raise AdapterMismatchError(f"'{name}' has no matching {other.strip('.')} tensor", where,
                                           "convert a complete adapter (both factors of every layer)")
            if factor == ".lora_A." and factor in name and peft_layout \
                    and tensors[name].shape[0] != tensors[partner].shape[1]:
                raise AdapterMismatchError(f"'{name}' has rank {tensors[name].shape[0]} but its lora_B rank "
                                           f"{tensors[partner].shape[1]}", where, "re-create the adapter")


def to_graph_layout(tensors: dict[str, "np.ndarray"], inputs: dict[str, AdapterInput], where: Path,
                    source: str = AUTO) -> tuple[dict[str, "np.ndarray"], bool]:
    """(the tensors as the graph takes them: its names, shapes and dtypes; whether they were read transposed).

    ``source`` names the file's layout (lora-edge: PEFT's, olive: transposed)
    where the shapes cannot tell; it needs one of our graphs, whose layout is PEFT's.
    """
    import numpy as np

    ours = is_lora_edge_graph(inputs)
    names = match_inputs(tensors, inputs, where)
    if source == AUTO:
        transposed = detect_transposed(tensors, names, inputs, where)
    elif not ours:
        raise ConfigError("--from names a layout relative to lora-edge's, but this graph is not a lora-edge graph",
                          "--from", "drop --from: the shapes against the graph tell the layout")
    else:
        transposed = parse_enum(Layout, source, "--from", "layout") is Layout.OLIVE
    converted = {}
    for name, tensor in tensors.items():
        slot = inputs[names[name]]
        array = np.transpose(tensor) if transposed else tensor
        if not slot.fits(array.shape):
            raise AdapterMismatchError(f"adapter tensor '{name}' read {'transposed' if transposed else 'as it is'} "
                                       f"has shape {list(array.shape)}, the graph's input takes {slot.describe()}",
                                       where, f"drop --from {source} (let the shapes tell the layout)")
        converted[slot.name] = np.ascontiguousarray(array.astype(slot.dtype, copy=False))
    check_pairs(converted, where, peft_layout=ours)
    return converted, transposed


def to_olive_layout(tensors: dict[str, "np.ndarray"]) -> dict[str, "np.ndarray"]:
    """lora-edge layout -> what ``olive convert-adapters`` writes for the same adapter: renamed, transposed."""
    import numpy as np

    return {olive_name(name): np.ascontiguousarray(np.transpose(tensor)) for name, tensor in tensors.items()}


def _layout_names(ours: bool, transposed: bool) -> tuple[str, str]:
    """(the layout read, the graph's layout) for messages and --json."""
    if ours:
        return (Layout.OLIVE.value if transposed else Layout.LORA_EDGE.value), Layout.LORA_EDGE.value
    return ("transposed" if transposed else GRAPH), GRAPH


def convert_adapter_file(adapter_file: Path, graph: Path, out: Path, layout: str = GRAPH,
                         source: str = AUTO, force: bool = False) -> ConvertResult:
    """Convert an ``.onnx_adapter`` file for the hot-swap ``graph`` (``lora-edge adapters convert``).

    The file may be in any layout above; ``layout`` is the one written: graph
    (the graph's own inputs: lora-edge's for our graphs, an Olive-built graph's
    own) or olive (Olive's converter layout; needs one of our graphs, which
    checks the tensors). Refuses, before writing anything, tensors the graph has
    no input for or whose shapes fit it neither as they are nor transposed.
    """
    if layout not in (GRAPH, Layout.OLIVE.value):
        raise ConfigError(f"unknown layout '{layout}'", "--layout", f"use {GRAPH} or {Layout.OLIVE.value}")
    if source != AUTO:
        parse_enum(Layout, source, "--from", "layout")
    out = require_writable_file_path(Path(out), "--out")
    if out.exists() and not force:
        raise BundleError(f"'{out}' already exists", "--out", "pass --force to replace it or choose another path")
    graph_path = resolve_graph(graph)
    tensors, versions = read_adapter_file(adapter_file)
    if not tensors:
        raise AdapterMismatchError("the adapter file holds no tensors", adapter_file, "give a non-empty adapter")
    inputs = graph_adapter_inputs(graph_path)
    ours = is_lora_edge_graph(inputs)
    if layout == Layout.OLIVE.value and not ours:
        raise ConfigError("--layout olive needs a lora-edge hot-swap graph to check the tensors against", "--graph",
                          "give the lora-edge graph, or convert for the Olive-built graph with --layout graph")
    converted, transposed = to_graph_layout(tensors, inputs, Path(adapter_file), source)
    written = to_olive_layout(converted) if layout == Layout.OLIVE.value else converted
    write_onnx_adapter(out, written, *versions)
    read_layout, graph_layout = _layout_names(ours, transposed)
    flips = transposed != (layout == Layout.OLIVE.value)
    return ConvertResult(out, Path(adapter_file), graph_path, read_layout,
                         Layout.OLIVE.value if layout == Layout.OLIVE.value else graph_layout,
                         len(written), sum(flips and tensor.ndim > 1 for tensor in converted.values()),
                         len(set(tensors) - set(written)))
