"""The retrain chain: curate -> train -> evaluate (candidate vs base vs champion) -> [quantize + evaluate quantized]
-> promote -> deploy, each stage its own flow called here as a subflow; what passes between them is paths, hashes
and registry URIs.

Run it:  charforge retrain [--config configs/retrain/default.yaml] [--approve --comment TEXT]
         or "Run" on the `retrain` deployment in the Prefect UI (prefect.yaml): the stage configs are its form.

Unchanged inputs are reused rather than recomputed: curation is cached on its input fingerprint, training on its
run identity (a finished run returns its adapter), an evaluation on (adapter, champion, evaluation config); a
candidate that is already champion skips evaluation and promotion, and a version the gateway already serves at 100%
is not rolled out again. Every stage is safe to retry (curation and training resume, evaluation writes a new run,
promotion and deployment complete an interrupted run), so each subflow gets one retry.

The reviewer's view is one MLflow parent run per chain run in `charforge-retrain` (charforge/chain_tracking.py), and
the lineage (dataset -> training run -> adapter -> evaluations -> version -> replicas) is written as tags on the
registry version and as the Prefect markdown artifact `lineage`.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from pathlib import Path

import httpx
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_link_artifact, create_markdown_artifact
from prefect.cache_policies import NONE

from charforge.config import load_yaml_model
from charforge.schemas.curate import CurateConfig
from charforge.schemas.evaluate import EvalConfig
from charforge.schemas.promote import PromotionPolicy
from charforge.schemas.quantize import QuantizeConfig
from charforge.schemas.retrain import RetrainConfig
from charforge.schemas.serving import ServingConfig
from charforge.schemas.train import TrainConfig
from charforge.settings import CONFIGS_DIR, platform, repo_path
from flows.curate import curate as curate_flow
from flows.deploy import deploy as deploy_flow, route_names
from flows.evaluate import evaluate as evaluate_flow
from flows.promote import promote as promote_flow
from flows.quantize import quantize as quantize_flow
from flows.train import train as train_flow
from charforge import chain_tracking as track
from charforge import registry
from charforge.evaluation.report import score_table

STAGE_SCHEMAS = {"curate": CurateConfig, "train": TrainConfig, "evaluate": EvalConfig,
                 "promotion": PromotionPolicy, "serving": ServingConfig}


def chain_parameters(path: Path) -> dict:
    """A `configs/retrain/*.yaml` file as the retrain flow's keyword arguments (stage files loaded and validated)."""
    cfg = load_yaml_model(path, RetrainConfig)
    params = {stage: load_yaml_model(repo_path(getattr(cfg, stage)), schema) for stage, schema in STAGE_SCHEMAS.items()}
    params["quantize"] = load_yaml_model(repo_path(cfg.quantize), QuantizeConfig) if cfg.quantize else None
    return {**params, "inputs": list(cfg.inputs), "dataset_dir": cfg.dataset_dir, "deploy": cfg.deploy,
            "start_fleet": cfg.start_fleet}


DEFAULTS = chain_parameters(CONFIGS_DIR / "retrain" / "default.yaml")


def api_key(serving: ServingConfig) -> str | None:
    return os.environ.get(serving.gateway.api_key_env) if serving.gateway.api_key_env else None


def gateway_get(url: str, path: str, key: str | None):
    headers = {"authorization": f"Bearer {key}"} if key else {}
    response = httpx.get(f"{url}{path}", headers=headers, timeout=10)
    response.raise_for_status()
    return response.json()


def gateway_healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=3).status_code == 200
    except httpx.HTTPError:
        return False


@task(name="reach-gateway", cache_policy=NONE)
def reach_gateway(serving: ServingConfig, gateway_url: str | None, start_fleet: bool) -> str:
    """The gateway to deploy through: the given URL, the configured one if it answers, else a fleet started with
    `charforge serve up` (detached: it outlives this flow run)."""
    url = (gateway_url or f"http://{serving.gateway.host}:{serving.gateway.port}").rstrip("/")
    if gateway_healthy(url):
        return url
    if gateway_url or not start_fleet or serving.fleet.discovery != "local":
        raise RuntimeError(f"no gateway answers at {url}; start the fleet with `charforge serve up` (or pass "
                           f"start_fleet=true) and re-run: every earlier stage is reused")
    import yaml

    from serving import daemon

    config_path = platform().state / "serving" / "retrain-serving.yaml"  # `serve run` reads its config from a file
    config_path.parent.mkdir(parents=True, exist_ok=True)
    config_path.write_text(yaml.safe_dump(serving.model_dump(mode="json"), sort_keys=False))
    get_run_logger().info(f"no gateway at {url}: starting {serving.fleet.replicas} replicas with `charforge serve up`")
    return daemon.up(config_path, serving, progress=get_run_logger().info).rstrip("/")


