"""Export time per deployment form, and fp32 latency of merged vs branched vs hot-swap.

On the default model (all-MiniLM-L6-v2) with an r=8 adapter (a random one on
query/value unless --adapter is given): each form is exported into its own
bundle (timed: torch.onnx export alone, and the whole form with verification),
then the three fp32 graphs run side by side on ONNX Runtime's CPU provider,
batch 1, sequence 128, 2 intra-op threads, in interleaved rounds (shuffled
order, lora_edge.runtime.interleave); each form's ratio to merged is the median of the
within-round ratios, with a bootstrap interval.
The branched overhead is set against the theoretical extra FLOPs of the
low-rank pairs (lora_edge.core.flops), over the model's FLOPs counted by torch.

    python benchmarks/forms_latency.py [--runs 300] [--adapter DIR] [--json out.json]

Timings on a shared machine are noisy: re-run on a quiet one before quoting them.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from lora_edge.runtime.interleave import ratio_stats, time_rounds

FORMS = ("merged", "branched", "hotswap")
TEXT = "please turn on the lights in the kitchen and tell me what the weather will be like tomorrow " * 20


def export_forms(adapter: Path, work: Path) -> dict[str, dict]:
    """Export each form into its own bundle; return per form the bundle and its export times."""
    from lora_edge.core.adapters import AdapterRef
    from lora_edge.core.manifest import list_graphs
    from lora_edge.export.bundle import export_bundle

    results = {}
    for form in FORMS:
        start = time.perf_counter()
        bundle = export_bundle("default", [AdapterRef("r8", adapter)], [form], work / f"bundle-{form}",
                               progress=lambda message: None)
        wall = time.perf_counter() - start
        (graph,) = list_graphs(bundle)
        results[form] = {"bundle": bundle, "graph": graph, "export_s": graph.extra["export_seconds"],
                         "form_wall_s": round(wall, 2)}
        print(f"exported {form}: torch.onnx {graph.extra['export_seconds']:.1f} s, "
              f"with loading and verification {wall:.1f} s", file=sys.stderr)
    return results


def branch_kernel_share(graph: Path, feeds: dict, threads: int, runs: int = 50) -> float:
    """Share of ORT kernel time spent in the low-rank pairs and their Adds of a branched graph (profiled).

    A ratio inside one run's profile: much less sensitive to a busy machine than wall-clock ratios.
    """
    import onnx

    from lora_edge.runtime.session import SessionSettings, create_session

    with tempfile.TemporaryDirectory() as tmp:
        settings = SessionSettings(intra_op_threads=threads, inter_op_threads=1,
                                   optimized_model_path=str(Path(tmp) / "optimized.onnx"),
                                   enable_profiling=True, profile_prefix=str(Path(tmp) / "profile"))
        session = create_session(graph, settings)
        optimized = onnx.load(settings.optimized_model_path)
        for _ in range(runs):
            session.run(None, feeds)
        events = json.loads(Path(session.end_profiling()).read_text())
    lora_nodes = {n.name for n in optimized.graph.node if any("lora_" in i for i in n.input)}
    branch_outputs = {n.output[0] for n in optimized.graph.node if any("lora_B" in i for i in n.input)}
    lora_nodes |= {n.name for n in optimized.graph.node if n.op_type == "Add" and set(n.input) & branch_outputs}
    total = branch = 0.0
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            total += event["dur"]
            branch += event["dur"] if event["name"].removesuffix("_kernel_time") in lora_nodes else 0.0
    return branch / total


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--adapter", type=Path, help="PEFT adapter for the default model (default: random r=8)")
    parser.add_argument("--rank", type=int, default=8, help="rank of the random adapter")
    parser.add_argument("--runs", type=int, default=300, help="timed runs per form")
    parser.add_argument("--warmup", type=int, default=20, help="untimed runs per form first")
    parser.add_argument("--threads", type=int, default=2, help="ORT intra-op threads")
    parser.add_argument("--sequence", type=int, default=128, help="sequence length (batch 1)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)

    import numpy as np

    from lora_edge.core.flops import adapter_flops_per_token, model_flops
    from lora_edge.core.choices import Task
    from lora_edge.core.cache import default_model_path
    from lora_edge.core.models import load_base_model, load_tokenizer
    from lora_edge.runtime.session import SessionSettings, create_session, load_lora_adapter, run
    from lora_edge.core.tiny import build_random_adapter

    with tempfile.TemporaryDirectory(prefix="forms-latency-") as tmp:
        work = Path(tmp)
        adapter = args.adapter or build_random_adapter(default_model_path(), work / "adapter", "bert",
                                                       rank=args.rank, alpha=2.0 * args.rank, seed=0)
        exports = export_forms(adapter, work)

        tokenizer = load_tokenizer(default_model_path())
        encoded = tokenizer([TEXT], truncation=True, max_length=args.sequence, padding="max_length",
                            return_tensors="np")
        feeds = {name: value.astype(np.int64) for name, value in encoded.items()}
        settings = SessionSettings(intra_op_threads=args.threads, inter_op_threads=1)
        sessions = {form: create_session(info["bundle"] / info["graph"].file, settings)
                    for form, info in exports.items()}
        hotswap = exports["hotswap"]
        lora = load_lora_adapter(hotswap["bundle"] / hotswap["graph"].extra["adapter_files"]["r8"])
        runners = {form: (lambda s=session, a=(lora if form == "hotswap" else None): run(s, feeds, adapter=a))
                   for form, session in sessions.items()}
        runners["hotswap (no adapter)"] = lambda: run(sessions["hotswap"], feeds)
        timed = time_rounds(runners, rounds=max(1, args.runs // 5), runs=5, warmup=args.warmup, gap_s=0.02)
        times = {name: [seconds * 1e3 for seconds in values] for name, values in timed.times.items()}
        branched = exports["branched"]
        share = branch_kernel_share(branched["bundle"] / branched["graph"].file, feeds, args.threads)

        import torch

        base = load_base_model(default_model_path(), Task.SEQ_CLS)
        model_total = model_flops(base, {k: torch.from_numpy(v) for k, v in feeds.items()})
        extra_total = adapter_flops_per_token(Path(adapter) / "adapter_model.safetensors") * args.sequence

    medians = {name: statistics.median(values) for name, values in times.items()}
    rows = []
    for name, values in times.items():
        form = name.split(" ")[0]
        ordered = sorted(values)
        rows.append({"form": name, "export_s": exports[form]["export_s"] if name == form else None,
                     "form_wall_s": exports[form]["form_wall_s"] if name == form else None,
                     "median_ms": round(medians[name], 3), "p10_ms": round(ordered[len(values) // 10], 3),
                     "p90_ms": round(ordered[9 * len(values) // 10], 3),
                     "vs_merged": round(ratio_stats(timed.per_round[name], timed.per_round["merged"]).ratio, 4),
                     "vs_merged_interval": [round(x, 4) for x in ratio_stats(timed.per_round[name],
                                                                            timed.per_round["merged"]).interval]})
    result = {"model": "all-MiniLM-L6-v2", "rank": args.rank, "batch": 1, "sequence": args.sequence,
              "threads": args.threads, "runs": args.runs, "rows": rows,
              "model_gflop": round(model_total / 1e9, 4), "lora_extra_gflop": round(extra_total / 1e9, 5),
              "lora_extra_flops_fraction": round(extra_total / model_total, 5),
              "branched_overhead": round(ratio_stats(timed.per_round["branched"], timed.per_round["merged"]).ratio - 1,
                                         4),
              "load_average": {"before": timed.load_before, "after": timed.load_after},
              "branch_kernel_share": round(share, 4),
              "merged_gflops_per_s": round(model_total / (medians["merged"] / 1e3) / 1e9, 1)}

    print(f"\nMiniLM-L6 + r={args.rank} adapter, batch 1, seq {args.sequence}, {args.threads} threads, CPU EP, "
          f"{args.runs} runs in interleaved rounds (ratios within rounds); load average "
          f"{timed.load_before} -> {timed.load_after}\n")
    print("| form | torch.onnx export s | export+load+verify s | median ms | p10 ms | p90 ms | vs merged |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        export_s = f"{row['export_s']:.1f}" if row["export_s"] is not None else "-"
        wall_s = f"{row['form_wall_s']:.1f}" if row["form_wall_s"] is not None else "-"
        print(f"| {row['form']} | {export_s} | {wall_s} | {row['median_ms']:.2f} | {row['p10_ms']:.2f} | "
              f"{row['p90_ms']:.2f} | {row['vs_merged']:.3f} |")
    print(f"\nmodel {result['model_gflop']:.3f} GFLOP per run ({result['merged_gflops_per_s']} GFLOP/s merged); "
          f"low-rank pairs add {result['lora_extra_gflop'] * 1e3:.2f} MFLOP = "
          f"{100 * result['lora_extra_flops_fraction']:.2f}% theoretical; "
          f"branched measured +{100 * result['branched_overhead']:.2f}% wall-clock; "
          f"its low-rank MatMuls and branch Adds take {100 * share:.2f}% of the kernel time (ORT profile)")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
