"""Preference pairs written by curation: the gold reply chosen, a free negative rejected, each split from its own
rows only, probe text kept out, and one-line errors for pair sets a preference stage cannot use."""

from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer

from charforge.curation.persona import PersonaIndex, make_ooc_checker
from charforge.curation.pipeline import curate_conversations
from charforge.errors import InputError
from charforge.schemas.curate import CurateConfig

MARA = "You are Mara Quill, a Victorian lamplighter who speaks in brisk, cheerful cockney."
BO = "You are Bo Harrow, a taciturn mountain shepherd."
ALL_TRAIN = {"eval_fraction": 0, "min_eval_per_character": 0}


def chat(system: str, *turns: str, **extra) -> str:
    messages = [{"role": "system", "content": system}]
    for n, text in enumerate(turns):
        messages.append({"role": "user" if n % 2 == 0 else "assistant", "content": text})
    return json.dumps({"messages": messages, **extra})


LINES = [
    chat(MARA, "Cold tonight?", "Cold as a fishmonger's slab, guv, but the lamps don't care.",
         "Any family?", "A brother on the barges and a niece who sings in the chapel choir."),
    chat(BO, "Any family?", "A sister in the valley. We write at lambing."),
    chat(MARA, "Where do you live?", "Two rooms over the cooper's yard, with a window that rattles."),
    chat(BO, "Lonely up there?", "No. The wind talks enough."),
    chat(MARA, "What do you dream of?", "A little shop with a bell on the door, guv."),  # a probe's reference
    chat(MARA, "Where do you live?", "Somewhere warm, I expect, but I'm not sure where.", source="production",
         rating="down", capture_id="cfr-1", version="charforge-v2"),
    chat(BO, "Lonely up there?", "As an AI, I don't feel lonely, but thanks for asking!", source="production",
         rating="up", flagged=["assistant_voice_rate", "ooc_rate"], capture_id="cfr-2", version="charforge-v2"),
]


@pytest.fixture
def curated(tmp_path, cards, base_model_dir):
    probes = tmp_path / "probes.jsonl"
    probes.write_text(json.dumps({"id": "mara-1", "character": "mara", "system_prompt": MARA, "history": [],
                                  "user_msg": "What do you dream of?", "probe_type": "normal",
                                  "reference": "A little shop with a bell on the door, guv."}) + "\n")
    raw = tmp_path / "raw.jsonl"
    raw.write_text("\n".join(LINES) + "\n")
    tokenizer = AutoTokenizer.from_pretrained(base_model_dir)

    def run(**pairs):
        cfg = CurateConfig(workers=0, split=ALL_TRAIN, pairs={"enabled": True, "probes": str(probes), **pairs})
        return curate_conversations([raw], tmp_path / "out", cards, cfg, tokenizer, progress=False)
    return run


def test_pairs_take_the_gold_reply_and_a_free_negative_of_each_kind(curated, tmp_path, cards):
    manifest = curated()
    assert manifest["pairs"] == {"train": {"boilerplate": 4, "boundary_break": 4, "monitor_flagged": 1,
                                           "other_character": 2, "rated_down": 1},
                                 "eval": {}, "dropped": {"probe_text": 2}}
    pairs = [json.loads(x) for x in (tmp_path / "out" / "pairs_train.jsonl").read_text().splitlines()]
    by = {(p["character"], p["negative"], p["prompt"][-1]["content"]): p for p in pairs}

    # another character's reply to the same user turn, at the turn where it was asked (here the second)
    mara = by[("mara", "other_character", "Any family?")]
    assert [m["content"] for m in mara["prompt"]] == [MARA, "Cold tonight?",
                                                      "Cold as a fishmonger's slab, guv, but the lamps don't care.",
                                                      "Any family?"]
    assert mara["chosen"] == [{"role": "assistant", "content": "A brother on the barges and a niece who sings in "
                                                               "the chapel choir."}]
    assert mara["rejected"][0]["content"] == "A sister in the valley. We write at lambing."
    assert by[("bo", "other_character", "Any family?")]["rejected"][0]["content"].startswith("A brother on the barges")
    # the production reply a user rated down, against the gold reply to the same turn
    down = by[("mara", "rated_down", "Where do you live?")]
    assert down["chosen"][0]["content"] == "Two rooms over the cooper's yard, with a window that rattles."
    assert down["rejected"][0]["content"] == "Somewhere warm, I expect, but I'm not sure where."
    # a reply the character monitor flagged (a user rated it up; the flag wins), likewise
    flagged = by[("bo", "monitor_flagged", "Lonely up there?")]
    assert (flagged["chosen"][0]["content"], flagged["rejected"][0]["content"]) == (
        "No. The wind talks enough.", "As an AI, I don't feel lonely, but thanks for asking!")
    # the probe's reference is in no pair (its row is trained on by SFT; evaluation scores it held out)
    assert not any("bell on the door" in json.dumps(p) for p in pairs)

    # the built negatives are out of character by curation's own rules
    check = make_ooc_checker(PersonaIndex(cards), [], True)
    for p in pairs:
        if p["negative"] in ("boilerplate", "boundary_break"):
            assert check(p["prompt"] + p["rejected"], p["character"]) is not None, p["rejected"]
            assert check(p["prompt"] + p["chosen"], p["character"]) is None
    assert manifest["sha256"]["pairs_train.jsonl"] and (tmp_path / "out" / "pairs_eval.jsonl").read_text() == ""

    without = curated(enabled=False)
    assert without["dataset_hash"] == manifest["dataset_hash"] and without["pairs"] is None  # SFT sees the same
    assert not (tmp_path / "out" / "pairs_train.jsonl").exists()  # no stale pairs beside a split they do not match