def already_serving(url: str, key: str | None, family: str, served: str) -> bool:
    routes = gateway_get(url, "/admin/routes", key)
    return routes.get(family, {}).get("weights") == {served: 100.0}


def replicas_serving(url: str, key: str | None, served: str) -> list[str]:
    return [r["url"] for r in gateway_get(url, "/admin/replicas", key) if r["healthy"] and served in r["loaded"]]


@task(name="check-curation-cache", cache_policy=NONE)
def curation_was_cached(flow_run_id: str) -> bool:
    """Whether the curate subflow's heavy task was served from Prefect's cache (its state is named Cached)."""
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, TaskRunFilter, TaskRunFilterName

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])),
                                     task_run_filter=TaskRunFilter(name=TaskRunFilterName(like_="curate-dataset")))
    return any(r.state is not None and r.state.name == "Cached" for r in runs)


def evaluation_key(evaluate: EvalConfig, adapter_sha: str, champion_sha: str | None) -> str:
    payload = json.dumps([evaluate.model_dump(mode="json"), adapter_sha, champion_sha], sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:24]


@task(name="find-cached-evaluation", cache_policy=NONE)
def cached_evaluation(key: str) -> dict | None:
    """An earlier chain's evaluation of the same adapter, against the same champion, with the same config."""
    c = track.client()
    experiment = c.get_experiment_by_name(f"{platform().mlflow.experiment_prefix}-retrain")
    if experiment is None:
        return None
    runs = c.search_runs([experiment.experiment_id], f"tags.evaluation_key = '{key}' and tags.stage = 'evaluate'",
                         max_results=1)
    if not runs:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        return json.loads(Path(c.download_artifacts(runs[0].info.run_id, "evaluation_result.json", tmp)).read_text())


@task(name="record-stage", cache_policy=NONE, retries=2, retry_delay_seconds=5)
def record_stage(parent: str, stage: str, stage_run_id: str | None, metrics: dict | None = None,
                 tags: dict | None = None, note: str = "") -> str:
    if metrics is None and stage_run_id:
        metrics = track.stage_metrics(stage_run_id)
    return track.stage_child(parent, stage, stage_run_id, metrics=metrics, tags=tags, note=note)


@task(name="record-evaluation", cache_policy=NONE, retries=2, retry_delay_seconds=5)
def record_evaluation(parent: str, evaluated: dict, key: str) -> str:
    child = track.record_evaluation(parent, evaluated)
    kept = {k: evaluated[k] for k in ("mlflow_run_id", "report", "chart", "run_dir", "targets", "registered")
            if k in evaluated}
    c = track.client()
    c.set_tag(child, "evaluation_key", key)
    c.log_dict(child, {**kept, "table": score_table(evaluated["summaries"])}, "evaluation_result.json")
    return child


@task(name="record-lineage", cache_policy=NONE, retries=2, retry_delay_seconds=5)
def record_lineage(lineage: dict) -> str:
    """Lineage as tags on the registry version and as the `lineage` markdown artifact of this flow run."""
    name, version = lineage["registered_model"], lineage["version"]
    c = registry.client()
    lineage["aliases"] = sorted(a for a, v in c.get_registered_model(name).aliases.items() if str(v) == version)
    tags = {"chain_run_id": lineage["chain_run_id"], "chain_run_url": lineage["chain_run_url"],
            "curate_run_id": lineage["curate_run_id"], "dataset_dir": lineage["dataset_dir"],
            "served_by": ",".join(lineage.get("replicas", [])) or "none",
            "served_name": lineage.get("served_name", "none"), "gateway_url": lineage.get("gateway_url", "none"),
            "retrain_prefect_flow_run_url": lineage.get("prefect_flow_run_url", "none")}
    if lineage.get("deployed_at"):
        tags["deployed_at"] = lineage["deployed_at"]
    for role, entry in lineage.get("evaluations", {}).items():
        tags[f"eval_run_id_{role}"] = entry["run_id"]
    track.tag_version_lineage(name, version, tags)
    markdown = track.lineage_markdown(lineage)
    create_markdown_artifact(key="lineage", markdown=markdown, description=f"Lineage of {name} v{version}")
    track.client().log_text(lineage["chain_run_id"], markdown, "lineage.md")
    return markdown


