"""Persona cards: `data/characters/<id>.yaml`, one character each."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from charforge.config import load_yaml_model
from charforge.errors import ConfigError


class CharacterStyle(BaseModel):
    """Surface markers of a character's voice, used by curation and evaluation."""

    model_config = ConfigDict(extra="forbid")

    catchphrases: list[str] = Field(default_factory=list, description="Phrases the character says often.")
    address: list[str] = Field(default_factory=list, description="How the character addresses others.")
    vocabulary: list[str] = Field(default_factory=list, description="Words typical of the character.")


class CharacterCard(BaseModel):
    """A persona: who the character is, how they talk, what they do not know."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]{1,62}$", description="Slug; also the file name.")
    name: str = Field(min_length=1, description="Display name.")
    system_prompt: str = Field(min_length=1, description="System message that puts the model in character.")
    description: str = Field(default="", description="Who the character is, for reviewers.")
    facts: list[str] = Field(default_factory=list, description="Statements the character holds true.")
    style: CharacterStyle = Field(default_factory=CharacterStyle, description="Voice markers.")
    boundaries: list[str] = Field(
        default_factory=list,
        description="Topics outside the character's world (e.g. modern technology); mentioning them breaks character.",
    )


def load_character(path: Path) -> CharacterCard:
    """Load one card; the file stem must equal its `id`."""
    card = load_yaml_model(path, CharacterCard)
    if card.id != path.stem:
        raise ConfigError(f"{path}: key 'id': '{card.id}' does not match the file name '{path.stem}'")
    return card


def load_characters(directory: Path) -> dict[str, CharacterCard]:
    """Load every `*.yaml` card in a directory, keyed by id."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ConfigError(f"{directory}: characters directory not found (pass --characters DIR)")
    cards = {p.stem: load_character(p) for p in sorted(directory.glob("*.yaml"))}
    if not cards:
        raise ConfigError(f"{directory}: no character cards (*.yaml) found")
    return cards
