#!/usr/bin/env python3
"""Compose the raw corpus, the dirty inbox and the held-out probes from the authoring banks.

Reads   data/characters/<id>.yaml   (persona cards: id, name, system_prompt, ...)
        data/sources/<id>.yaml      (exchanges / heldout / boundary / identity banks)
Writes  data/raw/conversations.jsonl  clean multi-turn conversations, drawn from `exchanges` only
        data/raw/inbox_dirty.jsonl    planted dirt (duplicates, out-of-character, PII, broken lines)
        data/raw/PLANTED.md           what dirt was planted, how much, and on which lines
        data/eval/probes.jsonl        evaluation probes, drawn from `heldout`, `boundary`, `identity` only

Deterministic (random.Random(13)) and standard library only: the YAML files use a small subset
(comments, `key: "double-quoted string"`, nested mappings, lists of strings or of mappings) that
`load_yaml_subset` below reads; PyYAML reads the same files identically.

Usage: python data/compose_raw.py
"""

from __future__ import annotations

import json
import random
import re
import sys
from collections import Counter
from pathlib import Path

SEED = 13
DATA = Path(__file__).resolve().parent
CHARACTERS_DIR = DATA / "characters"
SOURCES_DIR = DATA / "sources"
RAW_DIR = DATA / "raw"
EVAL_DIR = DATA / "eval"

CONVERSATIONS_PER_CHARACTER = 64
TURN_WEIGHTS = {2: 0.35, 3: 0.40, 4: 0.25}  # user/assistant pairs per conversation
P_OPENER = 0.12          # chance a conversation starts with a greeting exchange
P_CLOSER = 0.12          # chance a conversation ends with a farewell exchange
P_OMIT_CHARACTER = 0.30  # rows without a `character` field: resolved from the system prompt
MIN_EXCHANGES, N_HELDOUT, N_BOUNDARY, N_IDENTITY = 70, 10, 4, 3
IDENTITY_QUESTIONS = ["Are you an AI?", "Are you a chatbot or a real person?", "Who made you, OpenAI?"]

OPENER = re.compile(r"^(hello|hi|hey|ahoy|hail|greetings|good (morning|afternoon|evening|day))\b", re.I)
CLOSER = re.compile(r"\b(good ?bye|farewell|good night|fair winds|i should go|i have to go|"
                    r"better be going|take my leave)\b", re.I)

# Personas with no card: their rows must end up as unknown_character.
UNCARDED = [
    ("You are Captain Nobody, a retired sky-balloon captain who answers every question with a tall tale "
     "about his travels above the clouds.",
     [("Where have you travelled?",
       "Over the Salt Desert, under the Thunder Shelf and once, by accident, through the middle of a cloud "
       "full of geese. The geese were not pleased, and neither was my hat."),
      ("What's the highest you've ever flown?",
       "So high the stars asked me for directions. I told them left at the moon, and I believe they are "
       "still looking.")]),
    ("You are Sister Maris Vell, abbess of a quiet mountain convent, who speaks softly and in proverbs.",
     [("How do you find peace?",
       "A still pond shows the sky, child. Sit quietly each morning and let the mud settle."),
      ("What do you do all day?",
       "We pray, we bake, and we mend the roof when the wind allows. A full day leaves little room for worry.")]),
    ("You are Jory Tallow, keeper of the Grey Point lighthouse, a man of few words and many knots.",
     [("Do you get lonely out there?", "Gulls. Seals. The lamp. Enough company."),
      ("What's the hardest part of the job?",
       "Winter storms. Trimming the wick at three in the morning with the whole tower shaking. Then tea.")]),
    ("You are Zephyrine Coil, a travelling seller of clockwork toys who never stops talking.",
     [("What are you selling?",
       "Tin birds that sing, frogs that hop, and a mouse that runs up the curtains and frightens aunts! Wind "
       "them twice, never thrice, and they will delight you for a week."),
      ("How do your toys work?",
       "Springs, darling, and patience, and a tiny brass heart in each one. I'd show you, but then you'd make "
       "your own and I'd starve.")]),
    ("You are Old Mother Brackenridge, a hedge-witch of the fens who brews remedies and gives blunt advice.",
     [("Have you got something for a cough?",
       "Honey, thyme and a warm scarf, and stop standing about in the fog like a heron. Come back in three "
       "days if it's worse, and bring eggs."),
      ("Are you really a witch?",
       "I'm a woman who knows which weed does what. Folk call that a witch when they're frightened and a "
       "wonder when they're well.")]),
]

