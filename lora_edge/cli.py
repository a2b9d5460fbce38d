"""The `lora-edge` command line: a thin click shell over the stage functions.

Each command parses its options into the stage's typed inputs and calls one
stage function; no logic lives here. Stage modules are imported inside the
commands so that `lora-edge --help` never imports torch.

Errors: a :class:`~lora_edge.errors.LoraEdgeError` prints one line
(``error: <what>, <where>, <how to fix>``) and exits with the error's code;
``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import sys

import click

from lora_edge.errors import ConfigError, LoraEdgeError, exit_codes

EXIT_CODE_HELP = "Exit codes: " + ", ".join(f"{code} {name}" for name, code in
                                            sorted(exit_codes().items(), key=lambda item: item[1])) + "."


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
# --- train / sweep (trainer) ---
# --- merge / export / infer (deployment forms) ---
# --- generate (decoders) ---
# --- quantize ---
# --- devices / profile / compare ---
# --- check / run / demo ---


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point: run the CLI and turn LoraEdgeErrors into one-line errors."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    try:
        cli.main(args=args, prog_name="lora-edge", standalone_mode=False)
    except LoraEdgeError as exc:
        if debug:
            raise
        click.echo(f"error: {exc.format_message()}", err=True)
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
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
        click.echo(f"error: internal error ({exc.__class__.__name__}: {exc}), re-run with --debug for the traceback",
                   err=True)
        sys.exit(LoraEdgeError.exit_code)
