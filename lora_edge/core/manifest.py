"""The bundle's ``manifest.json``, typed: read and validated once, written atomically.

Schema: docs/ARCHITECTURE.md, "manifest.json". :meth:`Manifest.read` is the
only place the file is parsed; a manifest that is not JSON, has a value of the
wrong type, or was written by a newer format is a BundleError naming the key.
Every other module reads attributes (``manifest.model.task``,
``manifest.adapters[0].bundle_dir``), never dict keys.

Keys this version does not know are kept (``unknown`` of each record) and
written back in place, so a bundle written by a newer lora-edge of the same
format loses nothing when this one adds graphs to it.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from lora_edge.core.cache import DEFAULT_MODEL
from lora_edge.core.bundle import MANIFEST_FILE, ONNX_DIR, require_bundle, write_json
from lora_edge.core.choices import Form, Precision, Task
from lora_edge.core.errors import BundleError, ConfigError

NO_ADAPTER = "none"  # --adapter none: run a hot-swap graph as the base model

# The manifest's format. Absent in bundles written before it was recorded: those are format 1.
# Raise it only for a change an older reader would misread (a key that changes meaning); new keys need not.
MANIFEST_VERSION = 1
REEXPORT = "re-run lora-edge export (the manifest was changed or damaged after export)"

# The command that runs each task's graphs, for errors that point users to the right one.
TASK_COMMANDS = {Task.SEQ_CLS: "lora-edge infer", Task.CAUSAL_LM: "lora-edge generate"}


class _Fields:
    """Typed reads of one JSON object of the manifest; a wrong type is a BundleError naming the key path."""

    def __init__(self, data: Any, key: str, where: Path | str):
        self.key, self.where = key, where
        if not isinstance(data, dict) and not key:
            raise BundleError(f"manifest should be a JSON object, not {_kind(data)}", where, REEXPORT)
        if not isinstance(data, dict):
            self.fail(key, f"should be an object, not {_kind(data)}")
        self.data = data
        self.read: set[str] = set()

    def fail(self, key: str, problem: str):
        raise BundleError(f"manifest key '{key}' {problem}", self.where, REEXPORT)

    def path(self, key: str) -> str:
        return f"{self.key}.{key}" if self.key else key

    def get(self, key: str, kinds: tuple[type, ...], default: Any = None, required: bool = False) -> Any:
        """``data[key]`` when it is one of ``kinds``; ``default`` when it is absent or null (unless ``required``)."""
        self.read.add(key)
        value = self.data.get(key)
        if value is None:
            if required:
                self.fail(self.path(key), "is missing")
            return default
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
            names = " or ".join(_JSON_NAMES.get(kind, kind.__name__) for kind in kinds)
            self.fail(self.path(key), f"should be {names}, not {_kind(value)}")
        return value

    def strings(self, key: str, default: Any = None) -> list[str] | None:
        """A list of strings (None when absent or null and ``default`` is None)."""
        values = self.get(key, (list,), default)
        if values is not None and not all(isinstance(item, str) for item in values):
            self.fail(self.path(key), "should be a list of strings")
        return None if values is None else list(values)

    def enum(self, key: str, kind: type, default: Any = None) -> Any:
        """An enum member from its string value (required when ``default`` is None)."""
        value = self.get(key, (str,), default.value if default is not None else None, required=default is None)
        try:
            return kind(value)
        except ValueError:
            valid = ", ".join(member.value for member in kind)
            self.fail(self.path(key), f"is '{value[:40]}', not one of: {valid}")

    def records(self, key: str, parse: Callable[[Any, str, Path | str], Any]) -> tuple:
        """A list of records, each parsed by ``parse(item, key path, where)``."""
        items = self.get(key, (list,), [])
        return tuple(parse(item, f"{self.path(key)}[{index}]", self.where) for index, item in enumerate(items or []))

    def unknown(self) -> dict:
        """The keys not read: kept for the round trip."""
        return {key: value for key, value in self.data.items() if key not in self.read}


_JSON_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "true or false", dict: "an object",
               list: "a list"}


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    return _JSON_NAMES.get(type(value), type(value).__name__)


def _with_unknown(known: dict, unknown: dict) -> dict:
    """``known`` then the keys this version did not know (a known key always wins)."""
    return {**known, **{key: value for key, value in unknown.items() if key not in known}}


@dataclass
class GraphRecord:
    """One ONNX graph of a bundle, as listed in ``manifest.json["graphs"]``.

    ``name`` is how users refer to it (``merged.fp32``, ``branched.intent.int8-dynamic``);
    ``file`` is relative to the bundle. ``adapter`` is the adapter folded or
    branched into the graph (None for hotswap graphs, which take ``adapters``).
    ``source`` names the fp32 graph a quantized graph was made from. Not frozen:
    export and quantize fill ``extra`` as they verify the graph.
    """

    name: str
    file: str
    form: Form
    precision: Precision
    task: Task
    adapter: str | None = None
    adapters: list[str] = field(default_factory=list)
    source: str | None = None
    extra: dict = field(default_factory=dict)
    unknown: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self):
        self.form, self.precision, self.task = Form(self.form), Precision(self.precision), Task(self.task)

    @staticmethod
    def graph_name(form: Form, precision: Precision, adapter: str | None = None) -> str:
        """``<form>[.<adapter>].<precision>``; the adapter part only when a bundle has several."""
        parts = [Form(form).value] + ([adapter] if adapter else []) + [Precision(precision).value]
        return ".".join(parts)

    def to_json(self) -> dict:
        """JSON form for the manifest."""
        return _with_unknown({"name": self.name, "file": self.file, "form": self.form.value,
                              "precision": self.precision.value, "task": self.task.value, "adapter": self.adapter,
                              "adapters": list(self.adapters), "source": self.source, "extra": self.extra},
                             self.unknown)

    @classmethod
    def from_json(cls, record: Any, key: str = "graphs[]", where: Path | str = MANIFEST_FILE) -> "GraphRecord":
        """Inverse of :meth:`to_json`; a BundleError naming the key when the record is not one lora-edge wrote."""
        fields = _Fields(record, key, where)
        return cls(fields.get("name", (str,), required=True), fields.get("file", (str,), required=True),
                   fields.enum("form", Form), fields.enum("precision", Precision), fields.enum("task", Task),
                   adapter=fields.get("adapter", (str,)), adapters=fields.strings("adapters", []),
                   source=fields.get("source", (str,)), extra=fields.get("extra", (dict,), {}),
                   unknown=fields.unknown())


@dataclass(frozen=True)
class ModelRecord:
    """The base model: its directory when exported, its sha256, its task, whether it is the embedded default."""

    path: str = ""
    sha256: str | None = None
    task: Task = Task.SEQ_CLS
    default: bool = False
    unknown: dict = field(default_factory=dict, repr=False, compare=False)

    def to_json(self) -> dict:
        return _with_unknown({"path": self.path, "sha256": self.sha256, "task": self.task.value,
                              "default": self.default}, self.unknown)

    @classmethod
    def from_json(cls, record: Any, key: str = "model", where: Path | str = MANIFEST_FILE) -> "ModelRecord":
        fields = _Fields(record, key, where)
        return cls(fields.get("path", (str,), ""), fields.get("sha256", (str,)),
                   fields.enum("task", Task, Task.SEQ_CLS), fields.get("default", (bool,), False),
                   fields.unknown())

    def source(self) -> str:
        """What to give ``model_source.resolve_model_path`` for the base model on this host.

        The embedded default is named, not its recorded directory, so it is found
        wherever the package is installed here.
        """
        return DEFAULT_MODEL if self.default else self.path

    def config_file(self) -> Path:
        """The recorded model directory's config.json (it may not exist on this host)."""
        return Path(self.path) / "config.json"