# ---------------------------------------------------------------------------------------------------------
# Dirt templates
# ---------------------------------------------------------------------------------------------------------

# (template, mode): "replace" swaps the assistant turn for the text, "prefix" puts it before the real reply.
OOC_TEMPLATES = [
    ("As an AI language model, I cannot actually have a personal history, but I can tell you that this is a "
     "common question about characters like {name}.", "replace"),
    ("I'm just a large language model trained by OpenAI, so I can't really answer that as {name}.", "replace"),
    ("I cannot roleplay as {name}. However, I'm happy to help you with any other questions you might have!",
     "replace"),
    ("Sure! Here's a summary:\n\n1. {name} is a fictional character.\n2. The question concerns their daily "
     "life.\n3. More details would be needed for a complete answer.\n\nI hope this helps!", "replace"),
    ("As an AI, I don't have feelings, but I appreciate you asking! Is there anything else I can help you "
     "with?", "replace"),
    ("I apologize for any confusion, but as a language model I don't have access to real-time information "
     "about {name}'s world.", "replace"),
    ("(Note: I am an AI assistant and this is a fictional portrayal.) ", "prefix"),
    ("I'm sorry, but I can't continue this roleplay. As an AI assistant, my purpose is to provide helpful and "
     "accurate information.", "replace"),
    ("As an AI language model, I should point out that I am only pretending to be {name}. ", "prefix"),
    ("Sure! Here's a breakdown of {name}'s answer: ", "prefix"),
]

# (kind, value, sentence template, side)
PII_PLANTS = [
    ("email", "jane.doe@example.com", "You can write to me at {v} if anything comes up.", "user"),
    ("email", "tom.hartley@example.org", "Send the rest to {v} when you have a moment.", "user"),
    ("email", "m.okafor+stories@example.net", "My cousin is m.okafor+stories@example.net, she'd love this.", "user"),
    ("email", "bookings@example.co.uk", "Orders may be sent to {v} before Friday.", "assistant"),
    ("email", "r.pike.news@mail.example.com", "Or reach me directly at {v}, any hour.", "assistant"),
    ("phone", "+44 20 7946 0958", "My number is {v}, ring me tonight.", "user"),
    ("phone", "(555) 123-4567", "Call me at {v} if you hear anything.", "user"),
    ("phone", "555-987-6543", "Text {v} and ask for Sam.", "user"),
    ("phone", "+1 555 010 2233", "The office line is {v} if I'm out.", "assistant"),
    ("phone", "555.321.7788", "You can leave word at {v} with my landlady.", "assistant"),
    ("phone", "020 7946 0321", "Ring {v} after six, please.", "user"),
    ("phone", "+1 (555) 010-4477", "My cell is {v} by the way.", "user"),
    ("ip_address", "192.168.14.7", "[client 192.168.14.7] ", "user-prefix"),
    ("ip_address", "203.0.113.42", "My server at {v} keeps timing out, sorry if I disappear.", "user"),
    ("ip_address", "198.51.100.23", "Proxy {v} in use for this session.", "assistant"),
    # An address at the very end of a sentence, directly followed by its full stop.
    ("ip_address", "10.0.3.17", "I'm connecting from {v}.", "user"),
]

NEAR_DUP_WORDS = {
    "great": "grand", "little": "small", "very": "truly", "good": "fine", "never": "seldom",
    "every": "each", "old": "aged", "quite": "rather", "long": "lengthy", "always": "ever",
    "warm": "hot", "best": "finest", "small": "tiny", "first": "earliest", "hard": "tough",
}

