"""Preference tuning config (`configs/prefer/*.yaml`): DPO or KTO on top of a finished SFT adapter, on the pairs
curation wrote beside its dataset (`pairs.enabled`)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from charforge.config import StageConfig
from charforge.schemas.curate import PairKind


class PreferSettings(StageConfig):
    max_steps: int = Field(default=40, ge=1, description="Optimizer steps.")
    batch_size: int = Field(default=4, ge=1, description="Pairs per device per step (KTO: examples).")
    gradient_accumulation_steps: int = Field(default=1, ge=1, description="Micro-batches per optimizer step.")
    learning_rate: float = Field(default=5e-5, gt=0, description="Peak learning rate (preference tuning moves "
                                 "an already trained adapter: lower than SFT's).")
    lr_scheduler_type: str = Field(default="cosine", description="transformers scheduler name.")
    warmup_ratio: float = Field(default=0.1, ge=0, lt=1, description="Share of steps spent warming up.")
    beta: float = Field(default=0.1, gt=0, description="How far the policy may move from the reference (the SFT "
                        "adapter): TRL's beta.")
    max_length: int = Field(default=1024, ge=16, description="Tokens per prompt + reply (longer pairs are cut).")
    save_steps: int = Field(default=10, ge=1, description="Checkpoint every N steps (resume point).")
    save_total_limit: int = Field(default=2, ge=1, description="Checkpoints kept on disk.")
    logging_steps: int = Field(default=1, ge=1, description="Log loss, reward margins and accuracies every N steps.")
    seed: int = Field(default=13, description="Seed for data order.")
    heldout_pairs: int = Field(default=256, ge=0, description="After training, score up to this many pairs of the "
                               "evaluation split (never trained on) for the held-out pair accuracy; 0 skips it.")


class PreferConfig(StageConfig):
    """One preference run: which SFT adapter it starts from (and is judged against), which loss, how long."""

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_.-]*$", description="Run family name (folder + MLflow run name).")
    method: Literal["dpo", "kto"] = Field(default="dpo", description="dpo: pairs as they are; kto: each pair as a "
                                          "desirable and an undesirable example.")
    sft: Path = Field(default=Path("configs/train/smollm2_lora.yaml"), description="The SFT training config: its "
                      "finished adapter on `dataset_dir` initialises the policy and is the frozen reference; base "
                      "model, LoRA shape, QLoRA, dtype and chat template come from it.")
    adapter: str | None = Field(default=None, description="Start from this SFT adapter instead of the `sft` "
                                "config's finished run on the dataset: a folder or a registry reference "
                                "(models:/charforge-smollm2-lora@champion). `sft` still gives the base model, "
                                "dtype, QLoRA loading and chat template.")
    dataset_dir: Path = Field(default=Path(".state/datasets/default"), description="Curated dataset with "
                              "pairs_train.jsonl (curate with pairs.enabled: true) and the SFT adapter's dataset.")
    negatives: list[PairKind] | None = Field(
        default=None, min_length=1, description="The negative mix: train only on pairs whose rejected side is one of "
        "these kinds (curation's pairs.kinds); null: every pair curation wrote. The held-out pair accuracy is "
        "measured on every kind either way, and per kind.")
    training: PreferSettings = Field(default_factory=PreferSettings, description="Optimisation.")
