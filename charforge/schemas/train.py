"""Training stage config (`configs/train/*.yaml`)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from charforge.config import StageConfig


class LoraSettings(StageConfig):
    r: int = Field(default=8, ge=1, le=512, description="LoRA rank; must be <= the fleet's max_lora_rank to serve.")
    alpha: int = Field(default=16, ge=1, description="LoRA alpha (scale = alpha / r, or alpha / sqrt(r) with rslora).")
    dropout: float = Field(default=0.05, ge=0, lt=1, description="Dropout on the LoRA input.")
    target_modules: list[str] | Literal["all-linear"] = Field(
        default="all-linear", description="Modules to adapt; all-linear = every projection vLLM can serve."
    )
    use_rslora: bool = Field(default=False, description="Rank-stabilised scaling (vLLM serves it).")


class QuantSettings(StageConfig):
    """bitsandbytes 4-bit loading of the frozen base (QLoRA)."""

    quant_type: Literal["nf4", "fp4"] = Field(default="nf4", description="4-bit data type.")
    double_quant: bool = Field(default=True, description="Quantize the quantization constants too (~0.4 bit/param).")
    compute_dtype: Literal["float32", "bfloat16", "float16"] = Field(
        default="float32", description="Matmul dtype; float32 on CPU (the measured path), bfloat16 on GPU."
    )


class TrainingSettings(StageConfig):
    max_steps: int = Field(default=40, ge=1, description="Optimizer steps.")
    batch_size: int = Field(default=4, ge=1, description="Sequences (or packed rows) per device per step.")
    gradient_accumulation_steps: int = Field(default=1, ge=1, description="Micro-batches per optimizer step.")
    learning_rate: float = Field(default=2e-4, gt=0, description="Peak learning rate.")
    lr_scheduler_type: str = Field(default="cosine", description="transformers scheduler name.")
    warmup_ratio: float = Field(default=0.05, ge=0, lt=1, description="Share of steps spent warming up.")
    max_length: int = Field(default=1024, ge=16, description="Tokens per training row (packed or truncated).")
    packing: bool = Field(default=True, description="Pack rows into max_length sequences (best-fit decreasing).")
    padding_free: bool = Field(default=True, description="No padding tokens in batches (position_ids mark rows).")
    assistant_only_loss: bool = Field(default=True, description="Loss on assistant turns only.")
    save_steps: int = Field(default=10, ge=1, description="Checkpoint every N steps (resume point).")
    save_total_limit: int = Field(default=2, ge=1, description="Checkpoints kept on disk.")
    eval_steps: int | None = Field(default=None, ge=1, description="Eval loss every N steps; None = at the end only.")
    logging_steps: int = Field(default=1, ge=1, description="Log loss every N steps.")
    seed: int = Field(default=13, description="Seed for data order and LoRA init.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        default="auto", description="The frozen base's dtype while training; auto = bfloat16 on GPUs that support it "
        "(use_cpu false) and on CPUs with AMX (use_cpu true), else float32 (LoRA weights stay float32).",
    )
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = Field(
        default="sdpa", description="transformers attention kernel; packed rows keep their documents apart with all "
        "three (block-diagonal masks for sdpa/eager, varlen for flash_attention_2).",
    )
    use_cpu: bool = Field(default=True, description="Force CPU (the embedded default); false on GPU hosts.")
    gradient_checkpointing: bool = Field(default=False, description="Trade compute for memory (large models).")


class TrainConfig(StageConfig):
    """One training run: which base, which data, which adapter, how to train it."""

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_.-]*$", description="Run family name (folder + MLflow run name).")
    characters: list[str] | None = Field(
        default=None, min_length=1, description="The persona cards (ids) this adapter family covers: it trains on "
        "their rows of the curated dataset only, is evaluated on their probes in the chain, and a deployment switches "
        "only their routes. null: every character (one adapter for all).",
    )
    base_model: str = Field(default="smollm2-135m-instruct", description="Preset in configs/models/.")
    base_model_dir: Path | None = Field(
        default=None, description="Train on this local checkpoint instead of the preset's own folder (same "
        "architecture as the preset); relative paths are from the repo root.",
    )
    method: Literal["lora", "qlora"] = Field(default="lora", description="qlora loads the base in 4-bit.")
    dataset_dir: Path = Field(default=Path(".state/datasets/default"), description="Curated dataset (train.jsonl, "
                              "eval.jsonl, manifest.json); relative paths are from the repo root.")
    chat_template: Path | None = Field(
        default=None, description="Training chat template with {% generation %} markers for assistant-only loss, "
        "rendering exactly like the base template; None when TRL can patch the base template itself.",
    )
    max_lora_rank: int = Field(default=16, description="The serving fleet's --max-lora-rank (servability check).")
    lora: LoraSettings = Field(default_factory=LoraSettings, description="Adapter shape.")
    quantization: QuantSettings | None = Field(default=None, description="Required for method qlora.")
    training: TrainingSettings = Field(default_factory=TrainingSettings, description="Optimisation.")

    @field_validator("characters")
    @classmethod
    def _distinct(cls, ids: list[str] | None) -> list[str] | None:
        repeated = sorted({c for c in ids or [] if (ids or []).count(c) > 1})
        if repeated:
            raise ValueError(f"characters listed twice: {', '.join(repeated)}")
        return ids

    @model_validator(mode="after")
    def _qlora_needs_quantization(self) -> "TrainConfig":
        if self.method == "qlora" and self.quantization is None:
            raise ValueError("method 'qlora' needs a 'quantization' section")
        if self.method == "lora" and self.quantization is not None:
            raise ValueError("'quantization' is only used with method 'qlora'")
        return self