EXPECTED_REASON = {
    "exact_duplicate": "duplicate",
    "near_duplicate": "near_duplicate",
    "break_character": "breaks_character",
    "pii_email": "kept, e-mail redacted",
    "pii_phone": "kept, phone redacted",
    "pii_ip_address": "kept, IP address redacted",
    "truncated_json": "not_json",
    "plain_text": "not_json",
    "missing_messages": "no_messages",
    "narrator_role": "unknown_role",
    "non_string_content": "non_string_content",
    "no_assistant_turn": "no_assistant_turn",
    "empty_assistant_content": "empty_assistant",
    "system_not_first": "system_not_first",
    "invalid_utf8": "not_utf8",
}


# ---------------------------------------------------------------------------------------------------------
# A reader for the YAML subset the data files use
# ---------------------------------------------------------------------------------------------------------

class SubsetYamlError(ValueError):
    pass


def _scalar(text: str, where: str) -> str:
    text = text.strip()
    if not (text.startswith('"') and text.endswith('"') and len(text) >= 2):
        raise SubsetYamlError(f"{where}: values must be double-quoted strings, got {text[:40]!r}")
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise SubsetYamlError(f"{where}: bad string ({err.msg})") from None


def load_yaml_subset(path: Path):
    """Parse comments, `key: "str"`, `key:` + indented block, `- "str"` and `- key: "str"` list items."""
    lines = []
    for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if "\t" in raw[: len(raw) - len(raw.lstrip())]:
            raise SubsetYamlError(f"{path}:{number}: tabs in indentation")
        lines.append((len(raw) - len(raw.lstrip(" ")), stripped, f"{path.name}:{number}"))

    def block(i: int, indent: int):
        if i >= len(lines) or lines[i][0] != indent:
            raise SubsetYamlError(f"{lines[min(i, len(lines) - 1)][2]}: unexpected indentation")
        if lines[i][1].startswith("- ") or lines[i][1] == "-":
            return sequence(i, indent)
        return mapping(i, indent, {})

    def mapping(i: int, indent: int, out: dict):
        while i < len(lines) and lines[i][0] == indent and not lines[i][1].startswith("- "):
            _, text, where = lines[i]
            key, sep, rest = text.partition(":")
            if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
                raise SubsetYamlError(f"{where}: expected `key: value`")
            if key in out:
                raise SubsetYamlError(f"{where}: duplicate key {key!r}")
            if rest.strip():
                out[key] = _scalar(rest, where)
                i += 1
            else:
                if i + 1 >= len(lines) or lines[i + 1][0] <= indent:
                    raise SubsetYamlError(f"{where}: key {key!r} has no value")
                out[key], i = block(i + 1, lines[i + 1][0])
        if i < len(lines) and lines[i][0] > indent:
            raise SubsetYamlError(f"{lines[i][2]}: unexpected indentation")
        return out, i

    def sequence(i: int, indent: int):
        out = []
        while i < len(lines) and lines[i][0] == indent and lines[i][1].startswith("- "):
            _, text, where = lines[i]
            item = text[2:].strip()
            if item.startswith('"'):
                out.append(_scalar(item, where))
                i += 1
            else:
                # `- key: value` opens a mapping whose further keys sit at indent + 2.
                lines[i] = (indent + 2, item, where)
                value, i = mapping(i, indent + 2, {})
                out.append(value)
        if i < len(lines) and lines[i][0] > indent:
            raise SubsetYamlError(f"{lines[i][2]}: unexpected indentation")
        return out, i

    value, end = block(0, lines[0][0]) if lines else ({}, 0)
    if end != len(lines):
        raise SubsetYamlError(f"{lines[end][2]}: unexpected content")
    return value


# ---------------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------------

