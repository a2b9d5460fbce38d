#!/usr/bin/env python3
"""lora-edge's graphs against the peer recipe, side by side in one run: latency, ratios, GEMM throughput.

The peer recipe is what a user does by hand today: PEFT ``merge_and_unload()`` ->
``torch.onnx.export`` -> ``onnxruntime.quantization.quantize_dynamic(QInt8)``.
Both sides start from the same base model (the embedded MiniLM by default) and
the same r=8 adapter. Every variant runs batch 1, sequence 128, on the CPU
provider with 2 intra-op threads; the variants are interleaved in rounds (a
shuffled visit of every variant per round, a pause between visits so idle ORT
threads stop spinning), and each round's ratios against the peer are taken
within the round, so a busy neighbour slows both sides of a ratio alike.

It also times the model's GEMMs alone (ORT MatMul / dynamic-int8 MatMul
micro-graphs of the model's own shapes, and torch fp32 matmul) in the same run,
to show how far each graph is from this machine's GEMM throughput, and with
``--profile`` it prints ORT's per-op profile of the peer and lora-edge int8 graphs.

    python benchmarks/latency.py                       # table on stdout, JSON in benchmarks/results/
    python benchmarks/latency.py --adapter DIR --rounds 60 --profile
    python benchmarks/latency.py --workdir /tmp/le-bench --reuse   # keep/reuse the exported graphs
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent
LABELS = [f"intent_{i}" for i in range(10)]
# Targets of issue 5: (variant, baseline, bound): median(variant) <= bound * median(baseline).
TARGETS = [("merged int8 (best)", "peer int8", 0.70), ("merged fp32", "peer fp32", 1.02),
           ("branched int8", "merged int8-dynamic", 1.05), ("branched fp32", "merged fp32", 1.015)]


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --- building the graphs ------------------------------------------------------------------------------

def random_adapter(model_path: Path, out: Path, rank: int, seed: int) -> Path:
    """A PEFT r=``rank`` adapter on query/value with random (non-zero) A and B, plus a trained-looking head."""
    import torch
    from peft import LoraConfig, TaskType, get_peft_model

    from lora_edge.data import LabelMap
    from lora_edge.models import Task, load_base_model

    base = load_base_model(model_path, Task.SEQ_CLS, labels=LABELS)
    torch.manual_seed(seed)
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["query", "value"], init_lora_weights=False,
                        task_type=TaskType.SEQ_CLS)
    peft_model = get_peft_model(base, config)
    peft_model.save_pretrained(str(out), safe_serialization=True)
    LabelMap(tuple(LABELS)).save(out)
    return out


def peer_recipe(model_path: Path, adapter: Path, out: Path, batch: int, seq: int) -> dict[str, Path]:
    """PEFT merge_and_unload -> torch.onnx.export -> quantize_dynamic(QInt8), as a user writes it."""
    import torch
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from lora_edge.adapters import AdapterRef, load_reference

    out.mkdir(parents=True, exist_ok=True)
    merged = load_reference(model_path, AdapterRef("peer", adapter)).merge_and_unload().eval()
    ids = torch.randint(1000, 20000, (batch, seq))
    inputs = (ids, torch.ones_like(ids), torch.zeros_like(ids))
    names = ["input_ids", "attention_mask", "token_type_ids"]
    fp32, int8 = out / "peer.fp32.onnx", out / "peer.int8.onnx"
    torch.onnx.export(merged, inputs, str(fp32), input_names=names, output_names=["logits"],
                      dynamic_axes={name: {0: "batch", 1: "sequence"} for name in names})
    quantize_dynamic(str(fp32), str(int8), weight_type=QuantType.QInt8)
    return {"peer fp32": fp32, "peer int8": int8}


def lora_edge_graphs(model: str, adapter: Path, out: Path, calibration: Path) -> Path:
    """export_bundle (merged, branched, hotswap) then quantize_bundle (int8-dynamic, int8-static, int4)."""
    from lora_edge.adapters import AdapterRef
    from lora_edge.export_bundle import export_bundle
    from lora_edge.quantize import QuantizeOptions, quantize_bundle

    bundle = export_bundle(model, [AdapterRef("bench", adapter)], ["merged", "branched", "hotswap"], out,
                           force=True, progress=log)
    quantize_bundle(bundle, ["int8-dynamic", "int8-static", "int4"], QuantizeOptions(calibration=calibration),
                    progress=log)
    extra_variants(bundle)
    return bundle


def extra_variants(bundle: Path) -> None:
    """Two graphs outside the manifest, for comparison: per-tensor int8, and the fp32 graph with the CPU fusions."""
    import onnx

    from lora_edge.quantize import QuantizeOptions, fusion_plan_for, quantize_graph
    from lora_edge.quantize_prepare import fuse_graph

    onnx_dir, plan = bundle / "onnx", fusion_plan_for(bundle)
    quantize_graph(onnx_dir / "merged.fp32.onnx", onnx_dir / "extra.merged.int8-per-tensor.onnx", "int8-dynamic",
                   QuantizeOptions(per_channel=False), plan=plan)
    fused, _ = fuse_graph(onnx.load(str(onnx_dir / "merged.fp32.onnx")), plan, str(onnx_dir / "merged.fp32.onnx"))
    onnx.save(fused, str(onnx_dir / "extra.merged.fp32-fused.onnx"))


# --- timing ---------------------------------------------------------------------------------------------

def make_session(path: Path, threads: int, spinning: bool, profile_prefix: str | None = None):
    """A CPU session as the benchmark runs every graph: fixed threads, sequential, full optimizations."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    if profile_prefix:
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def model_feeds(batch: int, seq: int, seed: int = 0) -> dict:
    import numpy as np

    rng = np.random.default_rng(seed)
    ids = rng.integers(1000, 20000, size=(batch, seq), dtype=np.int64)
    return {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}


