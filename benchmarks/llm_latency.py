"""A real small LLM + LoRA, decoded side by side: lora-edge vs onnxruntime-genai vs PyTorch eager.

Same model (SmolLM2-135M-Instruct by default, an HF directory), same adapter
(a PEFT LoRA; by default a seeded random-B r=8 adapter on q_proj/v_proj),
batch 1, 2 intra-op threads, a --prompt-tokens prompt, --new-tokens greedy
tokens (EOS ignored). Engines, each in its own worker process
(``llm_worker.py``), timed in interleaved rounds (the order rotates every
round) so that machine load hits all of them alike; ratios are taken within a
round, then the median over rounds:

* lora-edge merged int4, hot-swap int4 (adapter active), merged fp32 (one bundle
  exported and quantized by the lora-edge CLI);
* onnxruntime-genai 0.18 int4 and fp32, built by its own model builder from the
  PEFT-merged model, installed into its own virtual environment
  (``--genai-venv``, created on first use: onnxruntime-genai, torch 2.13 CPU,
  transformers, onnx), never a lora-edge dependency;
* PyTorch eager fp32, PEFT unmerged and merged (KV cache, one token per step).

Also reported: greedy token agreement of every engine with PyTorch (first 32
tokens and all), graph sizes, and the per-op-type time of one lora-edge int4
decode step (ONNX Runtime's profiler). llama.cpp is not run (see README).

    python benchmarks/llm_latency.py --model /path/to/smollm2-hf [--adapter PEFT_DIR] [--rounds 5] \
        [--work ~/.cache/lora-edge/llm-bench] [--json benchmarks/results/llm_latency.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DEFAULT_VENV = Path("~/.cache/lora-edge/bench-venvs/genai").expanduser()
GENAI_REQUIREMENTS = ["onnxruntime-genai==0.18.0", "torch==2.13.0", "transformers", "onnx", "onnx_ir"]
PROMPT_TEXT = ("The history of the printing press begins in the fifteenth century, when Johannes Gutenberg "
               "combined movable metal type, oil-based ink and a wooden press adapted from wine making. ")


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def random_adapter(model: Path, out: Path) -> Path:
    """A seeded r=8 LoRA on q_proj/v_proj with random, small B (the model still speaks, tokens change)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    if (out / "adapter_config.json").exists():
        return out
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    peft = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                           task_type="CAUSAL_LM", init_lora_weights=False))
    with torch.no_grad():
        for name, tensor in peft.named_parameters():
            if "lora_B" in name:
                tensor.mul_(0.05)
    peft.save_pretrained(out)
    return out


def merged_model(model: Path, adapter: Path, out: Path) -> Path:
    """The PEFT-merged model as an HF directory (what onnxruntime-genai's builder takes)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if (out / "config.json").exists():
        return out
    base = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    PeftModel.from_pretrained(base, adapter).merge_and_unload().save_pretrained(out)
    AutoTokenizer.from_pretrained(model).save_pretrained(out)
    for extra in ("generation_config.json", "chat_template.jinja"):
        if (model / extra).exists():
            shutil.copy(model / extra, out / extra)
    return out


def lora_edge_bundle(model: Path, adapter: Path, out: Path) -> Path:
    """merged + hotswap, fp32 + int4, through the lora-edge CLI (export verifies every graph)."""
    if (out / "manifest.json").exists():
        return out
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "lora_edge", "export", "--model", str(model), "--adapter",
                    f"qv={adapter}", "--forms", "merged,hotswap", "--precisions", "fp32,int4", "--task",
                    "causal-lm", "--out", str(out), "--force"], check=True, env=env)
    log(f"lora-edge bundle in {time.perf_counter() - started:.0f} s")
    return out


def genai_python(venv: Path) -> Path:
    """The benchmark venv's python, creating the venv (onnxruntime-genai 0.18 + builder deps) if needed."""
    python = venv / "bin" / "python"
    if not python.exists():
        log(f"creating {venv} ({', '.join(GENAI_REQUIREMENTS)})")
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", *GENAI_REQUIREMENTS], check=True)
    return python


