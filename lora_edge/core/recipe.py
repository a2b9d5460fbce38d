"""Typed specs for each stage, validated on construction, and whole recipes from TOML (``export/*.toml``).

Every field is a :func:`~lora_edge.core.config_fields.config_field` (its default and
help text, written once: the CLI's options are generated from them) and is
checked in ``__post_init__``; a bad value raises a
:class:`~lora_edge.core.errors.ConfigError` that names the field (the CLI names
the option instead). Loaded from a
recipe file, the error names the file and the dotted field
(``export/demo.toml: check.thresholds.int4.top1_agreement``).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from lora_edge.core.choices import (SHIPPED_CHAT_DATA, SHIPPED_DATA_NAMES, SHIPPED_INTENT_DATA, Form, Precision, StrChoice,
                                    Task, tiny_arch)
from lora_edge.core.config_fields import config_field, field_default, field_help, field_of, same_field
from lora_edge.core.errors import ConfigError, parse_enum
from lora_edge.core.names import require_name
# The gate's thresholds (re-exported here: a recipe's [check] section overrides them).
from lora_edge.core.thresholds import (DEFAULT_THRESHOLDS, THRESHOLD_FIELDS, Thresholds,  # noqa: F401
                                  check_threshold_tables, resolve_thresholds)

ALL_LINEAR = "all-linear"
AUTO_TARGETS = "auto"  # the usual attention projections of the model's architecture (resolved by the trainer)


class LoraInit(StrChoice):
    """How the LoRA A/B matrices start (PEFT's ``init_lora_weights``)."""

    DEFAULT = "default"
    GAUSSIAN = "gaussian"
    PISSA = "pissa"

    def peft_value(self) -> bool | str:
        """The value PEFT's LoraConfig expects for ``init_lora_weights``."""
        return True if self is LoraInit.DEFAULT else self.value


@dataclass
class LoraSpec:
    """The LoRA adapter to train: which layers, what rank, how it is scaled and initialised."""

    rank: int = config_field(8, "LoRA rank r: the inner dimension of B·A.")
    alpha: float = config_field(16.0, "LoRA alpha: the update is scaled by alpha/r (alpha/sqrt(r) with rslora).")
    dropout: float = config_field(0.05, "Dropout on the LoRA branch input during training, in [0, 1).")
    targets: list[str] | str = config_field(AUTO_TARGETS, "Modules to adapt: names (suffix match; comma-separated "
                                                          "on the command line, e.g. query,value), all-linear, or "
                                                          "auto (the architecture's attention query/value "
                                                          "projections).")
    layers: list[int] = config_field([], "Adapt the targets only in these transformer blocks (0-based indices, "
                                         "comma-separated on the command line); empty: in every block. LoRA on "
                                         "the top blocks only stops the backward pass there, so each step costs "
                                         "less.", item=int)
    init: LoraInit = config_field(LoraInit.DEFAULT, "Initialisation of A/B: default, gaussian or pissa (pissa is "
                                                    "saved converted to plain LoRA).")
    rslora: bool = config_field(False, "Rank-stabilised scaling alpha/sqrt(r).")
    rank_pattern: dict[str, int] = config_field({}, "Per-module rank overrides, {module-name regex: rank}.")
    alpha_pattern: dict[str, float] = config_field({}, "Per-module alpha overrides, {module-name regex: alpha}.")

    def __post_init__(self):
        if not isinstance(self.rank, int) or self.rank < 1:
            raise ConfigError(f"rank must be a positive integer, got {self.rank!r}", "lora.rank", "use e.g. 8")
        if not isinstance(self.alpha, (int, float)) or self.alpha <= 0:
            raise ConfigError(f"alpha must be positive, got {self.alpha!r}", "lora.alpha", "use e.g. 16")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout!r}", "lora.dropout", "use e.g. 0.05")
        if isinstance(self.targets, str) and self.targets not in (ALL_LINEAR, AUTO_TARGETS):
            self.targets = [t.strip() for t in self.targets.split(",") if t.strip()]
        if not self.targets:
            raise ConfigError("no target modules given", "lora.targets", "name modules like query,value or all-linear")
        self.init = parse_enum(LoraInit, self.init, "lora.init")
        if not isinstance(self.layers, list) or any(not isinstance(i, int) or isinstance(i, bool) or i < 0
                                                    for i in self.layers):
            raise ConfigError(f"layers must be a list of block indices >= 0, got {self.layers!r}", "lora.layers",
                              "write e.g. layers = [22, 23, 24, 25, 26, 27, 28, 29]")
        for name, value in self.rank_pattern.items():
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"rank for '{name}' must be a positive integer", "lora.rank_pattern", "fix the value")

    def peft_config_kwargs(self) -> dict:
        """Keyword arguments for ``peft.LoraConfig`` (task type and modules_to_save excluded)."""
        targets = None if self.targets == AUTO_TARGETS else self.targets  # None: PEFT's per-model default
        return dict(r=self.rank, lora_alpha=self.alpha, lora_dropout=self.dropout,
                    target_modules=targets, init_lora_weights=self.init.peft_value(),
                    layers_to_transform=sorted(set(self.layers)) or None,
                    use_rslora=self.rslora, rank_pattern=dict(self.rank_pattern),
                    alpha_pattern=dict(self.alpha_pattern))


