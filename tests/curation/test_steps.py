"""Each curation step on literal text: one test per rejection reason, asserting the reason and its detail."""

from __future__ import annotations

import json

import pytest

from charforge.config import ConfigError
from charforge.characters import load_characters
from charforge.curation.dedup import ExactDeduper, NearDeduper, content_key, minhash_signatures
from charforge.curation.ingest import Drop, parse_conversation
from charforge.curation.persona import PersonaIndex, make_ooc_checker
from charforge.curation.scrub import normalize_text, scrub_pii
from charforge.curation.split import EVAL, OVER_CAP, TRAIN, assign_splits, eval_count

SYS = {"role": "system", "content": "You are Mara Quill, a Victorian lamplighter who speaks in brisk, cheerful cockney."}


@pytest.mark.parametrize(
    "line, reason, detail",
    [
        (b"", "empty_line", "blank line"),
        (b'{"messages": [{"role": "user", "content": "caf\xe9"}]}', "not_utf8", "invalid byte 0xe9 at byte 46"),
        (b'{"messages": [{"role": "user"', "not_json", "Expecting ',' delimiter at column 30"),
        (b'{"conversation": []}', "no_messages", "expected an object with a non-empty 'messages' list"),
        (b'{"messages": []}', "no_messages", "expected an object with a non-empty 'messages' list"),
        (b'{"messages": [{"role": "narrator", "content": "It was dusk."}]}', "unknown_role",
         "message 0 has role 'narrator'; expected system, user or assistant"),
        (b'{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": 42}]}',
         "non_string_content", "message 1 content is int"),
        (b'{"messages": [{"role": "user", "content": "hi"}, {"role": "system", "content": "You are X"}, '
         b'{"role": "assistant", "content": "hello"}]}', "system_not_first", "system message at position 1"),
        (b'{"messages": [{"role": "user", "content": "anyone there?"}]}', "no_assistant_turn",
         "no assistant message to learn from"),
        (b'{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}]}',
         "empty_assistant", "message 1 (assistant) is empty"),
        (b'{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}], "character": 7}',
         "unknown_character", "'character' must be a string, got int"),
    ],
)
def test_shape_rejections(line, reason, detail):
    obj, drop = parse_conversation(line)
    assert drop == Drop(reason, detail)


def test_valid_line_parses():
    line = json.dumps({"messages": [SYS, {"role": "user", "content": "Evening!"},
                                    {"role": "assistant", "content": "Evenin', guv!"}]}).encode()
    obj, drop = parse_conversation(line)
    assert drop is None and obj["messages"][2]["content"] == "Evenin', guv!"


def test_character_from_field_prompt_or_name(cards):
    index = PersonaIndex(cards)
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Evenin'"}]
    assert index.resolve({"messages": chat, "character": "bo"}) == ("bo", None)
    assert index.resolve({"messages": [SYS, *chat]}) == ("mara", None)
    renamed = {"role": "system", "content": "You are Mara Quill. Be brief."}
    assert index.resolve({"messages": [renamed, *chat]}) == ("mara", None)


def test_unknown_character_rejections(cards):
    index = PersonaIndex(cards)
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Ahoy"}]
    assert index.resolve({"messages": chat, "character": "nemo"}) == (
        None, Drop("unknown_character", "no card for character 'nemo'; add data/characters/nemo.yaml"))
    stranger = {"role": "system", "content": "You are Captain Nobody, a sailor."}
    _, drop = index.resolve({"messages": [stranger, *chat]})
    assert drop == Drop("unknown_character", "system prompt matches no card ('You are Captain Nobody, a sailor.'…); "
                        "add a card to data/characters/")
    assert index.resolve({"messages": chat})[1].reason == "unknown_character"