def genai_model(python: Path, merged: Path, precision: str, out: Path, threads: int,
                extra_options: tuple[str, ...] = ()) -> Path:
    """onnxruntime-genai's own build of the merged model (CPU), with ``threads`` intra-op threads.

    ``extra_options``: the builder's ``--extra_options`` (e.g. ``prune_lm_head=true``: last-token logits in prefill).
    """
    if not (out / "genai_config.json").exists():
        started = time.perf_counter()
        extra = ["--extra_options", *extra_options] if extra_options else []
        subprocess.run([str(python), "-m", "onnxruntime_genai.models.builder", "-i", str(merged), "-o", str(out),
                        "-p", precision, "-e", "cpu", "-c", str(out.parent / "genai-cache"), *extra], check=True)
        log(f"genai {precision} built in {time.perf_counter() - started:.0f} s")
    config_path = out / "genai_config.json"
    config = json.loads(config_path.read_text())
    options = config["model"]["decoder"].setdefault("session_options", {})
    options["intra_op_num_threads"] = threads
    options["inter_op_num_threads"] = 1
    config_path.write_text(json.dumps(config, indent=4))
    return out


def prompt_ids(model: Path, tokens: int, out: Path) -> list[int]:
    """``tokens`` token ids of a fixed English text (the same ids feed every engine)."""
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(model)(PROMPT_TEXT * 20)["input_ids"][:tokens]
    out.write_text(json.dumps(ids))
    return ids


