"""The bundle: one output directory per run, written atomically, described by manifest.json.

Layout (docs/ARCHITECTURE.md, "The bundle")::

    <bundle>/manifest.json   adapter/ or adapters/<name>/   onnx/   reports/

New bundles are built in a temporary sibling directory and renamed into place
at the end (:func:`atomic_directory`); files added to an existing bundle are
written to a temporary name and renamed (:func:`atomic_file`). Nothing is ever
left half-written, and nothing is overwritten without ``force``.
"""

from __future__ import annotations

import contextlib
import enum
import json
import os
import platform
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Iterator

from lora_edge.errors import BundleError

MANIFEST_FILE = "manifest.json"
ONNX_DIR = "onnx"
REPORTS_DIR = "reports"
TRACKED_LIBRARIES = ("lora-edge", "torch", "transformers", "peft", "onnx", "onnxruntime",
                     "onnxruntime-gpu", "onnxscript", "safetensors")


@contextlib.contextmanager
def atomic_directory(target: Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary directory that becomes ``target`` when the block succeeds.

    Raises BundleError when ``target`` exists and ``force`` is false. On any
    exception the temporary directory is removed and ``target`` is untouched.
    """
    target = Path(target)
    if target.exists() and not force:
        raise BundleError(f"'{target}' already exists", "--out", "pass --force to replace it or choose another path")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    old = None
    if target.exists():
        old = target.parent / f".{target.name}.old-{os.getpid()}"
        target.rename(old)
    staging.rename(target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_file(target: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; it replaces ``target`` when the block succeeds."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(prefix=f".{target.name}.tmp-", dir=target.parent)
    os.close(handle)
    staging = Path(name)
    try:
        yield staging
    except BaseException:
        staging.unlink(missing_ok=True)
        raise
    os.replace(staging, target)


def write_json(path: Path, payload: dict) -> Path:
    """Write ``payload`` as indented JSON, atomically."""
    with atomic_file(path) as staging:
        staging.write_text(json.dumps(payload, indent=2, sort_keys=False, default=str) + "\n")
    return path


def library_versions() -> dict[str, str]:
    """Installed versions of the libraries that shape an export, plus Python and platform."""
    versions = {"python": platform.python_version(), "platform": platform.platform()}
    for name in TRACKED_LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def require_bundle(path: Path) -> Path:
    """Check that ``path`` is a bundle directory (has a manifest) and return it."""
    path = Path(path)
    if not (path / MANIFEST_FILE).is_file():
        raise BundleError(f"'{path}' is not a lora-edge bundle (no {MANIFEST_FILE})", path,
                          "give a directory written by lora-edge export")
    return path


def read_manifest(bundle: Path) -> dict:
    """Load a bundle's manifest.json."""
    path = require_bundle(bundle) / MANIFEST_FILE
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise BundleError(f"manifest is not valid JSON ({exc.msg})", path, "re-run lora-edge export") from exc


def update_manifest(bundle: Path, **sections) -> dict:
    """Merge top-level ``sections`` into a bundle's manifest and rewrite it atomically."""
    manifest = read_manifest(bundle)
    manifest.update(sections)
    write_json(Path(bundle) / MANIFEST_FILE, manifest)
    return manifest


class Form(str, enum.Enum):
    """The three deployment forms of an adapter (docs/ARCHITECTURE.md)."""

    MERGED = "merged"      # B·A folded into W: one graph per adapter, no runtime cost
    BRANCHED = "branched"  # explicit low-rank MatMul pair beside each base linear
    HOTSWAP = "hotswap"    # LoRA weights are graph inputs; adapters are .onnx_adapter files


class Precision(str, enum.Enum):
    """Numeric precision of a graph's base weights (LoRA pairs stay float)."""

    FP32 = "fp32"
    FP16 = "fp16"
    INT8_DYNAMIC = "int8-dynamic"
    INT8_STATIC = "int8-static"
    INT4 = "int4"


def parse_choices(enum_class: type[enum.Enum], values: list[str], option: str) -> list:
    """Turn option strings into enum members; an unknown one raises ConfigError listing the valid ones."""
    from lora_edge.errors import ConfigError, parse_enum

    if not values:
        valid = ", ".join(member.value for member in enum_class)
        raise ConfigError(f"no value given for {option}", option, f"use one or more of: {valid}")
    return [parse_enum(enum_class, value, option, what=option.lstrip("-").rstrip("s")) for value in values]


@dataclass
class GraphRecord:
    """One ONNX graph of a bundle, as listed in ``manifest.json["graphs"]``.

    ``name`` is how users refer to it (``merged.fp32``, ``branched.intent.int8-dynamic``);
    ``file`` is relative to the bundle. ``adapter`` is the adapter folded or
    branched into the graph (None for hotswap graphs, which take ``adapters``).
    ``source`` names the fp32 graph a quantized graph was made from.
    """

    name: str
    file: str
    form: Form
    precision: Precision
    task: str
    adapter: str | None = None
    adapters: list[str] = field(default_factory=list)
    source: str | None = None
    extra: dict = field(default_factory=dict)

    @staticmethod
    def graph_name(form: Form, precision: Precision, adapter: str | None = None) -> str:
        """``<form>[.<adapter>].<precision>``; the adapter part only when a bundle has several."""
        parts = [Form(form).value] + ([adapter] if adapter else []) + [Precision(precision).value]
        return ".".join(parts)

    def to_json(self) -> dict:
        """JSON form for the manifest."""
        record = asdict(self)
        record["form"], record["precision"] = self.form.value, self.precision.value
        return record

    @classmethod
    def from_json(cls, record: dict) -> "GraphRecord":
        """Inverse of :meth:`to_json`."""
        record = dict(record)
        record["form"], record["precision"] = Form(record["form"]), Precision(record["precision"])
        return cls(**record)


def list_graphs(bundle: Path) -> list[GraphRecord]:
    """The graphs a bundle's manifest lists."""
    return [GraphRecord.from_json(item) for item in read_manifest(bundle).get("graphs", [])]


def require_graphs(bundle: Path) -> list[GraphRecord]:
    """:func:`list_graphs`, or a BundleError when the manifest lists none (every command says it the same way)."""
    graphs = list_graphs(bundle)
    if not graphs:
        raise BundleError("the bundle lists no graphs", Path(bundle) / MANIFEST_FILE,
                          "export graphs into it first (lora-edge export) or re-export the bundle")
    return graphs


def find_graph(bundle: Path, name: str) -> GraphRecord:
    """The graph called ``name`` (with or without ``.onnx``), or a BundleError listing the graphs."""
    name = name.removesuffix(".onnx")
    graphs = list_graphs(bundle)
    for graph in graphs:
        if graph.name == name:
            return graph
    names = ", ".join(g.name for g in graphs) or "none"
    raise BundleError(f"no graph named '{name}' in the bundle", Path(bundle) / MANIFEST_FILE,
                      f"use one of: {names}")


# The command that runs each task's graphs, for errors that point users to the right one.
TASK_COMMANDS = {"seq-cls": "lora-edge infer", "causal-lm": "lora-edge generate"}


def find_task_graph(bundle: Path, name: str, task: str) -> tuple[dict, GraphRecord]:
    """(manifest, graph record) of graph ``name``, which must be a ``task`` graph (ConfigError if not)."""
    manifest = read_manifest(bundle)
    record = find_graph(bundle, name)
    if record.task != task:
        from lora_edge.errors import ConfigError

        raise ConfigError(f"graph {record.name} is a {record.task} graph", "--graph",
                          f"use {TASK_COMMANDS.get(record.task, 'another command')} for {record.task} graphs")
    return manifest, record


def hotswap_adapter_file(bundle: Path, graph: GraphRecord, adapter: str) -> Path:
    """The ``.onnx_adapter`` file of ``adapter`` for a hot-swap graph (recorded in the graph's extra, else
    the bundle's convention ``onnx/adapters/<name>.onnx_adapter``); it may not exist."""
    recorded = (graph.extra or {}).get("adapter_files", {}).get(adapter)
    return Path(bundle) / (recorded or f"{ONNX_DIR}/adapters/{adapter}.onnx_adapter")


def require_adapter_file(bundle: Path, graph: GraphRecord, adapter: str) -> Path:
    """:func:`hotswap_adapter_file`, or a BundleError when that file is missing."""
    path = hotswap_adapter_file(bundle, graph, adapter)
    if not path.is_file():
        raise BundleError(f"adapter file of '{adapter}' is missing", path, "re-run lora-edge export")
    return path


def add_graphs(bundle: Path, records: list[GraphRecord]) -> dict:
    """Add (or replace, by name) graph records in a bundle's manifest, atomically."""
    manifest = read_manifest(bundle)
    by_name = {item["name"]: item for item in manifest.get("graphs", [])}
    for record in records:
        by_name[record.name] = record.to_json()
    manifest["graphs"] = list(by_name.values())
    write_json(Path(bundle) / MANIFEST_FILE, manifest)
    return manifest
