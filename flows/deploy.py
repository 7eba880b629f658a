"""Rolling deployment of a registered adapter version onto the fleet behind the gateway.

Run it:  charforge deploy --adapter models:/<name>@champion      charforge rollback [ROUTE]

1. pre-flight: materialize the version into the content-addressed store and verify sha256 + servability
   (a bad artifact never reaches a replica);
2. stage on every healthy replica, no traffic: load as `<name>-v<version>`, confirm `/v1/models` lists it with our
   folder as `root`, and check a smoke prompt answers differently than the base;
3. canary: the new version's weight goes through `rollout.steps` on every route of the family; each step is held
   and gated on the gateway's per-version error rate and p95 latency; a failing gate restores the previous
   weights at once;
4. the previous version stays loaded (rollback = one routing-table write) until the next deployment, which first
   retires versions no route weights or can roll back to: unloaded from every replica, dropped from the desired
   state, and their store folders deleted once every replica reports the name gone.

The rollout record under `<state>/serving/rollouts/` says where a crashed deployment stopped; a re-run resumes it
with the same rollback target. A lock per adapter family refuses a second concurrent rollout. A replica that
cannot take the load (no answer, 502-504) is retried with backoff, then left out (the gateway never routes a
version to a replica that does not list it); a bad artifact aborts at once, without retries.
"""

from __future__ import annotations

import fcntl
import json
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NONE

from charforge.base_models import load_preset
from charforge.config import ConfigError
from charforge.characters import load_characters
from charforge.schemas.serving import ServingConfig
from charforge.settings import DATA_DIR, platform
from serving import store
from serving.fleet import DesiredState, load_adapter, replica_headers, served_roots
from serving.routing import Gate, WindowStats, classify_load, gate_decision
from charforge import registry


class RolloutError(RuntimeError):
    pass


class GatewayAdmin:
    def __init__(self, url: str, api_key: str | None) -> None:
        self.url = url.rstrip("/")
        self.headers = {"authorization": f"Bearer {api_key}"} if api_key else {}

    def call(self, method: str, path: str, retry_s: float = 60, **kw) -> httpx.Response:
        """One admin call; a gateway that is restarting (connection refused) is waited for up to `retry_s` — its
        routing table is on disk, so the rollout carries on where it was."""
        deadline = time.monotonic() + retry_s
        while True:
            try:
                r = httpx.request(method, f"{self.url}{path}", headers=self.headers, timeout=30, **kw)
                break
            except httpx.ConnectError as exc:
                if time.monotonic() > deadline:
                    raise RolloutError(f"gateway {self.url} unreachable for {retry_s:.0f} s: {exc}") from None
                time.sleep(1)
        if r.status_code >= 400:
            raise RolloutError(f"gateway {method} {path}: {r.status_code} {r.text}")
        return r

    def replicas(self) -> list[dict]:
        return self.call("GET", "/admin/replicas").json()

    def routes(self) -> dict:
        return self.call("GET", "/admin/routes").json()

    def set_weights(self, route: str, weights: dict, system_prompt: str | None = None,
                    previous: dict | None = None) -> None:
        self.call("PUT", f"/admin/routes/{route}", json={"weights": weights, "system_prompt": system_prompt,
                                                          "previous": previous})

    def metrics(self) -> dict[tuple[str, str], dict]:
        """{(version, kind): value}: request counts by status and latency histogram buckets, summed over routes."""
        text = self.call("GET", "/metrics").text
        out: dict = {}
        for line in text.splitlines():
            if line.startswith("gateway_requests_total{"):
                labels, value = line[len("gateway_requests_total{"):].rsplit("} ", 1)
                tags = dict(part.split("=", 1) for part in labels.split(","))
                version, status = tags["version"].strip('"'), tags["status"].strip('"')
                key = (version, "errors" if not status.startswith("2") else "ok")
                out[key] = out.get(key, 0.0) + float(value)
            elif line.startswith("gateway_request_seconds_bucket{"):
                labels, value = line[len("gateway_request_seconds_bucket{"):].rsplit("} ", 1)
                tags = dict(part.split("=", 1) for part in labels.split(","))
                key = (tags["version"].strip('"'), f"le={tags['le'].strip(chr(34))}")
                out[key] = out.get(key, 0.0) + float(value)
        return out


def window(before: dict, after: dict, version: str) -> WindowStats:
    """Requests, errors and p95 latency of `version` between two metric snapshots."""
    restarted = any(after.get(key, 0.0) < value for key, value in before.items())  # the gateway restarted

    def delta(kind: str) -> float:
        return after.get((version, kind), 0.0) - (0.0 if restarted else before.get((version, kind), 0.0))
    requests = delta("ok") + delta("errors")
    buckets = sorted(((float(k[1][3:]), delta(k[1])) for k in after if k[0] == version and k[1].startswith("le=")),
                     key=lambda b: b[0])
    p95 = 0.0
    for bound, count in buckets:  # cumulative counts: the first bound holding 95% of the requests
        if requests and count >= 0.95 * requests:
            p95 = bound
            break
    return WindowStats(int(requests), int(delta("errors")), p95)


