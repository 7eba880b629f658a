"""Which character a conversation belongs to, and whether its assistant turns stay in character."""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

from charforge.characters import CharacterCard
from charforge.curation.ingest import Drop
from charforge.curation.scrub import PLACEHOLDERS

# Phrases by which an assistant steps out of a role: AI self-reference, refusals to role-play, assistant boilerplate.
OOC_PATTERNS = [
    r"\bas an? (?:ai|artificial intelligence|language model|assistant|chatbot)\b",
    r"\b(?:large )?language model\b",
    r"\bI(?:'m| am) (?:just |only |merely )?an? (?:ai|artificial intelligence|virtual assistant|chatbot|ai assistant)\b",
    r"\bI (?:cannot|can't|can not|won't|am unable to) (?:role-?play|pretend to be|act as)\b",
    r"\btrained by (?:openai|anthropic|google|meta)\b",
    r"\b(?:openai|chatgpt)\b",
    r"\bI don'?t have (?:personal )?(?:opinions|feelings|emotions|experiences|a body)\b",
    r"\bmy (?:training data|knowledge cut-?off)\b",
    r"^(?:sure|certainly|of course)! here(?:'s| is) (?:a|an|the|your) (?:summary|list|breakdown|overview)\b",
    r"\bI hope this helps\b",
]


# Every built-in pattern contains at least one of these words, so a turn without any of them skips the regex scan
# (the scan is the costliest step of curation at a million rows). tests/curation checks the pairing.
OOC_KEYWORDS = frozenset(
    "ai artificial model assistant chatbot roleplay role pretend act trained openai chatgpt opinions feelings "
    "emotions experiences body training knowledge summary list breakdown overview helps".split()
)
_LOWER_WORD = re.compile(r"[a-z]+")

# Cyrillic and Greek letters that look Latin: "Аs an АІ" (Cyrillic А, І) must not slip past the phrases above.
_LOOKALIKES = str.maketrans(dict(zip(
    "АВЕНІЈКМОРСТХаеіјорсхуΑΒΕΗΙΚΜΝΟΡΤΧΥΖαορ",
    "ABEHIJKMOPCTXaeijopcxyABEHIKMNOPTXYZaop",
)))
# Placeholders the PII scrubber writes ([EMAIL], ...): not words the character said, so no card boundary.
_PLACEHOLDER = re.compile("|".join(map(re.escape, PLACEHOLDERS.values())))


def skeleton(text: str) -> str:
    """The text as the phrase filters see it: compatibility forms folded (fullwidth ＡＩ -> AI), look-alike
    letters mapped to Latin. Only for matching; the row keeps its own characters."""
    if text.isascii():
        return text
    return unicodedata.normalize("NFKC", text).translate(_LOOKALIKES)


def _compile(patterns: list[str]) -> re.Pattern:
    return re.compile("|".join(f"(?:{p})" for p in patterns), re.IGNORECASE | re.MULTILINE)


def _squash(text: str) -> str:
    return " ".join(text.split()).casefold()


@dataclass
class PersonaIndex:
    """Cards indexed for resolution by id, exact system prompt, or the name in a 'You are <name>' prompt."""

    cards: dict[str, CharacterCard]

    def __post_init__(self) -> None:
        self.by_prompt = {_squash(c.system_prompt): c.id for c in self.cards.values()}
        self.by_name = sorted(((_squash(c.name), c.id) for c in self.cards.values()), key=lambda x: -len(x[0]))
        self.boundaries = {
            c.id: re.compile("|".join(rf"\b{re.escape(b)}\b" for b in c.boundaries), re.IGNORECASE)
            for c in self.cards.values()
            if c.boundaries
        }

    def resolve(self, row: dict) -> tuple[str | None, Drop | None]:
        """The row's character id: its `character` field, else its system prompt matched against the cards."""
        if "character" in row:
            if row["character"] in self.cards:
                return row["character"], None
            return None, Drop("unknown_character", f"no card for character {row['character']!r}; "
                              f"add data/characters/{row['character']}.yaml")
        messages = row["messages"]
        if messages[0]["role"] != "system":
            return None, Drop("unknown_character", "no 'character' field and no system prompt; add one of them")
        prompt = _squash(messages[0]["content"])
        if prompt in self.by_prompt:
            return self.by_prompt[prompt], None
        opening = prompt[:200]
        for name, cid in self.by_name:
            if re.search(rf"\byou are {re.escape(name)}\b", opening):
                return cid, None
        return None, Drop(
            "unknown_character",
            f"system prompt matches no card ({messages[0]['content'][:60]!r}…); add a card to data/characters/",
        )


def make_ooc_checker(index: PersonaIndex, extra_patterns: list[str], use_boundaries: bool):
    """Build `check(messages, character) -> Drop | None` for the configured phrases and card boundaries."""
    ooc = _compile(OOC_PATTERNS)
    extra = _compile(list(extra_patterns)) if extra_patterns else None

    def check(messages: list[dict], character: str) -> Drop | None:
        boundary = index.boundaries.get(character) if use_boundaries else None
        last_user = ""
        for i, msg in enumerate(messages):
            if msg["role"] == "user":
                last_user = msg["content"]
            if msg["role"] != "assistant":
                continue
            text = skeleton(msg["content"])
            hit = None
            if not OOC_KEYWORDS.isdisjoint(_LOWER_WORD.findall(text.lower())):
                hit = ooc.search(text)
            if hit is None and extra is not None:
                hit = extra.search(text)
            if hit:
                return Drop("breaks_character", f"message {i}: {hit.group(0)!r}")
            if boundary:
                for term in boundary.finditer(_PLACEHOLDER.sub(" ", msg["content"])):
                    # Answering a user who raised the topic is fine; bringing up an anachronism unprompted is not.
                    if not re.search(rf"\b{re.escape(term.group(0))}\b", last_user, re.IGNORECASE):
                        return Drop("breaks_character", f"message {i}: mentions {term.group(0)!r}, "
                                    f"outside {character}'s world")
        return None

    return check