def stage_run_id(flow_state) -> str:
    return str(flow_state.state_details.flow_run_id)


# log_prints stays off: it would be inherited by the train subflow, where `datasets` fingerprints functions by
# printing their disassembly (thousands of lines into the run log).
@flow(name="retrain")
def retrain(
    curate: CurateConfig = DEFAULTS["curate"],
    train: TrainConfig = DEFAULTS["train"],
    evaluate: EvalConfig = DEFAULTS["evaluate"],
    promotion: PromotionPolicy = DEFAULTS["promotion"],
    serving: ServingConfig = DEFAULTS["serving"],
    quantize: QuantizeConfig | None = DEFAULTS["quantize"],
    inputs: list[str] = DEFAULTS["inputs"],
    dataset_dir: str = DEFAULTS["dataset_dir"],
    deploy: bool = DEFAULTS["deploy"],
    start_fleet: bool = DEFAULTS["start_fleet"],
    gateway_url: str | None = None,
    approve: bool | None = None,
    approval_comment: str = "",
) -> dict:
    """Curate, train, evaluate against base and champion, promote by policy, and roll the new champion out.

    `approve` answers the reviewer step a first champion needs (None: wait for a reviewer in the Prefect UI when
    running against a Prefect server). `gateway_url` None: the serving config's gateway.
    """
    started = time.monotonic()
    flow_run_id = track.current_flow_run_id()
    parent = track.open_chain_run({"train_config": train.name, "eval_config": evaluate.name,
                                   "eval_limit": evaluate.limit or "all", "inputs": ",".join(inputs),
                                   "dataset_dir": dataset_dir, "deploy": deploy, "promotion_rules": len(promotion.rules)})
    create_link_artifact(key="mlflow-chain-run", link=track.run_url(parent), link_text="MLflow: this chain run",
                         description="The retrain chain's parent run in MLflow, with one child run per stage")
    try:
        summary = run_chain(parent, curate, train, evaluate, quantize, promotion, serving, inputs, dataset_dir,
                            deploy, start_fleet, gateway_url, approve, approval_comment)
    except BaseException as exc:
        track.close_chain_run(parent, "FAILED", {"error": f"{type(exc).__name__}: {exc}"[:2000]})
        raise
    summary |= {"chain_run_id": parent, "chain_run_url": track.run_url(parent), "wall_s": time.monotonic() - started,
                "prefect_flow_run_url": track.flow_run_url(flow_run_id) if flow_run_id else None}
    track.log_metrics(parent, {"chain/wall_s": summary["wall_s"], "chain/promoted": float(summary["promoted"]),
                               "chain/curation_cached": float(summary["curation_cached"])})
    track.close_chain_run(parent, "FINISHED", summary)
    # The whole summary is an artifact of the run (the CLI prints it once on the terminal); the log gets one line
    create_markdown_artifact(key="retrain-summary", markdown=f"```\n{summary_text(summary).strip()}\n```",
                             description=f"{summary['registered_model']} v{summary['version']}: evaluation, "
                             "decision, where it is served")
    outcome = ("not promoted" if not summary["promoted"] else "promoted to champion"
               if summary["promotion_changed"] else "already champion")
    get_run_logger().info(f"{summary['registered_model']} version {summary['version']} {outcome}; the evaluation "
                          "table, the decision and how to reach it are in the artifact 'retrain-summary'")
    return summary


