"""Prefect tasks of the promote flow, and what a reviewer answers in the Prefect UI."""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NONE
from prefect.input import RunInput

from charforge import registry, scores
from charforge.faults import crash_point
from charforge.config import load_yaml_model
from charforge.promotion import Decision, decide, decision_markdown
from charforge.schemas.promote import PromotionPolicy
from charforge.settings import CONFIGS_DIR, repo_path
from tasks.runtime import TRANSIENT_RETRIES, flow_run_tags


class Approval(RunInput):
    """What a reviewer answers in the Prefect UI."""

    approve: bool
    comment: str = ""
    reviewer: str = ""


@task(name="load-policy", cache_policy=NONE)
def load_policy(policy_file: str | None) -> PromotionPolicy:
    return load_yaml_model(repo_path(policy_file) if policy_file else CONFIGS_DIR / "promotion.yaml", PromotionPolicy)


@task(name="resolve-candidate", cache_policy=NONE, **TRANSIENT_RETRIES)
def resolve_candidate(ref: str) -> registry.VersionRef:
    """The registry version to judge (`models:/name/version` or `@alias`), after completing an alias move an
    interrupted promotion of its model decided."""
    c = registry.client()
    version = registry.resolve_version(c, ref)
    finished = registry.finish_pending(c, version.name)
    if finished is not None:
        get_run_logger().warning(f"completed an interrupted promotion of {version.name}: champion "
                                 f"{finished.champion}, previous {finished.previous}")
    return registry.version_ref(version)


@task(name="find-champion", cache_policy=NONE, **TRANSIENT_RETRIES)
def champion_version(name: str) -> str | None:
    champion = registry.alias_version(registry.client(), name, registry.CHAMPION)
    return str(champion.version) if champion is not None else None


@task(name="gather-scores", cache_policy=NONE, **TRANSIENT_RETRIES)
def gather_scores(version: registry.VersionRef) -> scores.GateScores:
    """Candidate and base from the candidate's evaluation; the champion from the same evaluation when it scored the
    current champion, else from the champion's own evaluation on the same probes; the quantized-base scores when
    the version was evaluated on one."""
    return scores.gate_scores(version)


@task(name="decide-promotion", cache_policy=NONE)
def judge(gathered: scores.GateScores, policy: PromotionPolicy) -> Decision:
    return decide(gathered.candidate, gathered.champion, gathered.base, policy, quantized=gathered.quantized)


@task(name="record-decision", cache_policy=NONE, **TRANSIENT_RETRIES)
def record_decision(version: registry.VersionRef, decision: Decision, champion_source: str,
                    policy: PromotionPolicy) -> str:
    """The decision on the version (tags), in an MLflow run (decision.json + table) and as a Prefect artifact."""
    markdown = decision_markdown(version.name, version.version, decision, champion_source)
    deciding = decision.deciding
    against = "base" if deciding is not None and deciding.kind == "vs_base" else "champion"
    table = scores.side_by_side(version.tags.get("eval_run_id", ""), deciding.metric if deciding else None, against)
    run_id = registry.record_decision(version.name, version.version, decision, champion_source, policy, markdown,
                                      flow_run_tags(), table)
    create_markdown_artifact(key="promotion-decision", markdown=markdown,
                             description=f"Promotion decision for {version.name} v{version.version}")
    return run_id


@task(name="record-approval", cache_policy=NONE, **TRANSIENT_RETRIES)
def record_approval(version: registry.VersionRef, answer: Approval) -> bool:
    registry.record_approval(version.name, version.version, answer.approve, answer.comment, answer.reviewer)
    if not answer.approve:
        get_run_logger().warning(f"reviewer rejected {version.name} version {version.version}: {answer.comment}")
    return answer.approve


@task(name="move-aliases", cache_policy=NONE)
def move_aliases(version: registry.VersionRef) -> registry.AliasMove:
    """champion <- this version, previous <- the old champion, crash-safe (see `registry.promote_aliases`)."""
    moved = registry.promote_aliases(registry.client(), version.name, version.version, crash_hook=crash_point)
    get_run_logger().info(f"{version.name}: champion -> version {moved.champion} (previous: {moved.previous})")
    return moved
