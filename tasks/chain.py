"""Prefect tasks of the retrain chain: its parameters, its MLflow parent run and children, the gateway it deploys
through, reused evaluations, the lineage and the summary."""

from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger, task
from prefect.artifacts import create_link_artifact, create_markdown_artifact
from prefect.cache_policies import NONE

from charforge import chain_tracking as track
from charforge import registry
from charforge.chain import ChainParameters, chain_with, check_stages, evaluation_key, summary_text
from charforge.clock import utc
from charforge.checksums import MANIFEST, sha256_file
from charforge.errors import Refused
from charforge.results import (ChainDecision, ChainSummary, CuratedDataset, Deployment, Evaluation, PromotionOutcome,
                               Rollout, TrainedAdapter)
from charforge.schemas.quantize import QuantizeConfig
from charforge.schemas.serving import ServingConfig
from charforge.settings import platform, repo_path
from serving import daemon
from serving.admin import GatewayAdmin, GatewayUnavailable, gateway_healthy
from serving.rollout import route_names
from tasks.runtime import TRANSIENT_RETRIES, current_flow_run_id, flow_run_url, prefect_ui


class ChampionRef(registry.VersionRef):
    """The current champion of the adapter family, when there is one."""


@task(name="resolve-chain-parameters", cache_policy=NONE)
def resolve_parameters(config: str, overrides: dict[str, object]) -> ChainParameters:
    """The stage configs given to the flow, the rest from the chain file (read now, not when the flow is imported)."""
    return check_stages(chain_with(repo_path(config), overrides))


@task(name="open-chain-run", cache_policy=NONE, **TRANSIENT_RETRIES)
def open_chain_run(chain: ChainParameters) -> str:
    """The chain's parent run in MLflow (children follow per stage), linked from this Prefect run."""
    flow_run_id = current_flow_run_id()
    parent = track.open_chain_run({
        "train_config": chain.train.name, "characters": ",".join(chain.train.characters or ()) or "all",
        "eval_config": chain.evaluate.name, "eval_limit": chain.evaluate.limit or "all",
        "inputs": ",".join(i if isinstance(i, str) else f"production:{i.hours:g}h" for i in chain.inputs),
        "dataset_dir": chain.dataset_dir,
        "deploy": chain.deploy, "promotion_rules": len(chain.promotion.rules)},
        {"prefect_flow_run_id": flow_run_id or "none",
         "prefect_flow_run_url": flow_run_url(flow_run_id) if flow_run_id else "none"})
    create_link_artifact(key="mlflow-chain-run", link=track.run_url(parent), link_text="MLflow: this chain run",
                         description="The retrain chain's parent run in MLflow, with one child run per stage")
    return parent


@task(name="record-stage", cache_policy=NONE, **TRANSIENT_RETRIES)
def record_stage(parent: str, stage: str, stage_run_id: str | None, metrics: dict[str, float] | None = None,
                 tags: dict[str, str] | None = None, note: str = "") -> str:
    """The stage's child run under the chain's parent, with its headline numbers (its own run's metrics)."""
    if metrics is None and stage_run_id:
        metrics = track.stage_metrics(stage_run_id)
    return track.stage_child(parent, stage, stage_run_id, metrics=metrics, tags=tags, note=note)


@task(name="require-servable", cache_policy=NONE)
def require_servable(trained: TrainedAdapter) -> None:
    if not trained.servable:
        raise Refused("the adapter cannot be served by the fleet: " + "; ".join(trained.reasons))


@task(name="find-champion", cache_policy=NONE, **TRANSIENT_RETRIES)
def find_champion(train_config: str) -> ChampionRef | None:
    c = registry.client()
    found = registry.alias_version(c, registry.registered_name(train_config), registry.CHAMPION)
    return ChampionRef(**registry.version_ref(found).model_dump()) if found is not None else None


@task(name="keep-champion", cache_policy=NONE, **TRANSIENT_RETRIES)
def keep_champion(parent: str, champion: ChampionRef) -> ChainDecision:
    """The adapter is already champion: evaluation and promotion are skipped."""
    get_run_logger().info(f"adapter {champion.tags['adapter_sha256'][:12]} is already {champion.name} champion "
                          f"(version {champion.version}): evaluation and promotion skipped")
    eval_run = champion.tags.get("eval_run_id")
    record_stage.fn(parent, "evaluate", eval_run, tags={"skipped": "already champion"})
    return ChainDecision(registered_model=champion.name, version=champion.version, eval_run_id=eval_run,
                         eval_table="(already champion: not re-evaluated)", promoted=True, changed=False,
                         reasons=("already champion",))