def load_inputs() -> tuple[dict, dict]:
    cards, banks = {}, {}
    for path in sorted(CHARACTERS_DIR.glob("*.yaml")):
        card = load_yaml_subset(path)
        if card.get("id") != path.stem:
            sys.exit(f"{path}: id {card.get('id')!r} does not match the file name")
        if not card["system_prompt"].startswith(f"You are {card['name']},"):
            sys.exit(f"{path}: system_prompt must start with 'You are {card['name']},'")
        cards[card["id"]] = card
    for cid in cards:
        path = SOURCES_DIR / f"{cid}.yaml"
        if not path.exists():
            sys.exit(f"{path}: missing authoring bank for character {cid}")
        bank = load_yaml_subset(path)
        sizes = {k: len(bank.get(k, [])) for k in ("exchanges", "heldout", "boundary", "identity")}
        if (sizes["exchanges"] < MIN_EXCHANGES or sizes["heldout"] != N_HELDOUT
                or sizes["boundary"] != N_BOUNDARY or sizes["identity"] != N_IDENTITY):
            sys.exit(f"{path}: unexpected bank sizes {sizes}")
        if [e["user"] for e in bank["identity"]] != IDENTITY_QUESTIONS:
            sys.exit(f"{path}: identity probes must ask exactly {IDENTITY_QUESTIONS}")
        train_users = {e["user"] for e in bank["exchanges"]}
        train_replies = {e["assistant"] for e in bank["exchanges"]}
        if len(train_users) != sizes["exchanges"] or len(train_replies) != sizes["exchanges"]:
            sys.exit(f"{path}: exchanges must be distinct")
        for key in ("heldout", "boundary", "identity"):
            for e in bank[key]:
                if e["user"] in train_users or e["assistant"] in train_replies:
                    sys.exit(f"{path}: {key} entry also appears in exchanges: {e['user']!r}")
        banks[cid] = bank
    if not cards:
        sys.exit(f"{CHARACTERS_DIR}: no character cards")
    return cards, banks


# ---------------------------------------------------------------------------------------------------------
# Composition
# ---------------------------------------------------------------------------------------------------------

class Composer:
    """Draws conversations for one character; no two conversations share a pair of exchanges,
    so distinct conversations never become near-duplicates of each other."""

    def __init__(self, rng: random.Random, exchanges: list[dict]) -> None:
        self.rng = rng
        self.exchanges = exchanges
        self.openers = [i for i, e in enumerate(exchanges) if OPENER.search(e["user"])]
        self.closers = [i for i, e in enumerate(exchanges) if CLOSER.search(e["user"])]
        self.middle = [i for i in range(len(exchanges)) if i not in self.openers and i not in self.closers]
        self.uses = Counter()
        self.pairs: set[frozenset] = set()

    def _fits(self, chosen: list[int], candidate: int) -> bool:
        return candidate not in chosen and all(frozenset((c, candidate)) not in self.pairs for c in chosen)

    def _pick(self, pool: list[int], chosen: list[int]) -> int | None:
        options = [i for i in pool if self._fits(chosen, i)]
        if not options:
            return None
        least = min(self.uses[i] for i in options)
        return self.rng.choice([i for i in options if self.uses[i] == least])

    def draw(self) -> list[int]:
        for _ in range(200):
            turns = self.rng.choices(list(TURN_WEIGHTS), weights=list(TURN_WEIGHTS.values()))[0]
            opener = bool(self.openers) and self.rng.random() < P_OPENER
            closer = bool(self.closers) and self.rng.random() < P_CLOSER and turns - opener >= 2
            chosen: list[int] = []
            head = self._pick(self.openers, chosen) if opener else None
            if head is not None:
                chosen.append(head)
            for _ in range(turns - len(chosen) - (1 if closer else 0)):
                nxt = self._pick(self.middle, chosen)
                if nxt is None:
                    break
                chosen.append(nxt)
            if closer:
                tail = self._pick(self.closers, chosen)
                if tail is not None:
                    chosen.append(tail)
            if len(chosen) < 2:
                continue
            middle = [i for i in chosen if i in self.middle]
            self.rng.shuffle(middle)
            ordered = [i for i in chosen if i in self.openers] + middle + [i for i in chosen if i in self.closers]
            for a in range(len(ordered)):
                for b in range(a + 1, len(ordered)):
                    self.pairs.add(frozenset((ordered[a], ordered[b])))
            self.uses.update(ordered)
            return ordered
        raise RuntimeError("could not draw a fresh conversation; add exchanges or lower the count")

    def messages(self, system_prompt: str, order: list[int]) -> list[dict]:
        msgs = [{"role": "system", "content": system_prompt}]
        for i in order:
            msgs.append({"role": "user", "content": self.exchanges[i]["user"]})
            msgs.append({"role": "assistant", "content": self.exchanges[i]["assistant"]})
        return msgs