@dataclass
class Variant:
    """One graph to time, with the session and adapter it runs with."""

    name: str
    path: Path
    adapter_file: Path | None = None
    runner: object = None
    times: list[float] = field(default_factory=list)
    cpu_times: list[float] = field(default_factory=list)  # process CPU time (all threads) per run
    per_round: list[float] = field(default_factory=list)


def make_runner(variant: Variant, threads: int, spinning: bool, feeds: dict):
    """lora-edge's GraphRunner on the benchmark's session; hot-swap graphs run with their adapter active."""
    from lora_edge.measure import GraphRunner
    from lora_edge.runtime import load_lora_adapter

    session = make_session(variant.path, threads, spinning)
    declared = {i.name for i in session.get_inputs()}
    adapter = load_lora_adapter(variant.adapter_file) if variant.adapter_file else None
    return GraphRunner(session, {k: v for k, v in feeds.items() if k in declared}, adapter)


def time_rounds(variants: list[Variant], rounds: int, runs: int, gap_s: float, seed: int = 0) -> None:
    """Interleaved timing: each round visits every variant once, in a shuffled order, ``runs`` timed runs each."""
    import numpy as np

    order = list(variants)
    shuffle = random.Random(seed)
    for _ in range(rounds):
        shuffle.shuffle(order)
        for variant in order:
            time.sleep(gap_s)  # let the previous session's threads stop spinning
            variant.runner()  # one untimed run: caches warm for this graph
            round_times = []
            for _ in range(runs):
                began, cpu_began = time.perf_counter(), time.process_time()
                variant.runner()
                round_times.append(time.perf_counter() - began)
                variant.cpu_times.append(time.process_time() - cpu_began)
            variant.times.extend(round_times)
            variant.per_round.append(float(np.median(round_times)))


# --- GEMM throughput --------------------------------------------------------------------------------------

