"""Quantization stage config (`configs/quantize/*.yaml`): what to quantize, with which tool and scheme, on which
calibration data, and how the result is re-evaluated."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationInfo, field_validator

from charforge.config import StageConfig

# The export formats each tool writes that vLLM loads as a pre-quantized checkpoint.
TOOL_FORMATS = {
    "auto-round": ("auto_round", "auto_gptq", "auto_awq"),
    "llm-compressor": ("compressed-tensors",),
}
# llm-compressor recipes this stage knows how to build (QuantizationModifier / GPTQModifier / AWQModifier).
LLM_COMPRESSOR_ALGORITHMS = ("rtn", "gptq", "awq")


class CalibrationSettings(StageConfig):
    """Calibration text: a seeded sample of the curated training conversations, rendered by the chat template."""

    dataset_dir: Path = Field(default=Path(".state/datasets/default"),
                              description="Curated dataset folder (its train.jsonl is sampled).")
    samples: int = Field(default=64, ge=1, description="Conversations sampled for calibration.")
    seqlen: int = Field(default=256, ge=16, description="Tokens per calibration sample; shorter conversations are "
                        "dropped by the tool, so keep this near the dataset's median length.")
    seed: int = Field(default=0, description="Sampling seed (same seed + dataset = same calibration set hash).")


class QuantizeConfig(StageConfig):
    """One quantized artifact: the base (multi-LoRA mode) or the adapter merged into it (merged mode)."""

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_.-]*$", description="Artifact name; also the registry suffix.")
    mode: Literal["multi_lora", "merged"] = Field(
        description="multi_lora: quantize the base, serve it with --enable-lora and hot-load adapters; merged: "
                    "merge the adapter into the base first and serve the result as its own model.")
    base_model: str = Field(default="smollm2-135m-instruct", description="Base model preset (configs/models/).")
    adapter: str | None = Field(default=None, description="Adapter folder or models:/ URI: merged into the base in "
                                "merged mode; evaluated on the quantized base in multi_lora mode.")
    tool: Literal["auto-round", "llm-compressor"] = Field(description="Quantization library.")
    scheme: str = Field(description="The tool's scheme name, e.g. W4A16, W2A16 (auto-round) or FP8_DYNAMIC, W4A16 "
                        "(llm-compressor).")
    bits: int | None = Field(default=None, ge=2, le=8, description="Weight bits (auto-round; None = the scheme's).")
    group_size: int | None = Field(default=None, description="Weights per quantization group (-1 = per channel; "
                                   "None = the scheme's). Must divide every quantized layer's input size.")
    sym: bool = Field(default=True, description="Symmetric weight quantization (auto-round).")
    iters: int = Field(default=0, ge=0, description="auto-round tuning steps per block; 0 = RTN (optimized RTN "
                       "still uses the calibration data for its importance weights).")
    optimized_rtn: bool = Field(default=True, description="With iters=0: auto-round's optimized RTN, which weighs "
                                "the rounding by activations of the calibration data; false = plain RTN (no "
                                "calibration pass, fastest).")
    algorithm: Literal["rtn", "gptq", "awq"] = Field(default="rtn", description="llm-compressor modifier: "
                                                     "rtn (QuantizationModifier), gptq or awq.")
    export_format: str = Field(description="Checkpoint format vLLM loads: auto_round / auto_gptq / auto_awq "
                               "(auto-round) or compressed-tensors (llm-compressor).")
    ignore: list[str] = Field(default_factory=lambda: ["lm_head"], description="Modules left unquantized.")
    calibration: CalibrationSettings = Field(default_factory=CalibrationSettings)
    eval_config: Path = Field(default=Path("configs/eval/quick.yaml"),
                              description="Evaluation config used for the bf16 reference and the quantized artifact.")
    policy: Path = Field(default=Path("configs/promotion.yaml"), description="Promotion policy whose "
                         "quantized_vs_bf16 rules judge the artifact at the end of the run.")
    register_version: bool = Field(default=True, description="Register the quantized model as its own registry version and "
                           "reference it from the evaluated adapter version; a checkpoint the policy refuses is "
                           "never registered.")

    @field_validator("export_format")
    @classmethod
    def written_by_tool(cls, value: str, info: ValidationInfo) -> str:
        formats = TOOL_FORMATS.get(info.data.get("tool"), ())
        if formats and value not in formats:
            raise ValueError(f"{info.data['tool']} does not write {value!r}; use one of {', '.join(formats)}")
        return value

    @field_validator("group_size")
    @classmethod
    def sensible_group(cls, value: int | None) -> int | None:
        if value is not None and value != -1 and value < 8:
            raise ValueError("use -1 (one group per output channel) or a group of at least 8 weights")
        return value