def test_pair_sets_a_preference_stage_cannot_use_are_one_line_errors(curated, tmp_path):
    with pytest.raises(InputError) as err:
        curated(kinds=["rated_down"])
    assert str(err.value) == ("no negatives for bo in the train split: the preference stage would leave their voice "
                              "untouched; add a kind that covers them (boilerplate covers every character)")
    probes = tmp_path / "family-probe.jsonl"  # the one shared user turn is a probe's: every pair would carry it
    probes.write_text(json.dumps({"id": "bo-1", "character": "bo", "system_prompt": BO, "history": [],
                                  "user_msg": "Any family?", "reference": "-", "probe_type": "normal"}) + "\n")
    with pytest.raises(InputError) as err:
        curated(kinds=["other_character"], probes=str(probes))
    assert str(err.value) == ("no preference pairs in the train split: enable more negative kinds (pairs.kinds: "
                              "other_character, boilerplate, boundary_break, rated_down, monitor_flagged) or curate more rows")


def test_a_pair_longer_than_the_token_limit_is_dropped_as_too_long(cards, base_model_dir):
    """Counted in token ids of the chat template, as training sees them (transformers 5 returns a dict from
    `apply_chat_template(tokenize=True)`, whose length is 2: no pair was ever too long): at a 60-token limit the
    shortest conversations fit and the longer ones do not."""
    from charforge.curation.pairs import build_pairs

    tokenizer = AutoTokenizer.from_pretrained(base_model_dir)
    rows = [dict(json.loads(line), character="bo" if BO in line else "mara") for line in LINES[:4]]
    lengths = {len(tokenizer.apply_chat_template(r["messages"], tokenize=True, return_dict=False)) for r in rows}
    assert min(lengths) < 60 < max(lengths)
    pairs, kept, dropped = build_pairs(rows, cards, ["boilerplate"], [], set(), tokenizer, max_tokens=60)
    assert dropped["too_long"] > 0 and kept["boilerplate"] == len(pairs) > 0
    assert all(len(tokenizer.apply_chat_template(p["prompt"] + side, tokenize=True, return_dict=False)) <= 60
               for p in pairs for side in (p["chosen"], p["rejected"]))


def test_a_preference_runs_negative_mix_takes_only_its_kinds_and_names_what_the_file_holds(curated, tmp_path):
    from charforge.curation.pairs import read_pairs
    from charforge.training.preference import preference_dataset

    curated()
    path = tmp_path / "out" / "pairs_train.jsonl"
    assert len(read_pairs(path)) == 12
    assert [(p["character"], p["negative"]) for p in read_pairs(path, ["other_character"])] == [
        ("mara", "other_character"), ("bo", "other_character")]
    kto = preference_dataset(path, "kto", ["other_character", "rated_down"])  # each pair: desirable + undesirable
    assert len(kto) == 6 and kto["label"] == [True, False] * 3

    curated(kinds=["boilerplate", "boundary_break"])
    with pytest.raises(InputError) as err:
        read_pairs(path, ["other_character"])
    assert str(err.value) == (f"{path}: no pairs with negatives other_character; the file holds boilerplate (4), "
                              "boundary_break (4); change `negatives` in the prefer config or curate those kinds "
                              "(pairs.kinds)")
