"""Promotion policy (`configs/promotion.yaml`): when a candidate adapter may become `champion`."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from charforge.config import StageConfig

# Metrics with one value per probe, which is what paired bootstrap CIs need (corpus metrics such as macro-F1 are
# reported by the evaluation but cannot be gated per probe).
GATEABLE_METRICS = {
    "character_mc/acc": True, "character_mc/acc_norm": True, "character_mc/acc_mutual_info": True,
    "character_reply_likelihood/bits_per_byte": False,
    "character_reply_likelihood/persona_effect_bpb": True,
    "character_generation/char_id_acc": True, "character_generation/char_id_clf": True,
    "character_boundaries/char_id_clf": True, "character_generation/persona_margin": True,
    "character_generation/ref_sim": True, "character_generation/ooc_rate": False,
    "character_generation/assistant_voice_rate": False, "character_generation/style_marker_rate": True,
    "character_generation/empty_rate": False, "character_generation/repetition": False,
    "character_boundaries/boundary_ok": True, "character_boundaries/ooc_rate": False,
    "character_boundaries/assistant_voice_rate": False,
}


class Comparison(StageConfig):
    """A paired comparison on the same probes, judged on the 95% CI of the improvement (candidate minus other,
    signed so that positive is better): its lower bound must reach `min_improvement`, or stay above
    `-max_regression`."""

    min_improvement: float | None = Field(default=None, description="CI lower bound of the gain must be >= this.")
    max_regression: float | None = Field(default=None, ge=0, description="CI lower bound must be >= -this.")

    @model_validator(mode="after")
    def one_bound(self) -> "Comparison":
        if (self.min_improvement is None) == (self.max_regression is None):
            raise ValueError("set exactly one of min_improvement or max_regression")
        return self

    @property
    def threshold(self) -> float:
        return self.min_improvement if self.min_improvement is not None else -self.max_regression


class Rule(StageConfig):
    """What one metric must satisfy."""

    metric: str = Field(description="<task>/<metric>, one of the per-probe metrics.")
    vs_base: Comparison | None = Field(default=None, description="Against the base model (same prompts).")
    vs_champion: Comparison | None = Field(default=None, description="Against the current champion.")
    quantized_vs_bf16: Comparison | None = Field(
        default=None, description="The adapter served on a quantized base vs the same adapter on the bf16 base "
        "(same prompts): the largest drop quantization may cost. Checked when the version was evaluated on a "
        "quantized base (`charforge quantize`).")
    max: float | None = Field(default=None, description="Absolute cap on the candidate's mean.")
    min: float | None = Field(default=None, description="Absolute floor on the candidate's mean.")

    @model_validator(mode="after")
    def known_metric(self) -> "Rule":
        if self.metric not in GATEABLE_METRICS:
            raise ValueError(f"metric {self.metric!r} cannot be gated per probe; use one of "
                             f"{', '.join(sorted(GATEABLE_METRICS))}")
        return self

    @property
    def higher_is_better(self) -> bool:
        return GATEABLE_METRICS[self.metric]


class PromotionPolicy(StageConfig):
    """The gate between `candidate` and `champion`."""

    confidence: float = Field(default=0.95, gt=0.5, lt=1, description="Two-sided CI level of the comparisons.")
    resamples: int = Field(default=2000, ge=200, description="Paired bootstrap resamples.")
    rules: list[Rule] = Field(min_length=1, description="Every rule must pass to promote.")
    approval: Literal["never", "first_version", "always"] = Field(
        default="first_version",
        description="When a passing decision waits for a human in the Prefect UI. With no champion yet (the first "
                    "version) the vs-champion checks cannot run, so by default a human confirms that one.",
    )
    approval_timeout_s: int = Field(default=3600, ge=10, description="How long the flow waits for a reviewer.")