@dataclass(frozen=True)
class AdapterRecord:
    """One adapter of a bundle: its copy (``bundle_dir``), where it came from, its sha256, config, labels, data."""

    name: str
    bundle_dir: str = "adapter"
    source: str | None = None
    sha256: str | None = None
    lora_config: dict | None = None
    labels: list[str] | None = None  # label names of a classifier, in id order
    data: dict | None = None  # the data files it was trained on: ``DataFiles.to_json`` (data.py sits above this module)
    unknown: dict = field(default_factory=dict, repr=False, compare=False)

    def to_json(self) -> dict:
        return _with_unknown({"name": self.name, "source": self.source, "sha256": self.sha256,
                              "bundle_dir": self.bundle_dir, "lora_config": self.lora_config,
                              "labels": self.labels, "data": self.data}, self.unknown)

    @classmethod
    def from_json(cls, record: Any, key: str = "adapters[]", where: Path | str = MANIFEST_FILE) -> "AdapterRecord":
        fields = _Fields(record, key, where)
        return cls(fields.get("name", (str,), required=True), fields.get("bundle_dir", (str,), "adapter"),
                   fields.get("source", (str,)), fields.get("sha256", (str,)), fields.get("lora_config", (dict,)),
                   fields.strings("labels"), fields.get("data", (dict,)), fields.unknown())