def linear_shapes(config: dict) -> list[tuple[int, int, int]]:
    """(count, in, out) of the encoder's linear layers: Q, K, V, O, FFN up, FFN down, per layer."""
    hidden, inner, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    return [(4 * layers, hidden, hidden), (layers, hidden, inner), (layers, inner, hidden)]


def model_ops(config: dict, seq: int, batch: int) -> dict:
    """Multiply-adds x 2 of the linear layers and of attention (scores and weighted sum) for one forward."""
    tokens = batch * seq
    linear = sum(2 * count * tokens * k * n for count, k, n in linear_shapes(config))
    attention = 2 * 2 * config["num_hidden_layers"] * batch * seq * seq * config["hidden_size"]
    return {"linear": linear, "attention": attention, "total": linear + attention}


def gemm_graph(shapes: list[tuple[int, int, int]], tokens: int, path: Path, int8: bool) -> Path:
    """A graph of the model's linear layers (one MatMul per distinct shape and repeat), fp32 or dynamic int8."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inputs, nodes, inits, outputs = [], [], [], []
    for index, (count, k, n) in enumerate(shapes):
        name = f"x{k}"
        if name not in {i.name for i in inputs}:
            inputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, [tokens, k]))
        for repeat in range(count):
            weight = f"w{index}_{repeat}"
            inits.append(numpy_helper.from_array(rng.standard_normal((k, n)).astype(np.float32) * 0.05, weight))
            out = f"y{index}_{repeat}"
            nodes.append(helper.make_node("MatMul", [name, weight], [out], name=f"mm{index}_{repeat}"))
            outputs.append(helper.make_tensor_value_info(out, TensorProto.FLOAT, [tokens, n]))
    model = helper.make_model(helper.make_graph(nodes, "gemms", inputs, outputs, inits),
                              opset_imports=[helper.make_opsetid("", 17)])
    fp32 = path.with_suffix(".fp32.onnx")
    onnx.save(model, str(fp32))
    if not int8:
        return fp32
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(fp32), str(path), weight_type=QuantType.QInt8)
    return path


def gemm_throughput(config: dict, batch: int, seq: int, threads: int, spinning: bool, work: Path,
                    repeats: int = 30) -> dict:
    """GOP/s of the model's linear layers run alone: ORT fp32 MatMul, ORT dynamic int8, torch fp32 matmul."""
    import numpy as np
    import torch

    tokens = batch * seq
    shapes = linear_shapes(config)
    ops = sum(2 * count * tokens * k * n for count, k, n in shapes)
    feeds = {f"x{k}": np.random.default_rng(1).standard_normal((tokens, k)).astype(np.float32)
             for _, k, _ in shapes}
    result = {}
    for label, int8 in (("ort fp32 MatMul", False), ("ort int8 dynamic MatMul", True)):
        session = make_session(gemm_graph(shapes, tokens, work / f"gemm-{'int8' if int8 else 'fp32'}.onnx", int8),
                               threads, spinning)
        for _ in range(3):
            session.run(None, feeds)
        times = []
        for _ in range(repeats):
            began = time.perf_counter()
            session.run(None, feeds)
            times.append(time.perf_counter() - began)
        result[label] = {"ms": float(np.median(times) * 1e3), "gops": ops / float(np.min(times)) / 1e9,
                         "gops_median": ops / float(np.median(times)) / 1e9}
    torch.set_num_threads(threads)
    weights = [(torch.from_numpy(feeds[f"x{k}"]), torch.randn(k, n) * 0.05, count) for count, k, n in shapes]
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        for x, w, count in weights:
            for _ in range(count):
                torch.matmul(x, w)
        times.append(time.perf_counter() - began)
    result["torch fp32 matmul"] = {"ms": float(np.median(times) * 1e3), "gops": ops / float(np.min(times)) / 1e9,
                                   "gops_median": ops / float(np.median(times)) / 1e9}
    return result


# --- per-op profile ----------------------------------------------------------------------------------------