@dataclass
class TrainSpec:
    """How to train: schedule, batch, seed. Either epochs or max_steps bounds the run."""

    epochs: float = config_field(3.0, "Training epochs (max steps > 0 replaces them).")
    max_steps: int = config_field(-1, "Train for this many optimizer steps instead of the epochs; -1: train "
                                      "for the epochs.")
    # 5e-3 / 3 epochs / batch 32: the default model with r=8 on query,value reaches ~98% test accuracy on
    # the shipped intent task (5e-4 stayed near 70%, 2 epochs gave ~96%); see benchmarks/train_intent.py.
    learning_rate: float = config_field(5e-3, "Peak learning rate (linear decay, AdamW).", option="--lr")
    batch_size: int = config_field(32, "Examples per device per step.")
    grad_accum: int = config_field(1, "Gradient accumulation steps.")
    max_length: int = config_field(64, "Truncate examples to this many tokens.")
    seed: int = config_field(0, "Seed for initialisation, data order and splits (same seed: same adapter bytes).")
    eval_steps: int = config_field(0, "Evaluate every N steps; 0 evaluates once per epoch.")
    warmup: float = config_field(0.06, "Linear learning-rate warm-up: a fraction of the run if < 1, else steps.")
    quantized_base: str = config_field("", "Causal LM: train the adapter against the base as an int4 graph holds "
                                           "it ('int4': every base weight quantized and dequantized once, with "
                                           "the int4 export's blocks and zero points), so branched/hot-swap int4 "
                                           "graphs keep the task; empty: the float base.")
    quantized_base_block_size: int = config_field(32, "With quantized_base: weights per int4 block; must equal "
                                                      "the quantize stage's block_size.")
    init_adapter: str = config_field("", "Start the LoRA weights from this trained adapter directory (same "
                                         "targets, layers and rank), e.g. to adapt a float-trained adapter to an "
                                         "int4 base with --quantized-base int4; empty: fresh LoRA weights.")

    def __post_init__(self):
        checks = {"epochs": self.epochs > 0 or self.max_steps > 0, "learning_rate": self.learning_rate > 0,
                  "batch_size": self.batch_size >= 1, "grad_accum": self.grad_accum >= 1,
                  "max_length": self.max_length >= 8, "eval_steps": self.eval_steps >= 0,
                  "warmup": self.warmup >= 0, "quantized_base": self.quantized_base in ("", "int4"),
                  "quantized_base_block_size": isinstance(self.quantized_base_block_size, int)
                  and self.quantized_base_block_size >= 16
                  and self.quantized_base_block_size & (self.quantized_base_block_size - 1) == 0}
        for name, ok in checks.items():
            if not ok:
                raise ConfigError(f"invalid {name} = {getattr(self, name)!r}", f"train.{name}",
                                  f"see --help: {field_help(TrainSpec)[name]}")


