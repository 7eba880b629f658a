"""Promotion flow: judge a registered candidate against the champion and the base with the policy, record why, ask a
human when the policy says so, and move the aliases.

Run it:  charforge promote --candidate models:/<name>/<version> [--policy configs/promotion.yaml]
                           [--approve | --reject] [--comment TEXT]

Re-running the promotion of the same version changes nothing. A crash after the decision is recorded leaves the
aliases as they were (plus a `pending_promotion` marker); the next run completes exactly that move.
"""

from __future__ import annotations

from prefect import flow, get_run_logger
from prefect.flow_runs import pause_flow_run
from prefect.client.schemas.objects import State
from prefect.states import Completed

from charforge.errors import InputError
from charforge.faults import crash_point
from charforge.results import PromotionOutcome
from charforge.schemas.promote import PromotionPolicy
from tasks.promote import (Approval, champion_version, gather_scores, judge, load_policy, move_aliases,
                           record_approval, record_decision, resolve_candidate)


@flow(name="promote")
def promote(candidate: str, policy_file: str | None = None, approve: bool | None = None, comment: str = "",
            interactive_hint: str = "", policy: PromotionPolicy | None = None) -> PromotionOutcome:
    """Judge `candidate` (models:/name/version or @alias) and, if it passes (and is approved), make it champion.
    `policy` (the retrain chain passes its parameter) wins over `policy_file`."""
    logger = get_run_logger()
    policy = policy or load_policy(policy_file)
    version = resolve_candidate(candidate)
    outcome = PromotionOutcome(name=version.name, version=version.version, promoted=False)
    if champion_version(version.name) == version.version:
        logger.info(f"{version.name} version {version.version} is already champion; nothing to do")
        return outcome.model_copy(update={"promoted": True, "reasons": ("already champion",)})
    gathered = gather_scores(version)
    decision = judge(gathered, policy)
    record_decision(version, decision, gathered.champion_source, policy)
    crash_point("after_decision")
    outcome = outcome.model_copy(update={"reasons": tuple(decision.reasons),
                                         "checks": tuple(c.detail for c in decision.checks)})
    if not decision.promote:
        logger.warning(f"{version.name} version {version.version} NOT promoted:\n- " + "\n- ".join(decision.reasons))
        return refused(outcome, "Refused", decision.summary())
    if decision.needs_approval:
        answer = reviewer_answer(version.name, version.version, policy, approve, comment, interactive_hint)
        if not record_approval(version, answer):
            return refused(outcome.model_copy(update={"reasons": (*decision.reasons,
                                                                  f"rejected by reviewer: {answer.comment}")}),
                           "Rejected", f"rejected by {answer.reviewer or 'a reviewer'}: {answer.comment}")
    moved = move_aliases(version)
    return outcome.model_copy(update={"promoted": True, "changed": moved.changed, "previous": moved.previous})


def refused(outcome: PromotionOutcome, name: str, message: str) -> State:
    """A Completed state of its own name, so that the Prefect UI's runs list tells a refusal from a promotion at a
    glance; a caller of the flow still gets the outcome."""
    return Completed(name=name, message=message[:2000], data=outcome)


def reviewer_answer(name: str, version: str, policy: PromotionPolicy, approve: bool | None, comment: str,
                    interactive_hint: str) -> Approval:
    """The command line's answer, or a reviewer's in the Prefect UI (the flow run pauses until then)."""
    if approve is not None:
        return Approval(approve=approve, comment=comment, reviewer="command line")
    if interactive_hint:
        raise InputError(f"models:/{name}/{version} passes the policy and needs a reviewer's approval: "
                         f"{interactive_hint}")
    get_run_logger().info(f"waiting up to {policy.approval_timeout_s} s for a reviewer to approve {name} version "
                          f"{version} in the Prefect UI")
    return pause_flow_run(wait_for_input=Approval, timeout=policy.approval_timeout_s)
