"""Device targets: what a deployment device asks of ONNX Runtime, as data (``devices/*.toml``).

A device target names the execution providers in order (each with options),
the thread counts, the graph optimization level, the precisions it prefers,
its memory and latency budgets and, optionally, looser accuracy tolerances.
This module is the one place that turns those needs into generic
:class:`~lora_edge.runtime.session.SessionSettings` (like onnxruntime's QNN
``quant_config`` helpers do for one provider): a small registry maps each
provider to its default options, so device files only state what differs.

Shipped targets live in ``lora_edge/resources/devices`` (the top-level
``devices/`` directory links there) and are installed with the package, so
``--device NAME`` works from a wheel; ``--device path/to/file.toml`` loads
any other file.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any

from lora_edge.core import toml_compat
from lora_edge.core.choices import Precision
from lora_edge.core.config_fields import config_field, field_help
from lora_edge.core.errors import ConfigError
from lora_edge.core.names import require_name
from lora_edge.runtime.session import OPTIMIZATION_LEVELS, SessionSettings
from lora_edge.core.thresholds import check_threshold_tables

DEVICE_SUFFIX = ".toml"
ARCHITECTURES = ("any", "x86_64", "arm64")
# platform.machine() spellings -> the names device files use
MACHINE_NAMES = {"x86_64": "x86_64", "amd64": "x86_64", "aarch64": "arm64", "arm64": "arm64"}


@dataclass(frozen=True)
class ProviderInfo:
    """What lora-edge knows about one ONNX Runtime execution provider."""

    name: str
    short: str
    memory: str  # where the provider keeps tensors: "cpu" or "cuda" (IO binding, GPU memory reporting)
    defaults: dict[str, Any]
    help: str
    cache_options: tuple[str, ...] = ()  # options naming a directory for engine/timing caches


# Defaults are what a device file gets without saying anything; its own
# options win. Values are converted to the strings ORT parses (bools as 1/0).
PROVIDERS: dict[str, ProviderInfo] = {info.name: info for info in (
    ProviderInfo("CPUExecutionProvider", "cpu", "cpu", {}, "ONNX Runtime's default CPU kernels (MLAS)."),
    ProviderInfo("CUDAExecutionProvider", "cuda", "cuda",
                 # HEURISTIC avoids cuDNN's exhaustive search on session start; the same-as-requested
                 # arena keeps the reported GPU memory close to what the graph needs.
                 {"device_id": 0, "cudnn_conv_algo_search": "HEURISTIC",
                  "arena_extend_strategy": "kSameAsRequested", "do_copy_in_default_stream": True},
                 "NVIDIA GPUs through CUDA/cuDNN (package onnxruntime-gpu)."),
    ProviderInfo("TensorrtExecutionProvider", "tensorrt", "cuda",
                 # Engines take minutes to build: cache them so a second session starts fast.
                 {"device_id": 0, "trt_engine_cache_enable": True, "trt_timing_cache_enable": True},
                 "NVIDIA TensorRT engines built from the graph (onnxruntime-gpu + TensorRT libraries).",
                 cache_options=("trt_engine_cache_path", "trt_timing_cache_path")),
    ProviderInfo("OpenVINOExecutionProvider", "openvino", "cpu", {"device_type": "CPU"},
                 "Intel CPUs/GPUs/NPUs through OpenVINO (package onnxruntime-openvino)."),
    ProviderInfo("QNNExecutionProvider", "qnn", "cpu", {"backend_path": "libQnnHtp.so"},
                 "Qualcomm Hexagon NPUs through QNN (package onnxruntime-qnn)."),
    ProviderInfo("CoreMLExecutionProvider", "coreml", "cpu", {}, "Apple Neural Engine / GPU through Core ML."),
    ProviderInfo("XnnpackExecutionProvider", "xnnpack", "cpu", {}, "XNNPACK kernels for arm/x86 CPUs."),
    ProviderInfo("DmlExecutionProvider", "dml", "cpu", {"device_id": 0}, "DirectML GPUs on Windows."),
)}
PROVIDER_ALIASES = {info.short: name for name, info in PROVIDERS.items()}


def provider_info(name: str) -> ProviderInfo | None:
    """Registry entry for a provider given by ORT name or short name (``cuda``), or None."""
    return PROVIDERS.get(PROVIDER_ALIASES.get(name.lower(), name))


def provider_option_strings(options: dict[str, Any]) -> dict[str, str]:
    """Provider options as ORT parses them: strings, with bools as ``1``/``0``."""
    return {str(key): ("1" if value else "0") if isinstance(value, bool) else str(value)
            for key, value in options.items()}


@dataclass
class ProviderSpec:
    """One execution provider of a device, with the options it is created with."""

    name: str = config_field("CPUExecutionProvider", "ONNX Runtime provider name (or short name: cpu, cuda, tensorrt).")
    options: dict[str, Any] = config_field({}, "Provider options; merged over lora-edge's defaults for the provider.")

    def __post_init__(self):
        info = provider_info(str(self.name))
        if info is None:
            raise ConfigError(f"unknown execution provider '{self.name}'", "providers.name",
                              f"use one of: {', '.join(PROVIDERS)}")
        self.name = info.name
        if not isinstance(self.options, dict) or any(isinstance(v, (dict, list)) for v in self.options.values()):
            raise ConfigError("provider options must be a table of plain values", "providers.options",
                              'write them like options = { device_id = 0 }')

    def resolved_options(self, cache_dir: Path | None = None) -> dict[str, str]:
        """Registry defaults overlaid with this device's options, as ORT strings.

        ``cache_dir`` fills the provider's cache-path options the device leaves
        unset (TensorRT would otherwise write its engines into the working directory).
        """
        info = PROVIDERS[self.name]
        cache = {name: str(cache_dir) for name in info.cache_options} if cache_dir else {}
        return provider_option_strings({**info.defaults, **cache, **self.options})


@dataclass
class DeviceTarget:
    """A deployment target: providers, threads and precisions to run graphs with, and its budgets."""

    name: str = config_field("", "Short name used with --device (letters, digits, -, _).")
    description: str = config_field("", "What the device is, in one line.")
    providers: list[ProviderSpec] = config_field([], "Execution providers in order of preference, each with options.")
    intra_op_threads: int = config_field(0, "Threads inside one operator; 0 lets ONNX Runtime use the physical cores.")
    inter_op_threads: int = config_field(0, "Threads across independent operators; 0 lets ONNX Runtime choose.")
    graph_optimization_level: str = config_field("all", "ORT graph optimizations: disable, basic, extended or all.")
    precisions: list[Precision] = config_field([], "Precisions the device prefers, best first (fp32, fp16, "
                                                  "int8-dynamic, int8-static, int4).")
    memory_budget_mb: float = config_field(0.0, "Memory a graph may add when loaded and run, in MB; 0 = no budget.")
    latency_budget_ms: float = config_field(0.0, "p90 latency a graph must stay under, in ms; 0 = no budget.")
    cpu_arch: str = config_field("any", "CPU architecture of the device: any, x86_64 or arm64.")
    cpu_features: list[str] = config_field([], "CPU flags the device has (as /proc/cpuinfo spells them, e.g. "
                                              "avx512_vnni, asimddp); the report lists those this host lacks.")
    tolerances: dict[str, dict[str, float]] = config_field({}, "Accuracy-gate overrides per precision (metrics of "
                                                              "recipe.Thresholds), e.g. [tolerances.fp16] "
                                                              "max_abs_diff = 0.05.")
    source: str = field(default="", metadata={"help": "File the device was loaded from."})

    def __post_init__(self):
        for name in ("name", "description", "graph_optimization_level", "cpu_arch"):
            if not isinstance(getattr(self, name), str):
                raise ConfigError(f"{name} must be a string, got {getattr(self, name)!r}", name,
                                  f'write it in quotes, e.g. {name} = "{fields_default(self, name)}"')
        require_name(self.name, "device name", "name", 'write e.g. name = "my-board"')
        if not isinstance(self.providers, list) or not self.providers:
            raise ConfigError("a device needs at least one execution provider", "providers",
                              'add [[providers]] name = "CPUExecutionProvider"')
        self.providers = [_provider(item, index) for index, item in enumerate(self.providers)]
        for name in ("intra_op_threads", "inter_op_threads"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ConfigError(f"{name} must be a non-negative integer, got {value!r}", name,
                                  "use 0 to let ONNX Runtime choose")
        if self.graph_optimization_level not in OPTIMIZATION_LEVELS:
            raise ConfigError(f"unknown graph_optimization_level {self.graph_optimization_level!r}",
                              "graph_optimization_level", f"use one of: {', '.join(OPTIMIZATION_LEVELS)}")
        self.precisions = _precisions(self.precisions)
        for name in ("memory_budget_mb", "latency_budget_ms"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
                raise ConfigError(f"{name} must be a non-negative number, got {value!r}", name, "use 0 for no budget")
        if self.cpu_arch not in ARCHITECTURES:
            raise ConfigError(f"unknown cpu_arch {self.cpu_arch!r}", "cpu_arch", f"use one of: {', '.join(ARCHITECTURES)}")
        if not isinstance(self.cpu_features, list) or not all(isinstance(f, str) for f in self.cpu_features):
            raise ConfigError("cpu_features must be a list of strings", "cpu_features", 'write e.g. ["avx2", "fma"]')
        self.tolerances = _tolerances(self.tolerances)

    @property
    def provider_names(self) -> list[str]:
        """ORT names of the device's providers, in order."""
        return [spec.name for spec in self.providers]

    @property
    def uses_gpu(self) -> bool:
        """True when the first provider keeps tensors in CUDA memory (IO binding, GPU memory reporting)."""
        return PROVIDERS[self.providers[0].name].memory == "cuda"

    def missing_providers(self, available: list[str] | None = None) -> list[str]:
        """The device's providers this host's onnxruntime lacks."""
        from lora_edge.runtime.session import available_providers

        have = set(available if available is not None else available_providers())
        return [name for name in self.provider_names if name not in have]

    def session_settings(self, allow_fallback: bool = False, enable_profiling: bool = False,
                         profile_prefix: str | None = None, cache_dir: Path | None = None) -> SessionSettings:
        """Generic session settings for this device (provider defaults merged with its options)."""
        return SessionSettings(providers=[(spec.name, spec.resolved_options(cache_dir)) for spec in self.providers],
                               intra_op_threads=self.intra_op_threads, inter_op_threads=self.inter_op_threads,
                               graph_optimization_level=self.graph_optimization_level,
                               enable_profiling=enable_profiling, profile_prefix=profile_prefix,
                               allow_fallback=allow_fallback)

    def host_mismatches(self, host_machine: str | None = None, host_flags: set[str] | None = None) -> list[str]:
        """Ways this host differs from the device's CPU (architecture, missing CPU features)."""
        notes = []
        machine = MACHINE_NAMES.get((host_machine or platform.machine()).lower(), host_machine or platform.machine())
        if self.cpu_arch != "any" and machine != self.cpu_arch:
            notes.append(f"the device is {self.cpu_arch}, this host is {machine}")
        if host_flags is not None:
            lacking = [flag for flag in self.cpu_features if flag not in host_flags]
            if lacking:
                notes.append(f"this host lacks the device's CPU features: {', '.join(lacking)}")
        return notes

    def to_json(self) -> dict:
        """Plain JSON form (for reports)."""
        record = {f.name: getattr(self, f.name) for f in fields(self)}
        record["providers"] = [{"name": spec.name, "options": spec.resolved_options()} for spec in self.providers]
        record["precisions"] = [p.value for p in self.precisions]
        return record

    def describe(self) -> str:
        """Human-readable, multi-line summary (``lora-edge devices show``)."""
        helps = field_help(DeviceTarget)
        lines = [f"{self.name}: {self.description}", f"  file: {self.source}"]
        for spec in self.providers:
            options = ", ".join(f"{k}={v}" for k, v in spec.resolved_options().items()) or "defaults"
            lines.append(f"  provider: {spec.name} ({options})")
        for name in ("intra_op_threads", "inter_op_threads", "graph_optimization_level", "memory_budget_mb",
                     "latency_budget_ms", "cpu_arch"):
            lines.append(f"  {name}: {getattr(self, name)}    # {helps[name]}")
        lines.append(f"  precisions: {', '.join(p.value for p in self.precisions)}")
        if self.cpu_features:
            lines.append(f"  cpu_features: {', '.join(self.cpu_features)}")
        for precision, overrides in self.tolerances.items():
            lines.append(f"  tolerances.{precision}: " + ", ".join(f"{k}={v}" for k, v in overrides.items()))
        return "\n".join(lines)