def op_profile(path: Path, feeds: dict, threads: int, spinning: bool, runs: int, work: Path,
               adapter_file: Path | None = None) -> dict:
    """ORT per-op-type time (ms per run) of a graph, after warm-up, from the session profiler."""
    from lora_edge.measure import summarize_trace
    from lora_edge.runtime import load_lora_adapter, run

    session = make_session(path, threads, spinning, str(work / f"profile-{path.stem}"))
    declared = {i.name for i in session.get_inputs()}
    feeds = {k: v for k, v in feeds.items() if k in declared}
    adapter = load_lora_adapter(adapter_file) if adapter_file else None
    warmup = 5
    for _ in range(warmup + runs):
        run(session, feeds, adapter)
    trace_file = Path(session.end_profiling())
    events = json.loads(trace_file.read_text())
    trace_file.unlink()
    summary = summarize_trace(events, skip_runs=warmup, top=12)
    run_us = sorted(e["dur"] for e in events if e.get("cat") == "Session" and e.get("name") == "model_run")
    return {"top_ops": summary.top_ops, "model_run_ms_median": run_us[len(run_us) // 2] / 1e3}


# --- report -------------------------------------------------------------------------------------------------

def summarize(variants: list[Variant], peer: dict[str, str], ops: dict) -> dict:
    """Medians, spreads, per-round ratios against the peer of the same precision class, GOP/s."""
    import numpy as np

    by_name = {v.name: v for v in variants}
    rows = {}
    for variant in variants:
        ms = np.asarray(variant.times) * 1e3
        baseline = by_name[peer["fp32"] if "fp32" in variant.name else peer["int8"]]
        ratios = np.asarray(variant.per_round) / np.asarray(baseline.per_round)
        cpu_ms = np.asarray(variant.cpu_times) * 1e3
        baseline_cpu = float(np.median(baseline.cpu_times) * 1e3)
        rows[variant.name] = {
            "median_ms": float(np.median(ms)), "p10_ms": float(np.percentile(ms, 10)),
            "cpu_median_ms": float(np.median(cpu_ms)), "cpu_ratio": float(np.median(cpu_ms)) / baseline_cpu,
            "p90_ms": float(np.percentile(ms, 90)), "runs": int(ms.size),
            "vs": baseline.name, "ratio": float(np.median(ratios)),
            "ratio_iqr": [float(np.percentile(ratios, 25)), float(np.percentile(ratios, 75))],
            "gops": ops["total"] / float(np.median(ms) / 1e3) / 1e9, "file": str(variant.path),
            "size_mb": round(graph_bytes(variant.path) / 1e6, 1),
        }
    return rows


def graph_bytes(path: Path) -> int:
    """Size of a graph file plus its external-data file, if torch.onnx.export wrote one beside it."""
    external = path.with_name(path.name + ".data")
    return path.stat().st_size + (external.stat().st_size if external.is_file() else 0)


def pair_ratio(variants: dict[str, Variant], name: str, baseline: str) -> dict:
    """Median over rounds of median(name)/median(baseline) within each round, with its interquartile range."""
    import numpy as np

    ratios = np.asarray(variants[name].per_round) / np.asarray(variants[baseline].per_round)
    return {"ratio": float(np.median(ratios)),
            "iqr": [float(np.percentile(ratios, 25)), float(np.percentile(ratios, 75))]}


def format_table(rows: dict, targets: list[dict], gemm: dict, ops: dict, noise: dict) -> str:
    lines = [f"{'graph':<24} {'median ms':>9} {'p10':>7} {'p90':>7} {'ratio':>7} {'vs':<10} {'GOP/s':>7} "
             f"{'cpu ms':>7} {'cpu ratio':>9} {'MB':>6}"]
    for name, row in rows.items():
        lines.append(f"{name:<24} {row['median_ms']:9.2f} {row['p10_ms']:7.2f} {row['p90_ms']:7.2f} "
                     f"{row['ratio']:7.3f} {row['vs']:<10} {row['gops']:7.1f} {row['cpu_median_ms']:7.2f} "
                     f"{row['cpu_ratio']:9.3f} {row['size_mb']:6.1f}")
    lines.append("")
    lines.append("targets (median over rounds of the within-round ratio; IQR in brackets):")
    for target in targets:
        lines.append(f"  {target['variant']:<20} <= {target['bound']:.3f} x {target['baseline']:<20} "
                     f"{target['ratio']:.3f} [{target['iqr'][0]:.3f}, {target['iqr'][1]:.3f}]  "
                     f"{'met' if target['met'] else 'NOT met'}")
    lines.append("")
    lines.append(f"model work per run: {ops['total'] / 1e9:.2f} GOP ({ops['linear'] / 1e9:.2f} in linear layers)")
    for label, figures in gemm.items():
        lines.append(f"  GEMM alone, {label:<24} {figures['gops']:7.1f} GOP/s best, "
                     f"{figures['gops_median']:7.1f} median ({figures['ms']:.2f} ms for the model's linears)")
    lines.append(f"noise: load average {noise['load_before']} -> {noise['load_after']}, "
                 f"{noise['rounds']} rounds x {noise['runs_per_round']} runs, spinning {noise['spinning']}; "
                 f"per-round CV of the medians {min(noise['per_round_cv'].values()):.2f}-"
                 f"{max(noise['per_round_cv'].values()):.2f}")
    lines.append("ratio: median over rounds of (graph / its peer) within a round; cpu: process CPU time of "
                 "all threads per run (robust to a busy machine when spinning is off)")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="default", help="Base model directory or 'default' (MiniLM).")
    parser.add_argument("--adapter", type=Path, default=None,
                        help="PEFT adapter directory (default: a random r=--rank adapter on query/value).")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2, help="ORT intra-op threads (and torch threads).")
    parser.add_argument("--rounds", type=int, default=40, help="Interleaved rounds.")
    parser.add_argument("--runs", type=int, default=5, help="Timed runs per variant per round.")
    parser.add_argument("--gap", type=float, default=0.02, help="Seconds of pause before each visit.")
    parser.add_argument("--spinning", choices=("on", "off"), default="on",
                        help="session.intra_op.allow_spinning for every session (ORT's default: on).")
    parser.add_argument("--calibration", type=Path, default=None,
                        help="int8-static calibration data (default: the shipped intent training split).")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/lora-edge-latency"))
    parser.add_argument("--reuse", action="store_true", help="Reuse graphs already in --workdir.")
    parser.add_argument("--profile", action="store_true", help="Also print ORT per-op profiles of the int8 graphs.")
    parser.add_argument("--json", type=Path, default=ROOT / "results" / "latency.json")
    args = parser.parse_args()

    import numpy as np

    from lora_edge.data import default_intent_files
    from lora_edge.measure import host_facts
    from lora_edge.models import load_config, resolve_model_path

    model_path = resolve_model_path(args.model)
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    adapter = args.adapter or work / "adapter"
    if args.adapter is None and not (args.reuse and adapter.is_dir()):
        log(f"random r={args.rank} adapter -> {adapter}")
        random_adapter(model_path, adapter, args.rank, seed=0)
    peer_dir, bundle = work / "peer", work / "bundle"
    if not (args.reuse and (peer_dir / "peer.int8.onnx").is_file()):
        log("peer recipe: merge_and_unload -> torch.onnx.export -> quantize_dynamic(QInt8)")
        peer_recipe(model_path, adapter, peer_dir, args.batch, args.seq)
    if not (args.reuse and (bundle / "onnx" / "extra.merged.fp32-fused.onnx").is_file()):
        log("lora-edge: export (merged, branched, hotswap) -> quantize (int8-dynamic, int8-static, int4)")
        lora_edge_graphs(args.model, adapter, bundle, args.calibration or default_intent_files().train)
    graphs = {"peer fp32": peer_dir / "peer.fp32.onnx", "peer int8": peer_dir / "peer.int8.onnx"}
    onnx_dir = bundle / "onnx"
    graphs.update({"merged fp32": onnx_dir / "merged.fp32.onnx", "branched fp32": onnx_dir / "branched.fp32.onnx",
                   "hotswap fp32": onnx_dir / "hotswap.fp32.onnx",
                   "merged fp32 fused": onnx_dir / "extra.merged.fp32-fused.onnx",
                   "merged int8-dynamic": onnx_dir / "merged.int8-dynamic.onnx",
                   "merged int8-per-tensor": onnx_dir / "extra.merged.int8-per-tensor.onnx",
                   "merged int8-static": onnx_dir / "merged.int8-static.onnx",
                   "branched int8": onnx_dir / "branched.int8-dynamic.onnx",
                   "hotswap int8": onnx_dir / "hotswap.int8-dynamic.onnx",
                   "merged int4": onnx_dir / "merged.int4.onnx"})
    adapter_file = onnx_dir / "adapters" / "bench.onnx_adapter"
    feeds = model_feeds(args.batch, args.seq)
    spinning = args.spinning == "on"
    variants = [Variant(name, path, adapter_file if name.startswith("hotswap") else None)
                for name, path in graphs.items()]
    for variant in variants:
        variant.runner = make_runner(variant, args.threads, spinning, feeds)
        for _ in range(3):
            variant.runner()
    load_before = [round(x, 2) for x in os.getloadavg()]
    log(f"timing {len(variants)} graphs: {args.rounds} rounds x {args.runs} runs, load average {load_before}")
    time_rounds(variants, args.rounds, args.runs, args.gap)
    config = load_config(model_path)
    log("timing the model's GEMMs alone")
    gemm = gemm_throughput(config, args.batch, args.seq, args.threads, spinning, work)
    load_after = [round(x, 2) for x in os.getloadavg()]

    ops = model_ops(config, args.seq, args.batch)
    rows = summarize(variants, {"fp32": "peer fp32", "int8": "peer int8"}, ops)
    by_name = {v.name: v for v in variants}
    best_int8 = min(("merged int8-dynamic", "merged int8-per-tensor", "merged int8-static"),
                    key=lambda n: rows[n]["median_ms"])
    targets = []
    for name, baseline, bound in TARGETS:
        actual = best_int8 if name == "merged int8 (best)" else name
        figures = pair_ratio(by_name, actual, baseline)
        targets.append({"variant": name, "measured": actual, "baseline": baseline, "bound": bound,
                        **figures, "met": figures["ratio"] <= bound})
    noise = {"load_before": load_before, "load_after": load_after, "rounds": args.rounds,
             "runs_per_round": args.runs, "spinning": args.spinning,
             "per_round_cv": {name: float(np.std(v.per_round) / np.mean(v.per_round)) for name, v in by_name.items()}}
    report = {"settings": vars(args) | {"model_path": str(model_path), "adapter": str(adapter)},
              "host": host_facts(args.threads), "model_ops": ops, "graphs": rows, "targets": targets,
              "gemm": gemm, "noise": noise}
    if args.profile:
        log("per-op profiles")
        report["profiles"] = {name: op_profile(graphs[name], feeds, args.threads, spinning, 40, work,
                                               adapter_file if name.startswith("hotswap") else None)
                              for name in ("peer int8", best_int8, "branched int8")}
    print(format_table(rows, targets, gemm, ops, noise))
    for name, profile in report.get("profiles", {}).items():
        print(f"\nper-op profile, {name} (model_run median {profile['model_run_ms_median']:.2f} ms):")
        for op in profile["top_ops"]:
            print(f"  {op['op_type']:<28} {op['ms_per_run']:7.3f} ms  {op['percent']:5.1f}%  {op['nodes']:3d} nodes")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2, default=str) + "\n")
    log(f"wrote {args.json}")


if __name__ == "__main__":
    main()
