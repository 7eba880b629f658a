"""OpenAI-compatible gateway in front of the vLLM fleet.

Clients call a stable name (e.g. `charforge`, or a character id such as `nell_bramwick`); the routing table maps it
to versioned adapter names with weights (`{"charforge-smollm2-lora-v3": 95, "charforge-smollm2-lora-v4": 5}`).
Per request: pick the version (sticky per user during a canary), pick a healthy replica that has that version
loaded, rewrite `model`, proxy (streaming or not), retry on another replica when the connection fails.

The routing table is a JSON file written atomically, so a restarted gateway comes back with the live state.
"""

from __future__ import annotations

import asyncio
import hmac
import itertools
import json
import logging
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import httpx
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from charforge.http import bearer
from charforge.io import write_json_atomic
from serving.fleet import replica_headers
from serving.routing import Replica, Strategy, assign_version, choose_replica


@dataclass
class Route:
    """A stable name: version weights, and optionally the system prompt of the character it stands for."""

    weights: dict[str, float]
    system_prompt: str | None = None
    previous: dict[str, float] | None = None  # the weights before the last change: what a rollback restores


@dataclass
class RouteTable:
    path: Path
    routes: dict[str, Route] = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path) -> "RouteTable":
        if not path.is_file():
            return cls(path)
        raw = json.loads(path.read_text())
        return cls(path, {name: Route(**r) for name, r in raw.get("routes", {}).items()})

    def save(self) -> None:
        # atomic: a crash leaves the old table or the new one
        write_json_atomic(self.path, {"routes": {n: r.__dict__ for n, r in self.routes.items()}})

    def set_weights(self, name: str, weights: dict[str, float], system_prompt: str | None = None,
                    previous: dict[str, float] | None = None) -> Route:
        """New weights; `previous` is what a rollback restores (default: the weights being replaced; a rollout
        passes the weights from before its first step, so rolling back mid-canary returns to the old version)."""
        if not any(w > 0 for w in weights.values()):
            raise ValueError(f"route {name!r}: at least one version needs a positive weight")
        old = self.routes.get(name)
        if previous is None:
            previous = dict(old.weights) if old else None
        route = Route(weights=dict(weights), system_prompt=system_prompt if system_prompt is not None else
                      (old.system_prompt if old else None), previous=previous)
        self.routes[name] = route
        self.save()
        return route


# The replica refused the connection, or dropped it before any response byte reached the client (a killed replica):
# the request had no effect the client saw, so another replica can take it. Timeouts are not retried (the work may
# still be running), and a stream that already sent chunks is never restarted.
RETRYABLE = (httpx.ConnectError, httpx.RemoteProtocolError, httpx.ReadError)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        labels = ["route", "version"]
        self.requests = Counter("gateway_requests_total", "Requests by outcome", [*labels, "status"],
                                registry=self.registry)
        self.latency = Histogram("gateway_request_seconds", "End-to-end latency", labels, registry=self.registry,
                                 buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64))
        self.ttft = Histogram("gateway_time_to_first_token_seconds", "Time to the first streamed chunk", labels,
                              registry=self.registry, buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16))
        self.tokens = Counter("gateway_completion_tokens_total", "Completion tokens (non-streaming usage)", labels,
                              registry=self.registry)
        self.outstanding = Gauge("gateway_outstanding_requests", "In-flight requests per replica", ["replica"],
                                 registry=self.registry)
        self.retries = Counter("gateway_connect_retries_total", "Requests retried on another replica", ["replica"],
                               registry=self.registry)