@dataclass(frozen=True)
class ExportStage:
    """Wall seconds of one export stage, and the process's peak RSS (MB) when it ended."""

    stage: str
    seconds: float
    peak_rss_mb: int | None = None
    unknown: dict = field(default_factory=dict, repr=False, compare=False)

    def to_json(self) -> dict:
        return _with_unknown({"stage": self.stage, "seconds": self.seconds, "peak_rss_mb": self.peak_rss_mb},
                             self.unknown)

    @classmethod
    def from_json(cls, record: Any, key: str = "export_stages[]", where: Path | str = MANIFEST_FILE) -> "ExportStage":
        fields = _Fields(record, key, where)
        return cls(fields.get("stage", (str,), required=True), fields.get("seconds", (int, float), required=True),
                   fields.get("peak_rss_mb", (int,)), fields.unknown())


@dataclass(frozen=True)
class Manifest:
    """A bundle's ``manifest.json``: what was exported, from what, with which libraries, and its graphs.

    Read with :meth:`read` (validated once); change with :func:`dataclasses.replace`
    or :func:`update_manifest`; write with :meth:`write`.
    """

    model: ModelRecord = field(default_factory=ModelRecord)
    adapters: tuple[AdapterRecord, ...] = ()
    graphs: tuple[GraphRecord, ...] = ()
    lora_edge_version: str | None = None
    created: str | None = None  # UTC ISO time
    libraries: dict = field(default_factory=dict)  # python, platform and library versions
    seed: int | None = None
    recipe: dict | None = None  # the recipe that made the bundle (Recipe.to_json)
    export_stages: tuple[ExportStage, ...] = ()
    manifest_version: int = MANIFEST_VERSION
    unknown: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self):
        for name in ("adapters", "graphs", "export_stages"):  # lists given by writers: keep the record immutable
            object.__setattr__(self, name, tuple(getattr(self, name)))

    # --- reading -----------------------------------------------------------------------------------

    @classmethod
    def read(cls, bundle: str | Path) -> "Manifest":
        """Load and validate ``<bundle>/manifest.json`` (BundleError naming the key and the fix when unusable)."""
        path = require_bundle(Path(bundle)) / MANIFEST_FILE
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise BundleError(f"manifest is not valid JSON ({exc.msg})", path, "re-run lora-edge export") from None
        except UnicodeDecodeError:
            raise BundleError("manifest is not UTF-8 text", path, "re-run lora-edge export") from None
        return cls.from_json(data, path)

    @classmethod
    def from_json(cls, data: Any, where: Path | str = MANIFEST_FILE) -> "Manifest":
        """The manifest of a parsed ``manifest.json``; a BundleError naming the key when it is not usable."""
        fields = _Fields(data, "", where)
        version = fields.get("manifest_version", (int,), MANIFEST_VERSION)
        if version > MANIFEST_VERSION or version < 1:
            raise BundleError(f"manifest key 'manifest_version' is {version}, a format this lora-edge does not read "
                              f"(it reads 1 to {MANIFEST_VERSION})", where,
                              "upgrade lora-edge (pip install -U lora-edge), or re-export the bundle with this one")
        return cls(model=ModelRecord.from_json(fields.get("model", (dict,), {}), "model", where),
                   adapters=fields.records("adapters", AdapterRecord.from_json),
                   graphs=fields.records("graphs", GraphRecord.from_json),
                   lora_edge_version=fields.get("lora_edge_version", (str,)),
                   created=fields.get("created", (str,)), libraries=fields.get("libraries", (dict,), {}),
                   seed=fields.get("seed", (int,)), recipe=fields.get("recipe", (dict,)),
                   export_stages=fields.records("export_stages", ExportStage.from_json),
                   manifest_version=version, unknown=fields.unknown())

    # --- writing -----------------------------------------------------------------------------------

    def to_json(self) -> dict:
        """The JSON object of ``manifest.json`` (the keys of docs/ARCHITECTURE.md, then any unknown ones)."""
        return _with_unknown({
            "manifest_version": self.manifest_version,
            "lora_edge_version": self.lora_edge_version,
            "created": self.created,
            "libraries": self.libraries,
            "seed": self.seed,
            "model": self.model.to_json(),
            "adapters": [adapter.to_json() for adapter in self.adapters],
            "graphs": [graph.to_json() for graph in self.graphs],
            "recipe": self.recipe,
            "export_stages": [stage.to_json() for stage in self.export_stages],
        }, self.unknown)

    def write(self, bundle: str | Path) -> Path:
        """Write ``<bundle>/manifest.json`` atomically (temporary file, then rename); return its path.

        The caller holds the bundle's writer lock (``bundle.bundle_lock``) or
        writes a bundle still in its staging directory.
        """
        return write_json(Path(bundle) / MANIFEST_FILE, self.to_json())

    # --- queries -----------------------------------------------------------------------------------

    @property
    def adapter_names(self) -> list[str]:
        """The adapters' names, in the bundle's order."""
        return [adapter.name for adapter in self.adapters]

    def adapter(self, name: str | None) -> AdapterRecord | None:
        """The adapter called ``name``, or None."""
        return next((adapter for adapter in self.adapters if adapter.name == name), None)

    def recipe_section(self, name: str) -> dict:
        """Section ``name`` of the recorded recipe (``{}`` without a recipe or section)."""
        section = (self.recipe or {}).get(name)
        return section if isinstance(section, dict) else {}

    def with_graphs(self, records: list[GraphRecord]) -> "Manifest":
        """A copy listing ``records`` too (a record replaces the graph of the same name, in its place)."""
        by_name = {graph.name: graph for graph in self.graphs}
        by_name.update({record.name: record for record in records})
        return dataclasses.replace(self, graphs=tuple(by_name.values()))


