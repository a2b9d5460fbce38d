"""Export wall time and peak memory: lora-edge against the stock way of writing the same graphs.

Two cases, each command run as its own process (interpreter start included), peak
RSS from ``wait4`` (the process and its children), sides interleaved in shuffled
order within each round; **ratio** is lora-edge / stock within a round.

* ``minilm``: the embedded all-MiniLM-L6-v2 + an r=8 LoRA on query/value (random
  B, as the tests build it). lora-edge writes three forms x (fp32, int8-dynamic);
  the stock recipe (PEFT ``merge_and_unload`` -> ``torch.onnx.export(dynamo=False)``
  -> ``quantize_dynamic``) writes one merged fp32 + int8.
* ``smollm2``: SmolLM2-135M (a local Hugging Face directory) + an r=8 LoRA on all
  linear layers. lora-edge writes merged + hotswap int4; the peer is PEFT
  ``merge_and_unload`` + ``save_pretrained`` followed by onnxruntime-genai's model
  builder (``-p int4 -e cpu``), installed in its own venv under
  ``~/.cache/lora-edge/bench-venvs/export-genai`` (created on first use; it sees
  the project's torch/transformers through a .pth file, so nothing is downloaded
  twice and the project's environment is untouched).

lora-edge runs as a user runs it, ``python -m lora_edge export ...`` (the CLI, its
exit included); its seconds per stage come from the bundle's ``manifest.json``
(``export_stages``)::

    python benchmarks/export_time.py --case minilm --rounds 3
    python benchmarks/export_time.py --case smollm2 --rounds 1 --smollm2 /work/cache/smollm2-hf
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
GENAI_VENV = Path.home() / ".cache" / "lora-edge" / "bench-venvs" / "export-genai"

STOCK_MINILM = """
import sys, torch
from peft import PeftModel
from transformers import AutoModelForSequenceClassification, AutoTokenizer
from onnxruntime.quantization import QuantType, quantize_dynamic
model_dir, adapter, out = sys.argv[1:4]
base = AutoModelForSequenceClassification.from_pretrained(model_dir)
model = PeftModel.from_pretrained(base, adapter).merge_and_unload().eval()
tok = AutoTokenizer.from_pretrained(model_dir)
enc = tok(["turn the lights on", "what is the weather"], padding=True, return_tensors="pt")
names = ["input_ids", "attention_mask", "token_type_ids"]
axes = {n: {0: "batch", 1: "sequence"} for n in names}
with torch.no_grad():
    torch.onnx.export(model, tuple(enc[n] for n in names), out + "/merged.fp32.onnx", dynamo=False,
                      input_names=names, output_names=["logits"], dynamic_axes=axes, opset_version=17)
quantize_dynamic(out + "/merged.fp32.onnx", out + "/merged.int8.onnx", weight_type=QuantType.QInt8)
"""

def lora_edge_export(model: str | Path, adapter: Path, out: Path, forms: str, precisions: str, task: str) -> list:
    """The lora-edge CLI's export command line (every graph checked against PyTorch, as always)."""
    return [PYTHON, "-m", "lora_edge", "export", "--model", str(model), "--adapter", f"a={adapter}", "--forms", forms,
            "--precisions", precisions, "--task", task, "--out", str(out), "--force"]

MERGE_FOR_BUILDER = """
import sys
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer
model_dir, adapter, out = sys.argv[1:4]
model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), adapter).merge_and_unload()
model.save_pretrained(out)
AutoTokenizer.from_pretrained(model_dir).save_pretrained(out)
"""


def run(command: list[str], env: dict | None, cwd: Path) -> tuple[float, float]:
    """(seconds, peak RSS in MB of the process and its children) of one command run in ``cwd``; raises when it
    fails. (Not in the checkout: ``python -m`` puts the working directory first on sys.path, before PYTHONPATH,
    which tells the sides' lora-edge apart.)"""
    import tempfile

    with tempfile.TemporaryFile() as log:  # a file, not a pipe: nobody reads a pipe while wait4 waits
        start = time.perf_counter()
        process = subprocess.Popen(command, env={**os.environ, **(env or {})}, stdout=subprocess.DEVNULL,
                                   stderr=log, cwd=cwd)
        _, status, usage = os.wait4(process.pid, 0)
        seconds = time.perf_counter() - start
        log.seek(0)
        stderr = log.read().decode(errors="replace")
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(command[:4])} ... failed ({process.returncode}):\n{stderr[-3000:]}")
    return seconds, usage.ru_maxrss / 1024


def ensure_genai_venv() -> Path:
    """The builder's venv: onnxruntime-genai on top of the project's packages (seen through a .pth file)."""
    python = GENAI_VENV / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(GENAI_VENV)], check=True)
        import site

        site_dir = next(p for p in site.getsitepackages() if p.endswith("site-packages"))
        version = f"python{sys.version_info.major}.{sys.version_info.minor}"
        (GENAI_VENV / "lib" / version / "site-packages" / "project-packages.pth").write_text(site_dir + "\n")
    if subprocess.run([str(python), "-c", "import onnxruntime_genai"], capture_output=True).returncode:
        subprocess.run([str(python), "-m", "pip", "install", "-q", "onnxruntime-genai"], check=True)
    return python


