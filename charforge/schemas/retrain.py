"""Retrain chain config (`configs/retrain/*.yaml`): which stage config each step of the chain uses, on which data,
and how far the chain goes. The stage configs stay in their own folders; this file only composes them."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator

from charforge.config import StageConfig


class ProductionInput(StageConfig):
    """Conversations captured at the gateway (`capture` in the serving config) as an input of curation: a window
    ending when the chain runs. Only replies a user rated up become training targets; rated-down and unrated ones
    are quarantined with their reason (`rejected.jsonl`)."""

    source: Literal["production"] = Field(description="The kind of input: captured conversations.")
    hours: float = Field(gt=0, description="The window: conversations captured in the last `hours` before the run "
                         "(168: a week).")
    routes: list[str] | None = Field(default=None, description="Only these gateway routes (null: every route).")


class FamilySpec(StageConfig):
    """One adapter family of the chain: a group of characters with its own adapter, registered model
    (`charforge-<name>`), promotion gate, rollout and rollback."""

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_.-]*$", description="The family's training run name: registered as "
                      "charforge-<name>, served as charforge-<name>-v<version>.")
    characters: list[str] = Field(min_length=1, description="The persona cards (ids) it covers: it trains on their "
                                  "rows, is evaluated on their probes, and its rollouts switch their routes. A "
                                  "character belongs to one family at most.")
    train: Path | None = Field(default=None, description="Its own training config; null: the chain's `train` "
                               "config, under this name and with these characters.")


def require_families_apart(families: list[tuple[str, list[str] | None]]) -> None:
    """(name, characters) of a chain's adapter families: each under its own name, naming its characters, each
    character in one family at most (a ValueError otherwise)."""
    names = [name for name, _ in families]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(f"adapter families named twice: {', '.join(twice)}")
    owner: dict[str, str] = {}
    for name, characters in families:
        if not characters:
            raise ValueError(f"adapter family {name} names no characters (set its `characters`)")
        for character in characters:
            if character in owner:
                raise ValueError(f"character {character} is in two adapter families: {owner[character]} and {name}")
            owner[character] = name


class RetrainConfig(StageConfig):
    """One chain run: curate -> train -> [prefer] -> evaluate -> [quantize] -> promote -> deploy (per adapter family
    when `families` is set)."""

    inputs: list[str | ProductionInput] = Field(
        default=["data/raw"], min_length=1, description="Raw JSONL files or folders to curate (relative paths are "
        "from the repo), and captured conversations: `{source: production, hours: 168}`.")
    dataset_dir: str = Field(default=".state/datasets/default", description="Where the curated dataset goes (and "
                             "what training reads, whatever the training config's dataset_dir says).")
    curate: Path = Field(default=Path("configs/curate/default.yaml"), description="Curation config.")
    train: Path = Field(default=Path("configs/train/smollm2_lora.yaml"), description="Training config.")
    families: list[FamilySpec] = Field(default_factory=list, description="Adapter families, one adapter per group "
                                       "of characters: curation runs once, then each family is trained, evaluated, "
                                       "gated and rolled out on its own, and one whose rows and training config did "
                                       "not change keeps its champion untouched. Empty: one adapter (`train`) for "
                                       "every character.")
    evaluate: Path = Field(default=Path("configs/eval/default.yaml"), description="Evaluation config (candidate, "
                           "base and champion are scored on the same probes).")
    prefer: Path | None = Field(default=None, description="Preference-tuning config (configs/prefer/*.yaml): DPO or "
                                "KTO on top of the SFT adapter the chain just trained, on the pairs curation writes "
                                "(the curate config needs `pairs: {enabled: true}`); its adapter is the candidate "
                                "evaluated, gated and rolled out, a version of the training config's family. Null "
                                "skips the stage.")
    quantize: Path | None = Field(default=None, description="Quantization config; null skips quantization and the "
                                  "evaluation of the quantized artifact.")
    promotion: Path = Field(default=Path("configs/promotion.yaml"), description="Promotion policy.")
    serving: Path = Field(default=Path("configs/serving.yaml"), description="Fleet, gateway and rollout settings.")
    deploy: bool = Field(default=True, description="Roll a newly promoted champion out to the fleet.")
    start_fleet: bool = Field(default=True, description="Start the local fleet + gateway (`charforge serve up`) when "
                              "no gateway answers and the serving config's fleet is local.")

    @field_validator("families")
    @classmethod
    def _families_apart(cls, families: list[FamilySpec]) -> list[FamilySpec]:
        require_families_apart([(f.name, f.characters) for f in families])
        return families
