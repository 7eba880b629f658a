"""OpenAI-compatible gateway in front of the vLLM fleet.

Clients call a stable name (e.g. `charforge`, or a character id such as `nell_bramwick`); the routing table maps it
to versioned adapter names with weights (`{"charforge-smollm2-lora-v3": 95, "charforge-smollm2-lora-v4": 5}`).
Per request: pick the version (sticky per user during a canary), pick a healthy replica that has that version
loaded, rewrite `model`, proxy (streaming or not), retry on another replica when the connection fails.

The routing table is a JSON file written atomically, so a restarted gateway comes back with the live state.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
import threading
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import aiohttp
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from charforge.clock import utc
from charforge.errors import CharforgeError
from charforge.keys import KeyRing, presented_key
from serving.fleet import replica_headers
from serving.capture import Capturer, Pending, ResponseRef
from serving.placement import Choice, Placement, choose, room
from serving.routing import Replica, Strategy, assign_version, classify_load, eligible
from serving.state_store import FileRoutes, PostgresStore

log = logging.getLogger(__name__)
audit_log = logging.getLogger("charforge.gateway.audit")


@dataclass
class Route:
    """A stable name: version weights, and optionally the system prompt of the character it stands for."""

    weights: dict[str, float]
    system_prompt: str | None = None
    previous: dict[str, float] | None = None  # the weights before the last change: what a rollback restores
    generation: int = 0  # +1 on every change: a writer that read generation N may write only while it is still N
    changed_by: str | None = None  # who made the last change (the admin caller's actor and key fingerprint)
    changed_at: float | None = None


class AdapterCatalogue:
    """Adapter versions the gateway may place on replicas on demand (served name -> adapter folder), read from a
    JSON file the deploy side writes (re-read when it changes), and the versions pinned on every replica (the
    fleet's desired state, `desired.json`: the replicas load those themselves; placement never evicts them)."""

    RECHECK_S = 0.5

    def __init__(self, path: Path, pinned_path: Path | None = None, max_resident: int = 4,
                 spill_outstanding: int = 8, load_timeout_s: float = 120, room_wait_s: float = 30) -> None:
        self.path, self.pinned_path = path, pinned_path
        self.max_resident, self.spill_outstanding, self.load_timeout_s = max_resident, spill_outstanding, load_timeout_s
        self.room_wait_s = room_wait_s
        self._cache: dict[Path, tuple[float, dict[str, str]]] = {}
        self._checked: dict[Path, float] = {}  # when each file's mtime was last looked at

    def _read(self, path: Path | None) -> dict[str, str]:
        """The file's mapping, looked at again at most every RECHECK_S (it is read on every request's path)."""
        if path is None:
            return {}
        cached = self._cache.get(path)
        now = time.monotonic()
        if cached and now - self._checked.get(path, 0.0) < self.RECHECK_S:
            return cached[1]
        self._checked[path] = now
        try:
            mtime = path.stat().st_mtime
        except FileNotFoundError:
            self._cache.pop(path, None)
            return {}
        if cached and cached[0] == mtime:
            return cached[1]
        try:
            raw = json.loads(path.read_text())
            folders = {str(k): str(v) for k, v in raw.items()} if isinstance(raw, dict) else {}
        except (OSError, ValueError) as exc:  # a half-written or broken file: keep serving what was read before
            log.warning("adapter catalogue %s is unreadable (%s); keeping the last one read", path, exc)
            return cached[1] if cached else {}
        self._cache[path] = (mtime, folders)
        return folders

    def folders(self) -> dict[str, str]:
        return self._read(self.path)

    def placement(self, inflight: dict, last_used: dict) -> Placement:
        pinned = frozenset(self._read(self.pinned_path))
        return Placement(catalogue=frozenset(self.folders()) - pinned, pinned=pinned, max_resident=self.max_resident,
                         spill_outstanding=self.spill_outstanding, inflight=inflight, last_used=last_used)


class VersionGone(Exception):
    """The replica answered that it does not serve the version (vLLM's 404 "The model `<name>` does not exist."):
    it was unloaded since the gateway last looked, e.g. evicted by another gateway placing adapters on the same
    replicas, or lost in a restart. Nothing was generated; the request chooses again."""


class RouteChanged(Exception):
    """A compare-and-set of a route found a newer generation than the writer read."""


class RouteTable:
    """The routes this gateway serves, kept in memory and in a shared store (`serving.state_store`: a file, or
    PostgreSQL) that every gateway watches: a change written through one gateway is served by all of them."""

    def __init__(self, source: Path | str | FileRoutes | PostgresStore,
                 routes: dict[str, Route] | None = None) -> None:
        self.store = FileRoutes(Path(source)) if isinstance(source, (str, Path)) else source
        self.routes: dict[str, Route] = routes or {}

    @property
    def path(self) -> Path | None:
        return self.store.path if isinstance(self.store, FileRoutes) else None

    @classmethod
    def load(cls, source: Path | str | FileRoutes | PostgresStore) -> "RouteTable":
        """The table as stored. A file that is unreadable falls back to its copy (`FileRoutes.load`): a gateway
        never crash-loops on its own table."""
        table = cls(source)
        table.reload()
        return table

    @staticmethod
    def parse(raw: dict) -> dict[str, Route]:
        return {name: Route(**r) for name, r in raw.items()}

    def reload(self) -> None:
        """Re-read the store (its watcher calls this on every change another gateway makes)."""
        self.routes = self.parse(self.store.load(self.parse))

    def watch(self, stop: threading.Event) -> threading.Thread:
        """A thread re-reading the table whenever the store says it changed, until `stop` is set."""
        thread = threading.Thread(target=self.store.watch, args=(self.reload, stop), name="route-watch", daemon=True)
        thread.start()
        return thread

    def set_weights(self, name: str, weights: dict[str, float], system_prompt: str | None = None,
                    previous: dict[str, float] | None = None, expected_generation: int | None = None,
                    who: str | None = None) -> Route:
        """New weights; `previous` is what a rollback restores (default: the weights being replaced; a rollout
        passes the weights from before its first step, so rolling back mid-canary returns to the old version).
        With `expected_generation`, the change is made only if the route is still at that generation in the store
        (a rollout never overwrites an operator's rollback, made through this gateway or another). The store is
        written before memory changes: a failed write serves nothing that would vanish on restart."""
        if not any(w > 0 for w in weights.values()):
            raise ValueError(f"route {name!r}: at least one version needs a positive weight")

        def change(stored: dict | None) -> dict:
            old = Route(**stored) if stored else None
            generation = old.generation if old else 0
            if expected_generation is not None and expected_generation != generation:
                when = utc(old.changed_at or 0) if old else '-'
                raise RouteChanged(f"route {name!r} is at generation {generation}, not {expected_generation}: "
                                   f"changed by {old.changed_by if old else 'nobody'} at {when}")
            return Route(weights=dict(weights), system_prompt=system_prompt if system_prompt is not None else
                         (old.system_prompt if old else None),
                         previous=previous if previous is not None else (dict(old.weights) if old else None),
                         generation=generation + 1, changed_by=who, changed_at=time.time()).__dict__
        self.routes = self.parse(self.store.update(name, change, self.parse))
        return self.routes[name]


# The replica refused the connection, or dropped it before any response byte reached the client (a killed replica),
# or did not accept it in time: the request had no effect the client saw, so another replica can take it. Other
# timeouts are not retried (the work may still be running: 504), and a stream that already sent chunks is never
# restarted (it ends with an error event). aiohttp's read timeouts are connection errors too: they are caught first.
RETRYABLE = (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError)
CONNECT_TIMEOUT = aiohttp.ConnectionTimeoutError  # retryable: the replica never accepted the request
READ_TIMEOUT = (aiohttp.ServerTimeoutError, asyncio.TimeoutError)  # 504: it may still be working on it
JSON_CONTENT = {"Content-Type": "application/json"}
PROBE_HEADER = "x-charforge-probe"  # admin only: route this request to the named version, count it as a probe
ACTOR_HEADER = "x-charforge-actor"  # admin callers say who they are (a rollout, `charforge rollback`), for the audit


class Metrics:
    """User traffic in `gateway_requests_total` & co.; a rollout's probe requests in `gateway_probe_*` (the canary
    gate reads both; user dashboards see only users). Outcomes: the HTTP status, `empty` (200 with no reply text),
    `cut` (a stream broken midway), `504` (the replica timed out). Overload 503s never reached a replica: they are
    counted in `gateway_rejected_total` only."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        labels = ["route", "version"]
        self.requests = Counter("gateway_requests_total", "Requests by outcome", [*labels, "status"],
                                registry=self.registry)
        self.latency = Histogram("gateway_request_seconds", "End-to-end latency", labels, registry=self.registry,
                                 buckets=LATENCY_BUCKETS)
        self.ttft = Histogram("gateway_time_to_first_token_seconds", "Time to the first streamed chunk", labels,
                              registry=self.registry, buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16))
        self.tokens = Counter("gateway_completion_tokens_total", "Completion tokens (the replica's usage; a stream "
                              "asks for it)", labels, registry=self.registry)
        self.probe_requests = Counter("gateway_probe_requests_total", "Rollout probe requests by outcome",
                                      [*labels, "status"], registry=self.registry)
        self.probe_latency = Histogram("gateway_probe_request_seconds", "Rollout probe latency", labels,
                                       registry=self.registry, buckets=LATENCY_BUCKETS)
        self.outstanding = Gauge("gateway_outstanding_requests", "In-flight requests per replica", ["replica"],
                                 registry=self.registry)
        self.retries = Counter("gateway_connect_retries_total", "Requests retried on another replica", ["replica"],
                               registry=self.registry)
        # Per adapter version and replica: what placement did and what each replica holds (vLLM exports only the
        # adapters with requests running or waiting).
        self.adapter_requests = Counter("gateway_adapter_requests_total", "Requests sent, by replica and version",
                                        ["replica", "version"], registry=self.registry)
        self.adapter_loads = Counter("gateway_adapter_loads_total", "On-demand adapter loads by outcome",
                                     ["replica", "version", "outcome"], registry=self.registry)
        self.adapter_load_seconds = Histogram("gateway_adapter_load_seconds", "On-demand load time (eviction "
                                              "included)", ["replica"], registry=self.registry,
                                              buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30))
        self.adapter_evictions = Counter("gateway_adapter_evictions_total", "Adapters unloaded to make room",
                                         ["replica", "version"], registry=self.registry)
        self.adapter_room_wait = Histogram("gateway_adapter_room_wait_seconds", "How long a request waited for a "
                                           "replica with room for its adapter", registry=self.registry,
                                           buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30))
        self.adapter_resident = Gauge("gateway_adapter_resident", "1 while the replica lists the version",
                                      ["replica", "version"], registry=self.registry)
        self.adapter_gone = Counter("gateway_adapter_gone_total", "Requests a replica answered with 404 for a version "
                                    "the gateway believed resident (unloaded elsewhere); chosen again",
                                    ["replica", "version"], registry=self.registry)
        self.rejected = Counter("gateway_rejected_total", "Requests refused before any replica saw them",
                                ["reason"], registry=self.registry)
        self.capture_dropped = Counter("gateway_capture_dropped_total", "Sampled conversations not captured",
                                       ["reason"], registry=self.registry)
        self.feedback = Counter("gateway_feedback_total", "Ratings stored", ["route", "version", "rating"],
                                registry=self.registry)
        # The character monitor's last window (flows/monitor.py publishes it here): what a dashboard alerts on.
        self.monitor = Gauge("charforge_monitor_value", "Character monitor: the last judged window's value",
                             ["route", "version", "metric"], registry=self.registry)
        self.monitor_replies = Gauge("charforge_monitor_replies", "Character monitor: replies in the last window",
                                     ["route", "version"], registry=self.registry)
        self.monitor_drift = Gauge("charforge_monitor_drift", "Character monitor: 1 when the last window crossed a "
                                   "limit", ["route", "version"], registry=self.registry)

    def observe(self, route: str, version: str, status: str, elapsed: float, probe: bool) -> None:
        requests, latency = (self.probe_requests, self.probe_latency) if probe else (self.requests, self.latency)
        requests.labels(route, version, status).inc()
        latency.labels(route, version).observe(elapsed)


LATENCY_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64)


def empty_reply(payload: dict) -> bool:
    """A 200 whose every choice has no text (and no tool call): a broken adapter, counted as an error."""
    choices = payload.get("choices") if isinstance(payload, dict) else None
    if not choices:
        return False

    def text(choice: dict) -> str:
        message = choice.get("message") or {}
        return (message.get("content") or "") if "message" in choice else (choice.get("text") or "")
    return all(not text(c).strip() and not (c.get("message") or {}).get("tool_calls") for c in choices)


def sse_error(message: str, code: int = 502) -> bytes:
    """An OpenAI-style error event: the openai client raises it instead of ending the stream as if complete."""
    return f"data: {json.dumps({'error': {'message': message, 'type': 'upstream_error', 'code': code}})}\n\n".encode()


class StreamOutcome:
    """What a relayed stream turned out to be, read from its SSE events as they pass: `cut` (broke midway),
    `upstream_error` (an error event from the replica), `empty` (a 200 whose deltas carried no text or tool call),
    or the upstream status."""

    def __init__(self, status: str) -> None:
        self.upstream_status, self.cut, self.error, self.text, self.closed = status, False, False, False, False
        self.completion_tokens: int | None = None  # from the stream's usage event, when it has one
        self._pending = b""

    def read(self, chunk: bytes) -> None:
        lines = (self._pending + chunk).split(b"\n")
        self._pending = lines.pop()[-65536:]  # a partial line waits for the next chunk (bounded)
        for line in lines:
            if not line.startswith(b"data:") or (self.text and b'"error"' not in line and b'"usage"' not in line):
                continue  # once text arrived, only an error or the usage event tells more
            try:
                event = json.loads(line[5:])
            except ValueError:  # `data: [DONE]`
                continue
            if not isinstance(event, dict):
                continue
            if event.get("error"):
                self.error = True
            usage = event.get("usage")
            if isinstance(usage, dict) and isinstance(usage.get("completion_tokens"), int):
                self.completion_tokens = usage["completion_tokens"]
            for choice in event.get("choices") or []:
                delta = choice.get("delta") or {}
                if (delta.get("content") or choice.get("text") or delta.get("tool_calls")
                        or delta.get("reasoning_content")):
                    self.text = True

    def status(self) -> str:
        if self.cut:
            return "cut"
        if self.error:
            return "upstream_error"
        if self.upstream_status == "200" and not self.text:
            return "empty"
        return self.upstream_status


def with_usage(body: dict) -> tuple[dict, bool]:
    """A streamed request asks the replica for its usage event (`stream_options.include_usage`), so the gateway counts
    completion tokens per version; True when the gateway added it (the event is then kept from the client)."""
    options = body.get("stream_options") or {}
    if not isinstance(options, dict) or options.get("include_usage"):
        return body, False  # the client asked for it (or sent something the replica will refuse itself)
    return {**body, "stream_options": {**options, "include_usage": True}}, True


class UsageHidden:
    """Relays a stream without the usage event the gateway asked for on a client's behalf: every other byte as it
    came, whole lines at a time (a partial line is held until its end arrives)."""

    def __init__(self) -> None:
        self._tail = b""

    def relay(self, chunk: bytes) -> bytes:
        data = self._tail + chunk
        end = data.rfind(b"\n") + 1
        self._tail, data = data[end:], data[:end]
        if b'"usage"' not in data:
            return data
        return b"".join(line for line in data.splitlines(keepends=True) if not usage_event(line))

    def rest(self) -> bytes:
        return self._tail


def usage_event(line: bytes) -> bool:
    """`data: {..., "choices": [], "usage": {...}}`: the usage-only event at the end of a stream."""
    if not line.startswith(b"data:") or b'"usage"' not in line:
        return False
    try:
        event = json.loads(line[5:])
    except ValueError:
        return False
    return isinstance(event, dict) and not event.get("choices") and isinstance(event.get("usage"), dict)


class RelayResponse(StreamingResponse):
    """A relayed stream whose bookkeeping (in-flight count, metrics, upstream close) runs even when the client went
    away before the first byte, where the body generator never starts and its `finally` never runs."""

    def __init__(self, content, on_close, **kwargs) -> None:
        super().__init__(content, **kwargs)
        self.on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.on_close()


def user_of(body: dict, request: Request) -> str | None:
    """The end user a request is for: the body's `user`, or the X-Session-Id header."""
    user = body.get("user") or request.headers.get("x-session-id")
    return user if isinstance(user, str) else None


class Gateway:
    def __init__(self, replica_urls: list[str], table: RouteTable, strategy: Strategy = "least_outstanding",
                 api_key: KeyRing | str | list[str] | None = None, health_interval_s: float = 1.0,
                 connect_retries: int = 2, request_timeout_s: float = 300, discover=None,
                 admin_key: KeyRing | str | list[str] | None = None, max_request_bytes: int = 1_048_576,
                 max_inflight_per_replica: int = 32, retry_after_s: int = 1, audit_path: Path | None = None,
                 capture: Capturer | None = None, catalogue: AdapterCatalogue | None = None) -> None:
        self.replicas = {f"replica-{i}": Replica(f"replica-{i}", url.rstrip("/"), healthy=False)
                         for i, url in enumerate(replica_urls)}
        self.discover = discover  # () -> {name: url}, e.g. ready pods by label (serving/discovery_k8s.py)
        self.table, self.strategy = table, strategy
        self.keys, self.admin_keys = KeyRing.of(api_key), KeyRing.of(admin_key)
        self.health_interval_s, self.connect_retries = health_interval_s, connect_retries
        self.request_timeout_s = request_timeout_s
        self.max_request_bytes, self.max_inflight = max_request_bytes, max_inflight_per_replica
        self.retry_after_s = retry_after_s
        # two counters: one request advances each once (a shared one advanced twice per request, so with two
        # replicas round robin always picked the same one)
        self.version_counter, self.replica_counter = itertools.count(), itertools.count()
        self.metrics = Metrics()
        self.audit_path = audit_path or (table.path.with_name("audit.jsonl") if table.path else None)
        self._watch_stop = threading.Event()
        self.draining = False  # set on SIGTERM (serving.runtime.DrainingServer): health 503, Connection: close
        self.capture = capture  # response ids, sampled capture, ratings (serving/capture.py); None: none of them
        if capture is not None:
            capture.dropped = self.metrics.capture_dropped
        # The upstream client is aiohttp's: at 100 req/s over 100 client connections httpx's pool added ~100 ms at the
        # median here, aiohttp's ~5 ms (bench/gateway_capacity.py). One session per event loop, made on first use.
        self._session: aiohttp.ClientSession | None = None
        self._session_loop: asyncio.AbstractEventLoop | None = None
        self._poller: asyncio.Task | None = None
        # adapter placement (None: a version is served only where the replicas already hold it)
        self.catalogue = catalogue
        self.inflight: dict[tuple[str, str], int] = {}  # (replica, version) -> requests in flight
        self.last_used: dict[tuple[str, str], float] = {}  # (replica, version) -> monotonic time of the last request
        self._placing: dict[str, asyncio.Lock] = {}  # one load or eviction at a time per replica
        self._placed: dict[str, int] = {}  # per replica, +1 on every load or eviction (a poll from before is stale)
        self._pending: dict[str, str] = {}  # version -> the replica it is being loaded on
        self._resident_seen: set[tuple[str, str]] = set()

    def session(self) -> aiohttp.ClientSession:
        """The upstream session of the running event loop (the replicas' key, never the client's)."""
        loop = asyncio.get_running_loop()
        if self._session is None or self._session.closed or self._session_loop is not loop:
            self._session = aiohttp.ClientSession(
                headers=replica_headers(), connector=aiohttp.TCPConnector(limit=512, limit_per_host=0),
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=2.0, sock_read=self.request_timeout_s))
            self._session_loop = loop
        return self._session

    async def close(self) -> None:
        if self._session is not None and not self._session.closed:
            await self._session.close()

    # ---- replica state -------------------------------------------------------------------------------------------
    def set_replicas(self, urls: dict[str, str]) -> None:
        """Replace the replica set (dynamic discovery); replicas that stay keep their state."""
        self.replicas = {name: self.replicas[name] if name in self.replicas and self.replicas[name].url == url
                         else Replica(name, url.rstrip("/"), healthy=False) for name, url in urls.items()}

    async def refresh(self) -> None:
        """Poll every replica's /health and /v1/models: healthy + the names it serves right now. Any answer a
        replica gives, or an address that cannot be used, makes it unhealthy; nothing here raises."""
        if self.discover is not None:
            try:
                self.set_replicas(await asyncio.to_thread(self.discover))
            except Exception as exc:  # the API server is unreachable or refuses: keep the last known replicas
                log.warning("fleet discovery failed: %s", exc)

        placed_before = dict(self._placed)

        async def one(replica: Replica) -> Replica:
            try:
                quick = aiohttp.ClientTimeout(total=2)
                async with self.session().get(f"{replica.url}/health", timeout=quick) as health:
                    healthy = health.status == 200
                async with self.session().get(f"{replica.url}/v1/models", timeout=quick) as models:
                    data = (await models.json(content_type=None))["data"]
                names = frozenset(m["id"] for m in data)
                adapters = frozenset(m["id"] for m in data if m.get("parent"))  # LoRA cards name their base
                return replace(replica, healthy=healthy, loaded=names, adapters=adapters)
            except Exception as exc:  # refused, timed out, `{"data": null}`, a malformed URL...
                if replica.healthy:
                    log.warning("replica %s (%s) is out of rotation: %s: %s", replica.name, replica.url,
                                type(exc).__name__, exc)
                return replace(replica, healthy=False)
        updated = await asyncio.gather(*(one(r) for r in self.replicas.values()))
        for r in updated:
            current = self.replicas.get(r.name)
            if current is not None:  # not dropped by discovery meanwhile
                if (r.name in self._placing and self._placing[r.name].locked()) or \
                        self._placed.get(r.name) != placed_before.get(r.name):
                    continue  # a load or eviction changed it during the poll: its own answer updated the set
                self.replicas[r.name] = replace(r, outstanding=current.outstanding)
        self._publish_residency()

    def _publish_residency(self) -> None:
        now = {(r.name, v) for r in self.replicas.values() for v in r.adapters}
        for replica, version in now | self._resident_seen:
            self.metrics.adapter_resident.labels(replica, version).set(1 if (replica, version) in now else 0)
        self._resident_seen |= now

    async def poll_forever(self) -> None:
        while True:
            try:
                await self.refresh()
            except Exception:  # never let the poller die: health would freeze
                log.exception("replica health poll failed; polling again")
            await asyncio.sleep(self.health_interval_s)

    def ensure_poller(self) -> None:
        """Restart the health poller if it ever ended (it should not; if it did, health would freeze)."""
        if self._poller is not None and self._poller.done() and not self._poller.cancelled():
            log.error("the replica health poller stopped (%s); restarting it", self._poller.exception())
            self._poller = asyncio.create_task(self.poll_forever())

    def mark_unhealthy(self, name: str) -> None:
        if name in self.replicas:  # discovery may have dropped it meanwhile
            self.replicas[name] = replace(self.replicas[name], healthy=False)

    def _track(self, name: str, delta: int, version: str | None = None) -> None:
        if version is not None:  # per version too: placement never evicts a version with requests in flight
            key = (name, version)
            self.inflight[key] = max(0, self.inflight.get(key, 0) + delta)
            if delta > 0:
                self.last_used[key] = time.monotonic()
                self.metrics.adapter_requests.labels(name, version).inc()
        r = self.replicas.get(name)
        if r is None:  # dropped by discovery while the request ran
            return
        self.replicas[name] = replace(r, outstanding=max(0, r.outstanding + delta))
        self.metrics.outstanding.labels(name).set(self.replicas[name].outstanding)

    # ---- credentials ---------------------------------------------------------------------------------------------
    def check_key(self, request: Request) -> str:
        """Inference calls: an inference key or an admin key (no key configured: open). Returns who called."""
        presented = presented_key(request.headers.get("authorization"))
        admin = self.admin_keys.match(presented)
        if admin:
            return f"admin {admin}"
        if not self.keys:
            return "anonymous"
        found = self.keys.match(presented)
        if found is None:
            raise HTTPException(401, detail="missing or wrong API key: send Authorization: Bearer <key>")
        return f"key {found}"

    def check_admin(self, request: Request) -> str:
        """Admin calls: only an admin key. The inference key is refused (403); with an inference key and no admin
        key configured the admin API is closed. Returns who called, for the audit log."""
        presented = presented_key(request.headers.get("authorization"))
        actor = "".join(ch for ch in request.headers.get(ACTOR_HEADER, "")[:120] if ch.isprintable()) or "unnamed"
        if self.admin_keys:
            found = self.admin_keys.match(presented)
            if found:
                return f"{actor} [{found}]"
            if self.keys.match(presented):
                raise HTTPException(403, detail="this is an inference key: it may chat but not change routes; admin "
                                                "calls need the admin key (gateway.admin_key_env)")
            raise HTTPException(401, detail="missing or wrong admin key: send Authorization: Bearer <admin key>")
        if self.keys:
            raise HTTPException(403, detail="the admin API is closed: this gateway has an inference key but no admin "
                                            "key; set the variable gateway.admin_key_env names "
                                            "(CHARFORGE_GATEWAY_ADMIN_KEY by default)")
        return f"{actor} [open gateway]"

    def audit(self, who: str, action: str, route: str, before: Route | None, after: Route) -> None:
        """One line per admin change, in the log and appended (fsync'd) to this gateway's audit.jsonl (beside
        routes.json by default)."""
        line = json.dumps({"at": utc(), "who": who, "action": action,
                           "route": route, "before": before.weights if before else None, "after": after.weights,
                           "generation": after.generation}, sort_keys=True)
        audit_log.info(line)
        if self.audit_path is None:
            return
        self.audit_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.audit_path, "a") as handle:
            handle.write(line + "\n")
            handle.flush()
            os.fsync(handle.fileno())

    # ---- requests ------------------------------------------------------------------------------------------------
    async def read_json(self, request: Request, optional: bool = False) -> dict:
        """The body as a JSON object, read up to `max_request_bytes` (413 past it, before it is all read);
        `optional`: no body at all (or chunked with no bytes) is `{}`."""
        limit = self.max_request_bytes
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            self.metrics.rejected.labels("too_large").inc()
            raise HTTPException(413, detail=f"request body is {int(declared)} bytes; this gateway accepts at most "
                                            f"{limit} (gateway.max_request_bytes)")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                self.metrics.rejected.labels("too_large").inc()
                raise HTTPException(413, detail=f"request body is over {limit} bytes, the most this gateway accepts "
                                                f"(gateway.max_request_bytes)")
            chunks.append(chunk)
        if optional and not any(chunks):
            return {}
        try:
            body = json.loads(b"".join(chunks) or b"null")
        except ValueError:
            raise HTTPException(400, detail="request body is not JSON") from None
        if not isinstance(body, dict):
            raise HTTPException(400, detail="request body must be a JSON object")
        return body

    def resolve(self, body: dict, request: Request, probe: str | None = None) -> tuple[str, str, dict]:
        """(route name, served model name, body to send upstream)."""
        name = body.get("model")
        if not isinstance(name, str):
            raise HTTPException(400, detail=f"'model' must be a route name (a string), not {json.dumps(name)[:80]}")
        messages = body.get("messages")
        if messages is not None and not (isinstance(messages, list) and all(isinstance(m, dict) for m in messages)):
            raise HTTPException(400, detail="'messages' must be a list of objects with a role and a content")
        route = self.table.routes.get(name)
        if route is None:
            known = ", ".join(sorted(self.table.routes)) or "none yet (deploy an adapter first)"
            raise HTTPException(404, detail=f"model {name!r} is not served here; available: {known}")
        if probe is not None:
            if probe not in route.weights:
                raise HTTPException(400, detail=f"probe version {probe!r} is not on route {name!r} "
                                                f"({', '.join(sorted(route.weights))})")
            version = probe
        else:
            version = assign_version(route.weights, user_of(body, request), next(self.version_counter))
        upstream = {**body, "model": version}
        if route.system_prompt and messages is not None and not any(m.get("role") == "system" for m in messages):
            upstream["messages"] = [{"role": "system", "content": route.system_prompt}, *messages]
        return name, version, upstream

    def placement(self) -> Placement | None:
        return self.catalogue.placement(self.inflight, self.last_used) if self.catalogue is not None else None

    def servable(self, version: str) -> bool:
        """Resident on a healthy replica, or placeable on demand (in the adapter catalogue)."""
        return any(r.healthy and version in r.loaded for r in self.replicas.values()) or (
            self.catalogue is not None and version in self.catalogue.folders())

    def pick(self, version: str, user: str | None, tried: frozenset[str] = frozenset()) -> Choice | None:
        """The replica for one attempt: eligible (holds the version, or can load it), not tried yet, below its
        in-flight bound; `serving.placement.choose` decides."""
        replicas = list(self.replicas.values())
        if self._pending:  # a version being loaded takes its slot already (it is never the one evicted: in flight)
            replicas = [replace(r, adapters=r.adapters | {v for v, on in self._pending.items() if on == r.name})
                        for r in replicas]
        return choose(replicas, version, self.strategy, self.placement(),
                      counter=next(self.replica_counter), user=user, exclude=tried, max_outstanding=self.max_inflight)

    async def place(self, choice: Choice, version: str) -> str:
        """Load `version` on the chosen replica (unloading the chosen victim first when it is full): "ok" once the
        replica serves it, "failed" when the replica refused or could not be reached (counted and logged: the
        request tries another replica), "again" when the replica changed while this request waited for it (it
        filled up with busy adapters, went unhealthy): the request chooses again. One placement at a time per
        replica, re-checked under that lock."""
        name = choice.replica.name
        lock = self._placing.setdefault(name, asyncio.Lock())
        key = (name, version)
        self.inflight[key] = self.inflight.get(key, 0) + 1  # the waiting request: nobody evicts what it came for
        self._track(name, +1)  # and it counts as in flight there, as it will once sent
        mine = self._pending.setdefault(version, name) == name  # other requests for it wait for this placement
        started = time.perf_counter()
        try:
            async with lock:
                replica = self.replicas.get(name)
                if replica is None or not replica.healthy:
                    return "again"
                if version in replica.loaded:
                    return "ok"
                folder = self.catalogue.folders().get(version) if self.catalogue else None
                if folder is None:
                    return "failed"
                placement = self.placement()
                ok, evict = room(replica, placement)
                if not ok:
                    return "again"
                if evict is not None and not await self._unload(replica, evict):
                    return "failed"
                outcome = await self._load(replica, version, folder)
                self.metrics.adapter_loads.labels(name, version, outcome).inc()
                if outcome != "ok":
                    return "failed"
                self.metrics.adapter_load_seconds.labels(name).observe(time.perf_counter() - started)
                log.info("placed %s on %s in %.0f ms%s", version, name, (time.perf_counter() - started) * 1000,
                         f" (evicted {evict})" if evict else "")
                current = self.replicas.get(name)
                self._placed[name] = self._placed.get(name, 0) + 1
                if current is not None:
                    self.replicas[name] = replace(current, loaded=current.loaded | {version},
                                                  adapters=current.adapters | {version})
                self._publish_residency()
                return "ok"
        finally:
            self.inflight[key] -= 1
            self._track(name, -1)
            if mine:
                self._pending.pop(version, None)

    async def placing_elsewhere(self, version: str, choice: Choice, tried: set[str]) -> bool:
        """adapter_affinity: when `version` is being loaded on another replica right now, wait for that load to end
        (True: choose again, it is likely resident there now) instead of loading it a second time here."""
        other = self._pending.get(version)
        if self.strategy != "adapter_affinity" or other is None or other == choice.replica.name or other in tried:
            return False
        async with self._placing[other]:
            return True

    async def _load(self, replica: Replica, version: str, folder: str) -> str:
        """POST /v1/load_lora_adapter -> "ok" | "failed" (the reason logged)."""
        try:
            async with self.session().post(f"{replica.url}/v1/load_lora_adapter",
                                           json={"lora_name": version, "lora_path": folder},
                                           timeout=aiohttp.ClientTimeout(total=self.catalogue.load_timeout_s)) as r:
                body, status = await r.text(), r.status
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            body, status = f"{type(exc).__name__}: {exc}", None
        try:
            vllm_error = isinstance(json.loads(body), dict) and "error" in json.loads(body)
        except ValueError:
            vllm_error = False
        verdict = classify_load(status, body, vllm_error)
        if verdict in ("ok", "already_loaded"):
            return "ok"
        log.warning("placing %s on %s failed (%s, HTTP %s): %s", version, replica.name, verdict, status, body[:300])
        return "failed"

    def _forget(self, name: str, version: str) -> None:
        """The replica does not hold `version` any more (its own answer): out of this gateway's view until the
        next poll says otherwise."""
        current = self.replicas.get(name)
        if current is not None:
            self.replicas[name] = replace(current, loaded=current.loaded - {version},
                                          adapters=current.adapters - {version})
            self._placed[name] = self._placed.get(name, 0) + 1  # a poll already in flight must not bring it back
            self._publish_residency()

    async def _unload(self, replica: Replica, version: str) -> bool:
        """Evict `version` from the replica (only while no request for it is in flight there). It leaves the
        replica's resident set before the call, so no request is sent there while vLLM unloads it."""
        if self.inflight.get((replica.name, version)):
            return False
        current = self.replicas.get(replica.name)
        if current is not None:
            self.replicas[replica.name] = replace(current, loaded=current.loaded - {version},
                                                  adapters=current.adapters - {version})
        self._placed[replica.name] = self._placed.get(replica.name, 0) + 1
        try:
            async with self.session().post(f"{replica.url}/v1/unload_lora_adapter", json={"lora_name": version},
                                           timeout=aiohttp.ClientTimeout(total=30)) as r:
                status, body = r.status, await r.text()
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            log.warning("evicting %s from %s failed: %s", version, replica.name, exc)
            return False
        if status not in (200, 404):  # 404: already gone
            log.warning("evicting %s from %s failed: HTTP %s %s", version, replica.name, status, body[:300])
            return False
        self.metrics.adapter_evictions.labels(replica.name, version).inc()
        return True

    async def forward(self, path: str, request: Request) -> Response:
        self.ensure_poller()
        probe = request.headers.get(PROBE_HEADER)
        if probe is not None:
            self.check_admin(request)
        else:
            self.check_key(request)
        body = await self.read_json(request)
        route, version, upstream = self.resolve(body, request, probe)
        tried: set[str] = set()
        started = time.perf_counter()
        full = False  # the attempts ended because every eligible replica left was at its in-flight bound
        placeable = self.catalogue is not None and version in self.catalogue.folders()
        not_loaded: list[str] = []  # replicas that could not load the version
        attempts = self.connect_retries + 1 + (len(self.replicas) if placeable else 0)
        room_deadline: float | None = None
        no_room = False  # waited room_wait_s for a replica with room for the version, in vain
        while attempts > 0:
            choice = self.pick(version, upstream.get("user"), frozenset(tried))
            if choice is None and placeable and any(
                    r.healthy and r.name not in tried and r.outstanding < self.max_inflight
                    for r in self.replicas.values()):
                # every replica that could take it holds its limit of adapters, each with requests in flight: the
                # request waits for one of them to go idle (bounded), rather than a 503 for a registered version
                now = time.monotonic()
                if room_deadline is None:
                    room_deadline = now + self.catalogue.room_wait_s
                if now < room_deadline:
                    await asyncio.sleep(0.01)
                    continue
            if room_deadline is not None:
                self.metrics.adapter_room_wait.observe(time.monotonic() - room_deadline + self.catalogue.room_wait_s)
                room_deadline, no_room = None, choice is None
            if choice is None:
                full = any(r.name not in tried and r.healthy and r.outstanding >= self.max_inflight
                           for r in self.replicas.values()) if placeable else \
                    any(r.name not in tried for r in eligible(list(self.replicas.values()), version))
                break
            if choice.load and await self.placing_elsewhere(version, choice, tried):
                continue
            replica = choice.replica
            if choice.load:
                placed = await self.place(choice, version)
                if placed == "again":  # the replica changed while this request waited for it: choose again
                    await asyncio.sleep(0.01)
                    continue
                if placed == "failed":
                    attempts -= 1
                    tried.add(replica.name)
                    not_loaded.append(replica.name)
                    continue  # that replica could not take it (a failed load, counted): another one may
            attempts -= 1
            tried.add(replica.name)
            try:
                return await self._send(replica, path, upstream, route, version, started, probe is not None,
                                        user_of(body, request))
            except CONNECT_TIMEOUT as exc:
                log.warning("%s %s: %s; trying another replica", replica.name, path, type(exc).__name__)
                self.mark_unhealthy(replica.name)
                self.metrics.retries.labels(replica.name).inc()
            except READ_TIMEOUT:
                self.metrics.observe(route, version, "504", time.perf_counter() - started, probe is not None)
                raise HTTPException(504, detail=f"{replica.name} did not answer within {self.request_timeout_s:g} s "
                                                f"(gateway.request_timeout_s)") from None
            except RETRYABLE as exc:
                log.warning("%s %s: %s; trying another replica", replica.name, path, type(exc).__name__)
                self.mark_unhealthy(replica.name)
                self.metrics.retries.labels(replica.name).inc()
            except VersionGone:
                log.warning("%s no longer serves %s (unloaded since it was last polled, e.g. by another gateway); "
                            "choosing again", replica.name, version)
                self.metrics.adapter_gone.labels(replica.name, version).inc()
                self._forget(replica.name, version)
                if placeable:
                    tried.discard(replica.name)  # it may be placed there again
        if full and not tried:  # refused before any replica saw it: overload, not an error of the version
            self.metrics.rejected.labels("overloaded").inc()
            raise HTTPException(503, detail=f"every replica serving {version!r} has {self.max_inflight} requests in "
                                            f"flight (gateway.max_inflight_per_replica); retry after "
                                            f"{self.retry_after_s} s", headers={"Retry-After": str(self.retry_after_s)})
        if no_room:  # a capacity refusal, like the overload above: not an error of the version
            self.metrics.rejected.labels("no_adapter_room").inc()
            raise HTTPException(503, detail=f"no replica had room for {version!r} within "
                                            f"{self.catalogue.room_wait_s:g} s (gateway.placement.room_wait_s): each "
                                            f"healthy one holds {self.catalogue.max_resident} adapters with requests "
                                            f"in flight (gateway.placement.max_resident); retry after "
                                            f"{self.retry_after_s} s",
                                headers={"Retry-After": str(self.retry_after_s)})
        self.metrics.observe(route, version, "503", time.perf_counter() - started, probe is not None)
        if not_loaded and set(not_loaded) == tried:
            raise HTTPException(503, detail=f"{version!r} could not be loaded on any replica (tried "
                                            f"{', '.join(sorted(tried))}; the gateway log says why); retry later")
        if tried:
            raise HTTPException(503, detail=f"{version!r}: no replica could be reached ({len(tried)} tried: "
                                            f"{', '.join(sorted(tried))}); retry later")
        raise HTTPException(503, detail=f"no healthy replica serves {version!r} right now")

    async def _send(self, replica: Replica, path: str, body: dict, route: str, version: str,
                    started: float, probe: bool, user: str | None = None) -> Response:
        url = f"{replica.url}{path}"
        headers = {"x-charforge-version": version, "x-charforge-replica": replica.name}
        ref, sampled = None, False
        if self.capture is not None and not probe:  # every answer gets an id a rating can name
            at, user_hash = time.time(), self.capture.ids.user_hash(user)
            ref = ResponseRef(self.capture.ids.mint(route, version, user_hash, at), route, version, at, user_hash)
            headers["x-charforge-response-id"] = ref.id
            sampled = self.capture.sampled(route)
        self._track(replica.name, +1, version)
        data = json.dumps(body).encode()  # what aiohttp's json= would send; kept (bytes) for a sampled capture
        if body.get("stream"):
            asked, hidden = with_usage(body) if not probe else (body, False)
            try:
                upstream = await self.session().post(url, data=json.dumps(asked).encode() if hidden else data,
                                                     headers=JSON_CONTENT)
            except BaseException:  # nothing was relayed: take the in-flight count back here, not in relay()
                self._track(replica.name, -1, version)
                raise
            if upstream.status == 404:  # an error body, not a stream: read it to see whether the version is gone
                try:
                    body404 = await upstream.read()
                except BaseException:
                    self._track(replica.name, -1, version)
                    upstream.close()
                    raise
                if not_served(body404, version):
                    self._track(replica.name, -1, version)
                    upstream.close()
                    raise VersionGone(version)
                upstream = ReadBody(upstream, body404)
            outcome = StreamOutcome(str(upstream.status))
            kept = bytearray() if sampled else None  # the raw stream, parsed by the capture writer, not here

            async def close() -> None:  # once, whether the relay ran to its end, broke, or never started
                if outcome.closed:
                    return
                outcome.closed = True
                self._track(replica.name, -1, version)
                elapsed = time.perf_counter() - started
                self.metrics.observe(route, version, outcome.status(), elapsed, probe)
                if outcome.completion_tokens is not None and not probe:
                    self.metrics.tokens.labels(route, version).inc(outcome.completion_tokens)
                upstream.close()  # a stream's connection is not reused: it may have broken off
                if kept is not None:
                    self.capture.submit(Pending(ref, replica.name, data, elapsed, outcome.status(),
                                                stream=bytes(kept)))

            usage = UsageHidden() if hidden else None

            async def relay():
                first = True
                try:
                    async for chunk in upstream.content.iter_any():
                        if first:
                            if not probe:
                                self.metrics.ttft.labels(route, version).observe(time.perf_counter() - started)
                            first = False
                        outcome.read(chunk)
                        if kept is not None and len(kept) < 1_048_576:
                            kept.extend(chunk)
                        out = chunk if usage is None else usage.relay(chunk)
                        if out:
                            yield out
                    if usage is not None and usage.rest():
                        yield usage.rest()
                except (aiohttp.ClientError, asyncio.TimeoutError) as exc:  # the replica broke off midway: say so
                    outcome.cut = True
                    if usage is not None and usage.rest():  # what had come of the last line, as without hiding
                        yield usage.rest()
                    log.warning("%s: stream of %s cut midway: %s", replica.name, version, type(exc).__name__)
                    yield sse_error(f"the stream from {replica.name} broke off midway ({type(exc).__name__}); "
                                    f"the reply is incomplete")
                finally:
                    await close()

            return RelayResponse(relay(), close, status_code=upstream.status, headers=headers,
                                 media_type=upstream.headers.get("content-type", "text/event-stream"))
        try:
            async with self.session().post(url, data=data, headers=JSON_CONTENT) as response:
                content = await response.read()
                code = response.status
        finally:
            self._track(replica.name, -1, version)
        if code == 404 and not_served(content, version):
            raise VersionGone(version)
        elapsed = time.perf_counter() - started
        status = str(code)
        try:
            payload = json.loads(content)
        except ValueError:
            self.metrics.observe(route, version, status, elapsed, probe)
            return Response(content, status_code=code, headers=headers)
        if code == 200 and empty_reply(payload):
            status = "empty"
        self.metrics.observe(route, version, status, elapsed, probe)
        if not probe:
            self.metrics.ttft.labels(route, version).observe(elapsed)
            if isinstance(payload, dict) and isinstance(payload.get("usage"), dict):
                self.metrics.tokens.labels(route, version).inc(payload["usage"].get("completion_tokens") or 0)
        if ref is not None and isinstance(payload, dict) and code == 200:
            payload["id"] = ref.id
            if sampled:
                choice = (payload.get("choices") or [{}])[0]
                reply = (choice.get("message") or {}).get("content") if "message" in choice else choice.get("text")
                usage = payload.get("usage")
                self.capture.submit(Pending(ref, replica.name, data, elapsed, status,
                                            reply=reply if isinstance(reply, str) else "",
                                            usage=(usage.get("prompt_tokens"), usage.get("completion_tokens"))
                                            if isinstance(usage, dict) else None))
        return JSONResponse(payload, status_code=code, headers=headers)


