#!/usr/bin/env python3
"""Generate the embedded voice-assistant intent data set (deterministic, fixed seed).

Writes ``train.jsonl``, ``validation.jsonl`` and ``test.jsonl`` (one
``{"text": ..., "label": ...}`` object per line) for 15 intents of an
on-device assistant. Utterances come from varied templates filled with slot
values (durations, times, cities, contacts, songs, rooms, ...), wrapped in
politeness prefixes/suffixes and sprinkled with seeded keyboard typos.

Utterances are de-duplicated on a normalised key (lower case, punctuation and
extra spaces removed: the same input to an uncased tokenizer) *before* the
per-label split, so no two splits share an utterance and no utterance carries
two labels.

Only the standard library is used, and every random choice draws from one
``random.Random(SEED)``: re-running the script reproduces the committed files
byte for byte (a test checks this).

Usage: python scripts/make_intent_data.py [--out lora_edge/resources/intent]
"""

from __future__ import annotations

import argparse
import json
import random
import re
from pathlib import Path

SEED = 20240611
PER_LABEL = 170                      # 15 labels x 170 = 2,550 utterances
SPLIT = {"train": 0.70, "validation": 0.15, "test": 0.15}
POLITE_RATE = 0.40                   # share of utterances with a politeness prefix and/or suffix
TYPO_RATE = 0.12                     # share of utterances with one keyboard typo
DEFAULT_OUT = Path(__file__).resolve().parent.parent / "lora_edge" / "resources" / "intent"

LABELS = ("set_timer", "set_alarm", "cancel_alarm", "get_weather", "play_music", "pause_music",
          "volume_up", "volume_down", "lights_on", "lights_off", "call_contact", "send_message",
          "navigate_to", "add_reminder", "get_time")

NUMBER_WORDS = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five", 6: "six", 7: "seven", 8: "eight",
                9: "nine", 10: "ten", 12: "twelve", 15: "fifteen", 20: "twenty", 25: "twenty five",
                30: "thirty", 45: "forty five", 90: "ninety"}


def _duration(rng: random.Random) -> str:
    """A spoken duration: '5 minutes', 'an hour and a half', 'ninety seconds', ..."""
    fixed = ["an hour", "half an hour", "a minute", "an hour and a half", "a quarter of an hour",
             "two and a half hours", "a couple of minutes", "a few minutes"]
    if rng.random() < 0.2:
        return rng.choice(fixed)
    amount = rng.choice([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 12, 15, 20, 25, 30, 40, 45, 90])
    unit = rng.choice(["seconds", "minutes", "minutes", "minutes", "hours"])
    if amount == 1:
        unit = unit.rstrip("s")
    spoken = NUMBER_WORDS.get(amount) if rng.random() < 0.4 else None
    text = f"{spoken or amount} {unit}"
    if unit.startswith("hour") and rng.random() < 0.3:
        text += f" and {rng.choice([5, 10, 15, 20, 30, 45])} minutes"
    return text


def _clock(rng: random.Random) -> str:
    """A spoken clock time: '7 am', '6:45', 'half past six', 'noon', ..."""
    hour = rng.randint(1, 12)
    style = rng.randrange(6)
    if style == 0:
        return f"{hour} {rng.choice(['am', 'pm', 'a.m.', 'p.m.', 'in the morning', 'in the evening'])}"
    if style == 1:
        return f"{hour}:{rng.choice(['00', '05', '10', '15', '20', '30', '40', '45', '50'])}"
    if style == 2:
        return f"{hour}:{rng.choice(['15', '30', '45'])} {rng.choice(['am', 'pm'])}"
    if style == 3:
        return f"{rng.choice(['half past', 'quarter past', 'quarter to', 'ten past', 'twenty to'])} " \
               f"{NUMBER_WORDS.get(hour, str(hour))}"
    if style == 4:
        return f"{NUMBER_WORDS.get(hour, str(hour))} o'clock"
    return rng.choice(["noon", "midnight", "6 sharp", "7 on the dot", "five thirty", "six fifteen"])


