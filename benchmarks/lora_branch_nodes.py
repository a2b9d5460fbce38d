"""What a LoRA branch's nodes cost in ONNX Runtime, one node kind at a time, beside the projection it rides on.

A branched or hot-swap graph adds, per targeted projection of a layer, the
low-rank pair's nodes to the merged graph: ``h = x·A`` (one A for the layer's
targets in lora-edge's graphs), ``d = h·B_t`` (each target's B zero-padded to
the shared rank) and ``y = base + d``, as ``export.cpu_fusion`` writes them. This times
each of those kinds as a one-node (or two-node) graph, in interleaved rounds
(shuffled order), against the base projection they ride on (``MatMul`` + bias
``Add``, fp32) and an ``Identity`` graph (what a session run costs with no work),
at MiniLM-L6's shapes (128 tokens, hidden 384, r=8, query and value targeted),
threads spinning (ORT's default) or not (``--spinning off``, as ``lora-edge compare`` times).
Each figure is the median over rounds of a graph's mean run time; "net" is that
minus the Identity graph's. The bound of issue 12 for branched fp32 (+1.5% of a
merged graph of ~8.6 ms on this machine) leaves ~21 us per layer for the whole
branch::

    python benchmarks/lora_branch_nodes.py --rounds 30
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

SPINNING = "1"  # session.intra_op.allow_spinning: ORT's default; main() sets it from --spinning


def _session(nodes: list, initializers: list, threads: int):
    """An ORT CPU session of a graph ``x [1, 128, 384] -> y`` made of ``nodes`` (threads not spinning)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 128, 384])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.add_session_config_entry("session.intra_op.allow_spinning", SPINNING)
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def cases(rank: int, hidden: int) -> dict[str, tuple[list, list]]:
    """Graph name -> (nodes, initializers): the base projection, each kind of branch node, nothing."""
    import numpy as np
    from onnx import helper, numpy_helper

    rng = np.random.default_rng(0)

    def tensor(name, *shape):
        return numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)

    node = helper.make_node
    shared_a = tensor("A", hidden, 2 * rank)  # query and value: one A for both targets
    return {
        "identity (a run with no work)": ([node("Identity", ["x"], ["y"])], []),
        "base projection: MatMul + bias Add": ([node("MatMul", ["x", "W"], ["m"]), node("Add", ["m", "b"], ["y"])],
                                               [tensor("W", hidden, hidden), tensor("b", hidden)]),
        "h = x·A (shared A, 2r columns)": ([node("MatMul", ["x", "A"], ["y"])], [shared_a]),
        "h = x·A, then d = h·B (B zero-padded to 2r rows)": (
            [node("MatMul", ["x", "A"], ["h"]), node("MatMul", ["h", "B"], ["y"])],
            [shared_a, numpy_helper.from_array(np.concatenate([rng.standard_normal((rank, hidden)),
                                                               np.zeros((rank, hidden))]).astype(np.float32), "B")]),
        "y = base + d (Add)": ([node("Add", ["x", "x"], ["y"])], []),
    }


def measure(rounds: int, runs: int, threads: int, rank: int, hidden: int) -> dict[str, float]:
    """Median over rounds of each graph's mean microseconds per run (graphs in a new order each round)."""
    import numpy as np

    sessions = {name: _session(nodes, inits, threads) for name, (nodes, inits) in cases(rank, hidden).items()}
    feed = {"x": np.random.default_rng(1).standard_normal((1, 128, hidden)).astype(np.float32)}
    times: dict[str, list[float]] = {name: [] for name in sessions}
    for round_index in range(rounds):
        order = list(sessions)
        random.Random(round_index).shuffle(order)
        for name in order:
            sessions[name].run(None, feed)  # untimed
            started = time.perf_counter()
            for _ in range(runs):
                sessions[name].run(None, feed)
            times[name].append((time.perf_counter() - started) / runs * 1e6)
    return {name: statistics.median(values) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--runs", type=int, default=50, help="runs per graph per round")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--spinning", choices=["on", "off"], default="on",
                        help="ORT's intra-op threads spin between parallel sections (on: ORT's default; off: as "
                             "`lora-edge compare` times)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    import os

    global SPINNING
    SPINNING = "1" if args.spinning == "on" else "0"

    load_before = os.getloadavg()
    medians = measure(args.rounds, args.runs, args.threads, args.rank, 384)
    idle = medians["identity (a run with no work)"]
    print(f"{'graph':45s} {'us/run':>8s} {'net us':>8s}")
    for name, value in medians.items():
        print(f"{name:45s} {value:8.1f} {value - idle:8.1f}")
    net = {name: value - idle for name, value in medians.items()}
    a = net["h = x·A (shared A, 2r columns)"]
    b = net["h = x·A, then d = h·B (B zero-padded to 2r rows)"] - a
    per_layer = a + 2 * b + 2 * net["y = base + d (Add)"]
    print(f"one layer's branch (x·A once, h·B and Add for query and value): ~{per_layer:.0f} us; "
          f"load average {load_before[0]:.1f} -> {os.getloadavg()[0]:.1f}")
    if args.json:
        args.json.write_text(json.dumps({"rounds": args.rounds, "runs": args.runs, "threads": args.threads,
                                         "spinning": args.spinning,
                                         "rank": args.rank, "median_us": medians, "net_us": net,
                                         "branch_per_layer_us": per_layer,
                                         "load_average": [load_before[0], os.getloadavg()[0]]}, indent=1))


if __name__ == "__main__":
    main()