@pytest.mark.parametrize(
    "reply, detail",
    [
        ("As an AI language model, I cannot light lamps.", "message 2: 'As an AI'"),
        ("I'm just a large language model trained by OpenAI.", "message 2: 'large language model'"),
        ("I cannot roleplay as a lamplighter.", "message 2: 'I cannot roleplay'"),
        ("Sure! Here's a summary of lamplighting:\n1. Light.", "message 2: \"Sure! Here's a summary\""),
        ("Check the internet for the lamp schedule, guv.", "message 2: mentions 'internet', outside mara's world"),
    ],
)
def test_breaks_character(cards, reply, detail):
    check = make_ooc_checker(PersonaIndex(cards), [], use_boundaries=True)
    messages = [SYS, {"role": "user", "content": "When do the lamps go on?"}, {"role": "assistant", "content": reply}]
    assert check(messages, "mara") == Drop("breaks_character", detail)


@pytest.mark.parametrize("reply", [
    "As an assistant I would say so.", "I am an AI.", "I'm only a chatbot, sorry.", "I can't role-play that.",
    "I won't pretend to be a lamplighter.", "I was trained by Google.", "Ask ChatGPT.",
    "I don't have feelings.", "That is past my knowledge cutoff.", "Certainly! Here is a list of lamps.",
    "I hope this helps!", "Speaking as a language model: no.",
])
def test_every_builtin_ooc_phrase_survives_the_keyword_prescreen(cards, reply):
    check = make_ooc_checker(PersonaIndex(cards), [], use_boundaries=False)
    messages = [SYS, {"role": "user", "content": "?"}, {"role": "assistant", "content": reply}]
    assert check(messages, "mara").reason == "breaks_character"


def test_boundary_raised_by_user_may_be_answered(cards):
    check = make_ooc_checker(PersonaIndex(cards), [], use_boundaries=True)
    messages = [SYS, {"role": "user", "content": "Do you use the internet?"},
                {"role": "assistant", "content": "The internet, guv? Never heard of such a net."}]
    assert check(messages, "mara") is None


def test_extra_ooc_phrase_from_config(cards):
    check = make_ooc_checker(PersonaIndex(cards), [r"\bdelve\b"], use_boundaries=False)
    messages = [SYS, {"role": "user", "content": "?"}, {"role": "assistant", "content": "Let us delve in."}]
    assert check(messages, "mara") == Drop("breaks_character", "message 2: 'delve'")


def test_normalize_text():
    assert normalize_text("Cafe\u0301\u200b  lamp\t\tlit \r\n\n\n\nnext ") == "Caf\u00e9 lamp lit\n\nnext"


@pytest.mark.parametrize(
    "text, expected, kind",
    [
        ("Write to jane.doe@example.com today", "Write to [EMAIL] today", "email"),
        ("Ring +44 20 7946 0958 now", "Ring [PHONE] now", "phone"),
        ("Ring (555) 123-4567 now", "Ring [PHONE] now", "phone"),
        ("Ring 555-987-6543 or 555.987.6543", "Ring [PHONE] or [PHONE]", "phone"),
        ("Host 192.168.14.7 is down", "Host [IP_ADDRESS] is down", "ip_address"),
        ("It came from 10.0.3.17.", "It came from [IP_ADDRESS].", "ip_address"),
    ],
)
def test_pii_is_replaced_with_typed_placeholders(text, expected, kind):
    scrubbed, counts = scrub_pii(text, ["email", "phone", "ip_address"])
    assert scrubbed == expected
    assert sum(counts.values()) == counts[kind] >= 1


def test_pii_leaves_ordinary_numbers_alone():
    text = "In 1888 I lit 42 lamps at 7.30 on version 1.2.3, 3 streets from No. 221."
    assert scrub_pii(text, ["email", "phone", "ip_address"]) == (text, {})


