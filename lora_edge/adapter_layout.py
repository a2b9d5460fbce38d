"""Hot-swap adapter files in two layouts: lora-edge's and Olive's, converted against a hot-swap graph's inputs.

An ``.onnx_adapter`` file (ONNX Runtime's ``AdapterFormat``) maps graph input
names to tensors. Two writers lay the same LoRA adapter out differently:

* **lora-edge** (``hotswap.py``): PEFT's file keys as names
  (``base_model.model.<module>.lora_A.weight``) and PEFT's layout, A ``[r, in]``
  and s·B ``[out, r]`` with each layer's own scale (rank/alpha patterns,
  rsLoRA), heads (``modules_to_save``) as PEFT stores them.
* **Olive** (``olive convert-adapters``, olive/cli/convert_adapters.py, olive-ai
  0.13.0): every PEFT tensor transposed (A ``[in, r]``, s·B ``[r, out]``, heads
  too), names with ``base_model.model.model`` replaced by ``model`` (a decoder's
  ``model.layers.0...``; encoder names stay PEFT's), B scaled by the adapter's
  global ``lora_alpha / r`` (``/ sqrt(r)`` with rsLoRA; rank and alpha patterns
  are not applied), float32 or float16. Olive's ``ExtractAdapters`` pass builds
  graphs that take exactly those names and layouts. With ``--quantize_int4`` it
  writes ``.quant.weight`` / ``.quant.scale`` / ``.quant.zero_point`` tensors
  instead, which only Olive's quantized graphs take.

Our hot-swap graph rejects an Olive file as it is (transposed shapes), and
Olive's graphs reject ours. :func:`convert_adapter_file` reads either layout,
tells which one it is from the tensors' shapes against the graph's adapter
inputs (docs/ARCHITECTURE.md, "The three deployment forms"), and writes the
graph's layout or Olive's. Anything that does not fit the graph is refused
before a file is written. numpy and ONNX Runtime only: no torch.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from lora_edge.bundle import MANIFEST_FILE, atomic_file, find_graph, require_writable_file_path
from lora_edge.errors import AdapterMismatchError, BundleError, ConfigError, parse_enum

if TYPE_CHECKING:
    import numpy as np

PEFT_PREFIX = "base_model.model."
OLIVE_INT4_SUFFIXES = (".quant.weight", ".quant.scale", ".quant.zero_point")
BUNDLE_GRAPH = "hotswap.fp32"  # the graph `--graph BUNDLE` means
ORT_FLOAT_TYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64"}


class Layout(str, enum.Enum):
    """How an adapter file names and lays out its tensors."""

    LORA_EDGE = "lora-edge"
    OLIVE = "olive"


AUTO = "auto"  # --from auto: tell the layout from the tensors' shapes


def olive_name(name: str) -> str:
    """The name ``olive convert-adapters`` gives a PEFT key (olive/cli/convert_adapters.py: the same replace)."""
    return name.replace("base_model.model.model", "model")


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
        return "[" + ", ".join("r" if dim is None else str(dim) for dim in self.shape) + "]"


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
        return (f"{self.out}: {self.tensors} tensors, {self.read_layout} layout -> {self.layout} "
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
    """The adapter inputs of a lora-edge hot-swap graph: its inputs with same-named defaults (initializers)."""
    from lora_edge.runtime import SessionSettings, create_session

    session = create_session(graph, SessionSettings(graph_optimization_level="disable"))
    inputs = {item.name: AdapterInput(item.name, tuple(d if isinstance(d, int) else None for d in item.shape),
                                      ORT_FLOAT_TYPES.get(item.type, item.type))
              for item in session.get_overridable_initializers() if item.name.startswith(PEFT_PREFIX)}
    if not inputs:
        raise ConfigError("the graph has no adapter inputs (not a lora-edge hot-swap graph)", graph,
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
        raise AdapterMismatchError(f"not a readable .onnx_adapter file ({str(exc).splitlines()[0][:160]})", path,
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


def match_inputs(tensors: dict[str, "np.ndarray"], inputs: dict[str, AdapterInput],
                 where: Path) -> dict[str, str]:
    """File name -> graph input name (PEFT's key, or Olive's renamed one); refuses what the graph lacks."""
    by_olive = {olive_name(name): name for name in inputs}
    names = {}
    for name in tensors:
        if name.endswith(OLIVE_INT4_SUFFIXES):
            raise AdapterMismatchError(f"tensor '{name}' is an int4-quantized LoRA factor (olive convert-adapters "
                                       "--quantize_int4)", where, "convert the PEFT adapter again without "
                                       "--quantize_int4: lora-edge hot-swap graphs take float factors")
        target = name if name in inputs else by_olive.get(name)
        if target is None:
            raise AdapterMismatchError(f"adapter tensor '{name}' has no input in the graph (an adapter of another "
                                       "base model, or of modules this graph was not exported for)", where,
                                       "convert it against the hot-swap graph of its own base model and targets")
        names[name] = target
    return names


def detect_layout(tensors: dict[str, "np.ndarray"], names: dict[str, str], inputs: dict[str, AdapterInput],
                  where: Path) -> Layout:
    """The file's layout, from each tensor's shape against its graph input: as it is (lora-edge) or transposed.

    A tensor that fits only one way decides; every one that decides must agree.
    Square and 1-D tensors fit both ways and say nothing.
    """
    votes: dict[Layout, str] = {}
    for name, tensor in tensors.items():
        slot = inputs[names[name]]
        as_is, transposed = slot.fits(tensor.shape), slot.fits(tensor.shape[::-1])
        if not (as_is or transposed):
            raise AdapterMismatchError(f"adapter tensor '{name}' has shape {list(tensor.shape)}, the graph's input "
                                       f"'{slot.name}' takes {slot.describe()} (nor does it fit transposed)", where,
                                       "use an adapter of this graph's base model and LoRA targets")
        if as_is != transposed:
            votes.setdefault(Layout.LORA_EDGE if as_is else Layout.OLIVE, name)
    if len(votes) == 2:
        raise AdapterMismatchError(f"tensor '{votes[Layout.LORA_EDGE]}' fits the graph as it is but "
                                   f"'{votes[Layout.OLIVE]}' only transposed: the file mixes layouts", where,
                                   "re-create the file with lora-edge export or olive convert-adapters")
    if not votes and all(tensor.ndim < 2 for tensor in tensors.values()):
        return Layout.LORA_EDGE  # 1-D tensors read the same either way
    if not votes:
        raise AdapterMismatchError("every tensor fits the graph both as it is and transposed (square or 1-D), "
                                   "so the file's layout cannot be told", where,
                                   "name it: --from lora-edge or --from olive")
    return next(iter(votes))


def check_pairs(tensors: dict[str, "np.ndarray"], where: Path) -> None:
    """Every LoRA layer has both factors, of one rank (tensors in lora-edge's layout, finite)."""
    import numpy as np

    for name, tensor in tensors.items():
        if np.issubdtype(tensor.dtype, np.floating) and not np.isfinite(tensor).all():
            raise AdapterMismatchError(f"tensor '{name}' holds NaN or Inf values", where, "re-create the adapter")
        if ".lora_A." not in name:
            continue
        partner = name.replace(".lora_A.", ".lora_B.")
        if partner not in tensors:
            raise AdapterMismatchError(f"'{name}' has no matching lora_B tensor", where,
                                       "convert a complete adapter (both factors of every layer)")
        if tensor.shape[0] != tensors[partner].shape[1]:
            raise AdapterMismatchError(f"'{name}' has rank {tensor.shape[0]} but its lora_B rank "
                                       f"{tensors[partner].shape[1]}", where, "re-create the adapter")
    orphans = [name for name in tensors if ".lora_B." in name and name.replace(".lora_B.", ".lora_A.") not in tensors]
    if orphans:
        raise AdapterMismatchError(f"'{orphans[0]}' has no matching lora_A tensor", where,
                                   "convert a complete adapter (both factors of every layer)")


def to_graph_layout(tensors: dict[str, "np.ndarray"], inputs: dict[str, AdapterInput], where: Path,
                    source: str = AUTO) -> tuple[dict[str, "np.ndarray"], Layout]:
    """(the tensors as the graph takes them: its names, shapes and dtypes, the layout they were read in)."""
    import numpy as np

    names = match_inputs(tensors, inputs, where)
    layout = detect_layout(tensors, names, inputs, where) if source == AUTO else parse_enum(Layout, source, "--from")
    converted = {}
    for name, tensor in tensors.items():
        slot = inputs[names[name]]
        array = np.transpose(tensor) if layout is Layout.OLIVE else tensor
        if not slot.fits(array.shape):
            raise AdapterMismatchError(f"adapter tensor '{name}' read in the {layout.value} layout has shape "
                                       f"{list(array.shape)}, the graph's input takes {slot.describe()}", where,
                                       f"drop --from {layout.value} (let the shapes tell the layout)")
        converted[slot.name] = np.ascontiguousarray(array.astype(slot.dtype, copy=False))
    check_pairs(converted, where)
    return converted, layout


def to_olive_layout(tensors: dict[str, "np.ndarray"]) -> dict[str, "np.ndarray"]:
    """lora-edge layout -> what ``olive convert-adapters`` writes for the same adapter: renamed, transposed."""
    import numpy as np

    return {olive_name(name): np.ascontiguousarray(np.transpose(tensor)) for name, tensor in tensors.items()}


def convert_adapter_file(adapter_file: Path, graph: Path, out: Path, layout: str = Layout.LORA_EDGE.value,
                         source: str = AUTO, force: bool = False) -> ConvertResult:
    """Convert an ``.onnx_adapter`` file for the hot-swap ``graph`` (``lora-edge adapters convert``).

    The file may be in either layout; ``layout`` is the one written: lora-edge
    (the graph's own inputs) or olive (for graphs Olive's ExtractAdapters built).
    Refuses, before writing anything, tensors the graph has no input for or whose
    shapes fit it neither as they are nor transposed.
    """
    target = parse_enum(Layout, layout, "--layout", "layout")
    if source != AUTO:
        parse_enum(Layout, source, "--from", "layout")
    out = require_writable_file_path(Path(out), "--out")
    if out.exists() and not force:
        raise BundleError(f"'{out}' already exists", "--out", "pass --force to replace it or choose another path")
    graph_path = resolve_graph(graph)
    tensors, versions = read_adapter_file(adapter_file)
    if not tensors:
        raise AdapterMismatchError("the adapter file holds no tensors", adapter_file, "give a non-empty adapter")
    converted, read_layout = to_graph_layout(tensors, graph_adapter_inputs(graph_path), Path(adapter_file), source)
    written = to_olive_layout(converted) if target is Layout.OLIVE else converted
    write_onnx_adapter(out, written, *versions)
    transposed = sum(tensor.ndim > 1 and read_layout is not target for tensor in converted.values())
    return ConvertResult(out, Path(adapter_file), graph_path, read_layout.value, target.value, len(written),
                         transposed, len(set(tensors) - set(written)))