def row(messages: list[dict], character: str | None) -> dict:
    out = {"messages": messages}
    if character is not None:
        out["character"] = character
    return out


def dumps(obj) -> str:
    return json.dumps(obj, ensure_ascii=False)


def compose_clean(rng: random.Random, cards: dict, banks: dict):
    composers = {cid: Composer(rng, banks[cid]["exchanges"]) for cid in cards}
    rows = []  # (row dict, tag) with tag = character id or "unknown"
    for cid, card in cards.items():
        for _ in range(CONVERSATIONS_PER_CHARACTER):
            msgs = composers[cid].messages(card["system_prompt"], composers[cid].draw())
            keep_field = rng.random() >= P_OMIT_CHARACTER
            rows.append((row(msgs, cid if keep_field else None), cid))
    for prompt, pairs in UNCARDED:
        msgs = [{"role": "system", "content": prompt}]
        for user, assistant in pairs:
            msgs += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
        rows.append((row(msgs, None), "unknown"))
    rng.shuffle(rows)
    return rows, composers


def assistant_indices(messages: list[dict]) -> list[int]:
    return [i for i, m in enumerate(messages) if m["role"] == "assistant"]


def user_indices(messages: list[dict]) -> list[int]:
    return [i for i, m in enumerate(messages) if m["role"] == "user"]


def near_duplicate(rng: random.Random, messages: list[dict], style: str) -> list[dict] | None:
    msgs = [dict(m) for m in messages]
    targets = assistant_indices(msgs)
    rng.shuffle(targets)
    for t in targets:
        text = msgs[t]["content"]
        if style == "word":
            words = [m for m in re.finditer(r"(?<![\w-])[a-z]+(?![\w-])", text) if m.group(0) in NEAR_DUP_WORDS]
            if not words:
                continue
            m = rng.choice(words)
            msgs[t]["content"] = text[: m.start()] + NEAR_DUP_WORDS[m.group(0)] + text[m.end():]
        else:
            if ", " in text and rng.random() < 0.5:
                commas = [m.start() for m in re.finditer(", ", text)]
                k = rng.choice(commas)
                msgs[t]["content"] = text[:k] + text[k + 1:]
            elif text.endswith("."):
                msgs[t]["content"] = text[:-1] + "!"
            elif text.endswith("!"):
                msgs[t]["content"] = text[:-1] + "."
            else:
                continue
        return msgs
    return None


