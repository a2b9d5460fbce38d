"""One engine of ``llm_latency.py``, run as a subprocess: reads commands on stdin, answers JSON lines.

Each engine lives in its own process (onnxruntime-genai runs in its own
virtual environment), loads its model once, and on every ``run`` command
greedily generates ``--new-tokens`` tokens after the fixed prompt ids (EOS
ignored), timing prefill (prompt -> first logits) and decode (the rest)
separately. Commands: ``run`` -> {"prefill_s", "decode_s", "decode_steps",
"tokens", "rss_loaded_mb", "peak_rss_mb"}; ``quit``. Memory: the resident set
once the engine has loaded its model (imports included), and the process's
peak resident set so far (VmHWM: every run up to this one).

    python llm_worker.py --engine lora-edge --graph G.onnx [--adapter A.onnx_adapter] --prompt-ids ids.json
    python llm_worker.py --engine genai --model DIR --prompt-ids ids.json
    python llm_worker.py --engine torch --model DIR [--adapter PEFT_DIR] [--merge] --prompt-ids ids.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def current_rss_mb() -> float:
    """This process's resident set now, in MB (Linux /proc)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def peak_rss_mb() -> float:
    """This process's peak resident set so far, in MB (VmHWM: ``getrusage``'s ru_maxrss would carry the
    benchmark parent's peak over fork + exec)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def lora_edge_engine(args):
    from lora_edge.runtime.generate import BoundAdapter, DecoderRunner, generate
    from lora_edge.runtime.session import create_session, decoder_settings

    session = create_session(args.graph, decoder_settings(args.threads))
    runner = DecoderRunner(session)
    adapter = BoundAdapter.load(args.adapter) if args.adapter else None

    def run(prompt: list[int]) -> dict:
        result = generate(runner, [prompt], args.new_tokens, eos_token_id=None, adapter=adapter)
        return {"prefill_s": result.prefill_seconds, "decode_s": result.decode_seconds,
                "decode_steps": result.decode_steps, "tokens": result.new_ids[0]}

    return run


def genai_engine(args):
    import onnxruntime_genai as og

    model = og.Model(args.model)

    def run(prompt: list[int]) -> dict:
        params = og.GeneratorParams(model)
        params.set_search_options(do_sample=False, max_length=len(prompt) + args.new_tokens,
                                  min_length=len(prompt) + args.new_tokens)
        generator = og.Generator(model, params)
        start = time.perf_counter()
        generator.append_tokens([prompt])
        prefill = time.perf_counter() - start
        tokens, steps, start = [], 0, time.perf_counter()
        while not generator.is_done() and steps < args.new_tokens:
            generator.generate_next_token()
            steps += 1
        decode = time.perf_counter() - start
        sequence = list(generator.get_sequence(0))
        tokens = [int(t) for t in sequence[len(prompt):]]
        # generate_next_token's first call picks the token from the prefill logits: count decode steps after it
        return {"prefill_s": prefill, "decode_s": decode, "decode_steps": max(steps - 1, 1), "tokens": tokens}

    return run


def torch_engine(args):
    import torch
    from transformers import AutoModelForCausalLM, DynamicCache

    torch.set_num_threads(args.threads)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    if args.adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, args.adapter)
        if args.merge:
            model = model.merge_and_unload()
    model.eval()

    @torch.inference_mode()
    def run(prompt: list[int]) -> dict:
        ids = torch.tensor([prompt])
        cache = DynamicCache()
        start = time.perf_counter()
        out = model(input_ids=ids, past_key_values=cache, use_cache=True)
        token = int(out.logits[0, -1].argmax())
        prefill = time.perf_counter() - start
        tokens, start = [token], time.perf_counter()
        for step in range(args.new_tokens - 1):
            position = torch.tensor([[len(prompt) + step]])
            out = model(input_ids=torch.tensor([[token]]), past_key_values=out.past_key_values, position_ids=position,
                        use_cache=True)
            token = int(out.logits[0, -1].argmax())
            tokens.append(token)
        return {"prefill_s": prefill, "decode_s": time.perf_counter() - start,
                "decode_steps": args.new_tokens - 1, "tokens": tokens}

    return run


ENGINES = {"lora-edge": lora_edge_engine, "genai": genai_engine, "torch": torch_engine}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engine", choices=sorted(ENGINES), required=True)
    parser.add_argument("--graph")
    parser.add_argument("--model")
    parser.add_argument("--adapter")
    parser.add_argument("--merge", action="store_true")
    parser.add_argument("--prompt-ids", required=True)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    prompt = json.loads(Path(args.prompt_ids).read_text())
    run = ENGINES[args.engine](args)
    loaded = current_rss_mb()
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        if line.strip() == "quit":
            break
        print(json.dumps({**run(prompt), "rss_loaded_mb": loaded, "peak_rss_mb": peak_rss_mb()}), flush=True)


if __name__ == "__main__":
    main()