def not_served(content: bytes, version: str) -> bool:
    """vLLM's answer for a model name it does not serve (a 404 with "The model `<name>` does not exist.")."""
    try:
        message = json.loads(content)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return False
    return isinstance(message, str) and f"`{version}` does not exist" in message


class ReadBody:
    """An upstream response whose body was already read (a 404 checked for `not_served`), relayed as if it
    were not: `content.iter_any()` yields that body once."""

    def __init__(self, response, body: bytes) -> None:
        self.status, self.headers, self._response, self._body = response.status, response.headers, response, body

    @property
    def content(self) -> "ReadBody":
        return self

    async def iter_any(self):
        yield self._body

    def close(self) -> None:
        self._response.close()


ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 405: "invalid_request_error", 409: "conflict_error",
               413: "invalid_request_error", 500: "server_error", 503: "service_unavailable", 504: "timeout"}


def openai_error(status: int, message: str, kind: str | None = None, headers: dict | None = None) -> JSONResponse:
    """An error in OpenAI's shape, so OpenAI clients show the message."""
    return JSONResponse({"error": {"message": message, "type": kind or ERROR_TYPES.get(status, "error"),
                                   "param": None, "code": status}}, status_code=status, headers=headers)


def optional_field(body: dict, key: str, kind: type):
    """`body[key]` if it is absent, null or a `kind` (a bool is not an int here); 400 naming the key otherwise."""
    value = body.get(key)
    if value is None or (isinstance(value, kind) and not isinstance(value, bool)):
        return value
    raise HTTPException(400, detail=f"{key!r} must be {'an integer' if kind is int else 'a string'} or null, not "
                                    f"{json.dumps(value)[:80]}")