def test_exact_duplicate_keeps_first():
    dedup = ExactDeduper()
    msgs = [SYS, {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    assert dedup.check(content_key("mara", msgs), 0) is None
    assert dedup.check(content_key("mara", [dict(m) for m in msgs]), 1) == 0
    assert dedup.check(content_key("bo", msgs), 2) is None


def test_near_duplicate_one_word_changed():
    text = ("Right you are guv the lamps of Brick Lane go on at dusk every evening and I climb my ladder with "
            "the long pole to light each wick before the fog rolls in off the river. Mrs Pell at the bakery gives "
            "me a bun for my trouble most nights, and the constable tips his hat when I pass the station house on "
            "my way back to the yard where the oil is kept in tall tins behind the stable door.")
    a = [{"role": "user", "content": "When?"}, {"role": "assistant", "content": text}]
    b = [{"role": "user", "content": "When?"}, {"role": "assistant", "content": text.replace("fog", "mist")}]
    c = [{"role": "user", "content": "Why?"}, {"role": "assistant", "content": "Sheep need me more than lamps do."}]
    near = NearDeduper(threshold=0.8, num_perm=128, bands=16)
    sa, sb, sc = minhash_signatures([a, b, c], num_perm=128, shingle_words=3)
    assert near.check(sa, 0) is None
    assert near.check(sb, 1) == 0
    assert near.check(sc, 2) is None


def test_split_is_stratified_capped_and_deterministic():
    chars = ["mara"] * 30 + ["bo"] * 5 + ["solo"]
    first = assign_splits(chars, cap=20, fraction=0.1, minimum=2, seed=13)
    assert first == assign_splits(chars, cap=20, fraction=0.1, minimum=2, seed=13)
    counts = {c: [first[i] for i, x in enumerate(chars) if x == c] for c in set(chars)}
    assert counts["mara"].count(OVER_CAP) == 10 and counts["mara"].count(EVAL) == 2
    assert counts["bo"].count(EVAL) == 2 and counts["bo"].count(TRAIN) == 3
    assert counts["solo"] == [TRAIN]
    assert first != assign_splits(chars, cap=20, fraction=0.1, minimum=2, seed=14)
    assert eval_count(100, 0.1, 2) == 10 and eval_count(2, 0.5, 2) == 1


def test_card_missing_required_field_names_file_and_field(tmp_path):
    d = tmp_path / "characters"
    d.mkdir()
    (d / "ghost.yaml").write_text("id: ghost\nname: The Ghost\n")
    with pytest.raises(ConfigError) as err:
        load_characters(d)
    assert str(err.value) == f"{d / 'ghost.yaml'}: key 'system_prompt': Field required"


def test_card_id_must_match_file_name(tmp_path):
    d = tmp_path / "characters"
    d.mkdir()
    (d / "ghost.yaml").write_text("id: spook\nname: The Ghost\nsystem_prompt: You are the Ghost.\n")
    with pytest.raises(ConfigError, match="key 'id': 'spook' does not match the file name 'ghost'"):
        load_characters(d)


def test_over_cap_rows_are_quarantined_with_their_original_text(cards, tmp_path, base_model_dir):
    from transformers import AutoTokenizer

    from charforge.schemas.curate import CurateConfig
    from charforge.curation.pipeline import curate_conversations

    replies = ["Sixty sheep.", "Snow on the ridge tonight.", "Fen is my dog.", "Lambing is hard work.",
               "Town is loud.", "The wind talks enough for two."]
    lines = [json.dumps({"messages": [{"role": "user", "content": f"Q{i}?"}, {"role": "assistant", "content": r}],
                         "character": "bo"}) for i, r in enumerate(replies)]
    raw = tmp_path / "bo.jsonl"
    raw.write_text("\n".join(lines) + "\n")
    cfg = CurateConfig(max_per_character=4, split={"eval_fraction": 0.25, "min_eval_per_character": 1})
    manifest = curate_conversations([raw], tmp_path / "out", cards, cfg, AutoTokenizer.from_pretrained(base_model_dir),
                                    progress=False)
    assert manifest["rejected_by_reason"] == {"over_cap": 2}
    assert manifest["per_character"] == {"bo": {"train": 3, "eval": 1}} and manifest["balanced"]
    rejected = [json.loads(x) for x in (tmp_path / "out" / "rejected.jsonl").read_text().splitlines()]
    assert [r["raw"] for r in rejected] == [lines[r["line"] - 1] for r in rejected]
    assert rejected[0]["detail"] == "bo already has max_per_character=4 rows"
