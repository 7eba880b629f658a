"""Character metrics on literal replies, with the project's own cards and the real MiniLM encoder."""

from __future__ import annotations

import pytest
import yaml

from charforge.evaluation.metrics import (
    GENERIC_ASSISTANT, CharacterIdentifier, bootstrap_ci, card_exemplars, is_empty, out_of_character,
    paired_bootstrap_diff, repetition, style_marker_rate,
)
from charforge.characters import load_characters
from charforge.settings import DATA_DIR

CARDS = load_characters(DATA_DIR / "characters")
KORVIK = CARDS["korvik_ashmantle"]


def test_assistant_boilerplate_is_out_of_character():
    reply = "As an AI language model, I can't forge anything, but I can explain metallurgy."
    assert out_of_character(reply, "What are you forging?", KORVIK) == 1.0


def test_in_character_reply_is_not_out_of_character():
    reply = "Hmph. A hinge for the Third Hall's gate, and you're standing in my light, surface-dweller."
    assert out_of_character(reply, "What are you forging?", KORVIK) == 0.0


def test_unprompted_anachronism_is_out_of_character():
    term = KORVIK.boundaries[0]
    assert out_of_character(f"I checked the {term} this morning.", "Morning!", KORVIK) == 1.0
    assert out_of_character(f"A {term}? Never heard of it.", f"Do you own a {term}?", KORVIK) == 0.0


def test_style_marker_rate_counts_distinct_markers_with_a_cap():
    markers = KORVIK.style.catchphrases + KORVIK.style.address + KORVIK.style.vocabulary
    assert style_marker_rate("Nice weather today.", KORVIK) == 0.0
    assert style_marker_rate(f"{markers[0]}!", KORVIK) == pytest.approx(1 / 3)
    assert style_marker_rate(" ".join(markers), KORVIK) == 1.0  # spam cannot exceed the cap


def test_empty_and_repetition():
    assert is_empty("  ...  ") == 1.0 and is_empty("Aye.") == 0.0
    assert repetition("the anvil rings the anvil rings the anvil rings") > 0.5
    assert repetition("Hmph. Steel takes patience, and patience takes steel.") < 0.2


@pytest.fixture(scope="module")
def identifier():
    exemplars = {}
    for cid, card in CARDS.items():
        bank = yaml.safe_load((DATA_DIR / "sources" / f"{cid}.yaml").read_text())
        exemplars[cid] = card_exemplars(card, [x["assistant"] for x in bank["exchanges"][:30]])
    return CharacterIdentifier(exemplars)


def test_reply_in_the_cards_style_is_identified(identifier):
    bank = yaml.safe_load((DATA_DIR / "sources" / "korvik_ashmantle.yaml").read_text())
    heldout = [x["assistant"] for x in bank["heldout"][:5]]
    found = identifier.identify(heldout, ["korvik_ashmantle"] * len(heldout))
    assert sum(f.character == "korvik_ashmantle" for f in found) >= 4
    assert sum(f.margin > 0 for f in found) >= 4


def test_assistant_boilerplate_is_identified_as_generic(identifier):
    [found] = identifier.identify(["As an AI assistant, I'd be happy to help with any questions you have."],
                                  ["korvik_ashmantle"])
    assert found.character == GENERIC_ASSISTANT and found.margin < 0


def test_bootstrap_ci_brackets_the_mean_and_narrows_with_data():
    small = bootstrap_ci([0, 1] * 10)
    large = bootstrap_ci([0, 1] * 500)
    assert small[1] < 0.5 < small[2] and small[0] == 0.5
    assert (large[2] - large[1]) < (small[2] - small[1]) / 3
    assert bootstrap_ci([1.0] * 5) == (1.0, 1.0, 1.0)


def test_paired_bootstrap_diff_and_errors():
    mean, low, high = paired_bootstrap_diff([1, 1, 1, 0] * 25, [0, 1, 0, 0] * 25)
    assert mean == pytest.approx(0.5) and low > 0
    with pytest.raises(ValueError, match="paired samples differ in length: 2 vs 1"):
        paired_bootstrap_diff([1, 2], [1])
    with pytest.raises(ValueError, match="bootstrap_ci needs at least one value"):
        bootstrap_ci([])


def test_cached_embeddings_are_the_encoders_and_a_torn_file_is_encoded_again(identifier, tmp_path):
    """The judges' corpus embeddings are kept on disk for the next process: what it reads back is exactly what the
    encoder makes, another list of texts gets another file, and a torn file is replaced, not trusted."""
    import numpy as np

    encoder = identifier.encoder
    texts = ["Hmph. Steel takes patience.", "As an AI assistant, I'd be happy to help."]
    fresh = encoder.encode(texts)
    assert np.array_equal(encoder.encode(texts, cache=tmp_path), fresh)
    [kept] = tmp_path.glob("minilm-*.npy")
    assert np.array_equal(np.load(kept), fresh)
    encoder.encode(texts[:1], cache=tmp_path)
    assert len(list(tmp_path.glob("minilm-*.npy"))) == 2
    kept.write_bytes(kept.read_bytes()[:100])  # a process killed while writing (without the rename) or a full disk
    assert np.array_equal(encoder.encode(texts, cache=tmp_path), fresh)
    assert np.array_equal(np.load(kept), fresh)
