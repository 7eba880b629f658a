"""Promotion flow: judge a registered candidate against the champion and the base with the policy, record why, ask a
human when the policy says so, and move the aliases.

Run it:  charforge promote --candidate models:/<name>/<version> [--policy configs/promotion.yaml]
                           [--approve | --reject] [--comment TEXT]

Re-running the promotion of the same version changes nothing. A crash after the decision is recorded leaves the
aliases as they were (plus a `pending_promotion` marker); the next run completes exactly that move.
"""

from __future__ import annotations

import json
import os
import signal
import tempfile
import time
from pathlib import Path

import mlflow
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NONE
from prefect.flow_runs import pause_flow_run
from prefect.input import RunInput

from charforge.config import ConfigError, load_yaml_model
from charforge.promotion import Decision, decide
from charforge.schemas.promote import PromotionPolicy
from charforge.settings import CONFIGS_DIR
from charforge.tracking import flow_run_tags, use_experiment
from charforge import registry


class Approval(RunInput):
    """What a reviewer answers in the Prefect UI."""

    approve: bool
    comment: str = ""
    reviewer: str = ""


def crash_point(name: str) -> None:
    """Fault injection for the reliability tests: SIGKILL this process at `name` when CHARFORGE_CRASH_AT says so."""
    if os.environ.get("CHARFORGE_CRASH_AT") == name:
        os.kill(os.getpid(), signal.SIGKILL)


def eval_scores(c, run_id: str) -> dict:
    """per_probe.json of an evaluation run: {model: {"<task>/<metric>": {probe: value}}}."""
    with tempfile.TemporaryDirectory() as tmp:
        path = c.download_artifacts(run_id, "per_probe.json", tmp)
        return json.loads(Path(path).read_text())


@task(name="gather-scores", cache_policy=NONE)
def gather_scores(name: str, version) -> tuple[dict, dict | None, dict | None, str]:
    """Candidate and base from the candidate's evaluation; the champion from the same evaluation when it scored the
    current champion, else from the champion's own evaluation on the same probes."""
    c = registry.client()
    run_id = version.tags.get("eval_run_id")
    if not run_id or version.tags.get("eval_status") != "passed":
        raise ConfigError(f"models:/{name}/{version.version} has no completed evaluation recorded; run "
                          f"`charforge evaluate --adapter models:/{name}/{version.version}` first")
    scores = eval_scores(c, run_id)
    champion = registry.alias_version(c, name, registry.CHAMPION)
    if champion is None:
        return scores["candidate"], None, scores.get("base"), "none (first version)"
    eval_run = c.get_run(run_id)
    if "champion" in scores and eval_run.data.tags.get("champion_adapter_sha256") == champion.tags.get(
            "adapter_sha256"):
        return scores["candidate"], scores["champion"], scores.get("base"), f"version {champion.version} (same run)"
    if champion.tags.get("eval_probes_sha256") != version.tags.get("eval_probes_sha256"):
        return scores["candidate"], {}, scores.get("base"), (
            f"version {champion.version} was evaluated on other probes; re-evaluate with --champion "
            f"models:/{name}/{champion.version}")
    champion_scores = eval_scores(c, champion.tags["eval_run_id"])["candidate"]
    return scores["candidate"], champion_scores, scores.get("base"), f"version {champion.version} (own evaluation)"


def gather_quantized(version) -> tuple[dict, dict] | None:
    """(scores on the quantized base, scores on the bf16 base) from the quantize run the version was evaluated in
    (tag `quantize_run_id`, set by `charforge quantize`), else None."""
    run_id = version.tags.get("quantize_run_id")
    if not run_id or run_id == "none":
        return None
    scores = eval_scores(registry.client(), run_id)
    return scores["quantized"], scores["bf16"]


def decision_markdown(name: str, version: str, decision: Decision, champion_source: str) -> str:
    verdict = "PROMOTE" if decision.promote else "REJECT"
    lines = [f"# Promotion of {name} version {version}: {verdict}", "", f"Champion compared: {champion_source}", "",
             "| check | passed | detail |", "|---|---|---|"]
    lines += [f"| {c.kind} | {'yes' if c.passed else '**no**'} | {c.detail} |" for c in decision.checks]
    lines += ["", "Reasons:", *[f"- {r}" for r in decision.reasons]]
    return "\n".join(lines) + "\n"