def fields_default(target: DeviceTarget, name: str) -> str:
    """The default of a DeviceTarget field, for error messages (``my-board`` for the empty name)."""
    default = next(f.default for f in fields(target) if f.name == name)
    return default or "my-board"


def _provider(item: Any, index: int) -> ProviderSpec:
    """A ProviderSpec from a TOML table (or a bare name), with errors naming providers[index]."""
    if isinstance(item, ProviderSpec):
        return item
    if isinstance(item, str):
        item = {"name": item}
    if not isinstance(item, dict):
        raise ConfigError(f"providers[{index}] must be a table with a name", f"providers[{index}]",
                          'write [[providers]] name = "CPUExecutionProvider"')
    unknown = set(item) - {"name", "options"}
    if unknown:
        raise ConfigError(f"unknown key '{sorted(unknown)[0]}'", f"providers[{index}]", "use name and options")
    try:
        return ProviderSpec(**item)
    except ConfigError as exc:
        raise ConfigError(exc.what, exc.where.replace("providers.", f"providers[{index}]."), exc.fix) from None


def _precisions(values: Any) -> list[Precision]:
    if not isinstance(values, list) or not values:
        raise ConfigError("precisions must be a non-empty list", "precisions", 'write e.g. ["int8-dynamic", "fp32"]')
    parsed = []
    for value in values:
        try:
            parsed.append(Precision(value))
        except ValueError:
            raise ConfigError(f"unknown precision '{value}'", "precisions",
                              f"use one of: {', '.join(p.value for p in Precision)}") from None
    return parsed