# Slot name -> list of values, or a function of the rng for generated values.
SLOTS = {
    "duration": _duration,
    "time": _clock,
    "day": ["tomorrow", "today", "on monday", "on tuesday", "on wednesday", "on thursday", "on friday",
            "on saturday", "on sunday", "every weekday", "on weekends", "tonight", "tomorrow morning",
            "every day", "next monday"],
    "when": ["tomorrow", "tonight", "this afternoon", "tomorrow morning", "on friday", "next week",
             "at noon", "this evening", "on sunday", "later today", "in an hour", "in two hours",
             "at 5 pm", "at 8:30", "before I leave", "when I get home", "on monday morning"],
    "weather_day": ["today", "tomorrow", "tonight", "this weekend", "on saturday", "this afternoon",
                    "next week", "on monday", "this evening", "in the morning"],
    "city": ["london", "paris", "new york", "tokyo", "berlin", "madrid", "chicago", "seattle", "boston",
             "sydney", "toronto", "dublin", "rome", "amsterdam", "lisbon", "denver", "austin", "miami",
             "vienna", "oslo", "prague", "seoul", "mumbai", "cairo", "nairobi", "lima", "vancouver",
             "san francisco", "los angeles", "hong kong", "cape town", "buenos aires", "stockholm"],
    "food": ["pasta", "eggs", "rice", "cake", "pizza", "cookies", "tea", "laundry", "bread", "roast",
             "potatoes", "steak", "noodles", "brownies", "soup"],
    "song": ["bohemian rhapsody", "hey jude", "billie jean", "shape of you", "hotel california",
             "imagine", "thriller", "yesterday", "wonderwall", "rolling in the deep", "blinding lights",
             "smells like teen spirit", "let it be", "dancing queen", "purple rain", "take on me",
             "bad guy", "halo", "clocks", "viva la vida", "africa", "levitating", "uptown funk"],
    "artist": ["the beatles", "queen", "adele", "taylor swift", "coldplay", "drake", "beyonce",
               "miles davis", "ed sheeran", "daft punk", "radiohead", "nirvana", "abba", "rihanna",
               "bob marley", "the weeknd", "billie eilish", "bruno mars", "norah jones", "metallica"],
    "genre": ["jazz", "rock", "classical", "hip hop", "lo-fi", "country", "pop", "blues", "reggae",
              "techno", "folk", "soul", "indie", "metal", "piano", "chill", "workout", "eighties"],
    "playlist": ["morning", "workout", "focus", "party", "road trip", "dinner", "sleep", "running",
                 "favorites", "discover weekly", "summer", "study"],
    "room": ["kitchen", "living room", "bedroom", "bathroom", "office", "hallway", "garage", "garden",
             "dining room", "basement", "kids room", "guest room", "porch", "attic", "study"],
    "device": ["speaker", "tv", "phone", "stereo", "soundbar", "kitchen speaker", "headphones"],
    "level": ["5", "7", "10", "20", "30", "50", "two", "three", "a notch", "a bit", "a little",
              "a few steps", "two points", "10 percent", "20 percent"],
    "contact": ["mom", "dad", "grandma", "grandpa", "alex", "sarah", "john", "maria", "david", "emma",
                "my wife", "my husband", "my boss", "the office", "dr smith", "aunt lucy", "uncle bob",
                "jessica", "michael", "priya", "wei", "carlos", "sophie", "the plumber", "my sister",
                "my brother", "tom", "olivia", "noah", "fatima", "liam", "the babysitter"],
    "phone_type": ["mobile", "cell", "home", "work", "landline"],
    "message": ["i'm running late", "dinner is ready", "i'll be home soon", "see you at the cafe",
                "happy birthday", "call me back when you can", "i'm on my way", "don't forget the keys",
                "the meeting moved to thursday", "can you pick up bread", "i love you", "good night",
                "traffic is terrible", "i landed safely", "the door code changed", "thanks for today",
                "let's meet at the station", "i'll be ten minutes late", "are you free tonight"],
    "place": ["the airport", "the train station", "work", "home", "the nearest gas station",
              "the closest pharmacy", "the hospital", "the mall", "downtown", "the beach",
              "grandma's house", "the office", "the library", "the stadium", "the nearest coffee shop",
              "the supermarket", "city hall", "the museum", "the gym", "the park", "main street",
              "42 oak avenue", "the zoo", "the dentist", "the school"],
    "mode": ["car", "bike", "foot", "bus", "train", "public transport"],
    "task": ["buy milk", "take my medicine", "water the plants", "pick up the kids", "pay the rent",
             "call the dentist", "send the report", "walk the dog", "book a table", "renew my passport",
             "take out the trash", "feed the cat", "charge my phone", "pick up the dry cleaning",
             "check the oven", "email the landlord", "buy a birthday gift", "do the laundry",
             "back up my laptop", "stretch", "drink water", "lock the back door", "pack my lunch"],
}