def update_manifest(bundle: str | Path, **changes) -> Manifest:
    """Replace top-level fields of a bundle's manifest (``adapters=...``) and rewrite it atomically.

    The caller holds the bundle's writer lock, as for :meth:`Manifest.write`.
    """
    manifest = dataclasses.replace(Manifest.read(bundle), **changes)
    manifest.write(bundle)
    return manifest


def add_graphs(bundle: str | Path, records: list[GraphRecord]) -> Manifest:
    """Add (or replace, by name) graph records in a bundle's manifest, atomically."""
    manifest = Manifest.read(bundle).with_graphs(records)
    manifest.write(bundle)
    return manifest


# --- graphs ----------------------------------------------------------------------------------------

def list_graphs(bundle: str | Path) -> list[GraphRecord]:
    """The graphs a bundle's manifest lists."""
    return list(Manifest.read(bundle).graphs)


def require_graphs(bundle: str | Path) -> list[GraphRecord]:
    """:func:`list_graphs`, or a BundleError when the manifest lists none (every command says it the same way)."""
    graphs = list_graphs(bundle)
    if not graphs:
        raise BundleError("the bundle lists no graphs", Path(bundle) / MANIFEST_FILE,
                          "export graphs into it first (lora-edge export) or re-export the bundle")
    return graphs