class Gateway:
    def __init__(self, replica_urls: list[str], table: RouteTable, strategy: Strategy = "least_outstanding",
                 api_key: str | None = None, health_interval_s: float = 1.0, connect_retries: int = 2,
                 request_timeout_s: float = 300, discover=None) -> None:
        self.replicas = {f"replica-{i}": Replica(f"replica-{i}", url.rstrip("/"), healthy=False)
                         for i, url in enumerate(replica_urls)}
        self.discover = discover  # () -> {name: url}, e.g. ready pods by label (serving/discovery_k8s.py)
        self.table, self.strategy, self.api_key = table, strategy, api_key
        self.health_interval_s, self.connect_retries = health_interval_s, connect_retries
        self.counter = itertools.count()
        self.metrics = Metrics()
        self.client = httpx.AsyncClient(timeout=httpx.Timeout(request_timeout_s, connect=2.0),
                                        headers=replica_headers(),  # the replicas' key, never the client's
                                        limits=httpx.Limits(max_connections=512, max_keepalive_connections=128))
        self._poller: asyncio.Task | None = None

    # ---- replica state -------------------------------------------------------------------------------------------
    def set_replicas(self, urls: dict[str, str]) -> None:
        """Replace the replica set (dynamic discovery); replicas that stay keep their state."""
        self.replicas = {name: self.replicas[name] if name in self.replicas and self.replicas[name].url == url
                         else Replica(name, url.rstrip("/"), healthy=False) for name, url in urls.items()}

    async def refresh(self) -> None:
        """Poll every replica's /health and /v1/models: healthy + the names it serves right now."""
        if self.discover is not None:
            try:
                self.set_replicas(await asyncio.to_thread(self.discover))
            except Exception as exc:  # the API server is unreachable or refuses: keep the last known replicas
                logging.getLogger(__name__).warning("fleet discovery failed: %s", exc)
        async def one(replica: Replica) -> Replica:
            try:
                health = await self.client.get(f"{replica.url}/health", timeout=2)
                models = await self.client.get(f"{replica.url}/v1/models", timeout=2)
                names = frozenset(m["id"] for m in models.json()["data"])
                return replace(replica, healthy=health.status_code == 200, loaded=names)
            except (httpx.HTTPError, ValueError, KeyError):
                return replace(replica, healthy=False)
        updated = await asyncio.gather(*(one(r) for r in self.replicas.values()))
        for r in updated:
            current = self.replicas.get(r.name)
            if current is not None:  # not dropped by discovery meanwhile
                self.replicas[r.name] = replace(r, outstanding=current.outstanding)

    async def poll_forever(self) -> None:
        while True:
            await self.refresh()
            await asyncio.sleep(self.health_interval_s)

    def mark_unhealthy(self, name: str) -> None:
        if name in self.replicas:  # discovery may have dropped it meanwhile
            self.replicas[name] = replace(self.replicas[name], healthy=False)

    def _track(self, name: str, delta: int) -> None:
        r = self.replicas.get(name)
        if r is None:  # dropped by discovery while the request ran
            return
        self.replicas[name] = replace(r, outstanding=max(0, r.outstanding + delta))
        self.metrics.outstanding.labels(name).set(self.replicas[name].outstanding)

    # ---- requests ------------------------------------------------------------------------------------------------
    def check_key(self, request: Request) -> None:
        if self.api_key and not hmac.compare_digest(request.headers.get("authorization", "").encode(),
                                                    bearer(self.api_key)["authorization"].encode()):
            raise HTTPException(401, detail="missing or wrong API key: send Authorization: Bearer <key>")

    def resolve(self, body: dict, request: Request) -> tuple[str, str, dict]:
        """(route name, served model name, body to send upstream)."""
        name = body.get("model")
        route = self.table.routes.get(name)
        if route is None:
            known = ", ".join(sorted(self.table.routes)) or "none yet (deploy an adapter first)"
            raise HTTPException(404, detail=f"model {name!r} is not served here; available: {known}")
        user = body.get("user") or request.headers.get("x-session-id")
        version = assign_version(route.weights, user, next(self.counter))
        upstream = {**body, "model": version}
        if route.system_prompt and "messages" in body and not any(m.get("role") == "system" for m in body["messages"]):
            upstream["messages"] = [{"role": "system", "content": route.system_prompt}, *body["messages"]]
        return name, version, upstream

    async def forward(self, path: str, request: Request) -> Response:
        self.check_key(request)
        try:
            body = await request.json()
        except ValueError:
            raise HTTPException(400, detail="request body is not JSON") from None
        route, version, upstream = self.resolve(body, request)
        tried: set[str] = set()
        started = time.perf_counter()
        for _ in range(self.connect_retries + 1):
            replica = choose_replica(list(self.replicas.values()), version, self.strategy,
                                     counter=next(self.counter), user=upstream.get("user"),
                                     exclude=frozenset(tried))
            if replica is None:
                break
            tried.add(replica.name)
            try:
                return await self._send(replica, path, upstream, route, version, started)
            except RETRYABLE:
                self.mark_unhealthy(replica.name)
                self.metrics.retries.labels(replica.name).inc()
        self.metrics.requests.labels(route, version, "503").inc()
        raise HTTPException(503, detail=f"no healthy replica serves {version!r} right now")

    async def _send(self, replica: Replica, path: str, body: dict, route: str, version: str,
                    started: float) -> Response:
        url = f"{replica.url}{path}"
        headers = {"x-charforge-version": version, "x-charforge-replica": replica.name}
        self._track(replica.name, +1)
        if body.get("stream"):
            upstream = await self.client.send(self.client.build_request("POST", url, json=body), stream=True)

            async def relay():
                first = True
                try:
                    async for chunk in upstream.aiter_raw():
                        if first:
                            self.metrics.ttft.labels(route, version).observe(time.perf_counter() - started)
                            first = False
                        yield chunk
                finally:
                    await upstream.aclose()
                    self._track(replica.name, -1)
                    self.metrics.requests.labels(route, version, str(upstream.status_code)).inc()
                    self.metrics.latency.labels(route, version).observe(time.perf_counter() - started)

            return StreamingResponse(relay(), status_code=upstream.status_code, headers=headers,
                                     media_type=upstream.headers.get("content-type", "text/event-stream"))
        try:
            response = await self.client.post(url, json=body)
        finally:
            self._track(replica.name, -1)
        elapsed = time.perf_counter() - started
        self.metrics.requests.labels(route, version, str(response.status_code)).inc()
        self.metrics.latency.labels(route, version).observe(elapsed)
        self.metrics.ttft.labels(route, version).observe(elapsed)
        try:
            payload = response.json()
            self.metrics.tokens.labels(route, version).inc(payload.get("usage", {}).get("completion_tokens", 0))
        except ValueError:
            return Response(response.content, status_code=response.status_code, headers=headers)
        return JSONResponse(payload, status_code=response.status_code, headers=headers)