# label -> list of (template, kind); kind "cmd" takes command politeness, "ask" question politeness
# (statements among the commands are detected by STATEMENT_STARTS).
TEMPLATES = {
    "set_timer": [
        ("set a timer for {duration}", "cmd"), ("start a {duration} timer", "cmd"),
        ("timer for {duration}", "cmd"), ("count down {duration}", "cmd"),
        ("set a {duration} timer for the {food}", "cmd"), ("put a timer on for {duration}", "cmd"),
        ("i need a timer for {duration}", "cmd"), ("time {duration} for the {food}", "cmd"),
        ("start a countdown of {duration}", "cmd"), ("can you time the {food} for {duration}", "ask"),
        ("set the kitchen timer to {duration}", "cmd"), ("new timer {duration}", "cmd"),
        ("let me know when {duration} have passed", "cmd"), ("start the timer, {duration}", "cmd"),
    ],
    "set_alarm": [
        ("set an alarm for {time}", "cmd"), ("wake me up at {time}", "cmd"),
        ("set an alarm for {time} {day}", "cmd"), ("wake me up {day} at {time}", "cmd"),
        ("i need to get up at {time} {day}", "cmd"), ("create an alarm at {time}", "cmd"),
        ("set my alarm to {time}", "cmd"), ("make sure i'm up by {time}", "cmd"),
        ("alarm at {time} {day}", "cmd"), ("add an alarm for {time} {day}", "cmd"),
        ("can you wake me at {time}", "ask"), ("set a wake up alarm for {time}", "cmd"),
        ("i want an alarm {day} at {time}", "cmd"), ("get me up at {time} {day}", "cmd"),
    ],
    "cancel_alarm": [
        ("cancel my {time} alarm", "cmd"), ("turn off the alarm for {day}", "cmd"),
        ("delete the alarm", "cmd"), ("remove all my alarms", "cmd"),
        ("i don't need the {time} alarm anymore", "cmd"), ("disable my alarm {day}", "cmd"),
        ("cancel the alarm i set for {time}", "cmd"), ("switch off my wake up alarm", "cmd"),
        ("delete my alarm for {time} {day}", "cmd"), ("clear the {time} alarm", "cmd"),
        ("no alarm {day}", "cmd"), ("get rid of the alarm at {time}", "cmd"),
        ("can you cancel my alarms for {day}", "ask"), ("cancel tomorrow's alarm", "cmd"),
        ("i don't want to be woken up {day}, cancel the alarm", "cmd"),
    ],
    "get_weather": [
        ("what's the weather in {city}", "ask"), ("will it rain {weather_day}", "ask"),
        ("do i need an umbrella {weather_day}", "ask"), ("how hot will it be in {city} {weather_day}", "ask"),
        ("weather forecast for {city}", "cmd"), ("is it going to snow in {city} {weather_day}", "ask"),
        ("what's the temperature outside", "ask"), ("how cold is it in {city}", "ask"),
        ("tell me the forecast for {weather_day}", "cmd"), ("is it sunny in {city}", "ask"),
        ("should i bring a jacket {weather_day}", "ask"), ("what's the weather like {weather_day}", "ask"),
        ("check the weather in {city} {weather_day}", "cmd"), ("how windy is it in {city}", "ask"),
        ("any storms expected {weather_day}", "ask"),
    ],
    "play_music": [
        ("play {song} by {artist}", "cmd"), ("put on some {genre}", "cmd"),
        ("play my {playlist} playlist", "cmd"), ("i want to hear {artist}", "cmd"),
        ("start playing {genre} music in the {room}", "cmd"), ("shuffle songs by {artist}", "cmd"),
        ("play {song}", "cmd"), ("play some {genre} on the {device}", "cmd"),
        ("put on {song}", "cmd"), ("can you play something by {artist}", "ask"),
        ("start my {playlist} mix", "cmd"), ("play music", "cmd"), ("play the latest album by {artist}", "cmd"),
        ("i'm in the mood for {genre}", "cmd"), ("queue up {song} by {artist}", "cmd"),
    ],
    "pause_music": [
        ("pause the music", "cmd"), ("pause", "cmd"), ("stop playing", "cmd"),
        ("pause the song", "cmd"), ("hold the music for a second", "cmd"),
        ("stop the music in the {room}", "cmd"), ("pause playback on the {device}", "cmd"),
        ("can you pause this", "ask"), ("put the music on hold", "cmd"), ("pause {song}", "cmd"),
        ("stop the song", "cmd"), ("pause the {playlist} playlist", "cmd"), ("freeze the playback", "cmd"),
        ("stop the music for a moment", "cmd"), ("pause whatever is playing on the {device}", "cmd"),
        ("pause {artist}", "cmd"),
    ],
    "volume_up": [
        ("turn it up", "cmd"), ("louder", "cmd"), ("increase the volume", "cmd"),
        ("volume up by {level}", "cmd"), ("raise the volume {level}", "cmd"),
        ("make it louder in the {room}", "cmd"), ("i can't hear it, turn it up", "cmd"),
        ("crank up the {device}", "cmd"), ("turn the volume up {level}", "cmd"),
        ("boost the sound on the {device}", "cmd"), ("turn up the music", "cmd"),
        ("it's too quiet", "cmd"), ("can you make it louder", "ask"), ("pump up the volume {level}", "cmd"),
        ("increase the {device} volume by {level}", "cmd"),
    ],
    "volume_down": [
        ("turn it down", "cmd"), ("quieter", "cmd"), ("lower the volume", "cmd"),
        ("volume down by {level}", "cmd"), ("reduce the volume {level}", "cmd"),
        ("make it quieter in the {room}", "cmd"), ("it's too loud", "cmd"),
        ("turn down the {device}", "cmd"), ("turn the volume down {level}", "cmd"),
        ("soften the sound on the {device}", "cmd"), ("turn down the music", "cmd"),
        ("that's way too loud, turn it down", "cmd"), ("can you make it quieter", "ask"),
        ("decrease the {device} volume by {level}", "cmd"), ("lower the music a bit", "cmd"),
    ],
    "lights_on": [
        ("turn on the lights in the {room}", "cmd"), ("switch on the {room} lights", "cmd"),
        ("lights on", "cmd"), ("i need some light in the {room}", "cmd"),
        ("it's too dark in the {room}", "cmd"), ("turn the {room} lamp on", "cmd"),
        ("light up the {room}", "cmd"), ("can you turn the lights on", "ask"),
        ("{room} lights on", "cmd"), ("switch the lights on", "cmd"), ("power on the {room} lights", "cmd"),
        ("brighten the {room}", "cmd"), ("turn on all the lights", "cmd"), ("lights on in the {room}", "cmd"),
    ],
    "lights_off": [
        ("turn off the lights in the {room}", "cmd"), ("switch off the {room} lights", "cmd"),
        ("lights off", "cmd"), ("kill the lights in the {room}", "cmd"),
        ("it's too bright in the {room}", "cmd"), ("turn the {room} lamp off", "cmd"),
        ("darken the {room}", "cmd"), ("can you turn the lights off", "ask"),
        ("{room} lights off", "cmd"), ("switch the lights off", "cmd"), ("shut off the {room} lights", "cmd"),
        ("turn off all the lights", "cmd"), ("lights off in the {room}", "cmd"),
        ("no more lights in the {room}", "cmd"),
    ],
    "call_contact": [
        ("call {contact}", "cmd"), ("phone {contact}", "cmd"), ("ring {contact}", "cmd"),
        ("give {contact} a call", "cmd"), ("dial {contact}'s {phone_type} number", "cmd"),
        ("video call {contact}", "cmd"), ("get {contact} on the phone", "cmd"),
        ("i need to talk to {contact}", "cmd"), ("call {contact} on their {phone_type}", "cmd"),
        ("can you call {contact}", "ask"), ("start a call with {contact}", "cmd"),
        ("call {contact} on speaker", "cmd"), ("ring {contact}'s {phone_type}", "cmd"),
        ("put me through to {contact}", "cmd"),
    ],
    "send_message": [
        ("text {contact} that {message}", "cmd"), ("send a message to {contact} saying {message}", "cmd"),
        ("tell {contact} {message}", "cmd"), ("message {contact}: {message}", "cmd"),
        ("send {contact} a text", "cmd"), ("whatsapp {contact} {message}", "cmd"),
        ("let {contact} know {message}", "cmd"), ("drop {contact} a message", "cmd"),
        ("write to {contact}: {message}", "cmd"), ("can you text {contact}", "ask"),
        ("send a text to {contact}", "cmd"), ("reply to {contact} with {message}", "cmd"),
        ("sms {contact} {message}", "cmd"),
    ],
    "navigate_to": [
        ("navigate to {place}", "cmd"), ("take me to {place}", "cmd"), ("directions to {place}", "cmd"),
        ("how do i get to {place}", "ask"), ("find the fastest route to {place}", "cmd"),
        ("start navigation to {place}", "cmd"), ("how far is {place}", "ask"),
        ("show me the way to {place}", "cmd"), ("get me to {place} by {mode}", "cmd"),
        ("route to {place} avoiding the highway", "cmd"), ("drive me to {place}", "cmd"),
        ("navigate to {city}", "cmd"), ("what's the best way to {place} by {mode}", "ask"),
        ("guide me to {place}", "cmd"),
    ],
    "add_reminder": [
        ("remind me to {task} {when}", "cmd"), ("add a reminder to {task}", "cmd"),
        ("don't let me forget to {task} {when}", "cmd"), ("create a reminder to {task} {when}", "cmd"),
        ("set a reminder to {task} {when}", "cmd"), ("remind me {when} to {task}", "cmd"),
        ("i need a reminder to {task}", "cmd"), ("add {task} to my reminders", "cmd"),
        ("can you remind me to {task}", "ask"), ("new reminder: {task} {when}", "cmd"),
        ("make a reminder for {when}: {task}", "cmd"), ("remind me about {task}", "cmd"),
        ("put a reminder in to {task} {when}", "cmd"),
    ],
    "get_time": [
        ("what time is it", "ask"), ("what's the time", "ask"), ("tell me the time", "cmd"),
        ("what time is it in {city}", "ask"), ("do you know what time it is", "ask"),
        ("current time", "cmd"), ("what's the local time in {city}", "ask"),
        ("what time is it right now", "ask"), ("how late is it", "ask"),
        ("what's the time in {city} right now", "ask"), ("time check", "cmd"),
        ("give me the current time in {city}", "cmd"), ("is it {time} yet", "ask"),
        ("what hour is it in {city}", "ask"), ("tell me what time it is in {city}", "cmd"),
    ],
}

