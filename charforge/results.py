"""What each stage hands to the next: small frozen pydantic models.

The flows return them, the chain, the command line and the tests read them by attribute, and Prefect stores them
as flow and task results (they pickle and serialize to JSON). Paths are strings, so a result means the same on any
machine that reads it; nothing here is `Any`, and maps hold plain values or other results.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict


class StageResult(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", coerce_numbers_to_str=True)


# ---- curation ----------------------------------------------------------------------------------------------------
class CuratedDataset(StageResult):
    """A curated dataset folder (train/eval/rejected JSONL + manifest.json) and its MLflow lineage run."""

    dataset_dir: str
    manifest: str
    dataset_hash: str
    mlflow_run_id: str = ""
    cached: bool = False  # the heavy pass was served from Prefect's cache (same inputs, outputs intact)


class ProductionWindow(StageResult):
    """Captured conversations of a window, exported as one curation input (data/raw's JSONL format)."""

    path: str
    since: str  # UTC, ISO 8601
    until: str
    conversations: int
    rated_up: int
    rated_down: int
    sha256: str

    def describe(self) -> str:
        return (f"{self.since}..{self.until}: {self.conversations} captured conversations ({self.rated_up} rated up, "
                f"{self.rated_down} rated down, {self.conversations - self.rated_up - self.rated_down} unrated); "
                f"{Path(self.path).name}")


# ---- training ----------------------------------------------------------------------------------------------------
class TrainedAdapter(StageResult):
    """A finished training run: the exported, checksummed adapter and whether the fleet can serve it."""

    adapter_dir: str
    adapter_sha256: str
    servable: bool
    reasons: tuple[str, ...] = ()  # why it cannot be served (empty when servable)
    mlflow_run_id: str
    run_dir: str
    global_step: int
    resumed_from: str | None = None
    dataset_hash: str


# ---- evaluation --------------------------------------------------------------------------------------------------
class MetricSummary(StageResult):
    """One metric of one task for one served model: the point value, its bootstrap CI, and per character."""

    value: float
    ci_low: float
    ci_high: float
    n: int
    per_character: dict[str, float] = {}


# task -> metric -> summary, for one served model
ModelScores = dict[str, dict[str, MetricSummary]]


class ParityExample(StageResult):
    hf: str
    vllm: str


class Parity(StageResult):
    """Train/serve parity: prompt tokens matched; share of prompts whose greedy tokens agree."""

    prompts: int
    tokens: int
    template_source: str
    first_token_agreement: float
    prefix_agreement: float
    examples: tuple[ParityExample, ...] = ()


class RegisteredVersion(StageResult):
    name: str
    version: str
    uri: str


class Evaluation(StageResult):
    """One evaluation run: scores per served model (candidate, base, champion), parity, where the files are."""

    mlflow_run_id: str
    run_dir: str
    report: str
    chart: str
    summaries: dict[str, ModelScores]  # display name (candidate, base, champion) -> scores
    targets: dict[str, str]  # display name -> the name vLLM served it under
    primary: Literal["candidate", "base"]
    parity: Parity | None = None
    serving: dict[str, float] = {}  # load_s, tokens_per_s of the primary model
    registered: RegisteredVersion | None = None
    reused_scores: dict[str, str] = {}  # display name -> the evaluation run whose scores were reused


# ---- promotion ---------------------------------------------------------------------------------------------------
class PromotionOutcome(StageResult):
    """The gate's verdict on a registered version, and whether the champion alias moved."""

    name: str
    version: str
    promoted: bool
    changed: bool = False
    reasons: tuple[str, ...] = ()
    checks: tuple[str, ...] = ()
    previous: str | None = None


# ---- quantization ------------------------------------------------------------------------------------------------
class QuantizationGate(StageResult):
    verdict: Literal["pass", "refuse"]
    checks: tuple[str, ...] = ()


class RegisteredCheckpoint(StageResult):
    uri: str
    adapter_version: str | None = None  # the adapter version that references it, when there is one


class Quantization(StageResult):
    checkpoint: str
    mlflow_run_id: str
    table: str
    deltas: dict[str, float]
    gate: QuantizationGate
    registered: RegisteredCheckpoint | None = None


# ---- deployment --------------------------------------------------------------------------------------------------
RolloutStatus = Literal["staging", "canary", "done", "rolled_back", "stopped"]  # stopped: a route changed under it


class Rollout(StageResult):
    """A rollout of one version onto the fleet, as recorded under `<state>/serving/rollouts/<family>.json`: where
    it stands, what it switched away from (the rollback target) and what each replica answered."""

    served: str
    status: RolloutStatus
    version: str = ""
    folder: str = ""
    previous: dict[str, dict[str, float]] = {}  # route -> weights before the rollout
    generations: dict[str, int] = {}  # route -> its generation after this rollout's last write (compare-and-set)
    replicas: dict[str, str] = {}  # replica URL -> staged | out of rotation (...) | skipped (unhealthy)
    step: float | None = None
    started: float = 0.0
    finished: float | None = None
    reason: str | None = None
    override: dict[str, str] | None = None  # by, reason, overridden, at: a version deployed without a promotion


# ---- the chain ---------------------------------------------------------------------------------------------------
class ChainDecision(StageResult):
    """The chain's evaluation and promotion of one adapter (or why they were skipped)."""

    registered_model: str
    version: str
    eval_run_id: str | None
    eval_table: str
    eval_report: str | None = None
    quantize_run_id: str | None = None
    promoted: bool
    changed: bool
    reasons: tuple[str, ...]


class Deployment(StageResult):
    """Where the chain's champion is served after its rollout."""

    gateway_url: str
    served_name: str
    rollout: str  # the rollout's status
    replicas: tuple[str, ...]
    example_route: str
    api_key_env: str | None = None
    deployed_at: str


class ChainSummary(StageResult):
    """What a retrain run did, end to end: the dataset, the adapter, its evaluation, the decision, where it runs."""

    registered_model: str
    version: str
    dataset_hash: str
    curation_cached: bool
    curate_run_id: str
    train_run_id: str
    adapter_sha256: str
    adapter_dir: str
    eval_run_id: str | None
    eval_table: str
    eval_report: str | None = None
    quantize_run_id: str | None = None
    promoted: bool
    promotion_changed: bool
    reasons: tuple[str, ...]
    gateway_url: str | None = None
    served_name: str | None = None
    rollout: str | None = None
    replicas: tuple[str, ...] = ()
    example_route: str | None = None
    api_key_env: str | None = None
    chain_run_id: str = ""
    chain_run_url: str = ""
    wall_s: float = 0.0
    prefect_flow_run_url: str | None = None
    production_windows: tuple[str, ...] = ()  # the captured-conversation windows curation read (ProductionWindow)


# ---- monitoring --------------------------------------------------------------------------------------------------
class Crossing(StageResult):
    """A window's value beyond its limit, with the whole confidence interval past it: `bound` is the interval's end
    nearest the limit (the lower end against a `max`, the upper end against a `min`)."""

    metric: str
    value: float
    limit: str  # "max 0.1" / "min 0.4"
    bound: float


class WindowJudgement(StageResult):
    """One route and served version over one monitor window."""

    route: str
    version: str
    since: float
    until: float
    captured: int  # captured conversations of the window
    replies: int  # those the judges could score (a known character, a 200 answer)
    ratings: int
    judged: bool  # at least min_replies replies: the per-reply metrics count (the thumbs-down ratio has its own min)
    reason: str = ""
    flagged: int = 0  # replies flagged one by one (`flag_replies`): never training targets
    values: dict[str, float] = {}
    crossings: tuple[Crossing, ...] = ()


class DriftEvent(StageResult):
    """A Prefect event the monitor emitted (or held back in cooldown)."""

    event: str
    route: str
    version: str
    role: str  # champion / canary / base
    metrics: tuple[str, ...]
    emitted: bool
    event_id: str | None = None


class FeedbackReady(StageResult):
    """Replies rated up since the last production window a retrain curated, and whether that was announced."""

    rated_up_since: str
    rated_up: int
    needed: int  # retrain_after_ratings (0: never announced)
    emitted: bool
    event_id: str | None = None


class MonitorSummary(StageResult):
    """What one monitor run judged, where it logged it and what it announced."""

    since: str
    until: str
    judgements: tuple[WindowJudgement, ...]
    events: tuple[DriftEvent, ...]
    feedback: FeedbackReady | None = None
    mlflow_run_id: str = ""