def _find(bundle: str | Path, graphs: tuple[GraphRecord, ...] | list[GraphRecord], name: str) -> GraphRecord:
    name = name.removesuffix(".onnx")
    for graph in graphs:
        if graph.name == name:
            return graph
    names = ", ".join(g.name for g in graphs) or "none"
    raise BundleError(f"no graph named '{name}' in the bundle", Path(bundle) / MANIFEST_FILE,
                      f"use one of: {names}")


def find_graph(bundle: str | Path, name: str) -> GraphRecord:
    """The graph called ``name`` (with or without ``.onnx``), or a BundleError listing the graphs."""
    return _find(bundle, list_graphs(bundle), name)


def find_task_graph(bundle: str | Path, name: str, task: Task | str) -> tuple[Manifest, GraphRecord]:
    """(manifest, graph record) of graph ``name``, which must be a ``task`` graph (ConfigError if not)."""
    manifest = Manifest.read(bundle)
    record = _find(bundle, manifest.graphs, name)
    if record.task is not Task(task):
        raise ConfigError(f"graph {record.name} is a {record.task.value} graph", "--graph",
                          f"use {TASK_COMMANDS.get(record.task, 'another command')} for {record.task.value} graphs")
    return manifest, record


def hotswap_adapter_file(bundle: str | Path, graph: GraphRecord, adapter: str) -> Path:
    """The ``.onnx_adapter`` file of ``adapter`` for a hot-swap graph (recorded in the graph's extra, else
    the bundle's convention ``onnx/adapters/<name>.onnx_adapter``); it may not exist."""
    files = (graph.extra or {}).get("adapter_files")
    recorded = files.get(adapter) if isinstance(files, dict) else None
    return Path(bundle) / (recorded if isinstance(recorded, str) else f"{ONNX_DIR}/adapters/{adapter}.onnx_adapter")


def require_adapter_file(bundle: str | Path, graph: GraphRecord, adapter: str) -> Path:
    """:func:`hotswap_adapter_file`, or a BundleError when that file is missing."""
    path = hotswap_adapter_file(bundle, graph, adapter)
    if not path.is_file():
        raise BundleError(f"adapter file of '{adapter}' is missing", path, "re-run lora-edge export")
    return path


def choose_adapter(record: GraphRecord, manifest: Manifest, adapter: str | None) -> str | None:
    """The adapter a run of ``record`` uses: the graph's own, or for hot-swap the asked one (None = base)."""
    names = manifest.adapter_names
    if record.form is not Form.HOTSWAP:
        own = record.adapter or (names[0] if len(names) == 1 else None)
        if adapter not in (None, own):
            raise ConfigError(f"graph {record.name} holds adapter '{own}', not '{adapter}'", "--adapter",
                              "pick the graph of that adapter, or a hot-swap graph")
        return own
    served = record.adapters or names
    if adapter == NO_ADAPTER:
        return None
    if adapter is None:
        if len(served) != 1:
            raise ConfigError(f"hot-swap graph {record.name} serves {len(served)} adapters", "--adapter",
                              f"choose one of: {', '.join(served)} (or '{NO_ADAPTER}' for the base model)")
        return served[0]
    if adapter not in served:
        raise ConfigError(f"hot-swap graph {record.name} has no adapter '{adapter}'", "--adapter",
                          f"choose one of: {', '.join(served)} (or '{NO_ADAPTER}' for the base model)")
    return adapter