def previous_weights(value) -> dict[str, float] | None:
    """The `previous` weights of a PUT: null or {"<served name>": <percent>, ...}; 400 otherwise."""
    if value is None:
        return None
    if isinstance(value, dict) and all(isinstance(w, (int, float)) and not isinstance(w, bool)
                                       for w in value.values()):
        return {str(k): float(w) for k, w in value.items()}
    raise HTTPException(400, detail=f"'previous' must be null or {{\"<served name>\": <percent>, ...}}, not "
                                    f"{json.dumps(value)[:80]}")


class CloseWhileDraining:
    """ASGI middleware: while the gateway drains, every response says `Connection: close`, so a keep-alive client
    opens its next request on a new connection (through the load balancer, to another gateway) instead of sending
    it on a socket that is about to close."""

    def __init__(self, app, gateway: Gateway) -> None:
        self.app, self.gateway = app, gateway

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or not self.gateway.draining:
            await self.app(scope, receive, send)
            return

        async def closing(message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), (b"connection", b"close")]}
            await send(message)
        await self.app(scope, receive, closing)


def create_app(gateway: Gateway) -> FastAPI:
    @asynccontextmanager
    async def lifespan(_: FastAPI):
        await gateway.refresh()
        gateway._poller = asyncio.create_task(gateway.poll_forever())
        gateway._watch_stop.clear()
        watcher = gateway.table.watch(gateway._watch_stop)  # changes other gateways write, served within a second
        if gateway.capture is not None:
            gateway.capture.start()
        yield
        gateway._poller.cancel()
        gateway._watch_stop.set()
        await asyncio.to_thread(watcher.join, 5)
        if gateway.capture is not None:
            await asyncio.to_thread(gateway.capture.close)  # writes what is queued
        await gateway.close()

    app = FastAPI(title="charforge gateway", lifespan=lifespan)
    app.add_middleware(CloseWhileDraining, gateway=gateway)

    @app.exception_handler(StarletteHTTPException)  # FastAPI's and the router's own (404, 405) alike
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "route_changed" if exc.status_code == 409 and str(exc.detail).startswith("route ") else None
        return openai_error(exc.status_code, str(exc.detail), kind, exc.headers)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
        return openai_error(500, f"internal error in the gateway ({type(exc).__name__}: {exc}); its log has the "
                                 f"traceback")

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        return await gateway.forward("/v1/chat/completions", request)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await gateway.forward("/v1/completions", request)

    @app.post("/v1/feedback")
    async def feedback(request: Request) -> dict:
        """A user's rating of one response: `{"id": <the response's id>, "rating": "up"|"down", "comment"?}`.
        Stored (fsync'd or committed) before the 200; a second rating of the same response replaces the first."""
        gateway.check_key(request)
        if gateway.capture is None:
            raise HTTPException(404, detail="ratings are not taken by this gateway (no capture store configured)")
        body = await gateway.read_json(request)
        try:
            row = await asyncio.to_thread(gateway.capture.rate, body)
        except LookupError as exc:
            raise HTTPException(404, detail=str(exc)) from None
        except OverflowError as exc:
            raise HTTPException(413, detail=str(exc)) from None
        except ValueError as exc:
            raise HTTPException(400, detail=str(exc)) from None
        except (OSError, CharforgeError) as exc:  # not stored, so not acknowledged
            raise HTTPException(503, detail=f"the rating was not stored ({exc}); send it again") from None
        gateway.metrics.feedback.labels(row["route"], row["version"], row["rating"]).inc()
        return {"id": row["id"], "rating": row["rating"], "stored": True}

    @app.get("/v1/models")
    async def models(request: Request) -> dict:
        gateway.check_key(request)
        return {"object": "list", "data": [{"id": name, "object": "model", "owned_by": "charforge"}
                                           for name in sorted(gateway.table.routes)]}

    @app.get("/health")
    async def health() -> Response:
        healthy = [r.name for r in gateway.replicas.values() if r.healthy]
        if gateway.draining:  # stopping: a load balancer's check takes this gateway out
            return JSONResponse({"healthy_replicas": healthy, "draining": True}, status_code=503)
        return JSONResponse({"healthy_replicas": healthy}, status_code=200 if healthy else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(gateway.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/admin/replicas")
    async def replicas(request: Request) -> list[dict]:
        gateway.check_admin(request)
        await gateway.refresh()
        return [{"name": r.name, "url": r.url, "healthy": r.healthy, "outstanding": r.outstanding,
                 "loaded": sorted(r.loaded), "adapters": sorted(r.adapters)} for r in gateway.replicas.values()]

    @app.get("/admin/placement")
    async def placement(request: Request) -> dict:
        """Where this gateway places versions from (null: it places nothing; only pinned versions are served), so a
        deployment configured with placement can check it hands its versions to a gateway that will place them."""
        gateway.check_admin(request)
        catalogue = gateway.catalogue
        return {"catalogue": str(catalogue.path) if catalogue else None,
                "max_resident": catalogue.max_resident if catalogue else None}

    @app.get("/admin/routes")
    async def routes(request: Request) -> dict:
        gateway.check_admin(request)
        return {name: r.__dict__ for name, r in gateway.table.routes.items()}

    def change(who: str, action: str, name: str, weights: dict, **kw) -> dict:
        before = gateway.table.routes.get(name)
        try:
            route = gateway.table.set_weights(name, weights, who=who, **kw)
        except RouteChanged as exc:
            raise HTTPException(409, detail=str(exc)) from None
        except ValueError as exc:
            raise HTTPException(400, detail=str(exc)) from None
        gateway.audit(who, action, name, before, route)
        return route.__dict__

    @app.put("/admin/routes/{name}")
    async def set_route(name: str, request: Request) -> dict:
        """Set a stable name's weights; every weighted version must be loaded on at least one healthy replica, or
        be in the adapter catalogue (placed on demand).
        `expected_generation`: change it only if nobody changed it since (409 otherwise)."""
        who = gateway.check_admin(request)
        body = await gateway.read_json(request)
        try:
            weights = {str(k): float(v) for k, v in body["weights"].items()}
        except (KeyError, AttributeError, TypeError, ValueError):
            raise HTTPException(400, detail='body must hold "weights": {"<served name>": <percent>, ...}') from None
        await gateway.refresh()
        missing = [v for v, w in weights.items() if w > 0 and not gateway.servable(v)]
        if missing:
            raise HTTPException(409, detail=f"not loaded on any healthy replica: {', '.join(missing)}")
        return change(who, "set_weights", name, weights, system_prompt=optional_field(body, "system_prompt", str),
                      previous=previous_weights(body.get("previous")),
                      expected_generation=optional_field(body, "expected_generation", int))

    @app.put("/admin/monitor")
    async def monitor(request: Request) -> dict:
        """The character monitor's window, as gauges: {"windows": [{route, version, replies, values, drift}]}."""
        gateway.check_admin(request)
        body = await gateway.read_json(request)
        try:
            windows = [(str(w["route"]), str(w["version"]), int(w["replies"]), bool(w["drift"]),
                        {str(k): float(v) for k, v in w["values"].items()}) for w in body["windows"]]
        except (KeyError, AttributeError, TypeError, ValueError):
            raise HTTPException(400, detail='body must hold "windows": [{"route", "version", "replies", "drift", '
                                            '"values": {metric: number}}]') from None
        m = gateway.metrics
        for route, version, replies, drift, values in windows:
            m.monitor_replies.labels(route, version).set(replies)
            m.monitor_drift.labels(route, version).set(float(drift))
            for metric, value in values.items():
                m.monitor.labels(route, version, metric).set(value)
        return {"windows": len(windows)}

    @app.post("/admin/routes/{name}/rollback")
    async def rollback(name: str, request: Request) -> dict:
        """Restore the weights before the last change (one file write; takes effect on the next request)."""
        who = gateway.check_admin(request)
        body = await gateway.read_json(request, optional=True)
        expected = optional_field(body, "expected_generation", int)
        route = gateway.table.routes.get(name)
        if route is None or not route.previous:
            raise HTTPException(409, detail=f"{name!r} has no previous weights to roll back to")
        return change(who, "rollback", name, route.previous, expected_generation=expected)

    return app