def _tolerances(table: Any) -> dict[str, dict[str, float]]:
    """Check the accuracy-gate overrides with the recipe's own validator (same metrics, same rules)."""
    return check_threshold_tables(table, "tolerances")


def device_from_dict(data: dict, source: str = "") -> DeviceTarget:
    """Build and validate a DeviceTarget from parsed TOML; errors name ``source`` and the bad field."""
    known = {f.name for f in fields(DeviceTarget)} - {"source"}
    unknown = sorted(set(data) - known)
    try:
        if unknown:
            raise ConfigError(f"unknown field '{unknown[0]}'", unknown[0], f"valid fields: {', '.join(sorted(known))}")
        return DeviceTarget(**data, source=source)
    except ConfigError as exc:
        where = f"{source}: {exc.where}" if source else exc.where
        raise ConfigError(exc.what, where, exc.fix) from None


def devices_dir() -> Path:
    """Directory of the device targets shipped with the package."""
    return Path(str(resources.files("lora_edge") / "resources" / "devices"))


def load_device_file(path: Path) -> DeviceTarget:
    """Load one device TOML file."""
    path = Path(path)
    try:
        data = toml_compat.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"device file '{path}' does not exist", "--device",
                          f"give a device name ({', '.join(list_devices())}) or a .toml path") from None
    except toml_compat.TOMLDecodeError as exc:
        raise ConfigError(f"not valid TOML ({exc})", path, "fix the syntax") from None
    except UnicodeDecodeError:
        raise ConfigError("not UTF-8 text", path, "save the device file as UTF-8 TOML") from None
    return device_from_dict(data, str(path))