@task(name="record-decision", cache_policy=NONE, retries=2, retry_delay_seconds=5)
def record_decision(name: str, version: str, decision: Decision, champion_source: str, policy: PromotionPolicy) -> str:
    """The decision on the version (tags), in an MLflow run (decision.json + table) and as a Prefect artifact."""
    c = registry.client()
    markdown = decision_markdown(name, version, decision, champion_source)
    use_experiment("promote")
    with mlflow.start_run(run_name=f"{name}-v{version}") as run:
        mlflow.set_tags({"stage": "promote", "registered_model": name, "model_version": version, **flow_run_tags()})
        mlflow.log_params({"promote": decision.promote, "rules": len(policy.rules), "approval": policy.approval,
                           "champion_compared": champion_source[:250]})
        mlflow.log_dict(decision.as_dict(), "decision.json")
        mlflow.log_dict(policy.model_dump(mode="json"), "policy.json")
        mlflow.log_text(markdown, "decision.md")
    tags = {"promotion_decision": "promote" if decision.promote else "reject",
            "promotion_reasons": "; ".join(decision.reasons)[:5000], "promotion_run_id": run.info.run_id,
            "promotion_decided_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "approval": "pending" if decision.needs_approval else "not_required"}
    for key, value in tags.items():
        c.set_model_version_tag(name, version, key, value)
    create_markdown_artifact(key="promotion-decision", markdown=markdown,
                             description=f"Promotion decision for {name} v{version}")
    return run.info.run_id


@flow(name="promote")
def promote(candidate: str, policy_file: str | None = None, approve: bool | None = None, comment: str = "",
            interactive_hint: str = "", policy: PromotionPolicy | None = None) -> dict:
    """Judge `candidate` (models:/name/version or @alias) and, if it passes (and is approved), make it champion.
    `policy` (the retrain chain passes its parameter) wins over `policy_file`."""
    logger = get_run_logger()
    if policy is None:
        policy = load_yaml_model(Path(policy_file) if policy_file else CONFIGS_DIR / "promotion.yaml", PromotionPolicy)
    c = registry.client()
    version = registry.resolve_version(c, candidate)
    name = version.name
    finished = registry.finish_pending(c, name)
    if finished:
        logger.warning(f"completed an interrupted promotion of {name}: champion {finished['champion']}, "
                       f"previous {finished['previous']}")
    champion = registry.alias_version(c, name, registry.CHAMPION)
    if champion is not None and champion.version == version.version:
        logger.info(f"{name} version {version.version} is already champion; nothing to do")
        return {"name": name, "version": version.version, "promoted": True, "changed": False,
                "reasons": ["already champion"]}

    cand, champ, base, champion_source = gather_scores(name, version)
    decision = decide(cand, champ, base, policy, quantized=gather_quantized(version))
    record_decision(name, version.version, decision, champion_source, policy)
    crash_point("after_decision")
    result = {"name": name, "version": version.version, "promoted": False, "changed": False,
              "reasons": decision.reasons, "checks": [c_.detail for c_ in decision.checks]}
    if not decision.promote:
        logger.warning(f"{name} version {version.version} NOT promoted:\n- " + "\n- ".join(decision.reasons))
        return result

    if decision.needs_approval:
        if approve is None and interactive_hint:
            raise ConfigError(f"models:/{name}/{version.version} passes the policy and needs a reviewer's approval: "
                              f"{interactive_hint}")
        if approve is None:
            logger.info(f"waiting up to {policy.approval_timeout_s} s for a reviewer to approve {name} "
                        f"version {version.version} in the Prefect UI")
            answer = pause_flow_run(wait_for_input=Approval, timeout=policy.approval_timeout_s)
        else:
            answer = Approval(approve=approve, comment=comment, reviewer="command line")
        c.set_model_version_tag(name, version.version, "approval", "approved" if answer.approve else "rejected")
        c.set_model_version_tag(name, version.version, "approval_comment", answer.comment[:5000] or "-")
        c.set_model_version_tag(name, version.version, "approval_reviewer", answer.reviewer or "-")
        if not answer.approve:
            logger.warning(f"reviewer rejected {name} version {version.version}: {answer.comment}")
            return {**result, "reasons": [*decision.reasons, f"rejected by reviewer: {answer.comment}"]}

    moved = registry.promote_aliases(c, name, version.version, crash_hook=crash_point)
    logger.info(f"{name}: champion -> version {moved['champion']} (previous: {moved['previous']})")
    return {**result, "promoted": True, "changed": moved["changed"], "previous": moved["previous"]}
