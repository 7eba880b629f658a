"""Rolling deployment of a registered adapter version onto the fleet behind the gateway.

Run it:  charforge deploy --adapter models:/<name>@champion      charforge rollback [ROUTE]
         charforge deploy --adapter models:/<name>/<version> --override --reason TEXT   (a version not promoted)

0. no bypass: a version the promotion gate did not pass (or a reviewer did not approve) is refused (exit 3) unless
   `--override --reason` says why; who and why are recorded on the version and in the rollout record;

1. pre-flight: materialize the version into the content-addressed store and verify sha256 + servability
   (a bad artifact never reaches a replica);
2. retire versions no route weights or can roll back to (unloaded everywhere, their files deleted);
3. stage on every healthy replica, no traffic: load as `<name>-v<version>`, confirm `/v1/models` lists it with our
   folder as `root`, and check a smoke prompt answers differently than the base;
4. canary: the new version's weight goes through `rollout.steps` on every route of the family; each step is held
   and gated on the gateway's per-version error rate and p95 latency; a failing gate restores the previous
   weights at once. The previous version stays loaded: rollback is one routing-table write.
5. with on-demand placement (`gateway.placement`), the family's versions then leave the desired state (loaded on
   every replica) for the placement catalogue: the gateway keeps them where requests need them, so a fleet serves
   more adapter families than a replica holds.

The rollout record under `<state>/serving/rollouts/` says where a crashed deployment stopped; a re-run resumes it
with the same rollback target. A lock per adapter family refuses a second concurrent rollout. A replica that
cannot take the load (no answer, 502-504) is retried with backoff, then left out; a bad artifact aborts at once.
The steps themselves are `serving/rollout.py`.
"""

from __future__ import annotations

from prefect import flow

from charforge.results import Rollout
from charforge.schemas.serving import ServingConfig
from tasks.deploy import (canary_step, exclusive_rollout, finish_rollout, gateway_admin, list_replicas,
                          prepare_rollout, record_staging, release_to_placement, require_promoted,
                          require_runtime_lora, require_staged, resolve_version, retire_old_versions, roll_back_version,
                          stage)


@flow(name="deploy")
def deploy(adapter: str, gateway_url: str, config: ServingConfig | None = None,
           override_reason: str | None = None) -> Rollout:
    """Roll `adapter` (models:/<name>/<version> or @alias) out through the gateway at `gateway_url`; the admin key
    comes from the environment (`gateway.admin_key_env`), never from a parameter. Only a version the promotion gate
    passed rolls out, unless `override_reason` says why another must (recorded on the version and the rollout)."""
    cfg = config or ServingConfig()
    require_runtime_lora(cfg, adapter)
    version = resolve_version(adapter)
    override = require_promoted(version, override_reason)
    gw = gateway_admin(gateway_url, cfg, f"deploy {adapter}")
    with exclusive_rollout(version.name):
        plan = prepare_rollout(version, gw, cfg, override)
        retire_old_versions(gw, plan)
        for replica in list_replicas(gw):
            record_staging(plan, replica.url, stage(replica.url, plan, cfg.rollout.smoke_prompt) if replica.healthy
                           else "skipped (unhealthy)")
        record = require_staged(plan)
        for pct in cfg.rollout.steps:
            record = canary_step(gw, plan, record, pct, cfg)
            if record.status in ("done", "rolled_back"):
                break
        record = finish_rollout(plan, record)
        release_to_placement(plan)
        return record


@flow(name="rollback")
def rollback(version: str, reason: str = "", gateway_url: str | None = None,
             config: ServingConfig | None = None) -> tuple[str, ...]:
    """Take `version` (a served name, `<registered model>-v<N>`) out of traffic: every route that sends it requests
    goes back to its previous weights. The `rollback` deployment runs it when the monitor reports a drifting canary
    (prefect.yaml); a rollout still stepping that version stops at its next step (its route changed under it)."""
    cfg = config or ServingConfig()
    gw = gateway_admin(gateway_url or f"http://{cfg.gateway.host}:{cfg.gateway.port}", cfg,
                       f"rollback flow ({reason or 'no reason given'})")
    return roll_back_version(gw, version, reason)