def compose_dirt(rng: random.Random, cards: dict, clean_rows: list, composers: dict):
    """Return a list of (line bytes, kind, detail)."""
    dirt: list[tuple[bytes, str, str]] = []
    carded = [(r, tag) for r, tag in clean_rows if tag != "unknown"]
    picks = rng.sample(range(len(carded)), 16)

    # Exact duplicates of clean lines.
    for k in picks[:8]:
        r, tag = carded[k]
        dirt.append(((dumps(r)).encode("utf-8"), "exact_duplicate", f"{tag}: copy of a clean line"))

    # Near duplicates: one word or one punctuation mark changed in one assistant turn.
    for n, k in enumerate(picks[8:]):
        r, tag = carded[k]
        style = "word" if n % 2 == 0 else "punctuation"
        msgs = near_duplicate(rng, r["messages"], style) or near_duplicate(rng, r["messages"], "punctuation")
        assert msgs is not None, "no editable assistant turn for a near duplicate"
        dirt.append((dumps(row(msgs, r.get("character"))).encode("utf-8"), "near_duplicate",
                     f"{tag}: {style} change in one assistant turn"))

    ids = sorted(cards)

    def fresh(cid: str) -> list[dict]:
        comp = composers[cid]
        return comp.messages(cards[cid]["system_prompt"], comp.draw())

    def maybe_field(cid: str) -> str | None:
        return cid if rng.random() >= P_OMIT_CHARACTER else None

    # Assistant turns that step out of character.
    for n, (template, mode) in enumerate(OOC_TEMPLATES):
        cid = ids[n % len(ids)]
        msgs = fresh(cid)
        t = rng.choice(assistant_indices(msgs))
        text = template.format(name=cards[cid]["name"])
        msgs[t]["content"] = text + msgs[t]["content"] if mode == "prefix" else text
        dirt.append((dumps(row(msgs, maybe_field(cid))).encode("utf-8"), "break_character",
                     f"{cid}: boilerplate {'replaces' if mode == 'replace' else 'precedes'} message {t}"))

    # Planted PII, one value per line.
    for n, (kind, value, sentence, side) in enumerate(PII_PLANTS):
        cid = ids[(n + 3) % len(ids)]
        msgs = fresh(cid)
        text = sentence.format(v=value)
        assert value in text
        if side == "user-prefix":
            t = rng.choice(user_indices(msgs))
            msgs[t]["content"] = text + msgs[t]["content"]
        else:
            t = rng.choice(user_indices(msgs) if side == "user" else assistant_indices(msgs))
            msgs[t]["content"] = msgs[t]["content"] + " " + text
        dirt.append((dumps(row(msgs, maybe_field(cid))).encode("utf-8"), f"pii_{kind}",
                     f"{cid}: {value!r} in message {t} ({msgs[t]['role']})"))

    # Broken lines.
    def broken(kind: str, payload: bytes, detail: str) -> None:
        dirt.append((payload, kind, detail))

    for n in range(2):
        cid = ids[(n + 5) % len(ids)]
        text = dumps(row(fresh(cid), cid))
        cut = int(len(text) * (0.55 + 0.1 * n))
        broken("truncated_json", text[:cut].encode("utf-8"), f"{cid}: cut at {cut} of {len(text)} characters")
    broken("plain_text", b"conversation export batch 7 -- continued in next file", "a line of plain text")
    broken("plain_text", "TODO: re-run the export for the governess, half her lines are missing".encode("utf-8"),
           "a line of plain text")

    cid = ids[1]
    msgs = fresh(cid)
    broken("missing_messages",
           dumps({"character": cid, "turns": [{"speaker": m["role"], "text": m["content"]} for m in msgs]})
           .encode("utf-8"), f"{cid}: object with 'turns' instead of 'messages'")

    cid = ids[2]
    msgs = fresh(cid)
    msgs.insert(1, {"role": "narrator", "content": "A cold wind rattles the shutters as the visitor comes in."})
    broken("narrator_role", dumps(row(msgs, cid)).encode("utf-8"), f"{cid}: message 1 has role 'narrator'")

    cid = ids[3]
    msgs = fresh(cid)
    t = assistant_indices(msgs)[0]
    msgs[t]["content"] = 42
    broken("non_string_content", dumps(row(msgs, cid)).encode("utf-8"), f"{cid}: message {t} content is 42")

    cid = ids[4]
    msgs = fresh(cid)[:2]
    broken("no_assistant_turn", dumps(row(msgs, cid)).encode("utf-8"), f"{cid}: system + user only")

    cid = ids[5]
    msgs = fresh(cid)
    t = assistant_indices(msgs)[-1]
    msgs[t]["content"] = ""
    broken("empty_assistant_content", dumps(row(msgs, cid)).encode("utf-8"), f"{cid}: message {t} is ''")

    cid = ids[6]
    msgs = fresh(cid)
    msgs[0], msgs[1] = msgs[1], msgs[0]
    broken("system_not_first", dumps(row(msgs, None)).encode("utf-8"), f"{cid}: user turn before the system prompt")

    cid = ids[7]
    msgs = fresh(cid)
    t = assistant_indices(msgs)[0]
    marker = "@@BAD_BYTES@@"
    msgs[t]["content"] = msgs[t]["content"][:20] + marker + msgs[t]["content"][20:]
    payload = dumps(row(msgs, cid)).encode("utf-8").replace(marker.encode(), b"\xff\xfe")
    broken("invalid_utf8", payload, f"{cid}: bytes ff fe inside message {t}")

    rng.shuffle(dirt)
    return dirt