@task(name="find-cached-evaluation", cache_policy=NONE, **TRANSIENT_RETRIES)
def cached_evaluation(chain: ChainParameters, trained: TrainedAdapter, champion: ChampionRef | None,
                      parent: str) -> Evaluation | None:
    """An earlier chain's evaluation of the same adapter, against the same champion, with the same config."""
    key = evaluation_key(chain.evaluate, trained.adapter_sha256, champion.tags.get("adapter_sha256") if champion
                         else None)
    found = track.find_evaluation(key)
    if found is not None:
        get_run_logger().info(f"reusing evaluation {found.mlflow_run_id} (same adapter, champion and config)")
        record_stage.fn(parent, "evaluate", found.mlflow_run_id, tags={"cached": "true"})
    return found


@task(name="record-evaluation", cache_policy=NONE, **TRANSIENT_RETRIES)
def record_evaluation(parent: str, evaluation: Evaluation, chain: ChainParameters, trained: TrainedAdapter,
                      champion: ChampionRef | None) -> str:
    key = evaluation_key(chain.evaluate, trained.adapter_sha256, champion.tags.get("adapter_sha256") if champion
                         else None)
    return track.record_evaluation(parent, evaluation, key)


@task(name="register-for-promotion", cache_policy=NONE, **TRANSIENT_RETRIES)
def register_for_promotion(chain: ChainParameters, trained: TrainedAdapter, evaluation: Evaluation) -> Evaluation:
    """The chain promotes a registry version: when its evaluation config does not register the candidate
    (`register_version: false`), the chain registers it here, as the evaluation would have."""
    if evaluation.registered is not None:
        return evaluation
    adapter_dir = Path(trained.adapter_dir)
    lineage = registry.adapter_lineage(adapter_dir / MANIFEST)
    registered = registry.register_candidate(adapter_dir, lineage, evaluation.mlflow_run_id,
                                             sha256_file(repo_path(chain.evaluate.probes)))
    get_run_logger().info(f"the evaluation config does not register versions (register_version: false); registered "
                          f"{registered.uri} for the promotion step")
    return evaluation.model_copy(update={"registered": registered})


@task(name="configure-quantization", cache_policy=NONE)
def quantization_for(chain: ChainParameters, trained: TrainedAdapter) -> QuantizeConfig:
    """The chain's quantize config on this adapter, calibrated on this chain's dataset."""
    q = chain.quantize
    return q.model_copy(update={"adapter": trained.adapter_dir, "calibration": q.calibration.model_copy(
        update={"dataset_dir": chain.dataset_dir})})


@task(name="record-promotion", cache_policy=NONE, **TRANSIENT_RETRIES)
def record_promotion(parent: str, outcome: PromotionOutcome, evaluation: Evaluation,
                     quantize_run_id: str | None) -> ChainDecision:
    tags = registry.client().get_model_version(outcome.name, outcome.version).tags
    record_stage.fn(parent, "promote", tags.get("promotion_run_id"),
                    metrics={"promote/promoted": float(outcome.promoted)},
                    tags={"promotion_decision": tags.get("promotion_decision", "none"),
                          "approval": tags.get("approval", "none"), "model_version": outcome.version},
                    note="\n".join(f"- {r}" for r in outcome.reasons))
    return ChainDecision(registered_model=outcome.name, version=outcome.version,
                         eval_run_id=evaluation.mlflow_run_id, eval_table=track.evaluation_table(evaluation),
                         eval_report=evaluation.report, quantize_run_id=quantize_run_id, promoted=outcome.promoted,
                         changed=outcome.changed, reasons=outcome.reasons)


def approval_hint(approve: bool | None) -> str:
    """Why a first champion cannot wait for a reviewer: there is no Prefect server to answer in."""
    import os

    if approve is not None or os.environ.get("PREFECT_API_URL"):
        return ""
    return "pass approve=true (charforge retrain --approve) or run against a Prefect server to answer in its UI"


@task(name="reach-gateway", cache_policy=NONE)
def reach_gateway(serving: ServingConfig, gateway_url: str | None, start_fleet: bool) -> GatewayAdmin:
    """The gateway to deploy through: the given URL, the configured one if it answers, else a fleet started with
    `charforge serve up` (detached: it outlives this flow run)."""
    url = (gateway_url or f"http://{serving.gateway.host}:{serving.gateway.port}").rstrip("/")
    if gateway_healthy(url):
        return GatewayAdmin(url, serving.gateway.admin_key(), "retrain", serving.gateway.metrics_urls)
    if gateway_url or not start_fleet or serving.fleet.discovery != "local":
        raise GatewayUnavailable(f"no gateway answers at {url}; start the fleet with `charforge serve up` (or pass "
                                 f"start_fleet=true) and re-run: every earlier stage is reused")
    get_run_logger().info(f"no gateway at {url}: starting {serving.fleet.replicas} replicas with `charforge serve up`")
    return GatewayAdmin(daemon.up_from_config(serving, progress=get_run_logger().info), serving.gateway.admin_key(),
                        "retrain", serving.gateway.metrics_urls)


