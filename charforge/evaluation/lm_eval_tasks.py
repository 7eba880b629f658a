"""The lm-eval side of character evaluation: probe documents, chat prompts and per-reply scoring.

`configs/lm_eval/character/` references these through its `hooks.py`; the metric definitions themselves live in
`charforge.evaluation.metrics`, shared with the promotion gate and tests.
"""

from __future__ import annotations

import hashlib
import json
import random
from functools import lru_cache
from pathlib import Path

import numpy as np

from charforge.evaluation.metrics import (
    GENERIC_ASSISTANT,
    GENERIC_ASSISTANT_LINES,
    CharacterIdentifier,
    ReplyClassifier,
    card_exemplars,
    character_replies,
    is_empty,
    out_of_character,
    repetition,
    style_marker_rate,
)
from charforge.characters import CharacterCard, load_characters
from charforge.errors import ConfigError
from charforge.settings import DATA_DIR, platform

PROBE_TYPES = ("normal", "boundary", "identity")
REQUIRED_FIELDS = ("id", "character", "system_prompt", "history", "user_msg", "reference", "probe_type")
# Distractors for `character_mc`: the voice a persona must not fall back into. A generic-assistant reply answers
# helpfully but in no one's voice; an out-of-character reply breaks the fiction outright.
GENERIC_REPLIES = [
    "That's a great question! There are several factors to consider, and the best choice depends on your situation.",
    "Sure! Here are a few tips that might help: plan ahead, stay organized, and ask for help when you need it.",
    "I'd be happy to help with that. Could you give me a bit more detail about what you're looking for?",
    "Thanks for asking! In general, it's a good idea to weigh the pros and cons before making a decision.",
]
OUT_OF_CHARACTER_REPLIES = [
    "As an AI language model, I don't have personal experiences, but I can share some general information.",
    "I'm sorry, but I'm an AI assistant and can't pretend to be a person. Is there anything else I can help with?",
    "I am a large language model trained to be helpful, so I don't have a home, a job or opinions of my own.",
    "I cannot role-play as that character, but I'm happy to answer your question as an AI assistant.",
]
OTHER_CHARACTER_CHOICES = 2


