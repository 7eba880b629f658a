"""Prefect tasks of the monitor flow: judge the window's captured replies, log them to MLflow, publish them on the
gateway, and announce drift as Prefect events (with a cooldown)."""

from __future__ import annotations

import json

import mlflow
from prefect import get_run_logger, task
from prefect.cache_policies import NONE
from prefect.events import emit_event

from charforge import monitoring, registry
from charforge.clock import utc
from charforge.results import DriftEvent, FeedbackReady, WindowJudgement
from charforge.schemas.monitor import MonitorConfig
from charforge.schemas.serving import ServingConfig
from charforge.config import load_yaml_model
from charforge.settings import platform, repo_path
from charforge.tracking import client, use_experiment
from serving import capture, state_store
from serving.admin import GatewayAdmin, GatewayUnavailable, GatewayRefused
from tasks.runtime import TRANSIENT_RETRIES, flow_run_tags

DRIFT_EVENT = "charforge.character.drift"
FEEDBACK_EVENT = "charforge.feedback.ready"


def gateway_url(serving: ServingConfig) -> str:
    return f"http://{serving.gateway.host}:{serving.gateway.port}"


@task(name="load-monitor-configs", cache_policy=NONE)
def load_configs(config: MonitorConfig | None, config_file: str, serving_file: str) -> tuple[MonitorConfig,
                                                                                             ServingConfig]:
    """The monitor's config (given, or read from `config_file` when the run starts) and the serving config."""
    cfg = config or load_yaml_model(repo_path(config_file), MonitorConfig)
    return cfg, load_yaml_model(repo_path(serving_file), ServingConfig)


@task(name="judge-window", cache_policy=NONE)
def judge_window(cfg: MonitorConfig, since: float, until: float) -> tuple[WindowJudgement, ...]:
    """The window's captures and ratings from the capture store (files or PostgreSQL), judged per route and version.
    Conversation text stays in this task: only figures leave it."""
    store = capture.capture_store(platform().state, state_store.store_url(platform().serving_store_url))
    try:
        rows = store.captures(since, until)
        ratings = list(store.feedback().values())
        scores = monitoring.reply_scores(rows, cfg)
        judgements = monitoring.judge_window(rows, ratings, cfg, since, until, scores)
        flags = monitoring.flagged_replies(scores, cfg, until)
        store.put_flags(flags)  # curation quarantines these replies as `monitor_flagged`
    finally:
        store.close()
    log = get_run_logger()
    log.info(f"window {utc(since)}..{utc(until)}: {len(rows)} captured conversations, "
             f"{sum(since <= r['at'] < until for r in ratings)} ratings, {len(judgements)} route/version pairs")
    for j in judgements:
        figures = ", ".join(f"{k} {v:g}" for k, v in sorted(j.values.items())) or "no figures"
        state = ("DRIFT " + ", ".join(f"{c.metric} {c.value:g} ({c.limit})" for c in j.crossings) if j.crossings
                 else "ok" if j.judged else j.reason)
        log.info(f"  {j.route} / {j.version}: {j.replies} replies ({j.flagged} flagged), {j.ratings} ratings; "
                 f"{figures}; {state}")
    return tuple(judgements)


@task(name="log-window", cache_policy=NONE, **TRANSIENT_RETRIES)
def log_window(cfg: MonitorConfig, judgements: tuple[WindowJudgement, ...], since: float, until: float) -> str:
    """One MLflow run per window in `charforge-monitor`: each route/version's figures as metrics, the judgements as
    `window.json`, and whether anything drifted as a tag (a reviewer filters on it). An empty window (nothing
    captured or rated) logs nothing: an idle fleet does not fill MLflow with a run an hour."""
    if not judgements:
        get_run_logger().info("nothing captured or rated in the window: no MLflow run")
        return ""
    use_experiment("monitor")
    with mlflow.start_run(run_name=f"{cfg.name}-{utc(until)}") as run:
        mlflow.set_tags({"stage": "monitor", "window_since": utc(since), "window_until": utc(until),
                         "drift": str(any(j.crossings for j in judgements)).lower(), **flow_run_tags()})
        mlflow.log_params({"window_minutes": cfg.window_minutes, "min_replies": cfg.min_replies,
                           "flag_replies": ",".join(cfg.flag_replies),
                           "min_ratings": cfg.min_ratings, "cooldown_minutes": cfg.cooldown_minutes,
                           "limits": json.dumps({k: v.model_dump(exclude_none=True) for k, v in cfg.limits.items()})})
        metrics = {}
        for j in judgements:
            prefix = f"{j.route}/{j.version}"
            metrics |= {f"{prefix}/replies": j.replies, f"{prefix}/ratings": j.ratings,
                        f"{prefix}/flagged": j.flagged, f"{prefix}/drift": float(bool(j.crossings))}
            metrics |= {f"{prefix}/{k}": v for k, v in j.values.items()}
        if metrics:
            mlflow.log_metrics(metrics)
        mlflow.log_dict([j.model_dump(mode="json") for j in judgements], "window.json")
    return run.info.run_id