def create_app(gateway: Gateway) -> FastAPI:
    @asynccontextmanager
    async def lifespan(_: FastAPI):
        await gateway.refresh()
        gateway._poller = asyncio.create_task(gateway.poll_forever())
        yield
        gateway._poller.cancel()
        await gateway.client.aclose()

    app = FastAPI(title="charforge gateway", lifespan=lifespan)

    @app.exception_handler(HTTPException)
    async def openai_error(_: Request, exc: HTTPException) -> JSONResponse:
        """Errors in the OpenAI shape, so OpenAI clients show the message."""
        kinds = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
                 409: "conflict_error", 503: "service_unavailable"}
        return JSONResponse({"error": {"message": exc.detail, "type": kinds.get(exc.status_code, "error"),
                                       "param": None, "code": exc.status_code}}, status_code=exc.status_code)

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        return await gateway.forward("/v1/chat/completions", request)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await gateway.forward("/v1/completions", request)

    @app.get("/v1/models")
    async def models(request: Request) -> dict:
        gateway.check_key(request)
        return {"object": "list", "data": [{"id": name, "object": "model", "owned_by": "charforge"}
                                           for name in sorted(gateway.table.routes)]}

    @app.get("/health")
    async def health() -> Response:
        healthy = [r.name for r in gateway.replicas.values() if r.healthy]
        return JSONResponse({"healthy_replicas": healthy}, status_code=200 if healthy else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(gateway.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/admin/replicas")
    async def replicas(request: Request) -> list[dict]:
        gateway.check_key(request)
        await gateway.refresh()
        return [{"name": r.name, "url": r.url, "healthy": r.healthy, "outstanding": r.outstanding,
                 "loaded": sorted(r.loaded)} for r in gateway.replicas.values()]

    @app.get("/admin/routes")
    async def routes(request: Request) -> dict:
        gateway.check_key(request)
        return {name: r.__dict__ for name, r in gateway.table.routes.items()}

    @app.put("/admin/routes/{name}")
    async def set_route(name: str, request: Request) -> dict:
        """Set a stable name's weights; every weighted version must be loaded on at least one healthy replica."""
        gateway.check_key(request)
        body = await request.json()
        weights = {k: float(v) for k, v in body["weights"].items()}
        await gateway.refresh()
        missing = [v for v, w in weights.items() if w > 0 and not any(
            r.healthy and v in r.loaded for r in gateway.replicas.values())]
        if missing:
            raise HTTPException(409, detail=f"not loaded on any healthy replica: {', '.join(missing)}")
        try:
            route = gateway.table.set_weights(name, weights, body.get("system_prompt"), body.get("previous"))
        except ValueError as exc:
            raise HTTPException(400, detail=str(exc)) from None
        return route.__dict__

    @app.post("/admin/routes/{name}/rollback")
    async def rollback(name: str, request: Request) -> dict:
        """Restore the weights before the last change (one file write; takes effect on the next request)."""
        gateway.check_key(request)
        route = gateway.table.routes.get(name)
        if route is None or not route.previous:
            raise HTTPException(409, detail=f"route {name!r} has no previous weights to roll back to")
        return gateway.table.set_weights(name, route.previous).__dict__

    return app