@dataclass
class CheckSpec:
    """The accuracy gate: which data it evaluates on, which device runs it, and its thresholds."""

    data: str = config_field("", "Labeled evaluation file (JSONL/CSV; causal LM: text). Empty: the test split "
                                "recorded with each adapter, else generated inputs (task metric skipped).")
    device: str = config_field("", "Device target (name or .toml) whose providers run the graphs and whose tolerances "
                                  "apply. Empty: ONNX Runtime's CPU provider, default thresholds.")
    max_examples: int = config_field(0, "Evaluate at most this many examples per adapter; 0 = all.")
    batch_size: int = config_field(32, "Examples per inference batch.")
    max_length: int = config_field(128, "Token length examples are truncated to.")
    generated_examples: int = config_field(32, "How many random inputs to generate when there is no data.")
    seed: int = config_field(0, "Seed for generated inputs.")
    greedy_prompts: int = config_field(20, "Causal LM: prompts the graph and the reference each continue greedily "
                                          "(greedy agreement, exact match on chat data); 0 = skip those metrics.")
    greedy_tokens: int = config_field(48, "Causal LM: most tokens generated per prompt (a continuation stops at EOS).")
    thresholds: dict[str, dict[str, float]] = config_field({}, "Overrides per precision, e.g. "
                                                              "[check.thresholds.int4] top1_agreement = 0.97.")

    def __post_init__(self):
        for name, minimum in (("max_examples", 0), ("batch_size", 1), ("max_length", 8), ("generated_examples", 1),
                              ("greedy_prompts", 0), ("greedy_tokens", 1)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
                raise ConfigError(f"{name} must be an integer >= {minimum}, got {value!r}", f"check.{name}",
                                  f"see --help: {field_help(CheckSpec)[name]}")
        check_threshold_tables(self.thresholds, "check.thresholds")

    def thresholds_for(self, precision: str, device_tolerances: dict | None = None,
                       device_where: str = "device.tolerances", task: Task = Task.SEQ_CLS) -> Thresholds:
        """The task's defaults for ``precision``, overridden by the device's tolerances, then by this spec."""
        return resolve_thresholds(precision, (device_tolerances or {}, device_where),
                                  (self.thresholds, "check.thresholds"), task=task)


# --------------------------------------------------------------------------------------------
# Recipes: one TOML file per export job
# --------------------------------------------------------------------------------------------

RECIPE_SUFFIX = ".toml"


@dataclass
class TrainingSpec:
    """A training block: train the adapter from data instead of naming a directory."""

    data: str = config_field(SHIPPED_INTENT_DATA, "Training data file (JSONL/CSV/txt), 'intent' for the shipped intent task, "
                                          "or 'commands' for the shipped command-parsing chat task (causal-lm).")
    validation: str = config_field("", "Validation file; empty: cut from the training data by seed.")
    test: str = config_field("", "Test file (the gate's default evaluation set); empty: cut from the data by seed.")
    lora: LoraSpec = config_field(None, "The LoRA adapter to train ([adapters.training.lora]).")
    train: TrainSpec = config_field(None, "The schedule ([adapters.training.train]).")

    def __post_init__(self):
        self.lora = _build(LoraSpec, self.lora or {}, "lora")
        self.train = _build(TrainSpec, self.train or {}, "train")
        if not isinstance(self.data, str) or not self.data:
            raise ConfigError("data must name a file or 'intent'", "data", 'write data = "intent"')
        if self.data in SHIPPED_DATA_NAMES + (SHIPPED_CHAT_DATA,) and (self.validation or self.test):
            raise ConfigError(f"validation/test go with a data file, not the shipped '{self.data}' task",
                              "validation" if self.validation else "test", "give data a file, or drop validation/test")

@dataclass
class AdapterSource:
    """An adapter of the recipe: an existing PEFT directory (``path``) or a ``training`` block."""

    name: str = config_field("", "Adapter name in the bundle (letters, digits, -, _); default: the directory's name.")
    path: str = config_field("", "An existing PEFT adapter directory.")
    training: TrainingSpec | None = config_field(None, "Train the adapter instead ([adapters.training]).")

    def __post_init__(self):
        if isinstance(self.training, dict):
            self.training = _build(TrainingSpec, self.training, "training")
        if bool(self.path) == bool(self.training):
            raise ConfigError("an adapter needs exactly one of 'path' or a [training] block", "path",
                              'write path = "adapters/intent", or add [adapters.training]')
        self.name = require_name(self.name or Path(self.path).name, "adapter name", "name",
                                 'write e.g. name = "intent"')


class CalibMethod(StrChoice):
    """How int8-static picks activation ranges from the calibration batches."""

    MINMAX = "minmax"
    ENTROPY = "entropy"
    PERCENTILE = "percentile"


@dataclass
class QuantizeOptions:
    """How to quantize: calibration for int8-static, per-channel scales, the int4 block size, fusions."""

    calibration: str | Path | None = config_field(None, "int8-static calibration data: JSONL/CSV with a text "
                                                        "column. Default: the training data recorded with the "
                                                        "adapter (data.json).")
    calib_method: CalibMethod = config_field(CalibMethod.MINMAX, "int8-static activation ranges: minmax, entropy "
                                                                 "or percentile.")
    calib_size: int = config_field(64, "Calibration texts to use (drawn with a fixed seed).")
    per_channel: bool = config_field(True, "Per-output-channel int8 weight scales: on MiniLM/intent 2.4x lower "
                                           "logit error than per-tensor for ~3% more latency "
                                           "(benchmarks/README.md).")
    block_size: int = config_field(32, "int4: weights per quantization block (a power of two >= 16).")
    int4_accuracy_level: int = config_field(4, "int4: MatMulNBits compute type (0 = as input, 4 = int8 activations).")
    int4_symmetric: bool = config_field(False, "int4: symmetric blocks (no zero points); asymmetric is more accurate "
                                               "at the same speed.")
    fuse: bool = config_field(True, "Fuse attention/LayerNorm for the target before quantizing (each rewrite "
                                    "verified); off: quantize the graphs as exported.")

    def __post_init__(self):
        self.calib_method = parse_enum(CalibMethod, self.calib_method, "calib_method", "calibration method")
        if self.calibration in ("", None):
            self.calibration = None
        else:
            self.calibration = Path(self.calibration).expanduser()
            if not self.calibration.is_file():
                raise ConfigError(f"calibration file '{self.calibration}' does not exist", "calibration",
                                  "give an existing JSONL or CSV file with a text column")
        _check_block_size(self.block_size)
        if not isinstance(self.calib_size, int) or self.calib_size < 1:
            raise ConfigError(f"calibration size must be a positive integer, got {self.calib_size!r}",
                              "calib_size", "use e.g. 64")
        if self.int4_accuracy_level not in (0, 1, 2, 3, 4):
            raise ConfigError(f"int4 accuracy level must be 0-4, got {self.int4_accuracy_level!r}",
                              "int4_accuracy_level", "use 4 (int8 compute) or 0")


def _check_block_size(value: Any) -> None:
    """int4 blocks: MatMulNBits takes a power of two >= 16 (shared by QuantizeOptions and ExportSpec)."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 16 or value & (value - 1):
        raise ConfigError(f"block size must be a power of two >= 16, got {value!r}", "block_size", "use 32 or 128")


@dataclass
class ExportSpec:
    """Which graphs to build: forms and precisions (the quantization settings a recipe may set included)."""

    forms: list[Form] = config_field([Form.MERGED, Form.BRANCHED, Form.HOTSWAP],
                                     "Deployment forms, comma-separated: merged (B·A folded into W), branched "
                                     "(explicit low-rank pairs), hotswap (one base graph + .onnx_adapter per "
                                     "adapter).")
    precisions: list[Precision] = config_field([Precision.FP32], "Precisions, comma-separated: fp32, fp16, "
                                                                 "int8-dynamic, int8-static, int4. The fp32 graphs "
                                                                 "are always built (the others are quantized from "
                                                                 "them) and kept in the bundle when fp32 is listed.")
    opset: int = config_field(0, "ONNX opset; 0 = the exporter's default.")
    calibration: str = same_field(QuantizeOptions, "calibration")
    block_size: int = same_field(QuantizeOptions, "block_size")

    def __post_init__(self):
        from lora_edge.core.bundle import parse_choices

        self.forms = list(dict.fromkeys(parse_choices(Form, _as_list(self.forms), "export.forms")))
        precisions = parse_choices(Precision, _as_list(self.precisions), "export.precisions")
        unique = list(dict.fromkeys(precisions))  # fp32 first: the others are made from it
        self.precisions = [p for p in unique if p is Precision.FP32] + [p for p in unique if p is not Precision.FP32]
        if not isinstance(self.opset, int) or isinstance(self.opset, bool) or self.opset < 0:
            raise ConfigError(f"opset must be a non-negative integer, got {self.opset!r}", "opset", "use e.g. 18")
        _check_block_size(self.block_size)
        if self.calibration is not None and not isinstance(self.calibration, str):
            raise ConfigError(f"calibration must be a file path, got {self.calibration!r}", "calibration",
                              'write e.g. calibration = "data/calibration.jsonl"')

    @property
    def quantized_precisions(self) -> list[Precision]:
        """The precisions made by quantizing the fp32 graphs."""
        return [p for p in self.precisions if p is not Precision.FP32]

    def quantize_options(self) -> QuantizeOptions:
        """The quantization settings of this export (the others at their defaults)."""
        return QuantizeOptions(calibration=self.calibration, block_size=self.block_size)


@dataclass
class MeasureSpec:
    """How to time graphs: the inputs, how many runs, and whether a missing provider may be replaced.

    200 runs (40 interleaved rounds of 5, ``lora_edge.profile.profiler.RUNS_PER_ROUND``)
    give the overhead ratios tight bootstrap intervals on a quiet machine; then
    rounds are added while an overhead's interval is wider than
    ``target_interval_pct`` (up to ``max_runs``), because two runs only agree
    once their intervals are narrow; ``time_budget_s`` bounds the timing
    either way (a busy machine gets fewer rounds and wider intervals, said in
    the report). Recipes that only need a rough figure set fewer runs (the
    shipped ones do).
    """

    batch: int = config_field(1, "Batch size of the timed inputs.")
    seq: int = config_field(128, "Sequence length of the timed inputs.")
    runs: int = config_field(200, "Timed runs per graph (see --target-interval-pct and --time-budget-s).")
    warmup: int = config_field(20, "Untimed warm-up runs per graph.")
    allow_fallback: bool = config_field(False, "Measure on the providers this host has when a device asks for "
                                               "others (recorded in the report). Off: such graphs are listed as "
                                               "not measured (and profile/compare fail).")
    target_interval_pct: float = config_field(1.0, "After --runs, keep adding interleaved rounds while the 95% "
                                                   "interval of any overhead over merged is wider than +- this "
                                                   "many points (0: exactly --runs).")
    max_runs: int = config_field(0, "Cap on timed runs per graph while adding rounds (0: 5 x --runs).")
    time_budget_s: float = config_field(90.0, "With a --target-interval-pct: end the timed rounds once they have "
                                              "taken this many seconds, even before --runs (but after 10 rounds "
                                              "of 5 runs).")
    spinning: bool = config_field(False, "Let ONNX Runtime's intra-op threads spin while they wait for work "
                                         "(its default). Off: on a machine with more busy threads than cores a "
                                         "spinning thread burns the time slice of the thread it waits for, and "
                                         "latencies and overheads measure the scheduler instead of the graph.")

    def __post_init__(self):
        for name, minimum in (("batch", 1), ("seq", 1), ("runs", 1), ("warmup", 0), ("max_runs", 0)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
                raise ConfigError(f"{name} must be an integer >= {minimum}, got {value!r}", name,
                                  f"give a value >= {minimum} ({field_help(MeasureSpec)[name]})")
        for name in ("allow_fallback", "spinning"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be true or false, got {getattr(self, name)!r}", name,
                                  f"give true or false ({field_help(MeasureSpec)[name]})")
        for name in ("target_interval_pct", "time_budget_s"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value < float("inf"):
                raise ConfigError(f"{name} must be a number >= 0, got {value!r}", name,
                                  f"give a value >= 0 ({field_help(MeasureSpec)[name]})")
            setattr(self, name, float(value))

    @property
    def run_cap(self) -> int:
        """The most timed runs per graph: ``runs`` when not adding rounds, else ``max_runs`` (0: 5 x runs)."""
        if not self.target_interval_pct:
            return self.runs
        return max(self.runs, self.max_runs or 5 * self.runs)

    def measure_settings(self) -> "MeasureSpec":
        """Just the measurement settings (a :class:`ProfileSpec` less its devices)."""
        return MeasureSpec(**{f.name: getattr(self, f.name) for f in fields(MeasureSpec)})


@dataclass
class ProfileSpec(MeasureSpec):
    """Where and how to measure latency: device targets and the measurement settings."""

    devices: list[str] = config_field([], "Device targets (names or .toml paths); 'host' = every shipped CPU "
                                          "target this host can run (its CPU architecture). Empty: no profiling.")

    def __post_init__(self):
        self.devices = _as_list(self.devices)
        super().__post_init__()


@dataclass
class Recipe:
    """One export job: model, adapters, forms, precisions, devices, gate thresholds, output directory."""

    name: str = config_field("", "Recipe name; the bundle is written to <output>/<name>.")
    description: str = config_field("", "What the recipe is for, in one line.")
    model: str = config_field("default", "Base model: 'default' (embedded MiniLM), a local HF directory, "
                                        "or 'tiny:<arch>' (a tiny random model built locally).")
    task: Task = config_field(Task.SEQ_CLS, "seq-cls (sequence classification: a head is trained with the "
                                            "adapter) or causal-lm.")
    output: str = config_field("runs", "Directory the bundle is written into (relative to the working directory).")
    seed: int = config_field(0, "Seed recorded in the manifest and used by every stage.")
    trust_remote_code: bool = config_field(False, "Allow model code from the model directory (off: safer).")
    adapters: list[AdapterSource] = config_field([], "The adapters ([[adapters]]): paths or training blocks.")
    export: ExportSpec = config_field(None, "[export]: forms, precisions, quantization settings.")
    profile: ProfileSpec = config_field(None, "[profile]: devices and measurement settings.")
    check: CheckSpec = config_field(None, "[check]: evaluation data and thresholds of the accuracy gate.")
    source: str = field(default="", metadata={"help": "File the recipe was loaded from."})

    def __post_init__(self):
        require_name(self.name, "recipe name", "name", 'write e.g. name = "demo"')
        self.task = Task.parse(self.task, "task")
        if not isinstance(self.adapters, list) or not self.adapters:
            raise ConfigError("a recipe needs at least one adapter", "adapters",
                              "add an [[adapters]] table with a path or a training block")
        self.adapters = [item if isinstance(item, AdapterSource) else _build(AdapterSource, item, f"adapters[{i}]")
                         for i, item in enumerate(self.adapters)]
        names = [adapter.name for adapter in self.adapters]
        duplicate = next((n for n in names if names.count(n) > 1), None)
        if duplicate:
            raise ConfigError(f"two adapters are named '{duplicate}'", "adapters", "give each adapter its own name")
        self.export = _section(ExportSpec, self.export, "export")
        self.profile = _section(ProfileSpec, self.profile, "profile")
        self.check = _section(CheckSpec, self.check, "check")
        if self.model.startswith("tiny:"):
            tiny_arch(self.model, "model")

    @property
    def bundle_dir(self) -> Path:
        """Where the bundle goes: ``<output>/<name>``."""
        return Path(self.output) / self.name

    def to_json(self) -> dict:
        """Plain JSON form (recorded in the bundle's manifest)."""
        def plain(value):
            if isinstance(value, enum.Enum):
                return value.value
            if hasattr(value, "__dataclass_fields__"):
                return {f.name: plain(getattr(value, f.name)) for f in fields(value)}
            if isinstance(value, dict):
                return {k: plain(v) for k, v in value.items()}
            if isinstance(value, list):
                return [plain(v) for v in value]
            return value

        return plain(self)


def _as_list(value: Any) -> list:
    """A list field given as a list or as one comma-separated string."""
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return list(value)


def _section(spec_class: type, value: Any, prefix: str) -> Any:
    if isinstance(value, spec_class):
        return value
    return _build(spec_class, value or {}, prefix)


def _type_error(spec_class: type, name: str, value: Any) -> str | None:
    """Why ``value`` does not fit field ``name`` (judged by the field's default), or None when it does.

    A field declared as a list may be given as one comma-separated string, and the other way round.
    """
    spec = field_of(spec_class, name)
    default = field_default(spec)
    if str(spec.type).startswith("list[") and isinstance(value, (list, str)):
        return None
    expected = {bool: (bool,), int: (int,), float: (int, float), str: (str,), list: (list, str), dict: (dict,)}
    for kind, accepted in expected.items():
        if isinstance(default, kind) and not isinstance(default, enum.Enum):
            ok = isinstance(value, accepted) and (kind is bool or not isinstance(value, bool))
            return None if ok else f"expected {kind.__name__}, got {type(value).__name__} {value!r}"
    if isinstance(default, enum.Enum) and not isinstance(value, (str, enum.Enum)):
        return f"expected a string, got {value!r}"
    return None


def _build(spec_class: type, table: Any, prefix: str) -> Any:
    """Construct ``spec_class`` from a TOML table; every error names ``prefix.<field>``.

    Unknown keys and wrongly typed values are refused here; the dataclass's own
    ``__post_init__`` checks the rest, and the field it names is re-rooted at ``prefix``.
    """
    if isinstance(table, spec_class):
        return table
    if not isinstance(table, dict):
        raise ConfigError(f"expected a table, got {table!r}", prefix, f"write [{prefix}] with its fields")
    known = [f.name for f in fields(spec_class) if f.name != "source"]
    for key, value in table.items():
        if key not in known:
            raise ConfigError(f"unknown field '{key}'", f"{prefix}.{key}", f"valid fields: {', '.join(known)}")
        problem = _type_error(spec_class, key, value)
        if problem:
            raise ConfigError(problem, f"{prefix}.{key}", f"see --help: {field_help(spec_class)[key]}")
    try:
        return spec_class(**table)
    except ConfigError as exc:
        raise ConfigError(exc.what, _reroot(exc.where, known, prefix), exc.fix) from None


def _reroot(where: str | None, known: list[str], prefix: str) -> str:
    """Turn a spec's own error location ("lora.rank", "rank", "adapters[0].path") into "<prefix>.<field...>".

    Specs name their fields with or without a section in front; the location is
    cut at the first part that is a field of this spec and re-rooted at ``prefix``.
    """
    parts = (where or "").split(".")
    rest = next((".".join(parts[i:]) for i, part in enumerate(parts) if part.split("[")[0] in known), where or "")
    return ".".join(part for part in (prefix, rest) if part)


def recipes_dir() -> Path:
    """Directory of the recipes shipped with the package (top-level ``export/`` links there)."""
    from importlib import resources

    return Path(str(resources.files("lora_edge") / "resources" / "recipes"))


def list_recipes() -> list[str]:
    """Names of the shipped recipes."""
    return sorted(path.stem for path in recipes_dir().glob(f"*{RECIPE_SUFFIX}"))


def find_recipe(name_or_path: str | Path) -> Path:
    """A recipe file: a path, or the name of a shipped recipe (``demo``)."""
    value = str(name_or_path)
    path = Path(value).expanduser()
    if path.is_file():
        return path
    shipped = recipes_dir() / f"{value}{RECIPE_SUFFIX}"
    if "/" not in value and shipped.is_file():
        return shipped
    raise ConfigError(f"recipe '{value}' does not exist", "RECIPE",
                      f"give a .toml path or a shipped recipe: {', '.join(list_recipes())}")


def recipe_from_dict(data: dict, source: str = "") -> Recipe:
    """Build and validate a Recipe from parsed TOML; errors read ``<source>: <dotted.field>``."""
    try:
        return _build(Recipe, data, "")
    except ConfigError as exc:
        where = (exc.where or "").lstrip(".")
        raise ConfigError(exc.what, f"{source}: {where}" if source else where, exc.fix) from None


def load_recipe(name_or_path: str | Path) -> Recipe:
    """Load and validate a recipe TOML file (or a shipped recipe by name)."""
    from lora_edge.core import toml_compat

    path = find_recipe(name_or_path)
    try:
        data = toml_compat.loads(path.read_text())
    except toml_compat.TOMLDecodeError as exc:
        raise ConfigError(f"not valid TOML ({exc})", path, "fix the syntax") from None
    except UnicodeDecodeError:
        raise ConfigError("not UTF-8 text", path, "save the recipe as UTF-8 TOML") from None
    recipe = recipe_from_dict(data, str(name_or_path) if Path(str(name_or_path)).is_file() else str(path))
    recipe.source = str(path)
    return recipe
