"""Cold `lora-edge infer` on a classifier bundle: wall time and peak RSS of a whole process, against stock ways.

Three ways to classify one text with the same bundle graph, each a fresh
Python process (what a device sees: import, load, tokenize, run, print):

* ``lora-edge``: ``python -m lora_edge infer BUNDLE --graph G --text T``;
* ``stock``: onnxruntime + ``tokenizers`` by hand (the fastest stock way,
  the README's "use a bundle without lora-edge" snippet);
* ``transformers``: ``AutoTokenizer`` + onnxruntime (what infer did before it
  dropped transformers/torch).

Rounds are interleaved (each round runs every way once, shuffled); the table
gives medians and the median within-round ratio to ``stock``. Peak RSS is the
child's ``ru_maxrss``. Also checks that the lora-edge process never imported
torch or transformers.

    python benchmarks/infer_startup.py BUNDLE [--graph merged.fp32] [--rounds 10] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

TEXT = "set an alarm for seven tomorrow morning"
STOCK = """
import json, sys, numpy as np, onnxruntime as ort
from tokenizers import Tokenizer
bundle, graph, text = sys.argv[1:4]
tok = Tokenizer.from_file(f"{bundle}/onnx/tokenizer.json"); tok.no_padding()
enc = tok.encode(text)
sess = ort.InferenceSession(f"{bundle}/onnx/{graph}.onnx", providers=["CPUExecutionProvider"])
feeds = {"input_ids": [enc.ids], "attention_mask": [enc.attention_mask], "token_type_ids": [enc.type_ids]}
names = {i.name for i in sess.get_inputs()}
logits = sess.run(["logits"], {k: np.asarray(v, np.int64) for k, v in feeds.items() if k in names})[0]
labels = json.load(open(f"{bundle}/onnx/label_map.json"))["labels"]
print(labels[int(logits[0].argmax())])
"""
TRANSFORMERS = STOCK.replace("from tokenizers import Tokenizer", "from transformers import AutoTokenizer").replace(
    'tok = Tokenizer.from_file(f"{bundle}/onnx/tokenizer.json"); tok.no_padding()\nenc = tok.encode(text)',
    'tok = AutoTokenizer.from_pretrained(f"{bundle}/onnx")\nenc = tok(text)').replace(
    '"input_ids": [enc.ids], "attention_mask": [enc.attention_mask], "token_type_ids": [enc.type_ids]',
    '"input_ids": [enc["input_ids"]], "attention_mask": [enc["attention_mask"]], '
    '"token_type_ids": [enc["token_type_ids"]]')
LORA_EDGE = """
import sys, runpy
sys.argv = ["lora-edge", "infer", *sys.argv[1:]]
try:
    runpy.run_module("lora_edge", run_name="__main__")
except SystemExit as exc:
    if exc.code not in (0, None):
        raise
print("imported:", ",".join(m for m in ("torch", "transformers") if m in sys.modules) or "-", file=sys.stderr)
"""


def run_child(code: str, args: list[str]) -> tuple[float, float, str]:
    """(wall seconds, peak RSS MB, stdout+stderr) of ``python -c code args`` in a fresh process."""
    started = time.perf_counter()
    child = subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    _, status, usage = os.wait4(child.pid, 0)
    wall = time.perf_counter() - started
    out, err = child.stdout.read(), child.stderr.read()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"child failed: {err[-2000:]}")
    return wall, usage.ru_maxrss / 1024, out + err


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--graph", default="merged.fp32")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--json", type=Path, default=None)
    options = parser.parse_args()
    bundle = str(options.bundle.resolve())
    ways = {
        "lora-edge": (LORA_EDGE, [bundle, "--graph", options.graph, "--text", TEXT]),
        "stock": (STOCK, [bundle, options.graph, TEXT]),
        "transformers": (TRANSFORMERS, [bundle, options.graph, TEXT]),
    }
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in ways}
    ratios: dict[str, list[float]] = {name: [] for name in ways}
    imported = set()
    for _ in range(options.rounds):
        order = list(ways)
        random.shuffle(order)
        round_walls = {}
        for name in order:
            wall, rss, text = run_child(*ways[name])
            results[name].append((wall, rss))
            round_walls[name] = wall
            if name == "lora-edge":
                imported.add(text.strip().splitlines()[-1])
        for name in ways:
            ratios[name].append(round_walls[name] / round_walls["stock"])
    table = {name: {"wall_s": round(statistics.median(w for w, _ in rows), 3),
                    "rss_mb": round(statistics.median(r for _, r in rows), 1),
                    "ratio_to_stock": round(statistics.median(ratios[name]), 2)} for name, rows in results.items()}
    print(f"{'way':<14}{'wall s':>8}{'RSS MB':>8}{'x stock':>9}   ({options.rounds} rounds, graph {options.graph})")
    for name, row in table.items():
        print(f"{name:<14}{row['wall_s']:>8.3f}{row['rss_mb']:>8.1f}{row['ratio_to_stock']:>9.2f}")
    print("lora-edge process " + "; ".join(sorted(imported)))
    if options.json:
        options.json.write_text(json.dumps({"graph": options.graph, "rounds": options.rounds, "table": table,
                                            "lora_edge_imports": sorted(imported)}, indent=2))


if __name__ == "__main__":
    main()