POLITE_PREFIX = {
    "cmd": ["please", "hey,", "hey assistant,", "could you", "can you", "would you please", "ok,",
            "i'd like you to", "quickly,", "um,", "yo,"],
    "ask": ["hey,", "ok,", "excuse me,", "quick question,", "um,", "hey assistant,", "so,"],
    "say": ["hey,", "ok,", "um,", "hey assistant,", "so,", "listen,"],
}
POLITE_SUFFIX = {
    "cmd": ["please", "thanks", "thank you", "for me", "right now", "asap", "if you can", "cheers"],
    "ask": ["please", "thanks", "if you know", "thank you"],
    "say": ["please", "thanks", "thank you"],
}
# Command templates that are statements ("i need ...", "it's too loud") take statement-style politeness.
STATEMENT_STARTS = ("i ", "i'", "it's", "that's", "no ", "let me", "any ", "{")
# Letters next to each other on a QWERTY keyboard, for substitution typos.
KEY_NEIGHBOURS = {"a": "sq", "b": "vn", "c": "xv", "d": "sf", "e": "wr", "f": "dg", "g": "fh", "h": "gj",
                  "i": "uo", "j": "hk", "k": "jl", "l": "k", "m": "n", "n": "bm", "o": "ip", "p": "o",
                  "r": "et", "s": "ad", "t": "ry", "u": "yi", "v": "cb", "w": "qe", "y": "tu", "z": "x"}


