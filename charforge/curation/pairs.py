"""Preference pairs from a curated split: the gold reply is `chosen`, a reply the character must not give is
`rejected`, in TRL's conversational format ({"prompt": [...], "chosen": [...], "rejected": [...]}).

The rejected side costs nothing in character chat:
- `other_character`: another character's reply to the same user turn in the same split, at whichever turn of the
  conversation it comes (the seed conversations ask many characters the same questions);
- `boilerplate`: an assistant-voice line (`BOILERPLATE` below, written for this purpose: no evaluation judge learns
  from it);
- `boundary_break`: the gold reply followed by a sentence that crosses one of the card's `boundaries` (anachronisms:
  the card says what the character cannot know);
- `rated_down`: a production reply a user rated down (curation quarantined it), paired with the gold reply to the
  same character and user turn when the split has one;
- `monitor_flagged`: likewise, a production reply the character monitor flagged (out of character, assistant voice,
  a loop, empty: `flag_replies` in configs/monitor.yaml).

Pairs of one split are built from that split only (train pairs from train rows, evaluation pairs from evaluation
rows), and none may carry a probe's text (`data/eval/probes.jsonl`: its reference or history): those are dropped
with the reason `probe_text`, like pairs whose sides are identical (`identical`) or too long (`too_long`).
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter, defaultdict
from pathlib import Path

from charforge.characters import CharacterCard
from charforge.errors import InputError

PAIRS_TRAIN = "pairs_train.jsonl"
KINDS = ("other_character", "boilerplate", "boundary_break", "rated_down", "monitor_flagged")
PRODUCTION_KINDS = ("rated_down", "monitor_flagged")  # negatives curation quarantined from captured conversations
BOILERPLATE = [
    "As an AI language model, I don't have personal experiences, but I'm happy to share some general information.",
    "I'm sorry, but I can't pretend to be a character. Is there anything else I can help you with?",
    "Great question! The answer depends on several factors, so it's best to consult a reliable source.",
    "I hope this helps! Let me know if you have any other questions.",
    "Certainly! Here's a summary of the key points: plan ahead, stay organized, and ask for help when needed.",
    "As an AI assistant, I don't have feelings, but thank you for asking!",
]
BOUNDARY_LINES = ["I read all about it on the {term} this very morning.", "Let me check the {term} and tell you.",
                  "My friends and I talked it over by {term} last night."]


def _pick(key: str, options: list):
    return options[int(hashlib.sha256(key.encode()).hexdigest(), 16) % len(options)]


def _norm(text: str) -> str:
    return " ".join(text.split()).casefold()


def _exchanges(messages: list[dict]):
    """(user turn, the assistant reply that follows it) pairs of a conversation."""
    return [(messages[i], messages[i + 1]) for i in range(len(messages) - 1)
            if messages[i]["role"] == "user" and messages[i + 1]["role"] == "assistant"]


def probe_texts(probes: Path) -> set[str]:
    """Every reference and history turn of the evaluation probes, normalised: text no pair may carry."""
    texts = set()
    for line in Path(probes).read_text().splitlines():
        row = json.loads(line)
        texts.update(_norm(t) for t in (row["reference"], row["user_msg"], *(m["content"] for m in row["history"])))
    return texts


def build_pairs(rows: list[dict], cards: dict[str, CharacterCard], kinds: list[str], production: list[dict],
                held_out: set[str], tokenizer, max_tokens: int) -> tuple[list[dict], Counter, Counter]:
    """Pairs of one split: one per (row, kind) that has a negative. Returns (pairs, kept by kind, dropped by reason).
    `rows` are curated rows of that split; `production` the captured rows curation quarantined as negatives, each
    with its kind (`negative`: rated_down or monitor_flagged)."""
    by_turn: dict[str, list[tuple[str, str]]] = defaultdict(list)  # user turn -> (character, gold reply)
    gold_of: dict[tuple[str, str], str] = {}
    for row in rows:
        for user, reply in _exchanges(row["messages"]):
            by_turn[_norm(user["content"])].append((row["character"], reply["content"]))
            gold_of.setdefault((row["character"], _norm(user["content"])), reply["content"])
    kept, dropped, pairs = Counter(), Counter(), []

    def add(prompt: list[dict], chosen: str, rejected: str, character: str, kind: str) -> None:
        texts = [m["content"] for m in prompt if m["role"] != "system"] + [chosen, rejected]
        if _norm(chosen) == _norm(rejected):
            dropped["identical"] += 1
        elif any(_norm(t) in held_out for t in texts):
            dropped["probe_text"] += 1
        elif max(len(tokenizer.apply_chat_template(prompt + [{"role": "assistant", "content": side}], tokenize=True,
                                                   return_dict=False))  # token ids (a dict by default since v5)
                 for side in (chosen, rejected)) > max_tokens:
            dropped["too_long"] += 1
        else:
            pairs.append({"prompt": prompt, "chosen": [{"role": "assistant", "content": chosen}],
                          "rejected": [{"role": "assistant", "content": rejected}], "character": character,
                          "negative": kind})
            kept[kind] += 1

    for row in rows:
        messages, character = row["messages"], row["character"]
        if "other_character" in kinds:  # at every user turn another character answered in this split
            for i in range(1, len(messages) - 1):
                if messages[i]["role"] != "user" or messages[i + 1]["role"] != "assistant":
                    continue
                others = sorted({reply for c, reply in by_turn[_norm(messages[i]["content"])] if c != character})
                if others:
                    prompt = [{"role": m["role"], "content": m["content"]} for m in messages[:i + 1]]
                    add(prompt, messages[i + 1]["content"], _pick(json.dumps(prompt), others), character,
                        "other_character")
        if messages[-1]["role"] != "assistant" or messages[-2]["role"] != "user":
            continue
        # one boilerplate and one boundary negative per row, at its last reply
        prompt = [{"role": m["role"], "content": m["content"]} for m in messages[:-1]]
        gold = messages[-1]["content"]
        key = json.dumps(prompt, sort_keys=True)
        if "boilerplate" in kinds:
            add(prompt, gold, _pick(key, BOILERPLATE), character, "boilerplate")
        if "boundary_break" in kinds and cards[character].boundaries:
            term = _pick(key + "term", cards[character].boundaries)
            add(prompt, gold, f"{gold} {_pick(key, BOUNDARY_LINES).format(term=term)}", character, "boundary_break")
    for row in production:
        messages = row["messages"]
        gold = gold_of.get((row["character"], _norm(messages[-2]["content"])))
        if row["negative"] not in kinds or gold is None:  # no gold reply to this turn in this split: the caller
            continue                                     # counts those paired nowhere
        add([{"role": m["role"], "content": m["content"]} for m in messages[:-1]], gold, messages[-1]["content"],
            row["character"], row["negative"])
    return pairs, kept, dropped


def require_negatives(pairs: list[dict], characters: list[str], split: str) -> None:
    """One-line errors for a pair set a preference stage cannot use."""
    if not pairs:
        raise InputError(f"no preference pairs in the {split} split: enable more negative kinds "
                         f"(pairs.kinds: {', '.join(KINDS)}) or curate more rows")
    covered = {p["character"] for p in pairs}
    missing = [c for c in characters if c not in covered]
    if missing:
        raise InputError(f"no negatives for {', '.join(missing)} in the {split} split: the preference stage would "
                         f"leave their voice untouched; add a kind that covers them (boilerplate covers every "
                         f"character)")


def pairs_file(dataset_dir: Path) -> Path:
    """The training pairs curation wrote beside the dataset; a one-line error naming the fix when there are none."""
    path = Path(dataset_dir) / PAIRS_TRAIN
    if not path.is_file():
        raise InputError(f"{path}: no preference pairs; curate with `pairs: {{enabled: true}}` in the curate config "
                         f"(charforge curate --config ...) to write them beside the dataset")
    if path.stat().st_size == 0:
        raise InputError(f"{path}: no preference pairs in the file; enable more negative kinds (pairs.kinds)")
    return path


def read_pairs(path: Path, negatives: list[str] | None = None) -> list[dict]:
    """The pairs of a pairs file, only those whose negative kind is in `negatives` when given (a preference run's
    negative mix); a one-line error naming the kinds the file holds when the mix leaves none."""
    rows = [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    if negatives is None:
        return rows
    kept = [r for r in rows if r["negative"] in negatives]
    if not kept:
        held = Counter(r["negative"] for r in rows)
        raise InputError(f"{path}: no pairs with negatives {', '.join(negatives)}; the file holds "
                         + ", ".join(f"{k} ({n})" for k, n in sorted(held.items()))
                         + "; change `negatives` in the prefer config or curate those kinds (pairs.kinds)")
    return kept
