"""The rollout of an adapter version onto the fleet behind the gateway, as plain steps the deploy flow calls:

1. pre-flight (`prepare`): the version materialized into the content-addressed store and verified (sha256,
   servability), the routes it switches, their weights now (the rollback target), the record saved;
2. `retire`: versions no route weights or can roll back to are unloaded everywhere and their files deleted;
3. `stage_on_replica`: load without traffic, prove the replica lists *this* folder and answers differently than the
   base;
4. `canary_step`: set the new version's weight on every route, hold, judge the gateway's per-version error rate
   and p95 latency; a failing gate restores the previous weights at once (`roll_back`). A step with too few
   requests is never waved through: the rollout sends probe requests (`send_probes`), and rolls back without
   evidence. Every route write is a compare-and-set on the route's generation: a route changed under the rollout
   (an operator's `charforge rollback`) stops it where the operator left it (`RouteChangedUnderRollout`, exit 3).

The record (in the serving store: `<state>/serving/rollouts/<family>.json`, or a PostgreSQL row every flow-run pod
sees) says where a crashed rollout stopped; a re-run resumes with the same rollback target. `rollout_lock` refuses a
second concurrent rollout of a family (a `flock`, or a PostgreSQL advisory lock; `serving.state_store`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

from charforge.characters import load_characters
from charforge.errors import Refused, Unavailable
from charforge.results import Rollout
from charforge.schemas.serving import ServingConfig
from charforge.settings import DATA_DIR
from charforge.schemas.serving import RolloutSettings
from serving.admin import GatewayAdmin, MetricsSnapshot, RouteChanged
from serving.fleet import (DesiredState, catalogue_path, desired_path, load_adapter, replica_headers,
                           served_roots)
from serving.routing import Gate, WindowStats, classify_load, gate_decision
from serving import state_store, store

Log = Callable[[str], None]


class RolloutRefused(Refused):
    """The rollout must not go on: a bad artifact, a replica serving something else, another rollout running."""


class RouteChangedUnderRollout(RolloutRefused):
    """Someone else (an operator's rollback, another tool) changed a route while this rollout ran: it stops."""


class NoReplicaToStage(Unavailable):
    """No healthy replica took the version."""


@dataclass(frozen=True)
class RolloutPlan:
    """Everything a rollout needs that does not change while it runs."""

    family: str  # the registered model name
    version: str
    served: str  # the name replicas serve it under: <family>-v<version>
    folder: Path  # its verified store folder
    routes: dict[str, str | None]  # route -> system prompt
    previous: dict[str, dict[str, float]]  # route -> weights before this rollout (the rollback target)
    records: state_store.FileRollouts | state_store.PostgresStore  # where the record lives
    desired_path: Path
    adapter_root: Path
    base_name: str
    catalogue_path: Path | None = None  # with on-demand placement (gateway.placement): where finished versions go

    @property
    def old_versions(self) -> dict[str, str]:
        return {route: next(iter(w)) for route, w in self.previous.items() if w}

    def weights_at(self, route: str, pct: float) -> dict[str, float]:
        """The route's weights with the new version at `pct` percent (all of it when there is nothing older)."""
        old = self.old_versions.get(route)
        if old is None or old == self.served or pct >= 100:
            return {self.served: 100.0}
        return {old: 100 - pct, self.served: pct}

    def step_weights(self, pct: float) -> dict[str, dict[str, float]]:
        """Every route's weights at a canary step. A route with no earlier version (a character card added since the
        last deployment) is written only once the canary is over (100%), or when no route has anything to canary
        against: a failing gate restores each route's previous weights, and a new route has none to restore, so it
        must never carry a version the gate has not passed."""
        canary = bool(self.old_versions) and pct < 100
        return {route: self.weights_at(route, pct) for route in self.routes
                if not canary or route in self.old_versions}


def route_names(cfg: ServingConfig, family: str, characters: list[str] | None = None) -> dict[str, str | None]:
    """Route -> system prompt for the routes a deployment of this family switches: with `characters` (an adapter
    family's, from its version's `characters` tag) only theirs."""
    routes: dict[str, str | None] = {}
    for entry in cfg.rollout.routes:
        if entry == "characters":
            cards = load_characters(DATA_DIR / "characters")
            unknown = sorted(set(characters or ()) - set(cards))
            if unknown:
                raise RolloutRefused(f"adapter family {family} covers characters without a persona card in "
                                     f"{DATA_DIR / 'characters'}: {', '.join(unknown)}")
            routes[family] = None
            routes.update({cid: card.system_prompt for cid, card in cards.items()
                           if not characters or cid in characters})
        else:
            routes[entry] = None
    return routes


def save_record(plan: RolloutPlan, record: Rollout) -> Rollout:
    plan.records.save(plan.family, record.model_dump(mode="json"))
    return record


def read_record(plan: RolloutPlan) -> Rollout | None:
    raw = plan.records.read(plan.family)
    return Rollout.model_validate(raw) if raw is not None else None


@contextmanager
def rollout_lock(records: state_store.FileRollouts | state_store.PostgresStore, family: str) -> Iterator[None]:
    """Exclusive per adapter family, across processes and machines; released if the deployer dies."""
    try:
        with records.lock(family):
            yield
    except state_store.RolloutLocked as exc:
        raise RolloutRefused(f"{exc}; wait for it to finish, or roll back with `charforge rollback`") from None


def prepare(name: str, version: str, source: str, adapter_sha: str, gw: GatewayAdmin, cfg: ServingConfig,
            state: Path, records: state_store.FileRollouts | state_store.PostgresStore, family_prefix: str,
            base_name: str, architecture: str, log: Log, override: dict[str, str] | None = None,
            characters: list[str] | None = None) -> RolloutPlan:
    """Verify and store the version, find the rollback target (kept from an unfinished rollout of this family),
    and save the record as `staging` (with the override that let an unpromoted version through, if any)."""
    catalogue = placed_catalogue(cfg, state)
    if catalogue is not None:
        require_placing_gateway(gw, catalogue, log)
    folder = store.fetch_version(name, version, source, adapter_sha, state / "adapters", cfg.fleet.max_lora_rank,
                                 architecture)
    routes = route_names(cfg, name.removeprefix(family_prefix), characters)
    current = gw.routes()
    previous = {r: current[r].weights for r in routes if r in current}
    generations = {r: current[r].generation for r in routes if r in current}
    unfinished_raw = records.read(name)
    unfinished = Rollout.model_validate(unfinished_raw) if unfinished_raw is not None else None
    if unfinished is not None and unfinished.status in ("staging", "canary"):
        previous = unfinished.previous
        generations = {**generations, **unfinished.generations}  # a route changed since the crash stops the resume
        log(f"resuming after an unfinished rollout of {unfinished.served} (step {unfinished.step}); rollback target "
            f"stays {previous}")
    plan = RolloutPlan(name, str(version), f"{name}-v{version}", folder, routes, previous, records,
                       desired_path(state), state / "adapters", base_name, catalogue)
    save_record(plan, Rollout(version=plan.version, served=plan.served, folder=str(folder), previous=previous,
                                     generations=generations, status="staging", started=time.time(),
                                     override=override))
    return plan


def unload_adapter(url: str, name: str) -> bool:
    try:
        r = httpx.post(f"{url}/v1/unload_lora_adapter", json={"lora_name": name}, headers=replica_headers(),
                       timeout=30)
    except httpx.HTTPError:
        return False
    return r.status_code == 200 or r.status_code in (400, 404) and name not in served_roots(url)


def retire(gw: GatewayAdmin, plan: RolloutPlan) -> list[str]:
    """Unload versions no route weights or can roll back to, from every replica; drop them from the desired state
    (and the placement catalogue); delete store folders only when every replica answered and none lists them any
    more. Then the new version joins the desired state, so a restarted replica gets it back before the gateway
    routes to it."""
    keep = {plan.served: str(plan.folder)}
    desired = DesiredState.load(plan.desired_path)
    placed = DesiredState.load(plan.catalogue_path) if plan.catalogue_path else DesiredState(Path())
    routes = gw.routes()
    referenced = {v for r in routes.values() for w in (r.weights, r.previous or {}) for v in w} | set(keep)
    mine = [name for name in {**desired.adapters, **placed.adapters} if name.startswith(f"{plan.family}-v")]
    stale = sorted(name for name in mine if name not in referenced)
    replicas = gw.replicas()
    for name in stale:
        for replica in replicas:
            if name in replica.loaded:
                unload_adapter(replica.url, name)
        desired.adapters.pop(name, None)
        placed.adapters.pop(name, None)
    desired.adapters.update(keep)
    desired.save()
    if plan.catalogue_path:
        placed.save()
    try:
        in_use = {root for replica in replicas for root in served_roots(replica.url).values()}
    except (httpx.HTTPError, ValueError, KeyError):
        return stale  # a replica did not answer: its files stay until a later deployment sees it
    if all(replica.healthy for replica in replicas):
        store.remove_unused(plan.adapter_root, in_use | set(desired.adapters.values()) | set(placed.adapters.values()),
                            plan.family)
    return stale


def placed_catalogue(cfg: ServingConfig, state: Path) -> Path | None:
    """The catalogue the gateway places versions from (`gateway.placement`), or None without placement."""
    placement = cfg.gateway.placement
    if placement is None:
        return None
    return Path(placement.catalogue) if placement.catalogue else catalogue_path(state)


def require_placing_gateway(gw: GatewayAdmin, catalogue: Path, log: Log) -> None:
    """A deployment configured with placement unpins its finished versions (`release`): only a gateway that places
    versions from a catalogue may serve them then. Refused before any work when the gateway places nothing."""
    theirs = gw.placement().get("catalogue")
    if theirs is None:
        raise RolloutRefused(f"config_error: this deployment hands finished versions to the placement catalogue "
                             f"{catalogue} (gateway.placement), but the gateway at {gw.url} places nothing (it was "
                             f"started without gateway.placement), so a replica that restarts or evicts them would "
                             f"not get them back; start the gateway and run the deployment with the same serving "
                             f"config")
    if Path(theirs).resolve() != catalogue.resolve():  # a shared volume may be mounted elsewhere: a warning only
        log(f"the gateway at {gw.url} places from {theirs}, this deployment writes {catalogue}: they must be the "
            f"same file (gateway.placement.catalogue)")


def release(plan: RolloutPlan) -> list[str]:
    """With on-demand placement, a finished rollout's versions (the family's served version and the one its routes
    can roll back to) leave the desired state, where every replica holds them, for the placement catalogue: the
    gateway places them where requests need them and may evict them when other families need the room, so a fleet
    serves more families than a replica holds. Replicas keep what they hold until then. Returns the versions moved."""
    if plan.catalogue_path is None:
        return []
    desired = DesiredState.load(plan.desired_path)
    placed = DesiredState.load(plan.catalogue_path)
    moved = sorted(name for name in desired.adapters if name.startswith(f"{plan.family}-v"))
    placed.adapters.update({name: desired.adapters[name] for name in moved})
    placed.save()  # placeable before it is unpinned: never neither
    for name in moved:
        del desired.adapters[name]
    desired.save()
    return moved


def load_with_backoff(url: str, served: str, folder: Path, delays: tuple[float, ...] = (2, 4, 8)) -> str:
    """Load and classify; a bad replica is retried after each delay. Returns the final verdict."""
    verdict = "bad_replica"
    for delay in (*delays, None):
        status, body, vllm_json = load_adapter(url, served, folder)
        verdict = classify_load(status, body, vllm_json)
        if verdict == "already_loaded":
            verdict = "ok" if served_roots(url).get(served) == str(folder) else "bad_artifact"
        if verdict in ("bad_artifact", "config_error"):
            raise RolloutRefused(f"{verdict}: loading {served} on {url} answered {status}: {body[:300]}")
        if verdict == "ok" or delay is None:
            return verdict
        time.sleep(delay)
    return verdict


def stage_on_replica(url: str, plan: RolloutPlan, smoke_prompt: str, warn: Log) -> str:
    """Load without traffic and prove the replica serves *this* artifact with an effect. A replica that does not
    answer after the retries is reported 'out of rotation', not fatal: the others carry the rollout."""
    served, folder = plan.served, plan.folder
    if load_with_backoff(url, served, folder) != "ok":
        warn(f"{url} did not take {served} after retries; left out of this rollout")
        return "out of rotation (bad_replica)"

    def ask(model: str) -> str:
        r = httpx.post(f"{url}/v1/chat/completions", headers=replica_headers(), timeout=120, json={
            "model": model, "temperature": 0, "max_tokens": 24,
            "messages": [{"role": "user", "content": smoke_prompt}]})
        r.raise_for_status()
        return r.json()["choices"][0]["message"]["content"]
    try:
        listed = served_roots(url).get(served)
        same = listed == str(folder) and ask(served) == ask(plan.base_name)
    except (httpx.HTTPError, ValueError, KeyError) as exc:  # the replica died or broke while staging
        warn(f"{url} failed while staging {served} ({exc}); left out of this rollout")
        return f"out of rotation (bad_replica: {type(exc).__name__})"
    if listed != str(folder):
        raise RolloutRefused(f"bad_replica: {url} does not list {served} with root {folder}")
    if same:
        raise RolloutRefused(f"bad_artifact: {served} answers the smoke prompt exactly like the base model")
    return "staged"


def window(before: MetricsSnapshot, after: MetricsSnapshot, version: str, probes_only: bool = False) -> WindowStats:
    """Requests, errors and p95 latency of `version` between two metric snapshots, added up over the gateways
    (user and probe traffic together, or the probes alone). A gateway whose counters went back restarted: its
    window is what it counted since."""
    totals: dict[str, float] = {}
    for gateway in {key[0] for key in after}:
        mine_before = {k[1:]: v for k, v in before.items() if k[0] == gateway}
        mine_after = {k[1:]: v for k, v in after.items() if k[0] == gateway}
        restarted = any(mine_after.get(key, 0.0) < value for key, value in mine_before.items())
        for (v, kind, probe), value in mine_after.items():
            if v == version and (probe or not probes_only):
                totals[kind] = totals.get(kind, 0.0) + value - (
                    0.0 if restarted else mine_before.get((v, kind, probe), 0.0))
    requests = totals.get("ok", 0.0) + totals.get("errors", 0.0)
    buckets = sorted((float(kind[3:]), count) for kind, count in totals.items() if kind.startswith("le="))
    p95 = 0.0
    for bound, count in buckets:  # cumulative counts: the first bound holding 95% of the requests
        if requests and count >= 0.95 * requests:
            p95 = bound
            break
    return WindowStats(int(requests), int(totals.get("errors", 0.0)), p95)


def actor(plan: RolloutPlan) -> str:
    """How this rollout signs its route changes (the gateway's audit log and each route's `changed_by`)."""
    return f"rollout of {plan.served}"


def own_change(plan: RolloutPlan, changed_by: str | None) -> bool:
    """Whether a route's last change was this rollout's (`changed_by` is "<actor> [<key fingerprint>]")."""
    return (changed_by or "").split(" [", 1)[0] == actor(plan)


def require_unchanged(gw: GatewayAdmin, plan: RolloutPlan, generations: dict[str, int],
                      routes: list[str]) -> dict[str, int]:
    """Raise `RouteChanged` if someone else changed one of `routes` since this rollout's last write (or read);
    returns the generations to write against (a change this rollout made just before a crash is its own)."""
    generations, current = dict(generations), gw.routes()
    for route in routes:
        now = current.get(route)
        if now is None or now.generation == generations.get(route, 0):
            continue
        if own_change(plan, now.changed_by):  # written by this rollout before a crash lost the record
            generations[route] = now.generation
            continue
        raise RouteChanged(f"route {route!r} is at generation {now.generation}, not {generations.get(route, 0)}: "
                           f"changed by {now.changed_by or 'unknown'}")
    return generations


def write_routes(gw: GatewayAdmin, plan: RolloutPlan, record: Rollout, weights: dict[str, dict[str, float]],
                 previous: bool = True) -> dict[str, int]:
    """Compare-and-set every route to `weights`: each only if it is still at the generation this rollout last
    wrote (or read, before its first write). Returns the new generations. A route someone else changed raises
    `RouteChanged` before anything is written (checked up front, and again by each write)."""
    generations = require_unchanged(gw, plan, record.generations, list(weights))
    for route, w in weights.items():
        state = gw.set_weights(route, w, plan.routes[route], plan.previous.get(route) if previous else None,
                               expected_generation=generations.get(route, 0), actor=actor(plan))
        generations[route] = state.generation
    return generations


def stopped(plan: RolloutPlan, record: Rollout, exc: RouteChanged) -> RouteChangedUnderRollout:
    """Record that a route changed under the rollout; the error the deploy flow ends with."""
    why = (f"a route changed under this rollout, which stops and leaves every route as it is now: {exc}. Run "
           f"`charforge deploy` again to roll {plan.served} out anew")
    save_record(plan, record.model_copy(update={"status": "stopped", "reason": why,
                                                             "finished": time.time()}))
    return RouteChangedUnderRollout(why)


def roll_back(gw: GatewayAdmin, plan: RolloutPlan, record: Rollout, why: str) -> Rollout:
    """Restore every route's weights from before the rollout (the previous version is still loaded). Each route is
    its own compare-and-set: a route someone changed meanwhile is left as they set it (they decided), every other
    route is restored all the same, so a failed gate never leaves the bad version serving anywhere it wrote. Raises
    `RouteChangedUnderRollout` (after restoring the rest) if a route was skipped."""
    generations, current, skipped = dict(record.generations), gw.routes(), []
    for route, weights in plan.previous.items():
        now = current.get(route)
        if now is not None and now.generation != generations.get(route, 0) and not own_change(plan, now.changed_by):
            skipped.append(f"route {route!r} is at generation {now.generation}, not {generations.get(route, 0)}: "
                           f"changed by {now.changed_by or 'unknown'}")
            continue
        expected = now.generation if now is not None else 0
        try:
            generations[route] = gw.set_weights(route, weights, plan.routes[route], None,
                                                expected_generation=expected, actor=actor(plan)).generation
        except RouteChanged as exc:  # changed between the read and the write
            skipped.append(str(exc))
    record = save_record(plan, record.model_copy(update={"status": "rolled_back", "reason": why,
                                                                      "generations": generations}))
    if skipped:
        raise stopped(plan, record, RouteChanged(f"{'; '.join(skipped)} (the gate said roll back: {why}; every "
                                                 f"other route was restored)"))
    return record


def probe_route(plan: RolloutPlan) -> str:
    """The route probes are sent on: a character's (with its system prompt) if the family has one."""
    return next((r for r, prompt in plan.routes.items() if prompt), next(iter(plan.routes)))


def send_probes(gw: GatewayAdmin, plan: RolloutPlan, versions: list[str], n: int, settings: RolloutSettings,
                log: Log) -> dict[str, list]:
    """`n` probe requests through the gateway to each of `versions`, pinned by the admin-only probe header and
    interleaved (the same prompt to each version in turn, so both see the same load). The gateway counts them apart
    from users. Returns each version's statuses."""
    route, sent = probe_route(plan), {v: [] for v in versions}
    for i in range(max(0, n)):
        for version in versions:
            sent[version].append(gw.probe(route, version, settings.probe_prompts[i % len(settings.probe_prompts)],
                                          settings.probe_max_tokens))
    log("probes on " + ", ".join(f"{v}: {len(s)} sent, {sum(1 for x in s if x == 200)} answered 200"
                                 for v, s in sent.items()))
    return sent


def canary_step(gw: GatewayAdmin, plan: RolloutPlan, record: Rollout, pct: float, gate: Gate,
                settings: RolloutSettings, log: Log) -> Rollout:
    """Move every route to `pct` percent of the new version and judge the step on the gateway's metrics. Returns
    the record: `canary` to go on, `done` when there was nothing to canary against or 100% was reached,
    `rolled_back` when the gate said so or there was no evidence; raises `RouteChangedUnderRollout` when a route
    changed under the rollout."""
    before = gw.metrics()
    try:
        generations = write_routes(gw, plan, record, plan.step_weights(pct))
    except RouteChanged as exc:
        raise stopped(plan, record, exc) from None
    first_version = not plan.old_versions
    record = save_record(plan, record.model_copy(update={
        "step": 100 if first_version else pct, "status": "canary", "generations": generations}))
    if first_version:
        log(f"{plan.served}: 100% of traffic (no earlier version on {', '.join(plan.routes)}: nothing to canary "
            "against)")
        return finish(plan, record)
    log(f"{plan.served}: {pct:g}% of traffic")
    if pct >= 100:
        return finish(plan, record)
    old = next(iter(plan.old_versions.values()))
    holds = 1 if settings.probes else 3
    for _ in range(holds):
        time.sleep(settings.hold_s)
        try:  # an operator who rolled back during the hold has decided: no probe, no judgement, no write
            require_unchanged(gw, plan, generations, list(plan.routes))
        except RouteChanged as exc:
            raise stopped(plan, record, exc) from None
        after = gw.metrics()
        new_w, old_w = window(before, after, plan.served), window(before, after, old)
        verdict, why = gate_decision(new_w, old_w, gate)
        if verdict != "wait":
            break
    if verdict == "wait" and settings.probes:
        # Errors count over users and probes together; latency compares the probes alone, which both versions got
        # alike (user requests on the old version may be longer or more concurrent than 16-token probes).
        log(f"gate at {pct:g}%: {why}; probing")
        probes_before = after
        send_probes(gw, plan, [plan.served, old], gate.min_requests - new_w.requests, settings, log)
        after = gw.metrics()
        new_w, old_w = window(before, after, plan.served), window(before, after, old)
        new_p = window(probes_before, after, plan.served, probes_only=True)
        old_p = window(probes_before, after, old, probes_only=True)
        verdict, why = gate_decision(WindowStats(new_w.requests, new_w.errors, new_p.p95_latency_s),
                                     WindowStats(old_w.requests, old_w.errors, old_p.p95_latency_s), gate)
    if verdict == "wait":
        verdict, why = "rollback", f"no evidence to judge the step on: {why}"
    log(f"gate at {pct:g}%: {verdict} ({why})")
    return roll_back(gw, plan, record, why) if verdict == "rollback" else record


def finish(plan: RolloutPlan, record: Rollout) -> Rollout:
    return save_record(plan, record.model_copy(update={"status": "done", "finished": time.time()}))
