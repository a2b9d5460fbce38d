#!/usr/bin/env python3
"""Do two back-to-back `lora-edge compare` runs agree? Figures, intervals and verdicts side by side.

Builds (once) a bundle of the embedded MiniLM with a random r=8 adapter
(merged, branched, hotswap x fp32, int8-dynamic, int8-static: `lora-edge
export` then `lora-edge quantize`), optionally starts ``--load`` busy loops
(``python -c 'while True: pass'``, killed at the end), runs ``lora-edge compare
--fresh`` twice in a row and prints, per (form, merged) pair, each run's
overhead, interval and verdict, the difference in points, and how many verdicts
agreed. Each run's compare.json is copied to ``--out``.

    python benchmarks/compare_twice.py --load 1                 # busy machine
    python benchmarks/compare_twice.py --load 0 -- --runs 100   # options after -- go to compare
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
GRAPHS = ",".join(f"{form}.{precision}" for precision in ("fp32", "int8-dynamic", "int8-static")
                  for form in ("merged", "branched", "hotswap"))


def lora_edge(*args: str) -> None:
    """Run the CLI of the lora_edge this script sits beside."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT.parent), os.environ.get("PYTHONPATH")]))}
    subprocess.run([sys.executable, "-m", "lora_edge", *args], check=True, env=env)


def build_bundle(work: Path) -> Path:
    """The MiniLM bundle with a random r=8 adapter in every form and precision (kept for the next call)."""
    bundle = work / "bundle"
    if (bundle / "onnx" / "hotswap.int8-static.onnx").is_file():
        return bundle
    from latency import random_adapter

    from lora_edge.core.data import default_intent_files
    from lora_edge.core.model_source import resolve_model_path

    adapter = random_adapter(resolve_model_path("default"), work / "adapter", 8, 0)
    lora_edge("export", "--adapter", f"bench={adapter}", "--precisions", "fp32,int8-dynamic", "--out", str(bundle),
              "--force", "--quiet")
    lora_edge("quantize", str(bundle), "--precisions", "int8-static", "--calibration",
              str(default_intent_files().train))
    return bundle


def run_compare(bundle: Path, device: str, extra: list[str], out: Path) -> dict:
    """One `lora-edge compare --fresh` run; its compare.json (copied to ``out``) with the wall time added."""
    began = time.perf_counter()
    lora_edge("compare", str(bundle), "--device", device, "--graphs", GRAPHS, "--fresh", *extra)
    result = json.loads((bundle / "reports" / "compare.json").read_text())
    result["wall_s"] = round(time.perf_counter() - began, 1)
    out.write_text(json.dumps(result, indent=2))
    return result


def _cell(row: dict) -> str:
    low, high = row["overhead_interval_pct"]
    return f"{row['overhead_pct']:+.1f} [{low:+.1f}, {high:+.1f}]"


def table(first: dict, second: dict) -> str:
    """Markdown: per pair, both runs' overhead [interval], verdict, the difference; then the agreement counts."""
    lines = ["| vs merged, same precision | run 1: overhead % [95% interval] | verdict | run 2: overhead % "
             "[95% interval] | verdict | difference (points) |", "| --- | --- | --- | --- | --- | ---: |"]
    rows2 = {row["graph"]: row for row in second["rows"]}
    agreed = close = total = 0
    for row in first["rows"]:
        other = rows2.get(row["graph"])
        if row.get("overhead_interval_pct") is None or other is None:
            continue
        difference = abs(row["overhead_pct"] - other["overhead_pct"])
        total += 1
        agreed += row["verdict"] == other["verdict"]
        close += difference < 2.0
        lines.append(f"| {row['graph']} | {_cell(row)} | {row['verdict']} | {_cell(other)} | {other['verdict']} | "
                     f"{difference:.1f} |")
    facts = [f"run {i}: {run['rounds']} rounds, timing {run.get('timing_s')} s ({run.get('stopped')}), compare "
             f"{run['wall_s']} s, load average {run['load_average'].get('before')} -> "
             f"{run['load_average'].get('after')}" for i, run in ((1, first), (2, second))]
    return "\n".join(lines + ["", *facts, f"verdicts agreed: {agreed}/{total}; figures within 2 points: "
                                          f"{close}/{total}"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/lora-edge-compare-twice"))
    parser.add_argument("--device", default="host-cpu")
    parser.add_argument("--load", type=int, default=1, help="Busy loops running during both compares.")
    parser.add_argument("--out", type=Path, default=ROOT / "results", help="Where the two compare.json go.")
    parser.add_argument("--tag", default="", help="Suffix of the result files (compare-twice<tag>-run{1,2}.json).")
    parser.add_argument("compare_args", nargs="*", help="Options passed to `lora-edge compare` (after --).")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    bundle = build_bundle(args.workdir)
    loops = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.load)]
    try:
        time.sleep(5 if loops else 0)
        runs = [run_compare(bundle, args.device, args.compare_args, args.out / f"compare-twice{args.tag}-run{i}.json")
                for i in (1, 2)]
    finally:
        for loop in loops:
            loop.kill()
            loop.wait()
    print(table(*runs))
    shutil.rmtree(bundle / ".cache", ignore_errors=True)


if __name__ == "__main__":
    main()
