"""Prefect tasks of the deploy flow: each a step of `serving.rollout`, with the flow run's logger."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from prefect import get_run_logger, task
from prefect.cache_policies import NONE

from charforge import registry
from charforge.base_models import load_preset
from charforge.errors import InputError
from charforge.results import Rollout
from charforge.schemas.serving import ServingConfig
from charforge.settings import platform
from serving import rollout, state_store
from serving.admin import GatewayAdmin, ReplicaState
from serving.routing import Gate
from tasks.runtime import TRANSIENT_RETRIES


@task(name="check-fleet-takes-adapters", cache_policy=NONE)
def require_runtime_lora(cfg: ServingConfig, adapter: str) -> None:
    if not cfg.fleet.enable_lora:
        raise InputError(f"{adapter}: this fleet serves {cfg.fleet.checkpoint or cfg.fleet.base_model} without "
                         f"runtime LoRA (fleet.enable_lora: false), so adapters cannot be rolled out to it; merge "
                         f"the adapter (charforge quantize with a mode: merged config) and serve that checkpoint, "
                         f"or set fleet.enable_lora: true")


def rollout_records() -> state_store.FileRollouts | state_store.PostgresStore:
    """Where rollout records and locks live (`platform.serving_store`): files under the state directory, or the
    PostgreSQL every flow-run pod reaches."""
    return state_store.rollout_store(platform().state, state_store.store_url(platform().serving_store_url))


@contextmanager
def exclusive_rollout(family: str) -> Iterator[None]:
    """One rollout of a family at a time, across processes and pods (`serving.rollout.rollout_lock`)."""
    with rollout.rollout_lock(rollout_records(), family):
        yield


def gateway_admin(url: str, cfg: ServingConfig, actor: str = "deploy flow") -> GatewayAdmin:
    """The admin client, with the admin key read here from the environment (`gateway.admin_key_env`): a secret
    never travels as a flow parameter, where Prefect would store it and show it in its UI."""
    return GatewayAdmin(url, cfg.gateway.admin_key(), actor, cfg.gateway.metrics_urls)


@task(name="list-replicas", cache_policy=NONE, **TRANSIENT_RETRIES)
def list_replicas(gw: GatewayAdmin) -> list[ReplicaState]:
    return gw.replicas()


@task(name="resolve-version", cache_policy=NONE, **TRANSIENT_RETRIES)
def resolve_version(ref: str) -> registry.VersionRef:
    return registry.version_ref(registry.resolve_version(registry.client(), ref))


@task(name="prepare-rollout", cache_policy=NONE)
def prepare_rollout(version: registry.VersionRef, gw: GatewayAdmin, cfg: ServingConfig,
                    override: dict[str, str] | None = None) -> rollout.RolloutPlan:
    """Store and verify the artifact (a bad one never reaches a replica), find the rollback target, save the
    record."""
    preset = load_preset(cfg.fleet.base_model)
    return rollout.prepare(version.name, version.version, version.source, version.tags["adapter_sha256"], gw, cfg,
                           platform().state / "serving", rollout_records(), f"{platform().mlflow.experiment_prefix}-",
                           preset.name, preset.architecture, get_run_logger().warning, override,
                           registry.family_characters(version.tags))


@task(name="require-promoted", cache_policy=NONE, **TRANSIENT_RETRIES)
def require_promoted(version: registry.VersionRef, override_reason: str | None) -> dict[str, str] | None:
    """No bypass of the gate: only a promoted (and, where the policy asks, approved) version rolls out; an override
    with a reason is recorded on the version and in the rollout record."""
    override = registry.require_deployable(version, override_reason, deploy_actor())
    if override is not None:
        get_run_logger().warning(f"{version.uri}: deployed by override of {override['by']} although "
                                 f"{override['overridden']}: {override['reason']}")
    return override


def deploy_actor() -> str:
    """Who deploys: CHARFORGE_ACTOR when set (a CI job, an operator's name), else user@host, plus the Prefect flow
    run when there is one."""
    import getpass
    import os
    import socket

    from tasks.runtime import flow_run_tags

    who = os.environ.get("CHARFORGE_ACTOR") or f"{getpass.getuser()}@{socket.gethostname()}"
    run = flow_run_tags().get("prefect_flow_run_id")
    return f"{who} (flow run {run})" if run else who


@task(name="retire-old-versions", cache_policy=NONE)
def retire_old_versions(gw: GatewayAdmin, plan: rollout.RolloutPlan) -> list[str]:
    retired = rollout.retire(gw, plan)
    if retired:
        get_run_logger().info(f"retired {', '.join(retired)} (no route weights them or rolls back to them)")
    return retired


@task(name="stage-on-replica", cache_policy=NONE)
def stage(url: str, plan: rollout.RolloutPlan, smoke_prompt: str) -> str:
    """Load without traffic and prove the replica serves this artifact with an effect."""
    return rollout.stage_on_replica(url, plan, smoke_prompt, get_run_logger().warning)


@task(name="record-staging", cache_policy=NONE)
def record_staging(plan: rollout.RolloutPlan, url: str, answer: str) -> Rollout:
    """What a replica answered to staging, in the rollout record."""
    record = rollout.read_record(plan)
    return rollout.save_record(plan, record.model_copy(update={"replicas": {**record.replicas, url: answer}}))


@task(name="require-staged", cache_policy=NONE)
def require_staged(plan: rollout.RolloutPlan) -> Rollout:
    """At least one replica took the version; the record as staging left it."""
    record = rollout.read_record(plan)
    if not any(v == "staged" for v in record.replicas.values()):
        raise rollout.NoReplicaToStage(f"no healthy replica took {plan.served}: {record.replicas or 'no replicas'}")
    return record


@task(name="canary-step", cache_policy=NONE)
def canary_step(gw: GatewayAdmin, plan: rollout.RolloutPlan, record: Rollout, pct: float,
                cfg: ServingConfig) -> Rollout:
    """`pct` percent of every route on the new version, held and judged; rolled back at once if the gate fails."""
    logger = get_run_logger()
    outcome = rollout.canary_step(gw, plan, record, pct, Gate(**cfg.rollout.gate.model_dump()), cfg.rollout,
                                  logger.info)
    if outcome.status == "rolled_back":
        logger.warning(f"rolled back {plan.served}: {outcome.reason}")
    return outcome


@task(name="finish-rollout", cache_policy=NONE)
def finish_rollout(plan: rollout.RolloutPlan, record: Rollout) -> Rollout:
    return record if record.status in ("done", "rolled_back") else rollout.finish(plan, record)


@task(name="release-to-placement", cache_policy=NONE)
def release_to_placement(plan: rollout.RolloutPlan) -> list[str]:
    """With `gateway.placement`: the family's versions go from every replica's desired state to the catalogue the
    gateway places from on demand (`serving.rollout.release`)."""
    moved = rollout.release(plan)
    if moved:
        get_run_logger().info(f"{', '.join(moved)}: placed on demand from now on ({plan.catalogue_path}); no longer "
                              f"pinned on every replica")
    return moved


@task(name="roll-back-version", cache_policy=NONE, **TRANSIENT_RETRIES)
def roll_back_version(gw: GatewayAdmin, version: str, reason: str) -> tuple[str, ...]:
    """Every route that gives `version` traffic flipped back to its previous weights (the previous version is still
    loaded: one routing-table write per route). A route without previous weights is named in the log, not changed.
    Returns the routes rolled back."""
    log = get_run_logger()
    done = []
    for name, route in gw.routes().items():
        if route.weights.get(version, 0) <= 0:
            continue
        if not route.previous:
            log.warning(f"route {name}: {version} has {route.weights[version]:g}% and there is no previous state to "
                        f"roll back to; left as it is")
            continue
        weights = gw.rollback(name)
        log.warning(f"route {name}: {version} rolled back ({reason}); weights now {weights}")
        done.append(name)
    if not done:
        log.info(f"no route gives {version} traffic: nothing to roll back")
    return tuple(done)

