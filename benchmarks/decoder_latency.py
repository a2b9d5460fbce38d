"""Causal-LM graphs on ONNX Runtime: prefill and decode tokens/s for merged vs branched vs hot-swap,
and how a decode step's cost grows with the past length.

A tiny random decoder (Qwen2 by default: the largest of the tiny decoders the
tests use, attention biases included) gets a random r=8 adapter on q/v
(or give --model DIR --adapter DIR for a real one); its context is raised to
--context positions (RoPE: the weights do not depend on it) so that long pasts
can be measured. The three fp32 forms are exported into one bundle, then run
side by side on the CPU provider with 2 intra-op threads, interleaved (the
order rotates every round), batch 1, and the median of many runs is reported:

* prefill: one step over a --prompt-token prompt from an empty past (tokens/s);
* decode: one-token steps after a past of --past tokens (tokens/s);
* decode step latency at past lengths 0 .. --context, per form (ms), with the
  growth relative to the shortest past.

    python benchmarks/decoder_latency.py [--arch qwen2] [--runs 200] [--json out.json]

Timings on a shared machine are noisy: re-run on a quiet one before quoting them.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np

from lora_edge.runtime.interleave import time_rounds

FORMS = ("merged", "branched", "hotswap")


def build_inputs(arch: str, context: int, rank: int, work: Path) -> tuple[Path, Path]:
    """A tiny random decoder of ``arch`` with a context of ``context`` positions, and a random adapter."""
    from lora_edge.core.tiny import build_random_adapter, build_tiny_model

    model = build_tiny_model(arch, work / f"tiny-{arch}")
    config_path = model / "config.json"
    config = json.loads(config_path.read_text())
    key = "n_positions" if "n_positions" in config else "max_position_embeddings"
    if arch == "gpt2" and context > config[key]:
        raise SystemExit("gpt2 has learned positions: its context cannot be raised; use --arch qwen2")
    config[key] = context
    config_path.write_text(json.dumps(config, indent=2))
    adapter = build_random_adapter(model, work / "adapter", arch, rank=rank, alpha=2.0 * rank, seed=0)
    return model, adapter


def export_forms(model: Path, adapter: Path, out: Path) -> Path:
    """merged, branched and hotswap fp32 graphs of model + adapter in one bundle."""
    from lora_edge.core.adapters import AdapterRef
    from lora_edge.export.bundle import export_bundle

    return export_bundle(model, [AdapterRef("r", adapter)], list(FORMS), out, task="causal-lm",
                         progress=lambda message: print(message, file=sys.stderr))


def runners(bundle: Path, threads: int) -> dict[str, tuple]:
    """Form -> (DecoderRunner, LoraAdapter or None) with ``threads`` intra-op threads on the CPU provider."""
    from lora_edge.core.bundle import ONNX_DIR
    from lora_edge.runtime.generate import DecoderRunner
    from lora_edge.core.manifest import find_graph
    from lora_edge.runtime.session import SessionSettings, create_session, load_lora_adapter

    settings = SessionSettings(intra_op_threads=threads, inter_op_threads=1)
    result = {}
    for form in FORMS:
        record = find_graph(bundle, f"{form}.fp32")
        adapter = load_lora_adapter(bundle / ONNX_DIR / "adapters" / "r.onnx_adapter") if form == "hotswap" else None
        result[form] = (DecoderRunner(create_session(bundle / record.file, settings)), adapter)
    return result


def step_call(runner, adapter, new_tokens: int, past_length: int, seed: int = 0):
    """A closure running one step of ``new_tokens`` tokens after a random past of ``past_length`` (batch 1)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(1000, 2000, size=(1, new_tokens), dtype=np.int64)
    mask = np.ones((1, past_length + new_tokens), dtype=np.int64)
    positions = np.arange(past_length, past_length + new_tokens, dtype=np.int64)[None]
    past = [rng.standard_normal((1, runner.num_kv_heads, past_length, runner.head_dim)).astype(np.float32)
            for _ in runner.past_names]
    return lambda: runner.step(ids, mask, positions, past, adapter, last_only=True)  # as generate runs it