def route_names(cfg: ServingConfig, family: str) -> dict[str, str | None]:
    """Route -> system prompt for the routes a deployment of this family switches."""
    routes: dict[str, str | None] = {}
    for entry in cfg.rollout.routes:
        if entry == "characters":
            routes[family] = None
            routes.update({cid: card.system_prompt for cid, card in load_characters(DATA_DIR / "characters").items()})
        else:
            routes[entry] = None
    return routes


def load_with_backoff(url: str, served: str, folder: Path, delays: tuple[float, ...] = (2, 4, 8)) -> str:
    """Load and classify; a bad replica is retried after each delay. Returns the final verdict."""
    for delay in (*delays, None):
        status, body, vllm_json = load_adapter(url, served, folder)
        verdict = classify_load(status, body, vllm_json)
        if verdict == "already_loaded":
            verdict = "ok" if served_roots(url).get(served) == str(folder) else "bad_artifact"
        if verdict in ("bad_artifact", "config_error"):
            raise RolloutError(f"{verdict}: loading {served} on {url} answered {status}: {body[:300]}")
        if verdict == "ok" or delay is None:
            return verdict
        time.sleep(delay)
    return verdict


@task(name="stage-on-replica", cache_policy=NONE)
def stage(url: str, served: str, folder: Path, base_name: str, smoke_prompt: str) -> str:
    """Load without traffic and prove the replica serves *this* artifact with an effect. A replica that does not
    answer after the retries is reported 'out of rotation', not fatal: the others carry the rollout."""
    if load_with_backoff(url, served, folder) != "ok":
        get_run_logger().warning(f"{url} did not take {served} after retries; left out of this rollout")
        return "out of rotation (bad_replica)"
    def ask(model: str) -> str:
        r = httpx.post(f"{url}/v1/chat/completions", headers=replica_headers(), timeout=120, json={
            "model": model, "temperature": 0, "max_tokens": 24,
            "messages": [{"role": "user", "content": smoke_prompt}]})
        r.raise_for_status()
        return r.json()["choices"][0]["message"]["content"]
    try:
        listed = served_roots(url).get(served)
        same = listed == str(folder) and ask(served) == ask(base_name)
    except (httpx.HTTPError, ValueError, KeyError) as exc:  # the replica died or broke while staging
        get_run_logger().warning(f"{url} failed while staging {served} ({exc}); left out of this rollout")
        return f"out of rotation (bad_replica: {type(exc).__name__})"
    if listed != str(folder):
        raise RolloutError(f"bad_replica: {url} does not list {served} with root {folder}")
    if same:
        raise RolloutError(f"bad_artifact: {served} answers the smoke prompt exactly like the base model")
    return "staged"


def save_record(path: Path, record: dict) -> None:
    """Atomically: a crash (or a reader) sees the previous record or the new one, never half of one."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=2))
    tmp.replace(path)


@contextmanager
def rollout_lock(path: Path):
    """Exclusive per adapter family, across processes and threads; released by the OS if the deployer dies."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = open(path, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise RolloutError(f"another rollout of {path.stem} is running (lock {path}); wait for it to finish, "
                           f"or roll back with `charforge rollback`") from None
    try:
        yield
    finally:
        handle.close()


def unload_adapter(url: str, name: str) -> bool:
    try:
        r = httpx.post(f"{url}/v1/unload_lora_adapter", json={"lora_name": name}, headers=replica_headers(),
                       timeout=30)
    except httpx.HTTPError:
        return False
    return r.status_code == 200 or r.status_code in (400, 404) and name not in served_roots(url)


@task(name="retire-old-versions", cache_policy=NONE)
def retire(gw: GatewayAdmin, desired: DesiredState, keep: dict[str, str], adapter_root: Path,
           family: str) -> list[str]:
    """Unload versions no route weights or can roll back to, from every replica; drop them from the desired state;
    delete store folders only when every replica answered and none lists them any more."""
    routes = gw.routes()
    referenced = {v for r in routes.values() for w in (r["weights"], r.get("previous") or {}) for v in w} | set(keep)
    stale = [name for name in desired.adapters if name not in referenced and name.startswith(f"{family}-v")]
    replicas = gw.replicas()
    for name in stale:
        for replica in replicas:
            if name in replica["loaded"]:
                unload_adapter(replica["url"], name)
        del desired.adapters[name]
    desired.save()
    try:
        in_use = {root for replica in replicas for root in served_roots(replica["url"]).values()}
    except (httpx.HTTPError, ValueError, KeyError):
        return stale  # a replica did not answer: its files stay until a later deployment sees it
    if all(replica["healthy"] for replica in replicas):
        store.remove_unused(adapter_root, in_use | set(desired.adapters.values()) | set(keep.values()), family)
    return stale


