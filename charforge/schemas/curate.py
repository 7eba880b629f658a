"""Curation stage config (`configs/curate/*.yaml`)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr

from charforge.config import StageConfig


class PIIConfig(StageConfig):
    email: bool = Field(default=True, description="Replace e-mail addresses with [EMAIL].")
    phone: bool = Field(default=True, description="Replace phone numbers with [PHONE].")
    ip_address: bool = Field(default=True, description="Replace IPv4 addresses with [IP_ADDRESS].")


class DedupConfig(StageConfig):
    near_threshold: float = Field(
        default=0.8, gt=0, le=1, description="Estimated Jaccard similarity at or above which a row is a near duplicate."
    )
    num_perm: int = Field(default=128, ge=16, le=512, description="MinHash permutations (accuracy vs speed/memory).")
    bands: int = Field(default=16, ge=1, description="LSH bands; num_perm / bands rows per band. More bands find "
                       "more candidates (recall) at more memory per row.")
    shingle_words: int = Field(default=3, ge=1, le=10, description="Word n-gram size of the MinHash shingles.")


class SplitConfig(StageConfig):
    eval_fraction: float = Field(default=0.1, ge=0, lt=1, description="Share of each character's rows for eval.")
    min_eval_per_character: int = Field(default=2, ge=0, description="At least this many eval rows per character "
                                        "(when it has more rows than that).")
    seed: int = Field(default=13, description="Seed of the deterministic balance and split.")


class SyntheticConfig(StageConfig):
    enabled: bool = Field(default=False, description="Generate extra conversations from the cards (off by default).")
    base_url: str = Field(default="http://127.0.0.1:8000/v1", description="Any OpenAI-compatible endpoint.")
    model: str = Field(default="smollm2-135m-instruct", description="Model name to request.")
    conversations_per_character: int = Field(default=5, ge=1, description="How many to generate per card.")
    turns: int = Field(default=2, ge=1, le=8, description="User/assistant exchanges per generated conversation.")
    temperature: float = Field(default=0.8, ge=0, le=2, description="Sampling temperature.")
    max_tokens: int = Field(default=120, ge=8, description="Longest generated question or reply, in tokens.")
    api_key: SecretStr | None = Field(default=None, description="Bearer token, if the endpoint needs one (masked in "
                                      "the manifest, MLflow and Prefect).")


# The negatives curation pairs against a gold reply (charforge/curation/pairs.py); a prefer config names them too.
PairKind = Literal["other_character", "boilerplate", "boundary_break", "rated_down", "monitor_flagged"]


class PairsConfig(StageConfig):
    enabled: bool = Field(default=False, description="Also write preference pairs (pairs_train.jsonl, "
                          "pairs_eval.jsonl) for the preference stage: the gold reply chosen, a free negative "
                          "rejected (charforge/curation/pairs.py).")
    kinds: list[PairKind] = Field(
        default_factory=lambda: ["other_character", "boilerplate", "boundary_break", "rated_down", "monitor_flagged"],
        min_length=1, description="Negatives: another character's reply to the same user turn, assistant "
        "boilerplate, the gold reply plus a sentence crossing a card boundary, production replies rated down or "
        "flagged by the character monitor.")
    probes: Path = Field(default=Path("data/eval/probes.jsonl"), description="Evaluation probes: a pair carrying "
                         "any of their text (reference or history) is dropped (probe_text).")


class CurateConfig(StageConfig):
    """What the curation stage keeps, drops and how it splits."""

    base_model: str = Field(default="smollm2-135m-instruct", description="Preset whose tokenizer measures length.")
    max_tokens: int = Field(default=1024, gt=0, description="Rows longer than this (after the chat template) are "
                            "quarantined as too_long.")
    max_per_character: int | None = Field(default=None, ge=1, description="Balance cap per character; extra rows "
                                          "are quarantined as over_cap.")
    ooc_phrases: list[str] = Field(
        default_factory=list,
        description="Extra regexes (case-insensitive) that mark an assistant turn as out of character.",
    )
    use_card_boundaries: bool = Field(
        default=True, description="An assistant turn that brings up a card boundary the user did not mention "
        "breaks character.",
    )
    pii: PIIConfig = Field(default_factory=PIIConfig, description="PII scrubbing.")
    dedup: DedupConfig = Field(default_factory=DedupConfig, description="Exact and near-duplicate removal.")
    split: SplitConfig = Field(default_factory=SplitConfig, description="Train/eval split.")
    synthetic: SyntheticConfig = Field(default_factory=SyntheticConfig, description="Optional synthetic expansion.")
    pairs: PairsConfig = Field(default_factory=PairsConfig, description="Preference pairs for the preference stage.")
    workers: int = Field(default=2, ge=0, description="Processes for the per-row steps (0 or 1: in-process).")
    chunk_size: int = Field(default=2000, ge=1, description="Rows per batch for tokenization (memory vs speed).")