def load_device(name_or_path: str | Path) -> DeviceTarget:
    """A shipped device by name (``raspberry-pi-5``), or a device TOML file by path."""
    if isinstance(name_or_path, DeviceTarget):
        return name_or_path
    value = str(name_or_path)
    shipped = devices_dir() / f"{value}{DEVICE_SUFFIX}"
    if "/" not in value and not value.endswith(DEVICE_SUFFIX) and shipped.is_file():
        return load_device_file(shipped)
    path = Path(value).expanduser()
    if path.is_file() or value.endswith(DEVICE_SUFFIX):
        return load_device_file(path)
    raise ConfigError(f"unknown device '{value}'", "--device",
                      f"use one of: {', '.join(list_devices())}, or a path to a .toml file")


def list_devices() -> list[str]:
    """Names of the shipped device targets."""
    return sorted(path.stem for path in devices_dir().glob(f"*{DEVICE_SUFFIX}"))


def device_table(as_json: bool = False) -> str:
    """The shipped devices as a Markdown table (or JSON): name, providers, threads, precisions, budgets."""
    import json

    from lora_edge.core.report import markdown_table

    devices = [load_device(name) for name in list_devices()]
    if as_json:
        return json.dumps([device.to_json() for device in devices], indent=2, default=str)
    rows = [{"name": d.name, "providers": ", ".join(PROVIDERS[n].short for n in d.provider_names),
             "threads": d.intra_op_threads or "auto", "precisions": ", ".join(p.value for p in d.precisions),
             "budget": f"{d.latency_budget_ms or '-'} ms / {d.memory_budget_mb or '-'} MB",
             "description": d.description} for d in devices]
    return markdown_table(rows, ["name", "providers", "threads", "precisions", "budget", "description"],
                          ["name", "providers", "threads", "precisions", "latency / memory budget", "description"])