def interleaved_ms(calls: dict[str, callable], runs: int, warmup: int) -> dict[str, float]:
    """Median milliseconds per call: ``runs`` rounds, each timing every call once in a shuffled order."""
    timed = time_rounds(calls, rounds=runs, runs=1, warmup=warmup, gap_s=0.0, visit_warmup=0)
    return {name: statistics.median(values) * 1e3 for name, values in timed.times.items()}


def main() -> None:
    """Export, measure, print Markdown tables, optionally write JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="qwen2", help="Tiny decoder to build: llama, qwen2, mistral (gpt2: "
                                                       "context fixed at 128).")
    parser.add_argument("--model", type=Path, help="A local causal-LM directory instead of a tiny model.")
    parser.add_argument("--adapter", type=Path, help="Its PEFT LoRA adapter (with --model).")
    parser.add_argument("--context", type=int, default=1024, help="Context positions of the tiny model.")
    parser.add_argument("--rank", type=int, default=8, help="Rank of the random adapter.")
    parser.add_argument("--prompt", type=int, default=64, help="Prompt tokens for the prefill measure.")
    parser.add_argument("--past", type=int, default=64, help="Past length for the decode tokens/s measure.")
    parser.add_argument("--pasts", default="0,64,128,256,512,1000", help="Past lengths for the growth table.")
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, help="Write the results here as JSON.")
    args = parser.parse_args()

    from lora_edge.core.report import markdown_table

    with tempfile.TemporaryDirectory(prefix="decoder-latency-") as tmp:
        work = Path(tmp)
        if args.model:
            model, adapter = args.model, args.adapter
        else:
            model, adapter = build_inputs(args.arch, args.context, args.rank, work)
        bundle = export_forms(model, adapter, work / "bundle")
        forms = runners(bundle, args.threads)
        context = forms["merged"][0].max_positions or args.context
        prefill = interleaved_ms({f: step_call(r, a, args.prompt, 0) for f, (r, a) in forms.items()},
                                 args.runs, args.warmup)
        decode = interleaved_ms({f: step_call(r, a, 1, args.past) for f, (r, a) in forms.items()},
                                args.runs, args.warmup)
        speed_rows = [{"form": f, "prefill tokens/s": args.prompt / (prefill[f] / 1e3),
                       "prefill vs merged": prefill[f] / prefill["merged"],
                       "decode tokens/s": 1.0 / (decode[f] / 1e3), "decode vs merged": decode[f] / decode["merged"]}
                      for f in FORMS]
        pasts = [int(p) for p in args.pasts.split(",") if int(p) < context]
        growth = {}
        for past in pasts:
            growth[past] = interleaved_ms({f: step_call(r, a, 1, past) for f, (r, a) in forms.items()},
                                          max(args.runs // 2, 20), args.warmup // 2)
        growth_rows = [{"past": past, **{f"{f} ms": growth[past][f] for f in FORMS},
                        "merged vs shortest past": growth[past]["merged"] / growth[pasts[0]]["merged"]}
                       for past in pasts]

    print(f"\nprefill {args.prompt} tokens / decode after {args.past} tokens, batch 1, {args.threads} threads, "
          f"CPU provider, median of {args.runs} interleaved runs ({model.name if args.model else args.arch}, "
          f"r={args.rank})\n")
    print(markdown_table(speed_rows, list(speed_rows[0])))
    print("decode step latency vs past length (one new token)\n")
    print(markdown_table(growth_rows, list(growth_rows[0])))
    if args.json:
        args.json.write_text(json.dumps({"speed": speed_rows, "decode_vs_past": growth_rows,
                                         "settings": vars(args) | {"json": str(args.json)}}, indent=2, default=str))


if __name__ == "__main__":
    main()