@task(name="publish-on-gateway", cache_policy=NONE)
def publish_on_gateway(serving: ServingConfig, judgements: tuple[WindowJudgement, ...]) -> bool:
    """The figures as the gateway's `charforge_monitor_*` gauges; a gateway that is down is reported, not fatal (the
    window is in MLflow and the events either way)."""
    gw = serving.gateway
    if not judgements:
        return False
    try:
        GatewayAdmin(gateway_url(serving), gw.admin_key(), "charforge monitor").publish_monitor([
            {"route": j.route, "version": j.version, "replies": j.replies, "drift": bool(j.crossings),
             "values": j.values} for j in judgements])
    except (GatewayUnavailable, GatewayRefused) as exc:
        get_run_logger().warning(f"figures not published on the gateway: {exc}")
        return False
    return True


@task(name="announce-drift", cache_policy=NONE, **TRANSIENT_RETRIES)
def announce_drift(cfg: MonitorConfig, judgements: tuple[WindowJudgement, ...], now: float,
                   gateway_url: str) -> tuple[DriftEvent, ...]:
    """A `charforge.character.drift` event per drifting route and version whose crossed metrics are out of cooldown.
    Its resource is the route (`charforge.route.<route>`) with the version, its role (champion / canary / base) and
    the gateway that served it as labels: the automations in prefect.yaml roll a canary back through that gateway
    and retrain on a drifting champion."""
    cooldown = monitoring.Cooldown(platform().state / "monitor" / "cooldown.json")
    c = client()
    out = []
    for j in judgements:
        if not j.crossings:
            continue
        role = registry.served_role(c, j.version)
        keys = {x.metric: cooldown.key(j.route, j.version, x.metric) for x in j.crossings}
        due = tuple(m for m, key in keys.items() if cooldown.due(key, cfg.cooldown_minutes * 60, now))
        if not due:
            out.append(DriftEvent(event=DRIFT_EVENT, route=j.route, version=j.version, role=role,
                                  metrics=tuple(keys), emitted=False))
            get_run_logger().info(f"{j.route} / {j.version}: drift on {', '.join(keys)} already announced within "
                                  f"{cfg.cooldown_minutes:g} min: no event")
            continue
        event = emit_event(
            event=DRIFT_EVENT,
            resource={"prefect.resource.id": f"charforge.route.{j.route}", "prefect.resource.name": j.route,
                      "charforge.version": j.version, "charforge.role": role, "charforge.gateway": gateway_url},
            payload={"crossings": [x.model_dump() for x in j.crossings], "values": j.values, "replies": j.replies,
                     "ratings": j.ratings, "window_since": utc(j.since), "window_until": utc(j.until)})
        for metric in due:
            cooldown.mark(keys[metric], now)
        out.append(DriftEvent(event=DRIFT_EVENT, route=j.route, version=j.version, role=role, metrics=due,
                              emitted=True, event_id=str(event.id) if event is not None else None))
        get_run_logger().warning(f"{j.route} / {j.version} ({role}): drift on {', '.join(due)}: event {DRIFT_EVENT}")
    return tuple(out)


@task(name="announce-new-ratings", cache_policy=NONE, **TRANSIENT_RETRIES)
def announce_new_ratings(cfg: MonitorConfig, now: float) -> FeedbackReady:
    """`charforge.feedback.ready` once `retrain_after_ratings` replies have been rated up since the newest production
    window a retrain curated (`<state>/production/last_window.json`): the nightly retrain's trigger. Announced once
    per curated window (the next retrain moves the window on)."""
    last = platform().state / "production" / "last_window.json"
    since = json.loads(last.read_text())["until"] if last.is_file() else 0.0
    store = capture.capture_store(platform().state, state_store.store_url(platform().serving_store_url))
    try:
        fresh = sum(r["rating"] == "up" and r["rated_at"] > since for r in store.feedback().values())
    finally:
        store.close()
    ready = FeedbackReady(rated_up_since=utc(since) if since else "the first capture", rated_up=fresh,
                          needed=cfg.retrain_after_ratings or 0, emitted=False)
    if cfg.retrain_after_ratings is None or fresh < cfg.retrain_after_ratings:
        return ready
    cooldown = monitoring.Cooldown(platform().state / "monitor" / "cooldown.json")
    key = f"feedback|{since}"
    if not cooldown.due(key, float("inf"), now):
        return ready
    event = emit_event(event=FEEDBACK_EVENT, resource={"prefect.resource.id": "charforge.capture",
                                                       "prefect.resource.name": "captured conversations"},
                       payload={"rated_up": fresh, "since": ready.rated_up_since})
    cooldown.mark(key, now)
    get_run_logger().info(f"{fresh} replies rated up since {ready.rated_up_since} (>= {cfg.retrain_after_ratings}): "
                          f"event {FEEDBACK_EVENT}")
    return ready.model_copy(update={"emitted": True, "event_id": str(event.id) if event is not None else None})