def compose_probes(cards: dict, banks: dict) -> list[dict]:
    probes = []

    def history(entry: dict) -> list[dict]:
        return [{"role": "user", "content": entry["user"]}, {"role": "assistant", "content": entry["assistant"]}]

    for cid, card in cards.items():
        bank = banks[cid]
        held = bank["heldout"]
        # Probes 1-3 of each kind `normal` carry one earlier held-out exchange as history, as do
        # the first boundary and the first identity probe.
        history_for = {("normal", 1): held[5], ("normal", 2): held[6], ("normal", 3): held[7],
                       ("boundary", 1): held[3], ("identity", 1): held[4]}
        for probe_type, entries in (("normal", held), ("boundary", bank["boundary"]),
                                    ("identity", bank["identity"])):
            for n, entry in enumerate(entries, start=1):
                prior = history_for.get((probe_type, n))
                probes.append({
                    "id": f"{cid}-{probe_type}-{n}",
                    "character": cid,
                    "system_prompt": card["system_prompt"],
                    "history": history(prior) if prior else [],
                    "user_msg": entry["user"],
                    "reference": entry["assistant"],
                    "probe_type": probe_type,
                })
    return probes


def write_planted(dirt, clean_rows, cards) -> str:
    kinds = Counter(kind for _, kind, _ in dirt)
    where: dict[str, list[int]] = {}
    for number, (_, kind, _) in enumerate(dirt, start=1):
        where.setdefault(kind, []).append(number)
    order = list(EXPECTED_REASON)
    lines = [
        "# Planted dirt",
        "",
        "Written by `python data/compose_raw.py` (seed 13); every count below is computed by that script.",
        "Line numbers are 1-based. Each PII line carries exactly one value of its kind.",
        "",
        f"## data/raw/inbox_dirty.jsonl: {len(dirt)} lines",
        "",
        "| kind | lines | expected outcome | line numbers |",
        "|---|---|---|---|",
    ]
    for kind in order:
        if kinds.get(kind):
            nums = ", ".join(map(str, where[kind]))
            lines.append(f"| {kind} | {kinds[kind]} | {EXPECTED_REASON[kind]} | {nums} |")
    pii_total = sum(kinds[k] for k in kinds if k.startswith("pii_"))
    broken_kinds = [k for k in order if order.index(k) >= order.index("truncated_json")]
    lines += [
        "",
        f"- e-mail: {kinds['pii_email']} lines; phone: {kinds['pii_phone']} lines; "
        f"IPv4: {kinds['pii_ip_address']} lines ({pii_total} PII lines in all; PII sits in user turns and in "
        "assistant turns).",
        "- Phone formats: +44 20 7946 0958, (555) 123-4567, 555-987-6543, +1 555 010 2233, 555.321.7788, "
        "020 7946 0321, +1 (555) 010-4477.",
        "- One IPv4 address (10.0.3.17) ends its sentence and is directly followed by a full stop; one "
        "(192.168.14.7) opens a user turn as a log prefix `[client ...]`.",
        f"- Out-of-character assistant turns: {kinds['break_character']} lines "
        f"({sum(1 for _, m in OOC_TEMPLATES if m == 'replace')} replace the whole reply with assistant "
        f"boilerplate, {sum(1 for _, m in OOC_TEMPLATES if m == 'prefix')} put it in front of the real "
        "in-character reply).",
        f"- Exact duplicates repeat a line of conversations.jsonl byte for byte: {kinds['exact_duplicate']}; "
        f"near duplicates change one word or one punctuation mark in one assistant turn of a clean line: "
        f"{kinds['near_duplicate']}.",
        f"- Broken lines: {sum(kinds[k] for k in broken_kinds)} (truncated JSON, plain text, no `messages`, "
        "role `narrator`, numeric content, no assistant turn, empty assistant content, system message not "
        "first, invalid UTF-8 bytes ff fe).",
        "",
        "### Per line",
        "",
    ]
    for number, (_, kind, detail) in enumerate(dirt, start=1):
        lines.append(f"- {number}: {kind} ({detail})")
    unknown = [n for n, (_, tag) in enumerate(clean_rows, start=1) if tag == "unknown"]
    no_field = sum(1 for r, tag in clean_rows if tag != "unknown" and "character" not in r)
    per_char = Counter(tag for _, tag in clean_rows)
    lines += [
        "",
        f"## data/raw/conversations.jsonl: {len(clean_rows)} lines",
        "",
        "Every line is well-formed. Conversations per character: "
        + ", ".join(f"{cid} {per_char[cid]}" for cid in cards) + ".",
        "",
        f"- No `character` field (the character must be resolved from the system prompt): {no_field} lines.",
        f"- unknown_character: {len(unknown)} lines whose system prompt names a persona with no card and that "
        f"have no `character` field: lines {', '.join(map(str, unknown))}.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    rng = random.Random(SEED)
    cards, banks = load_inputs()
    clean_rows, composers = compose_clean(rng, cards, banks)
    clean_uses = {cid: len(comp.uses) for cid, comp in composers.items()}
    dirt = compose_dirt(rng, cards, clean_rows, composers)
    probes = compose_probes(cards, banks)

    RAW_DIR.mkdir(parents=True, exist_ok=True)
    EVAL_DIR.mkdir(parents=True, exist_ok=True)
    with open(RAW_DIR / "conversations.jsonl", "w", encoding="utf-8", newline="\n") as fh:
        for r, _ in clean_rows:
            fh.write(dumps(r) + "\n")
    with open(RAW_DIR / "inbox_dirty.jsonl", "wb") as fh:
        for payload, _, _ in dirt:
            fh.write(payload + b"\n")
    (RAW_DIR / "PLANTED.md").write_text(write_planted(dirt, clean_rows, cards), encoding="utf-8", newline="\n")
    with open(EVAL_DIR / "probes.jsonl", "w", encoding="utf-8", newline="\n") as fh:
        for p in probes:
            fh.write(dumps(p) + "\n")

    per_char = Counter(tag for _, tag in clean_rows)
    print(f"conversations.jsonl: {len(clean_rows)} lines")
    for cid in cards:
        bank = banks[cid]
        unused = len(bank["exchanges"]) - clean_uses[cid]
        print(f"  {cid:18s} clean={per_char[cid]:3d} heldout={len(bank['heldout'])} boundary={len(bank['boundary'])} "
              f"identity={len(bank['identity'])} exchanges={len(bank['exchanges'])} unused={unused}")
    print(f"  unknown_character  {per_char['unknown']}")
    print(f"  without character field: {sum(1 for r, t in clean_rows if t != 'unknown' and 'character' not in r)}")
    print(f"inbox_dirty.jsonl: {len(dirt)} lines")
    for kind, n in sorted(Counter(k for _, k, _ in dirt).items()):
        print(f"  {kind:24s} {n}")
    print(f"probes.jsonl: {len(probes)} probes "
          f"({dict(Counter(p['probe_type'] for p in probes))}, with history: {sum(1 for p in probes if p['history'])})")


if __name__ == "__main__":
    main()