def run_chain(parent, curate, train, evaluate, quantize, promotion, serving, inputs, dataset_dir, deploy,
              start_fleet, gateway_url, approve, approval_comment) -> dict:
    logger = get_run_logger()
    # 1. curate (cached on the input fingerprint)
    state = curate_flow.with_options(retries=1)(inputs=tuple(inputs), out_dir=dataset_dir, config=curate,
                                                return_state=True)
    curated = state.result()
    cached = curation_was_cached(stage_run_id(state))
    record_stage(parent, "curate", curated["mlflow_run_id"], tags={"dataset_hash": curated["dataset_hash"],
                                                                   "cached": str(cached).lower()})
    # 2. train (a finished run of the same identity returns its adapter)
    trained = train_flow.with_options(retries=1, retry_delay_seconds=10)(config=train, dataset_dir=dataset_dir)
    record_stage(parent, "train", trained["mlflow_run_id"], tags={"adapter_sha256": trained["adapter_sha256"],
                                                                  "servable": str(trained["servable"]).lower()})
    if not trained["servable"]:
        raise RuntimeError("the adapter cannot be served by the fleet: " + "; ".join(trained["reasons"]))
    summary = {"dataset_hash": curated["dataset_hash"], "curation_cached": cached, "curate_run_id":
               curated["mlflow_run_id"], "train_run_id": trained["mlflow_run_id"],
               "adapter_sha256": trained["adapter_sha256"], "adapter_dir": trained["adapter_dir"]}

    # 3. evaluate candidate vs base (vs champion), unless this adapter is already champion or was evaluated alike
    c = registry.client()
    name = registry.registered_name(train.name)
    champion = registry.alias_version(c, name, registry.CHAMPION)
    if champion is not None and champion.tags.get("adapter_sha256") == trained["adapter_sha256"]:
        logger.info(f"adapter {trained['adapter_sha256'][:12]} is already {name} champion (version "
                    f"{champion.version}): evaluation and promotion skipped")
        version = champion.version
        evaluation = {"mlflow_run_id": champion.tags.get("eval_run_id"), "table": "(already champion: not re-evaluated)"}
        decision = {"promoted": True, "changed": False, "reasons": ["already champion"]}
        record_stage(parent, "evaluate", evaluation["mlflow_run_id"], tags={"skipped": "already champion"})
    else:
        key = evaluation_key(evaluate, trained["adapter_sha256"],
                             champion.tags.get("adapter_sha256") if champion else None)
        evaluation = cached_evaluation(key)
        if evaluation is not None:
            logger.info(f"reusing evaluation {evaluation['mlflow_run_id']} (same adapter, champion and config)")
            record_stage(parent, "evaluate", evaluation["mlflow_run_id"], tags={"cached": "true"})
        else:
            evaluated = evaluate_flow.with_options(retries=1, retry_delay_seconds=30)(
                config=evaluate, adapter=trained["adapter_dir"],
                champion=f"models:/{name}/{champion.version}" if champion else None)
            record_evaluation(parent, evaluated, key)
            evaluation = {**evaluated, "table": score_table(evaluated["summaries"])}
        version = evaluation["registered"]["version"]
        if quantize is not None:  # quantize, evaluate on the quantized base; the policy reads it from the version
            quantized = quantize_flow.with_options(retries=1)(
                config=quantize.model_copy(update={"adapter": trained["adapter_dir"], "calibration":
                                                   quantize.calibration.model_copy(update={"dataset_dir": dataset_dir})}))
            record_stage(parent, "quantize", quantized["mlflow_run_id"], note=quantized["table"])
            summary["quantize_run_id"] = quantized["mlflow_run_id"]
        # 4. promote by policy (a reviewer approves the first champion)
        hint = "" if approve is not None or os.environ.get("PREFECT_API_URL") else (
            "pass approve=true (charforge retrain --approve) or run against a Prefect server to answer in its UI")
        decision = promote_flow.with_options(retries=1)(candidate=f"models:/{name}/{version}", policy=promotion,
                                                        approve=approve, comment=approval_comment,
                                                        interactive_hint=hint)
        tags = c.get_model_version(name, version).tags
        record_stage(parent, "promote", tags.get("promotion_run_id"),
                     metrics={"promote/promoted": float(decision["promoted"])},
                     tags={"promotion_decision": tags.get("promotion_decision", "none"),
                           "approval": tags.get("approval", "none"), "model_version": version},
                     note="\n".join(f"- {r}" for r in decision["reasons"]))
    summary |= {"registered_model": name, "version": version, "eval_run_id": evaluation["mlflow_run_id"],
                "eval_table": evaluation["table"], "eval_report": evaluation.get("report"),
                "promoted": decision["promoted"], "promotion_changed": decision.get("changed", True),
                "reasons": decision["reasons"]}

    # 5. deploy the champion (a version the gateway already serves at 100% is left alone)
    lineage_extra = {}
    if deploy and decision["promoted"]:
        url = reach_gateway(serving, gateway_url, start_fleet)
        key = api_key(serving)
        served = f"{name}-v{version}"
        family = name.removeprefix(f"{platform().mlflow.experiment_prefix}-")
        if already_serving(url, key, family, served):
            logger.info(f"{served} already takes all traffic on {url}: nothing to deploy")
            record = {"status": "done", "served": served, "reason": "already serving"}
        else:
            record = deploy_flow.with_options(retries=1, retry_delay_seconds=30)(
                adapter=f"models:/{name}/{version}", gateway_url=url, api_key=key, config=serving)
        replicas = replicas_serving(url, key, served)
        record_stage(parent, "deploy", None, metrics={"deploy/replicas_serving": len(replicas)},
                     tags={"served_name": served, "rollout_status": record["status"], "gateway_url": url,
                           "replicas": ",".join(replicas)})
        routes = [r for r in route_names(serving, family) if r != family]
        summary |= {"gateway_url": url, "served_name": served, "rollout": record["status"], "replicas": replicas,
                    "example_route": routes[0] if routes else family, "api_key_env": serving.gateway.api_key_env}
        lineage_extra = {"served": f"{served} on {', '.join(replicas) or 'no replica'} ({record['status']})",
                         "gateway_url": url, "served_name": served, "replicas": replicas,
                         "deployed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    version_tags = c.get_model_version(name, version).tags
    evaluations = {"candidate": version_tags.get("eval_run_id")}
    if summary.get("quantize_run_id"):
        evaluations["quantized"] = track.client().get_run(summary["quantize_run_id"]).data.tags.get(
            "quantized_eval_run_id")
    record_lineage({
        "registered_model": name, "version": str(version), "dataset_hash": curated["dataset_hash"],
        "dataset_dir": dataset_dir, "curate_run_id": curated["mlflow_run_id"],
        "curate_run_url": track.run_url(curated["mlflow_run_id"]), "train_run_id": trained["mlflow_run_id"],
        "train_run_url": track.run_url(trained["mlflow_run_id"]), "adapter_sha256": trained["adapter_sha256"],
        "adapter_dir": trained["adapter_dir"],
        "evaluations": {k: {"run_id": v, "url": track.run_url(v)} for k, v in evaluations.items() if v},
        "version_url": track.version_url(name, str(version)),
        "promotion": f"{version_tags.get('promotion_decision', '-')} (approval: {version_tags.get('approval', '-')})",
        "promotion_run_url": track.run_url(version_tags["promotion_run_id"]) if version_tags.get("promotion_run_id")
        else "", "chain_run_id": parent, "chain_run_url": track.run_url(parent),
        "prefect_flow_run_url": track.flow_run_url(track.current_flow_run_id()), **lineage_extra})
    return summary


def summary_text(s: dict) -> str:
    """What a person needs after a chain run: the table, the decision, where it is served, where to look."""
    lines = [f"\n== retrain: {s['registered_model']} version {s['version']} "
             f"({'champion' if s['promoted'] else 'NOT promoted'}) ==",
             f"dataset {s['dataset_hash'][:12]} (curation {'cached' if s['curation_cached'] else 'ran'}), "
             f"adapter {s['adapter_sha256'][:12]}", "", s["eval_table"], "promotion decision:",
             *[f"  - {r}" for r in s["reasons"]], "", f"MLflow chain run: {s['chain_run_url']}"]
    if s.get("prefect_flow_run_url"):
        lines.append(f"Prefect flow run: {s['prefect_flow_run_url']}")
    lines.append(f"MLflow / Prefect UIs: {track.mlflow_ui()} / {track.prefect_ui()} (`charforge ui` serves both)")
    if s.get("gateway_url"):
        lines += [f"gateway: {s['gateway_url']} serves {s['served_name']} on {len(s['replicas'])} replica(s) "
                  f"(status: charforge serve status; stop: charforge serve down)", "", try_it(s)]
    return "\n".join(lines)


def try_it(s: dict) -> str:
    """Ready-to-paste requests to the gateway: curl and the openai client."""
    url, route = s["gateway_url"], s["example_route"]
    key_env = s.get("api_key_env")
    auth = f' -H "Authorization: Bearer ${key_env}"' if key_env else ""
    key = f'os.environ.get("{key_env}", "none")' if key_env else '"none"'
    body = json.dumps({"model": route, "messages": [{"role": "user", "content": "Who are you, and what is your day like?"}],
                       "max_tokens": 80})
    return (f"curl -s {url}/v1/chat/completions -H 'Content-Type: application/json'{auth} -d '{body}'\n\n"
            f".venv/bin/python -c 'import os, openai; c = openai.OpenAI(base_url=\"{url}/v1\", api_key={key}); "
            f"print(c.chat.completions.create(model=\"{route}\", messages=[{{\"role\": \"user\", \"content\": "
            f"\"Who are you?\"}}]).choices[0].message.content)'")
