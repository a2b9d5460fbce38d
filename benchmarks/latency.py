#!/usr/bin/env python3
"""lora-edge's graphs against the strongest stock recipe, side by side in one run: latency, ratios, GEMM throughput.

The peer is what a user can do by hand today, in every stock variant, and the
fastest of them (per precision and per input kind, in this run) is the one
lora-edge is compared with: PEFT ``merge_and_unload()`` -> ``torch.onnx.export``
with the TorchScript exporter (``dynamo=False``) and with the dynamo exporter
(torch 2.13's default), plus the TorchScript graph through ORT's transformers
optimizer (``optimize_model``: fused Attention, SkipLayerNormalization, ...);
each fp32 graph then -> ``quantize_dynamic(QInt8)`` per-channel and per-tensor.
Both sides start from the same base model (the embedded MiniLM by default) and
the same r=8 adapter.

Two input kinds, both reported: 128 real tokens, and a short sentence padded to
128. Every graph runs batch 1 on the CPU provider with 2 intra-op threads; all
graphs and both kinds are interleaved in rounds (lora_edge.runtime.interleave: shuffled
order each round, a pause before each visit so idle ORT threads stop spinning),
and ratios are taken within each round, so a busy neighbour slows both sides of
a ratio alike. It also times the model's GEMMs alone, and with ``--profile``
prints ORT's per-op profiles of the fastest peer and lora-edge int8 graphs.

    python benchmarks/latency.py                       # table on stdout, JSON in benchmarks/results/
    python benchmarks/latency.py --adapter DIR --rounds 60 --profile
    python benchmarks/latency.py --workdir /tmp/le-bench --reuse   # keep/reuse the exported graphs
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent
LABELS = [f"intent_{i}" for i in range(10)]
SHORT_TEXT = "turn on the lights in the kitchen"
INPUT_KINDS = ("real128", "padded")
INPUT_KIND_TEXT = {"real128": "128 real tokens", "padded": f"'{SHORT_TEXT}' padded to 128"}
# Targets of issue 12: (variant, baseline, bound): within-round ratio variant / baseline <= bound, per input kind.
# "peer fp32" / "peer int8" stand for the fastest peer of that precision in the run.
TARGETS = [("merged int8-dynamic", "peer int8", 0.70), ("merged fp32", "peer fp32", 0.85),
           ("branched fp32", "merged fp32", 1.015), ("hotswap fp32", "merged fp32", 1.015),
           ("branched int8-dynamic", "merged int8-dynamic", 1.05),
           ("hotswap int8-dynamic", "merged int8-dynamic", 1.05),
           ("branched int8-static", "merged int8-static", 1.05), ("hotswap int8-static", "merged int8-static", 1.05)]


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --- building the graphs ------------------------------------------------------------------------------

def random_adapter(model_path: Path, out: Path, rank: int, seed: int) -> Path:
    """A PEFT r=``rank`` adapter on query/value with random (non-zero) A and B, plus a trained-looking head."""
    import torch
    from peft import LoraConfig, TaskType, get_peft_model

    from lora_edge.core.data import LabelMap
    from lora_edge.core.choices import Task
    from lora_edge.core.models import load_base_model

    base = load_base_model(model_path, Task.SEQ_CLS, labels=LABELS)
    torch.manual_seed(seed)
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["query", "value"], init_lora_weights=False,
                        task_type=TaskType.SEQ_CLS)
    peft_model = get_peft_model(base, config)
    peft_model.save_pretrained(str(out), safe_serialization=True)
    LabelMap(tuple(LABELS)).save(out)
    return out


def peer_recipes(model_path: Path, adapter: Path, out: Path, seq: int) -> dict[str, Path]:
    """Every stock recipe: merge_and_unload -> TorchScript / dynamo export (-> ORT optimizer) -> quantize_dynamic."""
    import onnx
    import torch
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.transformers import optimizer

    from lora_edge.core.adapters import AdapterRef, load_reference
    from lora_edge.core.models import load_config

    out.mkdir(parents=True, exist_ok=True)
    merged = load_reference(model_path, AdapterRef("peer", adapter)).merge_and_unload().eval()
    ids = torch.randint(1000, 20000, (1, seq))
    inputs = (ids, torch.ones_like(ids), torch.zeros_like(ids))
    names = ["input_ids", "attention_mask", "token_type_ids"]
    axes = {name: {0: "batch", 1: "sequence"} for name in names}
    fp32 = {"torchscript": out / "torchscript.fp32.onnx", "dynamo": out / "dynamo.fp32.onnx",
            "ort-optimizer": out / "ort-optimizer.fp32.onnx"}
    if not fp32["torchscript"].is_file():
        torch.onnx.export(merged, inputs, str(fp32["torchscript"]), input_names=names, output_names=["logits"],
                          dynamic_axes=axes, dynamo=False, opset_version=17)
    if not fp32["dynamo"].is_file():
        torch.onnx.export(merged, inputs, str(fp32["dynamo"]), input_names=names, output_names=["logits"],
                          dynamic_axes=axes, dynamo=True)
    if not fp32["ort-optimizer"].is_file():
        config = load_config(model_path)
        optimized = optimizer.optimize_model(str(fp32["torchscript"]), model_type="bert",
                                             num_heads=config["num_attention_heads"],
                                             hidden_size=config["hidden_size"])
        log(f"  ORT optimizer fused: {optimized.get_fused_operator_statistics()}")
        optimized.save_model_to_file(str(fp32["ort-optimizer"]))
    graphs = {}
    for exporter, path in fp32.items():
        graphs[f"peer fp32 [{exporter}]"] = path
        for per_channel in (True, False):
            int8 = out / f"{exporter}.int8{'-per-channel' if per_channel else ''}.onnx"
            # DefaultTensorType: shape inference cannot type the contrib ops of the optimized graph
            quantize_dynamic(str(path), str(int8), weight_type=QuantType.QInt8, per_channel=per_channel,
                             extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
            graphs[f"peer int8 [{exporter}, {'per-channel' if per_channel else 'per-tensor'}]"] = int8
    return graphs


def lora_edge_graphs(model: str, adapter: Path, out: Path, calibration: Path, int4: bool) -> Path:
    """export_bundle (merged, branched, hotswap; fp32 fused), quantize_bundle (int8-dynamic, int8-static[, int4])."""
    from lora_edge.core.adapters import AdapterRef
    from lora_edge.export.bundle import export_bundle
    from lora_edge.core.recipe import QuantizeOptions
    from lora_edge.quantize.quantizer import fusion_plan_for, quantize_bundle, quantize_graph

    bundle = export_bundle(model, [AdapterRef("bench", adapter)], ["merged", "branched", "hotswap"], out,
                           force=True, progress=log)
    precisions = ["int8-dynamic", "int8-static"] + (["int4"] if int4 else [])
    quantize_bundle(bundle, precisions, QuantizeOptions(calibration=calibration), progress=log)
    onnx_dir = bundle / "onnx"  # outside the manifest, for comparison: per-tensor int8
    quantize_graph(onnx_dir / "merged.fp32.onnx", onnx_dir / "extra.merged.int8-per-tensor.onnx", "int8-dynamic",
                   QuantizeOptions(per_channel=False), plan=fusion_plan_for(bundle))
    return bundle


def graph_files(peers: dict[str, Path], bundle: Path, int4: bool) -> dict[str, Path]:
    """Every graph to time, by the name the tables use."""
    onnx_dir = bundle / "onnx"
    graphs = dict(peers)
    for precision in ("fp32", "int8-dynamic", "int8-static") + (("int4",) if int4 else ()):
        for form in ("merged", "branched", "hotswap"):
            graphs[f"{form} {precision}"] = onnx_dir / f"{form}.{precision}.onnx"
    graphs["merged int8-per-tensor"] = onnx_dir / "extra.merged.int8-per-tensor.onnx"
    return graphs


# --- timing ---------------------------------------------------------------------------------------------

def make_session(path: Path, threads: int, spinning: bool, profile_prefix: str | None = None):
    """A CPU session as the benchmark runs every graph: fixed threads, sequential (ORT's default), full optimizations."""
    from lora_edge.runtime.session import SessionSettings, create_session

    settings = SessionSettings(intra_op_threads=threads, inter_op_threads=1,
                               config_entries={"session.intra_op.allow_spinning": "1" if spinning else "0"},
                               enable_profiling=profile_prefix is not None, profile_prefix=profile_prefix)
    return create_session(path, settings)


def model_feeds(kind: str, seq: int, tokenizer_dir: Path) -> dict:
    """``real128``: ``seq`` random token ids, no padding; ``padded``: a short sentence padded to ``seq``."""
    import numpy as np

    if kind == "real128":
        ids = np.random.default_rng(0).integers(1000, 20000, size=(1, seq), dtype=np.int64)
        return {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}
    from lora_edge.core.models import load_tokenizer

    encoded = load_tokenizer(tokenizer_dir)([SHORT_TEXT], padding="max_length", max_length=seq, truncation=True,
                                            return_tensors="np")
    ids = encoded["input_ids"].astype(np.int64)
    return {"input_ids": ids, "attention_mask": encoded["attention_mask"].astype(np.int64),
            "token_type_ids": np.zeros_like(ids)}


@dataclass
class Graph:
    """One graph to time: its file, session and (hot-swap) adapter."""

    name: str
    path: Path
    session: object = None
    adapter: object = None


def open_graphs(graphs: dict[str, Path], adapter_file: Path, threads: int, spinning: bool) -> list[Graph]:
    from lora_edge.runtime.session import load_lora_adapter

    opened = []
    for name, path in graphs.items():
        adapter = load_lora_adapter(adapter_file) if name.startswith("hotswap") else None
        opened.append(Graph(name, path, make_session(path, threads, spinning), adapter))
    return opened


def runner(graph: Graph, feeds: dict):
    """lora-edge's GraphRunner on the benchmark's session (hot-swap graphs with their adapter active)."""
    from lora_edge.runtime.measure import GraphRunner

    declared = {i.name for i in graph.session.get_inputs()}
    return GraphRunner(graph.session, {k: v for k, v in feeds.items() if k in declared}, graph.adapter)


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
    from lora_edge.runtime.measure import summarize_trace
    from lora_edge.runtime.session import load_lora_adapter, run

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

def graph_bytes(path: Path) -> int:
    """Size of a graph file plus its external-data file, if torch.onnx.export wrote one beside it."""
    external = path.with_name(path.name + ".data")
    return path.stat().st_size + (external.stat().st_size if external.is_file() else 0)


def precision_class(name: str) -> str:
    """fp32 graphs are compared with the fastest peer fp32 graph, every quantized one with the fastest peer int8."""
    return "fp32" if "fp32" in name else "int8"


def fastest_peers(medians: dict[str, float]) -> dict[str, str]:
    """The fastest peer graph of each precision class in this run (by median)."""
    return {cls: min((n for n in medians if n.startswith(f"peer {cls}")), key=medians.get) for cls in ("fp32", "int8")}


def summarize_kind(timed, kind: str, graphs: dict[str, Path], ops: dict) -> dict:
    """Per graph, for one input kind: medians, spreads, CPU time, and the within-round ratio to the fastest peer."""
    import numpy as np

    from lora_edge.runtime.interleave import ratio_stats

    key = lambda name: f"{kind}|{name}"  # noqa: E731
    medians = {name: float(np.median(timed.times[key(name)])) * 1e3 for name in graphs}
    peers = fastest_peers(medians)
    rows = {}
    for name, path in graphs.items():
        ms = np.asarray(timed.times[key(name)]) * 1e3
        baseline = peers[precision_class(name)]
        stats = ratio_stats(timed.per_round[key(name)], timed.per_round[key(baseline)])
        rows[name] = {"median_ms": medians[name], "p10_ms": float(np.percentile(ms, 10)),
                      "p90_ms": float(np.percentile(ms, 90)),
                      "cpu_median_ms": float(np.median(timed.cpu_times[key(name)]) * 1e3), "runs": int(ms.size),
                      "vs": baseline, "ratio": stats.ratio, "ratio_iqr": list(stats.iqr),
                      "ratio_interval": list(stats.interval),
                      "gops": ops["total"] / (medians[name] / 1e3) / 1e9, "file": str(path),
                      "size_mb": round(graph_bytes(path) / 1e6, 1)}
    return {"rows": rows, "fastest_peer": peers}


def kind_targets(timed, kind: str, peers: dict[str, str]) -> list[dict]:
    """Each issue-12 target on one input kind: within-round ratio, IQR, bootstrap interval, met or not."""
    from lora_edge.runtime.interleave import ratio_stats

    targets = []
    for name, baseline, bound in TARGETS:
        actual = peers["fp32" if baseline == "peer fp32" else "int8"] if baseline.startswith("peer") else baseline
        stats = ratio_stats(timed.per_round[f"{kind}|{name}"], timed.per_round[f"{kind}|{actual}"])
        targets.append({"variant": name, "baseline": actual, "bound": bound, "ratio": stats.ratio,
                        "iqr": list(stats.iqr), "interval": list(stats.interval), "met": stats.ratio <= bound})
    return targets


def format_kind(kind: str, summary: dict, targets: list[dict]) -> str:
    lines = [f"== {INPUT_KIND_TEXT[kind]} ==",
             f"{'graph':<40} {'median ms':>9} {'p10':>7} {'p90':>7} {'ratio':>6} {'95% interval':>15} "
             f"{'cpu ms':>7} {'GOP/s':>6} {'MB':>6}  vs"]
    for name, row in summary["rows"].items():
        low, high = row["ratio_interval"]
        lines.append(f"{name:<40} {row['median_ms']:9.2f} {row['p10_ms']:7.2f} {row['p90_ms']:7.2f} "
                     f"{row['ratio']:6.3f} [{low:6.3f}, {high:6.3f}] {row['cpu_median_ms']:7.2f} {row['gops']:6.0f} "
                     f"{row['size_mb']:6.1f}  {row['vs']}")
    lines.append("targets (median over rounds of the within-round ratio; IQR; 95% bootstrap interval):")
    for target in targets:
        lines.append(f"  {target['variant']:<22} <= {target['bound']:.3f} x {target['baseline']:<38} "
                     f"{target['ratio']:.3f} IQR [{target['iqr'][0]:.3f}, {target['iqr'][1]:.3f}] "
                     f"CI [{target['interval'][0]:.3f}, {target['interval'][1]:.3f}]  "
                     f"{'met' if target['met'] else 'NOT met'}")
    return "\n".join(lines)


def format_footer(gemm: dict, ops: dict, noise: dict) -> str:
    lines = [f"model work per run (128 tokens): {ops['total'] / 1e9:.2f} GOP "
             f"({ops['linear'] / 1e9:.2f} in linear layers)"]
    for label, figures in gemm.items():
        lines.append(f"  GEMM alone, {label:<24} {figures['gops']:7.1f} GOP/s best, "
                     f"{figures['gops_median']:7.1f} median ({figures['ms']:.2f} ms for the model's linears)")
    lines.append(f"noise: load average {noise['load_before']} -> {noise['load_after']}, {noise['rounds']} rounds x "
                 f"{noise['runs_per_round']} runs, spinning {noise['spinning']}, niceness {noise['niceness']}")
    lines.append("ratio: median over rounds of (graph / the fastest peer of its precision) within a round; "
                 "cpu: process CPU time of all threads per run")
    return "\n".join(lines)


def build(args, model_path: Path, work: Path) -> tuple[dict[str, Path], Path, Path]:
    """The peer graphs and the lora-edge bundle (reused with --reuse); returns graphs, bundle, adapter."""
    from lora_edge.core.data import default_intent_files

    adapter = args.adapter or work / "adapter"
    if args.adapter is None and not (args.reuse and adapter.is_dir()):
        log(f"random r={args.rank} adapter -> {adapter}")
        random_adapter(model_path, adapter, args.rank, seed=0)
    peer_dir, bundle = work / "peer", work / "bundle"
    if (peer_dir / "ort-optimizer.int8.onnx").is_file() and args.reuse:
        peers = {}
        for exporter in ("torchscript", "dynamo", "ort-optimizer"):
            peers[f"peer fp32 [{exporter}]"] = peer_dir / f"{exporter}.fp32.onnx"
            peers[f"peer int8 [{exporter}, per-channel]"] = peer_dir / f"{exporter}.int8-per-channel.onnx"
            peers[f"peer int8 [{exporter}, per-tensor]"] = peer_dir / f"{exporter}.int8.onnx"
    else:
        log("peer recipes: merge_and_unload -> torch.onnx.export (TorchScript, dynamo; + ORT optimizer) -> "
            "quantize_dynamic (per-channel, per-tensor)")
        peers = peer_recipes(model_path, adapter, peer_dir, args.seq)
    if not (args.reuse and (bundle / "onnx" / "extra.merged.int8-per-tensor.onnx").is_file()):
        log("lora-edge: export (merged, branched, hotswap; fp32 fused) -> quantize (int8-dynamic, int8-static)")
        lora_edge_graphs(args.model, adapter, bundle, args.calibration or default_intent_files().train, args.int4)
    return graph_files(peers, bundle, args.int4), bundle, adapter


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="default", help="Base model directory or 'default' (MiniLM).")
    parser.add_argument("--adapter", type=Path, default=None,
                        help="PEFT adapter directory (default: a random r=--rank adapter on query/value).")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2, help="ORT intra-op threads (and torch threads).")
    parser.add_argument("--rounds", type=int, default=40, help="Interleaved rounds.")
    parser.add_argument("--runs", type=int, default=5, help="Timed runs per graph and input kind per round.")
    parser.add_argument("--gap", type=float, default=0.02, help="Seconds of pause before each visit.")
    parser.add_argument("--spinning", choices=("on", "off"), default="on",
                        help="session.intra_op.allow_spinning for every session (ORT's default: on).")
    parser.add_argument("--int4", action="store_true", help="Also build and time the int4 graphs.")
    parser.add_argument("--calibration", type=Path, default=None,
                        help="int8-static calibration data (default: the shipped intent training split).")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/lora-edge-latency"))
    parser.add_argument("--reuse", action="store_true", help="Reuse graphs already in --workdir.")
    parser.add_argument("--profile", action="store_true", help="Also print ORT per-op profiles (fastest peers, merged and branched fp32/int8).")
    parser.add_argument("--no-gemm", action="store_true", help="Skip timing the GEMMs alone.")
    parser.add_argument("--json", type=Path, default=ROOT / "results" / "latency.json")
    return parser.parse_args()