@flow(name="deploy")
def deploy(adapter: str, gateway_url: str, api_key: str | None = None, config: ServingConfig | None = None) -> dict:
    cfg = config or ServingConfig()
    if not cfg.fleet.enable_lora:
        raise ConfigError(f"{adapter}: this fleet serves {cfg.fleet.checkpoint or cfg.fleet.base_model} without "
                          f"runtime LoRA (fleet.enable_lora: false), so adapters cannot be rolled out to it; merge "
                          f"the adapter (charforge quantize with a mode: merged config) and serve that checkpoint, or "
                          f"set fleet.enable_lora: true")
    state = platform().state / "serving"
    version = registry.resolve_version(registry.client(), adapter)
    with rollout_lock(state / "rollouts" / f"{version.name}.lock"):
        return roll_out(version, GatewayAdmin(gateway_url, api_key), cfg, state)


def roll_out(version, gw: GatewayAdmin, cfg: ServingConfig, state: Path) -> dict:
    logger = get_run_logger()
    served = f"{version.name}-v{version.version}"
    preset = load_preset(cfg.fleet.base_model)
    folder = store.materialize(version.name, version.version, version.source, version.tags["adapter_sha256"],
                               state / "adapters", cfg.fleet.max_lora_rank, preset.architecture)
    record_path = state / "rollouts" / f"{version.name}.json"
    record_path.parent.mkdir(parents=True, exist_ok=True)
    routes = route_names(cfg, version.name.removeprefix(f"{platform().mlflow.experiment_prefix}-"))
    current = gw.routes()
    previous = {r: current[r]["weights"] for r in routes if r in current}
    if record_path.is_file():  # a deployment of this family that did not finish: keep what it switched away from
        unfinished = json.loads(record_path.read_text())
        if unfinished.get("status") in ("staging", "canary"):
            previous = unfinished["previous"]
            logger.warning(f"resuming after an unfinished rollout of {unfinished['served']} "
                           f"(step {unfinished['step']}); rollback target stays {previous}")
    record = {"version": version.version, "served": served, "folder": str(folder), "previous": previous,
              "replicas": {}, "step": None, "status": "staging", "started": time.time()}
    save_record(record_path, record)

    desired = DesiredState.load(state / "desired.json")
    retired = retire(gw, desired, {served: str(folder)}, state / "adapters", version.name)
    if retired:
        logger.info(f"retired {', '.join(retired)} (no route weights them or rolls back to them)")
    desired.adapters[served] = str(folder)
    desired.save()  # restarted replicas get it back before the gateway routes to them
    for replica in gw.replicas():
        if not replica["healthy"]:
            record["replicas"][replica["url"]] = "skipped (unhealthy)"
            continue
        record["replicas"][replica["url"]] = stage(replica["url"], served, folder, preset.name,
                                                   cfg.rollout.smoke_prompt)
        save_record(record_path, record)
    if not any(v == "staged" for v in record["replicas"].values()):
        raise RolloutError("no healthy replica to stage on")

    gate = Gate(**cfg.rollout.gate.model_dump())
    old_versions = {r: next(iter(w)) for r, w in previous.items() if w}

    def weights_at(route: str, pct: float) -> dict:
        old = old_versions.get(route)
        return {served: 100.0} if old is None or old == served or pct >= 100 else {old: 100 - pct, served: pct}

    def roll_back(why: str) -> dict:
        for route, weights in previous.items():
            gw.set_weights(route, weights, routes[route])
        record.update(status="rolled_back", reason=why)
        save_record(record_path, record)
        logger.warning(f"rolled back {served}: {why}")
        return record

    for pct in cfg.rollout.steps:
        before = gw.metrics()
        for route, prompt in routes.items():
            gw.set_weights(route, weights_at(route, pct), prompt, previous.get(route))
        record.update(step=pct if old_versions else 100, status="canary")  # a first version takes it all at once
        save_record(record_path, record)
        if not old_versions:
            logger.info(f"{served}: 100% of traffic (no earlier version on {', '.join(routes)}: nothing to canary "
                        "against)")
            break
        logger.info(f"{served}: {pct:g}% of traffic")
        if pct >= 100:
            break
        for _ in range(3):
            time.sleep(cfg.rollout.hold_s)
            after = gw.metrics()
            old = next(iter(old_versions.values()))
            verdict, why = gate_decision(window(before, after, served), window(before, after, old), gate)
            logger.info(f"gate at {pct:g}%: {verdict} ({why})")
            if verdict != "wait":
                break
        if verdict == "rollback":
            return roll_back(why)
    record.update(status="done", finished=time.time())
    save_record(record_path, record)
    return record
