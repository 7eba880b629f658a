"""The project's own data: cards load, the raw corpus curates to a balanced manifest, planted dirt is caught."""

from __future__ import annotations

import json
import re

import pytest

from charforge.characters import load_characters
from charforge.settings import DATA_DIR


def planted_outcomes() -> dict[int, str]:
    """Line -> expected reason for data/raw/inbox_dirty.jsonl, from the table in data/raw/PLANTED.md."""
    expected = {}
    for row in re.findall(r"^\| \w+ \| \d+ \| (\w+) \| ([\d, ]+) \|$", (DATA_DIR / "raw" / "PLANTED.md").read_text(),
                          re.M):
        for line in row[1].split(","):
            expected[int(line)] = row[0]
    return expected


@pytest.fixture(scope="module")
def curated(curated_project):
    return curated_project


def test_eight_distinct_original_characters():
    cards = load_characters(DATA_DIR / "characters")
    assert len(cards) >= 8
    assert len({c.system_prompt for c in cards.values()}) == len(cards)
    assert all(c.boundaries and c.facts and c.style.catchphrases for c in cards.values())


def test_manifest_balances_with_plausible_reasons(curated):
    _, m = curated
    assert m["rows_read"] == m["rows_kept"] + m["rows_rejected"] + m["duplicates_removed"]
    assert m["balanced"]
    assert m["rows_kept"] >= 8 * 50
    assert all(c["train"] >= 50 and c["eval"] >= 2 for c in m["per_character"].values())
    assert m["rejected_by_reason"]["breaks_character"] == 10
    assert m["rejected_by_reason"]["unknown_character"] == 5  # personas without a card
    assert m["pii_redactions"] == {"email": 5, "phone": 7, "ip_address": 4}


def test_every_planted_line_gets_its_expected_reason(curated):
    out, _ = curated
    rejected = [json.loads(line) for line in (out / "rejected.jsonl").read_text().splitlines()]
    got = {r["line"]: r["reason"] for r in rejected if r["source"].endswith("inbox_dirty.jsonl")}
    want = {line: reason for line, reason in planted_outcomes().items() if not reason.startswith("kept")}
    assert want and got == want


def test_no_planted_pii_or_assistant_boilerplate_reaches_training(curated):
    out, _ = curated
    text = (out / "train.jsonl").read_text() + (out / "eval.jsonl").read_text()
    assert not re.search(r"@example\.|555|\d+\.\d+\.\d+\.\d+|as an ai|language model", text, re.I)
    assert text.count("[EMAIL]") == 5 and text.count("[PHONE]") == 7 and text.count("[IP_ADDRESS]") == 4


def test_eval_probes_are_held_out_from_training(curated):
    out, _ = curated
    train = (out / "train.jsonl").read_text() + (out / "eval.jsonl").read_text()
    probes = [json.loads(line) for line in (DATA_DIR / "eval" / "probes.jsonl").read_text().splitlines()]
    assert len(probes) >= 8 * 10
    assert not [p["id"] for p in probes if json.dumps(p["reference"])[1:-1] in train]


def test_worker_processes_give_the_same_dataset_as_one_process(curated, tmp_path, base_model_dir):
    from transformers import AutoTokenizer

    from charforge.config import load_yaml_model
    from charforge.schemas.curate import CurateConfig
    from charforge.settings import CONFIGS_DIR
    from charforge.curation.pipeline import curate_conversations

    _, single = curated
    cfg = load_yaml_model(CONFIGS_DIR / "curate" / "default.yaml", CurateConfig)
    cfg = cfg.model_copy(update={"workers": 2, "chunk_size": 50})
    files = sorted((DATA_DIR / "raw").glob("*.jsonl"))
    parallel = curate_conversations(files, tmp_path, load_characters(DATA_DIR / "characters"), cfg,
                                    AutoTokenizer.from_pretrained(base_model_dir), progress=False)
    assert parallel["sha256"] == single["sha256"]
    assert parallel["rejected_by_reason"] == single["rejected_by_reason"]