def fill(template: str, rng: random.Random) -> str:
    """Replace each ``{slot}`` in ``template`` with a value drawn from SLOTS."""
    def value(match: re.Match) -> str:
        source = SLOTS[match.group(1)]
        return source(rng) if callable(source) else rng.choice(source)
    return re.sub(r"\{(\w+)\}", value, template)


def add_politeness(text: str, kind: str, rng: random.Random) -> tuple[str, str]:
    """A prefix, a suffix, or both around ``text``; returns (prefixed text, suffix or '')."""
    where = rng.choice(["prefix", "suffix", "both"])
    if where in ("prefix", "both"):
        text = f"{rng.choice(POLITE_PREFIX[kind])} {text}"
    suffix = rng.choice(POLITE_SUFFIX[kind]) if where in ("suffix", "both") else ""
    return text, suffix


def add_typo(text: str, rng: random.Random) -> str:
    """Introduce one keyboard typo (swap, drop, double or neighbour key) in a word of 4+ letters."""
    words = text.split(" ")
    candidates = [i for i, word in enumerate(words) if len(word) >= 4 and word.isalpha()]
    if not candidates:
        return text
    index = rng.choice(candidates)
    word = words[index]
    pos = rng.randrange(1, len(word) - 1)
    kind = rng.choice(["swap", "drop", "double", "neighbour"])
    if kind == "swap":
        word = word[:pos] + word[pos + 1] + word[pos] + word[pos + 2:]
    elif kind == "drop":
        word = word[:pos] + word[pos + 1:]
    elif kind == "double":
        word = word[:pos] + word[pos] + word[pos:]
    else:
        word = word[:pos] + rng.choice(KEY_NEIGHBOURS.get(word[pos], word[pos])) + word[pos + 1:]
    words[index] = word
    return " ".join(words)


