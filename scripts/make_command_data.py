#!/usr/bin/env python3
"""Generate the shipped command-parsing task (a causal-LM chat task) from the shipped intent data.

Each row is a chat: a fixed system prompt, the user's utterance, and the
assistant's answer, one line of JSON ``{"intent": ..., "slots": {...}}``::

    {"messages": [{"role": "system", "content": "..."},
                  {"role": "user", "content": "wake me up at 7:45 pm on friday"},
                  {"role": "assistant", "content": "{\\"intent\\": \\"set_alarm\\", \\"slots\\": {...}}"}]}

Where the slots come from: ``scripts/make_intent_data.py`` builds every
utterance by filling a template's ``{slot}`` placeholders from fixed value
lists before adding politeness, casing and typos. This script re-runs that
generator with the same seed while recording the values each fill drew, so
every utterance gets the exact slot values it was made from (canonical values:
a typo in the utterance does not reach the answer). It checks that the re-run
reproduces the shipped intent files text for text, and fails otherwise.

Slot names: ``weather_day`` becomes ``day``, ``food`` becomes ``item``,
``place`` (and ``city`` in navigation) become ``destination``; a leading
"on " is dropped from days ("on friday" -> "friday"). Slots appear in the
order the template names them.

Splits follow the intent splits (no utterance is in two splits); validation and
test keep the first ``EVAL_ROWS`` rows of their (already shuffled) intent
split, so greedy exact-match decoding of the test set stays quick.

Usage: python scripts/make_command_data.py [--out lora_edge/resources/commands]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_intent_data as intent  # noqa: E402  (the generator whose draws are recorded)

DEFAULT_OUT = ROOT / "lora_edge" / "resources" / "commands"
INTENT_DIR = ROOT / "lora_edge" / "resources" / "intent"
EVAL_ROWS = 100
SYSTEM_PROMPT = 'Reply with the command as JSON: {"intent": ..., "slots": {...}}.'
RENAME = {"weather_day": "day", "food": "item", "place": "destination"}


def recorded_generation() -> tuple[dict[str, list[dict]], dict[str, list[tuple[str, str]]]]:
    """Re-run the intent generator with its seed; return its splits and each text's (slot, value) draws."""
    draws: list[tuple[str, str]] = []
    slots_of: dict[str, list[tuple[str, str]]] = {}
    sources = dict(intent.SLOTS)

    def recording(name):
        source = sources[name]

        def draw(rng):
            value = source(rng) if callable(source) else rng.choice(source)
            draws.append((name, value))
            return value
        return draw

    original_utterance = intent.utterance

    def utterance(label, rng):
        draws.clear()
        text = original_utterance(label, rng)
        slots_of.setdefault(text, list(draws))
        return text

    intent.SLOTS = {name: recording(name) for name in sources}
    intent.utterance = utterance
    try:
        rng = random.Random(intent.SEED)
        splits = intent.split(intent.generate(rng), rng)
    finally:
        intent.SLOTS, intent.utterance = sources, original_utterance
    return splits, slots_of


def answer(label: str, draws: list[tuple[str, str]]) -> str:
    """The assistant's one-line JSON for an utterance of ``label`` made from ``draws``."""
    slots = {}
    for name, value in draws:
        if label == "navigate_to" and name == "city":
            name = "destination"
        name = RENAME.get(name, name)
        if name == "day" and value.startswith("on "):
            value = value[3:]
        slots[name] = value
    return json.dumps({"intent": label, "slots": slots}, ensure_ascii=False)


def chat_row(text: str, label: str, draws: list[tuple[str, str]]) -> dict:
    """One chat row: system prompt, utterance, JSON answer."""
    return {"messages": [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": text},
                         {"role": "assistant", "content": answer(label, draws)}]}


def build(intent_dir: Path = INTENT_DIR) -> dict[str, list[dict]]:
    """The command splits, checked against the shipped intent files."""
    splits, slots_of = recorded_generation()
    rows = {}
    for name, examples in splits.items():
        shipped = [json.loads(line) for line in (intent_dir / f"{name}.jsonl").read_text().splitlines() if line]
        if shipped != examples:
            raise SystemExit(f"the intent generator no longer reproduces {intent_dir / name}.jsonl; "
                             "regenerate both data sets together")
        if name != "train":
            examples = examples[:EVAL_ROWS]
        rows[name] = [chat_row(ex["text"], ex["label"], slots_of[ex["text"]]) for ex in examples]
    return rows


def main(argv: list[str] | None = None) -> None:
    """Generate the command data set into --out (default: the package's resources/commands)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output directory")
    args = parser.parse_args(argv)
    splits = build()
    intent.write(splits, args.out)
    print(f"wrote {args.out}: " + ", ".join(f"{name} {len(rows)}" for name, rows in splits.items()))


if __name__ == "__main__":
    main()
