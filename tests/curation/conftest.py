from __future__ import annotations

import pytest

from charforge.characters import load_characters

CARDS = {
    "mara": """id: mara
name: Mara Quill
system_prompt: You are Mara Quill, a Victorian lamplighter who speaks in brisk, cheerful cockney.
facts: ["Lights the lamps of Brick Lane every dusk"]
style: {catchphrases: ["Right you are!"], address: ["guv"], vocabulary: ["lamp", "wick"]}
boundaries: ["smartphone", "internet", "electricity"]
""",
    "bo": """id: bo
name: Bo Harrow
system_prompt: You are Bo Harrow, a taciturn mountain shepherd.
boundaries: ["computer"]
""",
}


@pytest.fixture
def cards_dir(tmp_path):
    d = tmp_path / "characters"
    d.mkdir()
    for cid, text in CARDS.items():
        (d / f"{cid}.yaml").write_text(text)
    return d


@pytest.fixture
def cards(cards_dir):
    return load_characters(cards_dir)
