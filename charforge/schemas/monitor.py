"""Character-drift monitoring (`configs/monitor.yaml`): which captured replies a window judges, with what limits, and
how often a crossing may be announced."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, field_validator, model_validator

from charforge.config import StageConfig

# What the monitor measures per captured reply (the evaluation's judges, `charforge/evaluation/`), and whether higher
# is better; `thumbs_down_ratio` is over the window's ratings, not its replies.
MONITOR_METRICS = {"ooc_rate": False, "assistant_voice_rate": False, "char_id_clf": True, "repetition": False,
                   "empty_rate": False, "thumbs_down_ratio": False}


class Limit(StageConfig):
    """A bound on a window's mean: `max` for rates where lower is better, `min` where higher is better."""

    max: float | None = Field(default=None, description="Crossed when the window's value is above it.")
    min: float | None = Field(default=None, description="Crossed when the window's value is below it.")

    @model_validator(mode="after")
    def _one_bound(self) -> Limit:
        if (self.max is None) == (self.min is None):
            raise ValueError("give exactly one of max or min")
        return self


class MonitorConfig(StageConfig):
    """One monitor run judges the replies captured in the last `window_minutes`, per route and served version."""

    name: str = Field(default="monitor", description="Shown in MLflow and the Prefect UI.")
    window_minutes: float = Field(default=60, gt=0, description="The window judged: captures of the last N minutes "
                                  "(an hourly deployment judges the last hour).")
    min_replies: int = Field(default=20, ge=1, description="A route and version with fewer captured replies in the "
                             "window is reported but not judged: too few to tell drift from noise.")
    min_ratings: int = Field(default=10, ge=1, description="The thumbs-down ratio is judged only with at least this "
                             "many ratings in the window.")
    confidence: float = Field(default=0.95, ge=0, lt=1, description="A window drifts on a metric only when the "
                              "whole confidence interval of its value is past the limit: a Wilson interval for the "
                              "rates (ooc, assistant voice, identification, empty, thumbs-down), a normal one for "
                              "mean repetition. With 12 replies, 3 identified (0.25, under min 0.40) is noise "
                              "(interval up to 0.53); 0 of 12 is drift (up to 0.24). 0: the point value alone.")
    cooldown_minutes: float = Field(default=360, ge=0, description="After a drift event for a route, version and "
                                    "metric, the same crossing emits no event for this long (one drift starts one "
                                    "run, not one per window).")
    retrain_after_ratings: int | None = Field(default=200, ge=1, description="Emit `charforge.feedback.ready` (the "
                                              "nightly retrain's trigger) once this many replies have been rated up "
                                              "since the last production window a retrain curated; null: never.")
    limits: dict[str, Limit] = Field(default_factory=lambda: {
        "ooc_rate": Limit(max=0.10), "assistant_voice_rate": Limit(max=0.15), "char_id_clf": Limit(min=0.40),
        "repetition": Limit(max=0.60), "empty_rate": Limit(max=0.05), "thumbs_down_ratio": Limit(max=0.30)},
        description="Per metric, the bound whose crossing is drift.")
    flag_replies: list[str] = Field(
        default_factory=lambda: ["ooc_rate", "assistant_voice_rate", "repetition", "empty_rate"],
        description="Per-reply metrics whose limit flags a single captured reply (its own value beyond the bound): "
        "a flagged reply is never a training target, even rated up; curation quarantines it as `monitor_flagged` "
        "and the preference stage may use it as a negative. [] flags nothing.")
    probes: Path = Field(default=Path("data/eval/probes.jsonl"), description="Evaluation probes the reply "
                         "classifier never learns from (as in evaluation).")
    characters_dir: Path = Field(default=Path("data/characters"), description="Persona cards (a reply's character "
                                 "is the card whose system prompt it was asked under).")

    @field_validator("limits")
    @classmethod
    def _known_metrics(cls, limits: dict[str, Limit]) -> dict[str, Limit]:
        for metric in limits:
            if metric not in MONITOR_METRICS:
                raise ValueError(f"unknown metric {metric!r}; the monitor measures {', '.join(MONITOR_METRICS)}")
        return limits

    @model_validator(mode="after")
    def _flags_have_limits(self) -> MonitorConfig:
        for metric in self.flag_replies:
            if metric == "thumbs_down_ratio" or metric not in MONITOR_METRICS:
                raise ValueError(f"flag_replies: {metric!r} is not a per-reply metric; choose from "
                                 f"{', '.join(m for m in MONITOR_METRICS if m != 'thumbs_down_ratio')}")
            if metric not in self.limits:
                raise ValueError(f"flag_replies: {metric!r} has no limit to flag a reply by; add it to limits")
        return self