def surface(text: str, suffix: str, kind: str, rng: random.Random) -> str:
    """Casing and end punctuation (before any politeness suffix), as speech-to-text might emit them."""
    if rng.random() < 0.5:
        text = text[0].upper() + text[1:]
    end = rng.random()
    if kind == "ask" and end < 0.6:
        text += "?"
    elif kind != "ask" and end < 0.25:
        text += "," if suffix else rng.choice([".", "!"])
    elif suffix and end < 0.7:
        text += ","
    return f"{text} {suffix}" if suffix else text


def normalise(text: str) -> str:
    """Key for de-duplication: what an uncased tokenizer sees, minus punctuation."""
    return " ".join(re.sub(r"[^\w' ]", " ", text.lower()).split())


def utterance(label: str, rng: random.Random) -> str:
    """One random utterance for ``label``."""
    template, kind = rng.choice(TEMPLATES[label])
    if kind == "cmd" and template.startswith(STATEMENT_STARTS):
        kind = "say"
    text, suffix = fill(template, rng), ""
    if rng.random() < POLITE_RATE:
        text, suffix = add_politeness(text, kind, rng)
    text = surface(text, suffix, kind, rng)
    if rng.random() < TYPO_RATE:
        text = add_typo(text, rng)
    return text


def generate(rng: random.Random, per_label: int = PER_LABEL) -> dict[str, list[str]]:
    """``per_label`` unique utterances per label; a text that another label already produced is skipped."""
    owner: dict[str, str] = {}
    by_label: dict[str, list[str]] = {label: [] for label in LABELS}
    for label in LABELS:
        attempts = 0
        while len(by_label[label]) < per_label:
            attempts += 1
            if attempts > per_label * 200:
                raise RuntimeError(f"templates for {label} cannot produce {per_label} unique utterances")
            text = utterance(label, rng)
            key = normalise(text)
            if key in owner:
                continue
            owner[key] = label
            by_label[label].append(text)
    return by_label


def split(by_label: dict[str, list[str]], rng: random.Random) -> dict[str, list[dict]]:
    """Stratified split by SPLIT fractions; each split shuffled."""
    splits: dict[str, list[dict]] = {name: [] for name in SPLIT}
    for label, texts in by_label.items():
        texts = list(texts)
        rng.shuffle(texts)
        n_val = round(len(texts) * SPLIT["validation"])
        n_test = round(len(texts) * SPLIT["test"])
        cuts = {"validation": texts[:n_val], "test": texts[n_val:n_val + n_test], "train": texts[n_val + n_test:]}
        for name, part in cuts.items():
            splits[name].extend({"text": text, "label": label} for text in part)
    for rows in splits.values():
        rng.shuffle(rows)
    return splits


def write(splits: dict[str, list[dict]], out: Path) -> None:
    """Write one JSONL file per split (UTF-8, '\\n' line ends, stable key order)."""
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in splits.items():
        with open(out / f"{name}.jsonl", "w", encoding="utf-8", newline="\n") as handle:
            for row in rows:
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")


def main(argv: list[str] | None = None) -> None:
    """Generate the data set into --out (default: the package's resources/intent)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output directory")
    args = parser.parse_args(argv)
    rng = random.Random(SEED)
    splits = split(generate(rng), rng)
    write(splits, args.out)
    sizes = ", ".join(f"{name} {len(rows)}" for name, rows in splits.items())
    print(f"wrote {args.out}: {sizes}")


if __name__ == "__main__":
    main()