@task(name="check-already-serving", cache_policy=NONE, **TRANSIENT_RETRIES)
def already_serving(gw: GatewayAdmin, decision: ChainDecision) -> Rollout | None:
    """A version the gateway already serves at 100% is left alone."""
    family = decision.registered_model.removeprefix(f"{platform().mlflow.experiment_prefix}-")
    served = f"{decision.registered_model}-v{decision.version}"
    if not gw.serves_only(family, served):
        return None
    get_run_logger().info(f"{served} already takes all traffic on {gw.url}: nothing to deploy")
    return Rollout(served=served, status="done", reason="already serving")


@task(name="record-deployment", cache_policy=NONE, **TRANSIENT_RETRIES)
def record_deployment(parent: str, gw: GatewayAdmin, serving: ServingConfig, decision: ChainDecision,
                      record: Rollout) -> Deployment:
    replicas = gw.replicas_serving(record.served)
    record_stage.fn(parent, "deploy", None, metrics={"deploy/replicas_serving": len(replicas)},
                    tags={"served_name": record.served, "rollout_status": record.status, "gateway_url": gw.url,
                          "replicas": ",".join(replicas)})
    family = decision.registered_model.removeprefix(f"{platform().mlflow.experiment_prefix}-")
    characters = registry.family_characters(registry.client().get_model_version(decision.registered_model,
                                                                                 decision.version).tags)
    routes = [r for r in route_names(serving, family, characters) if r != family]
    return Deployment(gateway_url=gw.url, served_name=record.served, rollout=record.status, replicas=tuple(replicas),
                      example_route=routes[0] if routes else family, api_key_env=serving.gateway.api_key_env,
                      deployed_at=utc())


@task(name="record-lineage", cache_policy=NONE, **TRANSIENT_RETRIES)
def record_lineage(parent: str, chain: ChainParameters, curated: CuratedDataset, trained: TrainedAdapter,
                   decision: ChainDecision, deployment: Deployment | None,
                   production_windows: tuple[str, ...] = ()) -> ChainSummary:
    """Lineage as tags on the registry version and as the `lineage` markdown artifact; the chain's summary."""
    summary = ChainSummary(
        registered_model=decision.registered_model, version=decision.version, dataset_hash=curated.dataset_hash,
        curation_cached=curated.cached, curate_run_id=curated.mlflow_run_id, train_run_id=trained.mlflow_run_id,
        adapter_sha256=trained.adapter_sha256, adapter_dir=trained.adapter_dir, eval_run_id=decision.eval_run_id,
        eval_table=decision.eval_table, eval_report=decision.eval_report, quantize_run_id=decision.quantize_run_id,
        promoted=decision.promoted, promotion_changed=decision.changed, reasons=decision.reasons,
        production_windows=production_windows, chain_run_id=parent, chain_run_url=track.run_url(parent),
        prefect_flow_run_url=flow_run_url(current_flow_run_id()) if current_flow_run_id() else None,
        **({"gateway_url": deployment.gateway_url, "served_name": deployment.served_name,
            "rollout": deployment.rollout, "replicas": deployment.replicas, "example_route": deployment.example_route,
            "api_key_env": deployment.api_key_env} if deployment else {}))
    markdown = track.record_lineage(summary, chain.dataset_dir, deployment.deployed_at if deployment else None)
    create_markdown_artifact(key="lineage", markdown=markdown,
                             description=f"Lineage of {summary.registered_model} v{summary.version}")
    return summary


@task(name="close-chain-run", cache_policy=NONE, **TRANSIENT_RETRIES)
def close_chain_run(parent: str, summary: ChainSummary | None, error: str | None, wall_s: float) -> ChainSummary | None:
    """The parent run ends FINISHED with the summary and headline metrics, or FAILED with the error; the summary
    becomes the `retrain-summary` artifact, and the run log gets one line pointing to it."""
    if summary is None:
        track.close_chain_run(parent, "FAILED", {"error": (error or "")[:2000]})
        return None
    summary = summary.model_copy(update={"wall_s": wall_s})
    track.log_metrics(parent, {"chain/wall_s": wall_s, "chain/promoted": float(summary.promoted),
                               "chain/curation_cached": float(summary.curation_cached)})
    track.close_chain_run(parent, "FINISHED", summary.model_dump(mode="json"))
    create_markdown_artifact(key="retrain-summary",
                             markdown=f"```\n{summary_text(summary, track.mlflow_ui(), prefect_ui()).strip()}\n```",
                             description=f"{summary.registered_model} v{summary.version}: evaluation, decision, "
                             "where it is served")
    outcome = ("not promoted" if not summary.promoted else "promoted to champion" if summary.promotion_changed
               else "already champion")
    get_run_logger().info(f"{summary.registered_model} version {summary.version} {outcome}; the evaluation table, "
                          "the decision and how to reach it are in the artifact 'retrain-summary'")
    return summary