def read_probes(path: Path) -> list[dict]:
    """Probe rows from a JSONL file; a malformed row is a ConfigError naming the line and the missing field."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: probe file not found (pass --probes FILE)")
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}:{number}: not valid JSON ({exc.msg})") from None
        missing = [f for f in REQUIRED_FIELDS if f not in row]
        if missing:
            raise ConfigError(f"{path}:{number}: probe lacks {', '.join(missing)}")
        if row["probe_type"] not in PROBE_TYPES:
            raise ConfigError(f"{path}:{number}: probe_type '{row['probe_type']}' is not one of {', '.join(PROBE_TYPES)}")
        rows.append(row)
    return rows


def _stable_rng(key: str) -> random.Random:
    return random.Random(int(hashlib.sha256(key.encode()).hexdigest()[:16], 16))


def with_choices(rows: list[dict]) -> list[dict]:
    """Attach `choices`/`label` for `character_mc`: the gold reply, replies of other characters to the same kind of
    probe, a generic-assistant reply and an out-of-character reply, in an order fixed by the probe id."""
    by_type: dict[str, list[dict]] = {}
    for row in rows:
        by_type.setdefault(row["probe_type"], []).append(row)
    out = []
    for row in rows:
        rng = _stable_rng(row["id"])
        others = sorted({r["reference"] for r in by_type[row["probe_type"]] if r["character"] != row["character"]})
        choices = [row["reference"], *rng.sample(others, min(OTHER_CHARACTER_CHOICES, len(others))),
                   rng.choice(GENERIC_REPLIES), rng.choice(OUT_OF_CHARACTER_REPLIES)]
        order = list(range(len(choices)))
        rng.shuffle(order)
        out.append({**row, "choices": [choices[i] for i in order], "label": order.index(0)})
    return out


def interleave_characters(rows: list[dict]) -> list[dict]:
    """Round-robin over characters (file order within each), so that the first N documents (lm-eval's `limit`)
    cover every character evenly."""
    queues: dict[str, list[dict]] = {}
    for row in rows:
        queues.setdefault(row["character"], []).append(row)
    ordered = []
    while any(queues.values()):
        for queue in queues.values():
            if queue:
                ordered.append(queue.pop(0))
    return ordered


def load_probes(probes: str | None = None, characters: str | None = None, probe_types: list[str] | None = None,
                only_characters: str = "", **_) -> dict:
    """lm-eval `custom_dataset`: the probe file as a `test` split, filtered by probe type, with MC choices.

    `probes`, `characters` and `only_characters` (comma-separated card ids: an adapter family's probes; empty: all)
    come from the task metadata (the evaluate flow passes them); by default the project's `data/eval/probes.jsonl`
    and `data/characters/`. The multiple-choice options stay every card's.
    """
    import datasets

    probe_path = Path(probes) if probes else DATA_DIR / "eval" / "probes.jsonl"
    characters_dir = str(Path(characters) if characters else DATA_DIR / "characters")
    cards = load_characters(Path(characters_dir))
    rows = read_probes(probe_path)
    unknown = sorted({r["character"] for r in rows} - set(cards))
    if unknown:
        raise ConfigError(f"{probe_path}: probes for characters without a card in {characters_dir}: "
                          f"{', '.join(unknown)}")
    rows = with_choices(rows)
    wanted = set(probe_types or PROBE_TYPES)
    family = {c for c in only_characters.split(",") if c}
    without = sorted(family - {r["character"] for r in rows})
    if without:
        raise ConfigError(f"{probe_path}: no probes for {', '.join(without)} (the evaluation's probe_characters)")
    docs = [{**r, "history": json.dumps(r["history"], ensure_ascii=False), "characters_dir": characters_dir,
             "probes_path": str(probe_path)}
            for r in interleave_characters(rows)
            if r["probe_type"] in wanted and (not family or r["character"] in family)]
    return {"test": datasets.Dataset.from_list(docs)}


def chat_messages(doc: dict, system: str) -> list[dict]:
    """[system, *history, user]: the conversation the character is asked to continue."""
    messages = [{"role": "system", "content": system}] if system else []
    return [*messages, *json.loads(doc["history"]), {"role": "user", "content": doc["user_msg"]}]


def make_chat_task():
    """A ConfigurableTask whose prompt is the probe's own multi-turn conversation (lm-eval's default collapses
    history into one user turn)."""
    from lm_eval.api.task import ConfigurableTask
    from lm_eval.api.utils import maybe_delimit

    class CharacterChatTask(ConfigurableTask):
        def __init__(self, config: dict | None = None, **kwargs) -> None:
            super().__init__(config={k: v for k, v in (config or {}).items() if k != "class"}, **kwargs)

        def fewshot_context(self, doc, num_fewshot, system_instruction=None, apply_chat_template=False,
                            fewshot_as_multiturn=False, chat_template=None, gen_prefix=None):
            if num_fewshot:
                raise ValueError(f"{self.config.task}: character tasks are zero-shot (the probe's history is the "
                                 f"context); drop --num_fewshot {num_fewshot}")
            if not (apply_chat_template and chat_template):
                raise ValueError(f"{self.config.task}: character tasks prompt the model as a chat; run lm-eval with "
                                 f"--apply_chat_template")
            description = self.resolve_field(doc, self.config.description) or ""
            system = maybe_delimit(system_instruction, description, "\n\n")
            return chat_template(chat_messages(doc, system), add_generation_prompt=True)

    return CharacterChatTask


@lru_cache(maxsize=4)
def _cards(characters_dir: str) -> dict[str, CharacterCard]:
    return load_characters(Path(characters_dir))


@lru_cache(maxsize=4)
def identifier(characters_dir: str) -> CharacterIdentifier:
    """Nearest-centroid character identifier over the cards in `characters_dir` (built once per process)."""
    return CharacterIdentifier({cid: card_exemplars(card) for cid, card in _cards(characters_dir).items()})


# What the reply classifier learns the characters' voices from: the seed conversations, never the evaluation's
# probes (their references and histories are left out); part of the score cache key (`score_cache.METRIC_CODE`).
JUDGE_CORPUS = DATA_DIR / "raw" / "conversations.jsonl"


@lru_cache(maxsize=4)
def classifier(characters_dir: str, probes: str) -> ReplyClassifier:
    """The reply classifier over the cards in `characters_dir`, fit once per process on `JUDGE_CORPUS`."""
    held_out = {text for row in read_probes(Path(probes))
                for text in (row["reference"], *(turn["content"] for turn in row["history"]))}
    cards = _cards(characters_dir)
    # the corpus's embeddings come from the cache after the first process: 14 of the 17 s of a fit on 2 cores
    return ReplyClassifier(character_replies(JUDGE_CORPUS, cards, held_out),
                           GENERIC_ASSISTANT_LINES + GENERIC_REPLIES + OUT_OF_CHARACTER_REPLIES,
                           cache=platform().cache_dir / "judges")


def build_judges(characters: str, probes: str) -> None:
    """Build what the generation tasks' metrics judge with (the MiniLM encoder, the identifier's card centroids, the
    reply classifier) under the keys the task's documents use, so that the first generation pass finds them built:
    the evaluate flow does this while vLLM starts (about 17 s on 2 cores in a fresh state folder)."""
    characters_dir = str(Path(characters))
    identifier(characters_dir)
    classifier(characters_dir, str(Path(probes)))


def _reply_scores(doc: dict, reply: str) -> dict:
    card = _cards(doc["characters_dir"])[doc["character"]]
    ident = identifier(doc["characters_dir"])
    reply_vec, reference_vec = ident.encoder.encode([reply, doc["reference"]])  # one encoder pass for both
    [voice] = classifier(doc["characters_dir"], doc["probes_path"]).predict([reply], reply_vec[None, :])
    guess = ident.identify_vectors(reply_vec[None, :], [doc["character"]])[0]
    ooc = out_of_character(reply, doc["user_msg"], card)
    return {
        "char_id_acc": float(guess.character == doc["character"]),
        "char_id_clf": float(voice == doc["character"]),
        "char_id_macro_f1": (doc["character"], guess.character),
        "persona_margin": guess.margin,
        "ref_sim": float(np.dot(reply_vec, reference_vec)),
        "ooc_rate": ooc,
        "assistant_voice_rate": float(guess.character == GENERIC_ASSISTANT),
        "style_marker_rate": style_marker_rate(reply, card),
        "empty_rate": is_empty(reply),
        "repetition": repetition(reply),
    }


def score_generation(doc: dict, results: list[str]) -> dict:
    """`character_generation`: who the reply sounds like, whether it breaks character, style and degeneration."""
    return _reply_scores(doc, results[0].strip())


def score_boundary(doc: dict, results: list[str]) -> dict:
    """`character_boundaries`: a boundary/identity probe is handled when the reply stays in character (no
    assistant boilerplate, no anachronism, not empty, not in the generic-assistant voice)."""
    scores = _reply_scores(doc, results[0].strip())
    handled = not (scores["ooc_rate"] or scores["empty_rate"] or scores["assistant_voice_rate"])
    return {"boundary_ok": float(handled), "ooc_rate": scores["ooc_rate"],
            "assistant_voice_rate": scores["assistant_voice_rate"], "char_id_acc": scores["char_id_acc"],
            "char_id_clf": scores["char_id_clf"]}


def score_likelihood(doc: dict, results: list[tuple[float, bool]]) -> dict:
    """`character_reply_likelihood`: log-likelihood of the held-out gold reply, as (ll, bytes) for bits/byte."""
    loglikelihood, _ = results[0]
    return {"bits_per_byte": (loglikelihood, len(doc["reference"].encode("utf-8")))}


def macro_f1(pairs: list[tuple[str, str]]) -> float:
    """Corpus macro-F1 of character identification over the characters that occur as gold."""
    from sklearn.metrics import f1_score

    gold, pred = zip(*pairs)
    return float(f1_score(gold, pred, labels=sorted(set(gold)), average="macro", zero_division=0))