def random_adapter(model: Path, out: Path, arch: str, **kwargs) -> Path:
    if not (out / "adapter_config.json").is_file():
        sys.path.insert(0, str(ROOT))
        from lora_edge.core.tiny import build_random_adapter

        build_random_adapter(model, out, arch, rank=8, alpha=16.0, seed=1, **kwargs)
    return out


def stages_of(bundle: Path) -> dict[str, float]:
    """lora-edge's seconds per stage, from the bundle's manifest (older versions: per-graph export/quantize seconds)."""
    manifest = json.loads((bundle / "manifest.json").read_text())
    if "export_stages" in manifest:
        return {stage["stage"]: stage["seconds"] for stage in manifest["export_stages"]}
    stages = {}
    for graph in manifest["graphs"]:
        for key, label in (("export_seconds", "export"), ("quantize_seconds", "quantize")):
            if key in graph["extra"]:
                stages[f"{label} {graph['name']}"] = graph["extra"][key]
    return stages


def case_commands(case: str, work: Path, smollm2: Path, before: Path | None) -> dict[str, list]:
    """side -> list of (label, command, env) steps; a side's time and peak are over its steps.

    With ``before`` (a checkout of an earlier lora-edge), its export runs as one more side.
    """
    env = {"PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    sides = _case_sides(case, work, smollm2, env)
    if before is not None:
        label, command, _ = sides["lora-edge"][0]
        command = [c.replace(str(work / "bundle"), str(work / "bundle-before")) for c in command]
        sides["before"] = [(label, command, {**env, "PYTHONPATH": str(before)})]
    return sides


def _case_sides(case: str, work: Path, smollm2: Path, env: dict) -> dict[str, list]:
    if case == "minilm":
        sys.path.insert(0, str(ROOT))
        from lora_edge.core.cache import default_model_path

        model = default_model_path()
        adapter = random_adapter(model, work / "minilm-r8", "bert")
        (work / "stock").mkdir(exist_ok=True)
        (work / "stock.py").write_text(STOCK_MINILM)
        return {
            "lora-edge": [("export", lora_edge_export("default", adapter, work / "bundle", "merged,branched,hotswap",
                                                      "fp32,int8-dynamic", "seq-cls"), env)],
            "stock": [("merge+export+quantize", [PYTHON, str(work / "stock.py"), str(model), str(adapter),
                                                  str(work / "stock")], env)],
        }
    adapter = random_adapter(smollm2, work / "smollm2-all-linear", "llama", target_modules="all-linear")
    (work / "merge.py").write_text(MERGE_FOR_BUILDER)
    genai = ensure_genai_venv()
    return {
        "lora-edge": [("export", lora_edge_export(smollm2, adapter, work / "bundle", "merged,hotswap", "int4",
                                                  "causal-lm"), env)],
        "builder": [("peft merge+save", [PYTHON, str(work / "merge.py"), str(smollm2), str(adapter),
                                         str(work / "merged")], env),
                    ("builder int4 cpu", [str(genai), "-m", "onnxruntime_genai.models.builder", "-i",
                                          str(work / "merged"), "-o", str(work / "genai"), "-p", "int4", "-e", "cpu",
                                          "-c", str(work / "genai-cache")], env)],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", choices=["minilm", "smollm2"], action="append")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--work", type=Path, default=Path("/tmp/lora-edge-export-time"))
    parser.add_argument("--smollm2", type=Path, default=Path("/work/cache/smollm2-hf"))
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--before", type=Path, default=None, help="an earlier lora-edge checkout, run as a third side")
    args = parser.parse_args()
    results = {}
    for case in args.case or ["minilm"]:
        work = args.work.resolve() / case
        work.mkdir(parents=True, exist_ok=True)
        sides = case_commands(case, work, args.smollm2.resolve(), args.before and args.before.resolve())
        rows = []
        for round_index in range(args.rounds):
            order = list(sides)
            random.Random(round_index).shuffle(order)
            row = {}
            for side in order:
                seconds, peak, steps = 0.0, 0.0, {}
                for label, command, env in sides[side]:
                    step_seconds, step_peak = run(command, env, work)
                    seconds, peak = seconds + step_seconds, max(peak, step_peak)
                    steps[label] = round(step_seconds, 1)
                row[side] = {"seconds": round(seconds, 1), "peak_mb": round(peak), "steps": steps}
                if side in ("lora-edge", "before"):
                    row[side]["stages"] = stages_of(work / ("bundle" if side == "lora-edge" else "bundle-before"))
                print(f"[{case} round {round_index + 1}] {side}: {seconds:.1f} s, peak {peak:.0f} MB {steps}",
                      flush=True)
            other = next(s for s in sides if s not in ("lora-edge", "before"))
            row["time_ratio"] = round(row["lora-edge"]["seconds"] / row[other]["seconds"], 2)
            row["peak_ratio"] = round(row["lora-edge"]["peak_mb"] / row[other]["peak_mb"], 2)
            rows.append(row)
            print(f"[{case} round {round_index + 1}] ratio time {row['time_ratio']}, peak {row['peak_ratio']}",
                  flush=True)
        results[case] = rows
        print(json.dumps(rows[-1]["lora-edge"]["stages"], indent=1))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    shutil.rmtree(args.work / "minilm" / "stock", ignore_errors=True)


if __name__ == "__main__":
    main()