def main() -> None:
    args = parse_args()

    from lora_edge.runtime.interleave import time_rounds
    from lora_edge.runtime.measure import host_facts
    from lora_edge.core.model_source import resolve_model_path
    from lora_edge.core.models import load_config

    model_path = resolve_model_path(args.model)
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    graphs, bundle, adapter = build(args, model_path, work)
    spinning = args.spinning == "on"
    opened = open_graphs(graphs, bundle / "onnx" / "adapters" / "bench.onnx_adapter", args.threads, spinning)
    feeds = {kind: model_feeds(kind, args.seq, bundle / "onnx") for kind in INPUT_KINDS}
    calls = {f"{kind}|{graph.name}": runner(graph, feeds[kind]) for kind in INPUT_KINDS for graph in opened}
    log(f"timing {len(opened)} graphs x {len(INPUT_KINDS)} input kinds: {args.rounds} rounds x {args.runs} runs")
    timed = time_rounds(calls, args.rounds, args.runs, warmup=3, gap_s=args.gap)
    config = load_config(model_path)
    gemm = {} if args.no_gemm else gemm_throughput(config, 1, args.seq, args.threads, spinning, work)
    ops = model_ops(config, args.seq, 1)
    noise = {"load_before": timed.load_before, "load_after": timed.load_after, "rounds": args.rounds,
             "runs_per_round": args.runs, "spinning": args.spinning, "niceness": os.nice(0)}
    report = {"settings": vars(args) | {"model_path": str(model_path), "adapter": str(adapter)},
              "host": host_facts(args.threads), "model_ops": ops, "gemm": gemm, "noise": noise, "kinds": {}}
    for kind in INPUT_KINDS:
        summary = summarize_kind(timed, kind, graphs, ops)
        targets = kind_targets(timed, kind, summary["fastest_peer"])
        report["kinds"][kind] = {"input": INPUT_KIND_TEXT[kind], **summary, "targets": targets}
        print(format_kind(kind, summary, targets) + "\n")
    print(format_footer(gemm, ops, noise))
    if args.profile:
        peers = report["kinds"]["real128"]["fastest_peer"]
        profiled = (peers["fp32"], "merged fp32", "branched fp32", peers["int8"], "merged int8-dynamic",
                    "branched int8-dynamic")
        report["profiles"] = {name: op_profile(graphs[name], feeds["real128"], args.threads, spinning, 40, work,
                                               bundle / "onnx" / "adapters" / "bench.onnx_adapter"
                                               if name.startswith("hotswap") else None)
                              for name in profiled}
        for name, profile in report["profiles"].items():
            print(f"\nper-op profile, {name} (model_run median {profile['model_run_ms_median']:.2f} ms):")
            for op in profile["top_ops"]:
                print(f"  {op['op_type']:<28} {op['ms_per_run']:7.3f} ms  {op['percent']:5.1f}%  "
                      f"{op['nodes']:3d} nodes")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2, default=str) + "\n")
    log(f"wrote {args.json}")


if __name__ == "__main__":
    main()