class Worker:
    """One engine in its own process (llm_worker.py), answering ``run`` with timings and tokens."""

    def __init__(self, name: str, python: Path, args: list[str], threads: int):
        env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(threads)}
        self.name = name
        self.process = subprocess.Popen([str(python), str(HERE / "llm_worker.py"), *args, "--threads", str(threads)],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        ready = self.process.stdout.readline()
        if not ready:
            raise SystemExit(f"worker {name} failed to start")

    def run(self) -> dict:
        self.process.stdin.write("run\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            raise SystemExit(f"worker {self.name} died")
        return json.loads(line)

    def close(self) -> None:
        try:
            self.process.stdin.write("quit\n")
            self.process.stdin.flush()
        except BrokenPipeError:
            pass
        self.process.wait(timeout=60)


def graph_file(bundle: Path, name: str) -> Path:
    from lora_edge.core.manifest import find_graph

    return bundle / find_graph(bundle, name).file


def hotswap_adapter(bundle: Path, graph: str = "hotswap.int4") -> Path:
    """The adapter file the bundle records for ``graph`` (a graph with packed LoRA inputs has its own)."""
    from lora_edge.core.manifest import find_graph, hotswap_adapter_file

    record = find_graph(bundle, graph)
    return hotswap_adapter_file(bundle, record, record.adapters[0])


def engine_specs(args, bundle: Path, genai_dirs: dict, genai_py: Path | None) -> dict[str, tuple[Path, list[str]]]:
    """Engine name -> (python, worker arguments)."""
    common = ["--prompt-ids", str(args.work / "prompt.json"), "--new-tokens", str(args.new_tokens)]
    specs = {
        "lora-edge merged int4": (Path(sys.executable), ["--engine", "lora-edge", "--graph",
                                                          str(graph_file(bundle, "merged.int4"))]),
        "lora-edge hotswap int4": (Path(sys.executable), ["--engine", "lora-edge", "--graph",
                                                           str(graph_file(bundle, "hotswap.int4")),
                                                           "--adapter", str(hotswap_adapter(bundle))]),
        "lora-edge merged fp32": (Path(sys.executable), ["--engine", "lora-edge", "--graph",
                                                          str(graph_file(bundle, "merged.fp32"))]),
    }
    if args.baseline_bundle:
        specs["lora-edge merged int4 (baseline bundle)"] = (
            Path(sys.executable), ["--engine", "lora-edge", "--graph", str(graph_file(args.baseline_bundle, "merged.int4"))])
        specs["lora-edge hotswap int4 (baseline bundle)"] = (
            Path(sys.executable), ["--engine", "lora-edge", "--graph", str(graph_file(args.baseline_bundle, "hotswap.int4")),
                                   "--adapter", str(hotswap_adapter(args.baseline_bundle))])
    for precision, directory in genai_dirs.items():
        specs[f"genai {precision}"] = (genai_py, ["--engine", "genai", "--model", str(directory)])
    specs["torch eager peft"] = (Path(sys.executable), ["--engine", "torch", "--model", str(args.model),
                                                        "--adapter", str(args.adapter)])
    specs["torch eager merged"] = (Path(sys.executable), ["--engine", "torch", "--model", str(args.model),
                                                          "--adapter", str(args.adapter), "--merge"])
    return {name: (python, argv + common) for name, (python, argv) in specs.items()}


def run_rounds(workers: dict[str, Worker], rounds: int) -> dict[str, list[dict]]:
    """Warm up every worker once, then ``rounds`` rounds with the order rotated each round."""
    for worker in workers.values():
        worker.run()
    names = list(workers)
    results = {name: [] for name in names}
    for index in range(rounds):
        shift = index % len(names)
        for name in names[shift:] + names[:shift]:
            time.sleep(0.3)  # let the previous engine's spinning threads stop
            results[name].append(workers[name].run())
        log(f"round {index + 1}/{rounds} done (load {os.getloadavg()[0]:.1f})")
    return results


def summarize(results: dict[str, list[dict]], prompt_tokens: int, reference: str) -> dict:
    """Median tokens/s per engine, within-round ratios, greedy agreement with ``reference``'s tokens."""
    rounds = len(next(iter(results.values())))
    per_round = {name: [{"prefill": prompt_tokens / r["prefill_s"], "decode": r["decode_steps"] / r["decode_s"]}
                        for r in runs] for name, runs in results.items()}
    ref_tokens = results[reference][0]["tokens"]
    summary = {}
    for name, runs in per_round.items():
        tokens = results[name][0]["tokens"]
        same = [a == b for a, b in zip(tokens, ref_tokens)]
        first_diff = same.index(False) if False in same else len(same)
        entry = {"prefill_tokens_per_s": statistics.median(r["prefill"] for r in runs),
                 "decode_tokens_per_s": statistics.median(r["decode"] for r in runs),
                 "rss_loaded_mb": max(r.get("rss_loaded_mb", 0) for r in results[name]),
                 "peak_rss_mb": max(r.get("peak_rss_mb", 0) for r in results[name]),
                 "agreement_first_32": sum(same[:32]) / 32, "agreement_all": sum(same) / max(1, len(same)),
                 "identical_prefix_tokens": first_diff, "rounds": rounds}
        for other in ("genai int4", "torch eager peft", "lora-edge merged int4"):
            if other in per_round and other != name:
                for phase in ("decode", "prefill"):
                    ratios = [mine[phase] / theirs[phase] for mine, theirs in zip(runs, per_round[other])]
                    entry[f"{phase}_ratio_vs_{other.replace(' ', '_')}"] = statistics.median(ratios)
        entry["ratios"] = {other: {phase: statistics.median(mine[phase] / theirs[phase]
                                                            for mine, theirs in zip(runs, per_round[other]))
                                   for phase in ("prefill", "decode")}
                           for other in per_round if other != name}  # within-round medians against every engine
        summary[name] = entry
    return summary


def decode_step_profile(graph: Path, prompt: list[int], steps: int, threads: int) -> list[dict]:
    """Per op type: microseconds per decode step of ``graph`` (ORT profiler, after a prefill)."""
    import tempfile

    from lora_edge.runtime.generate import DecoderRunner, generate
    from lora_edge.runtime.session import SessionSettings, create_session

    with tempfile.TemporaryDirectory() as tmp:
        settings = SessionSettings(intra_op_threads=threads, inter_op_threads=1, enable_profiling=True,
                                   profile_prefix=str(Path(tmp) / "profile"))
        session = create_session(graph, settings)
        generate(DecoderRunner(session), [prompt], steps + 1, eos_token_id=None)
        events = json.loads(Path(session.end_profiling()).read_text())
    runs = [e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"]
    decode_start = runs[1]["ts"] if len(runs) > 1 else 0  # skip the prefill run
    totals: dict[str, list] = {}
    for event in events:
        if event.get("cat") != "Node" or not event.get("name", "").endswith("_kernel_time") or event["ts"] < decode_start:
            continue
        op = event.get("args", {}).get("op_name", "?")
        slot = totals.setdefault(op, [0.0, 0])
        slot[0] += event["dur"]
        slot[1] += 1
    decode_runs = max(1, len(runs) - 1)
    rows = [{"op": op, "us_per_step": total / decode_runs, "nodes_per_step": count / decode_runs}
            for op, (total, count) in totals.items()]
    return sorted(rows, key=lambda row: -row["us_per_step"])


def table(summary: dict) -> str:
    lines = ["| engine | prefill tok/s | decode tok/s | decode vs genai int4 | prefill vs genai int4 | "
             "decode vs torch peft | greedy = torch (first 32) | RSS loaded MB | peak RSS MB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, e in summary.items():
        lines.append(f"| {name} | {e['prefill_tokens_per_s']:.0f} | {e['decode_tokens_per_s']:.1f} | "
                     f"{e.get('decode_ratio_vs_genai_int4', 1.0):.2f} | {e.get('prefill_ratio_vs_genai_int4', 1.0):.2f} | "
                     f"{e.get('decode_ratio_vs_torch_eager_peft', 1.0):.2f} | {e['agreement_first_32']:.0%} | "
                     f"{e['rss_loaded_mb']:.0f} | {e['peak_rss_mb']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="HF causal-LM directory (SmolLM2-135M-Instruct)")
    parser.add_argument("--adapter", type=Path, help="PEFT LoRA dir (default: a seeded random q/v r=8 adapter)")
    parser.add_argument("--work", type=Path, default=Path("~/.cache/lora-edge/llm-bench").expanduser())
    parser.add_argument("--genai-venv", type=Path, default=DEFAULT_VENV)
    parser.add_argument("--skip-genai", action="store_true")
    parser.add_argument("--genai-pruned-head", action="store_true",
                        help="also build and run genai int4 with the builder's prune_lm_head=true (last-token "
                             "logits in prefill), engine 'genai int4-pruned-head'")
    parser.add_argument("--baseline-bundle", type=Path,
                        help="another lora-edge bundle (e.g. built by an earlier version) whose merged.int4 and "
                             "hotswap.int4 run as engines 'lora-edge merged int4 (baseline bundle)' and 'lora-edge "
                             "hotswap int4 (baseline bundle)', for a before/after in one run")
    parser.add_argument("--engines", help="comma-separated engine names to run (default: all), e.g. "
                                          "'lora-edge merged int4,genai int4' for a quick ratio")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--profile-steps", type=int, default=32)
    parser.add_argument("--json", type=Path, default=HERE / "results" / "llm_latency.json")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()
    args.adapter = args.adapter or random_adapter(args.model, args.work / "adapter-qv-r8")
    merged = merged_model(args.model, args.adapter, args.work / "merged-hf")
    bundle = lora_edge_bundle(args.model, args.adapter, args.work / "bundle")
    genai_dirs, genai_py = {}, None
    if not args.skip_genai:
        genai_py = genai_python(args.genai_venv)
        genai_dirs = {p: genai_model(genai_py, merged, p, args.work / f"genai-{p}", args.threads)
                      for p in ("int4", "fp32")}
        if args.genai_pruned_head:
            genai_dirs["int4-pruned-head"] = genai_model(genai_py, merged, "int4", args.work / "genai-int4-pruned-head",
                                                         args.threads, ("prune_lm_head=true",))
    prompt = prompt_ids(args.model, args.prompt_tokens, args.work / "prompt.json")
    specs = engine_specs(args, bundle, genai_dirs, genai_py)
    if args.engines:
        wanted = [name.strip() for name in args.engines.split(",")]
        unknown = sorted(set(wanted) - set(specs))
        if unknown:
            raise SystemExit(f"unknown engine(s) {unknown}; choose from {sorted(specs)}")
        specs = {name: spec for name, spec in specs.items() if name in wanted}
    workers = {}
    try:
        for name, (python, argv) in specs.items():
            log(f"starting {name}")
            workers[name] = Worker(name, python, argv, args.threads)
        results = run_rounds(workers, args.rounds)
    finally:
        for worker in workers.values():
            worker.close()
    summary = summarize(results, len(prompt), "torch eager peft" if "torch eager peft" in results else next(iter(results)))
    profile = decode_step_profile(graph_file(bundle, "merged.int4"), prompt, args.profile_steps, args.threads)
    sizes = {name: round(os.path.getsize(graph_file(bundle, name)) / 1e6, 1)
             for name in ("merged.int4", "hotswap.int4", "merged.fp32")}
    for precision, directory in genai_dirs.items():
        sizes[f"genai {precision}"] = round(sum(f.stat().st_size for f in directory.glob("*.onnx*")) / 1e6, 1)
    report = {"model": str(args.model), "adapter": str(args.adapter), "prompt_tokens": len(prompt),
              "new_tokens": args.new_tokens, "threads": args.threads, "rounds": args.rounds,
              "load_average_before": load_before, "load_average_after": os.getloadavg(),
              "engines": summary, "model_mb": sizes, "decode_step_profile_merged_int4": profile[:15]}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2))
    print(table(summary))
    print("\nmodel MB:", sizes)
    print("\nper-op time of one merged int4 decode step (us):")
    for row in profile[:15]:
        print(f"  {row['op']:<36} {row['us_per_step']:9.1f} us  {row['nodes_per_step']:.0f} nodes")


if __name__ == "__main__":
    main()
