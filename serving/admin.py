"""The gateway's admin API as its clients use it (a rollout, `charforge rollback`, `serve status`, the chain):
replicas and what they serve, routes and their weights, and the request metrics a canary is judged on."""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

import httpx
from prometheus_client.parser import text_string_to_metric_families

from charforge.errors import Refused, Unavailable
from charforge.http import bearer


class GatewayUnavailable(Unavailable):
    """The gateway does not answer (not started, or down for longer than a restart takes)."""


class GatewayRefused(Refused):
    """The gateway answered an admin call with an error (e.g. a version no healthy replica has loaded)."""


class RouteChanged(GatewayRefused):
    """A compare-and-set write found the route changed since it was read (an operator's rollback, another writer)."""


@dataclass(frozen=True)
class ReplicaState:
    name: str
    url: str
    healthy: bool
    outstanding: int
    loaded: tuple[str, ...]


@dataclass(frozen=True)
class RouteState:
    weights: dict[str, float]
    system_prompt: str | None = None
    previous: dict[str, float] | None = None
    generation: int = 0
    changed_by: str | None = None

    @classmethod
    def of(cls, raw: dict) -> "RouteState":
        return cls(raw["weights"], raw.get("system_prompt"), raw.get("previous"), raw.get("generation", 0),
                   raw.get("changed_by"))


# (gateway, version, "ok" | "errors" | "le=<bound>", probe?) -> value summed over routes: requests by outcome and
# latency buckets, per gateway (each one's counters restart on its own) and apart for probes
MetricsSnapshot = dict[tuple[str, str, str, bool], float]


def gateway_healthy(url: str, timeout: float = 3) -> bool:
    try:
        return httpx.get(f"{url.rstrip('/')}/health", timeout=timeout).status_code == 200
    except httpx.HTTPError:
        return False


class GatewayAdmin:
    """A client of the admin API; `api_key` is the gateway's admin key, `actor` names the caller in its audit log.
    `metrics_urls`: every gateway sharing the route table, whose request metrics a canary is judged on together
    (default: this one); `dns+http://name:port` stands for every address `name` resolves to (a headless Service)."""

    def __init__(self, url: str, api_key: str | None, actor: str = "charforge",
                 metrics_urls: list[str] | tuple[str, ...] = ()) -> None:
        self.url = url.rstrip("/")
        self.headers = {**bearer(api_key), "x-charforge-actor": actor}
        self.metrics_urls = tuple(metrics_urls)

    def call(self, method: str, path: str, retry_s: float = 60, **kw) -> httpx.Response:
        """One admin call; a gateway that is restarting (connection refused) is waited for up to `retry_s` — its
        routing table is on disk, so a rollout carries on where it was."""
        deadline = time.monotonic() + retry_s
        while True:
            try:
                r = httpx.request(method, f"{self.url}{path}", **{"headers": self.headers, "timeout": 30, **kw})
                break
            except httpx.ConnectError as exc:
                if time.monotonic() > deadline:
                    raise GatewayUnavailable(f"gateway {self.url} unreachable for {retry_s:.0f} s: {exc}") from None
                time.sleep(1)
        if r.status_code >= 400:
            try:
                error = r.json()["error"]
                kind, message = error.get("type"), error.get("message")
            except (ValueError, KeyError, TypeError, AttributeError):
                kind, message = None, r.text
            raise (RouteChanged if kind == "route_changed" else GatewayRefused)(
                f"gateway {method} {path}: {r.status_code} {message}")
        return r

    def replicas(self) -> list[ReplicaState]:
        return [ReplicaState(r["name"], r["url"], r["healthy"], r["outstanding"], tuple(r["loaded"]))
                for r in self.call("GET", "/admin/replicas").json()]

    def placement(self) -> dict:
        """The gateway's placement: its catalogue's path (None without `gateway.placement`) and resident cap."""
        return self.call("GET", "/admin/placement").json()

    def routes(self) -> dict[str, RouteState]:
        return {name: RouteState.of(r) for name, r in self.call("GET", "/admin/routes").json().items()}

    def set_weights(self, route: str, weights: dict[str, float], system_prompt: str | None = None,
                    previous: dict[str, float] | None = None, expected_generation: int | None = None,
                    actor: str | None = None) -> RouteState:
        """Set weights; with `expected_generation`, only if the route is still at it (`RouteChanged` otherwise);
        `actor` signs this change instead of the client's own name."""
        return RouteState.of(self.call("PUT", f"/admin/routes/{route}", json={
            "weights": weights, "system_prompt": system_prompt, "previous": previous,
            "expected_generation": expected_generation},
            headers={**self.headers, **({"x-charforge-actor": actor} if actor else {})}).json())

    def rollback(self, route: str) -> dict[str, float]:
        """Flip a route back to its previous weights; returns the weights now in force."""
        return self.call("POST", f"/admin/routes/{route}/rollback", retry_s=0).json()["weights"]

    def publish_monitor(self, windows: list[dict]) -> int:
        """The character monitor's window as the gateway's `charforge_monitor_*` gauges; returns how many."""
        return self.call("PUT", "/admin/monitor", retry_s=0, json={"windows": windows}).json()["windows"]

    def probe(self, route: str, version: str, prompt: str, max_tokens: int, timeout: float = 120) -> int | str:
        """One probe request through the gateway, pinned to `version` (admin-only header; counted apart from user
        traffic). Returns the HTTP status, or the name of the connection error."""
        try:
            r = httpx.post(f"{self.url}/v1/chat/completions", timeout=timeout,
                           headers={**self.headers, "x-charforge-probe": version},
                           json={"model": route, "max_tokens": max_tokens, "temperature": 0,
                                 "messages": [{"role": "user", "content": prompt}]})
        except httpx.HTTPError as exc:
            return type(exc).__name__
        return r.status_code

    def serves_only(self, route: str, served: str) -> bool:
        """Whether `route` sends all its traffic to `served` already."""
        current = self.routes().get(route)
        return current is not None and current.weights == {served: 100.0}

    def replicas_serving(self, served: str) -> list[str]:
        return [r.url for r in self.replicas() if r.healthy and served in r.loaded]

    def gateways(self) -> list[str]:
        """The gateways whose metrics are added up (`metrics_urls` with `dns+` names resolved now)."""
        return expand_urls(self.metrics_urls) if self.metrics_urls else [self.url]

    def metrics(self) -> MetricsSnapshot:
        """Request counts by outcome and latency histogram buckets per version, summed over routes, user and probe
        traffic apart, from every gateway (one /metrics read each), read with the Prometheus client's own parser.
        A gateway that does not answer within 5 s is left out of this snapshot (its window counts nothing)."""
        out: MetricsSnapshot = {}
        for gateway in self.gateways():
            try:
                text = httpx.get(f"{gateway}/metrics", timeout=5).text if gateway != self.url else \
                    self.call("GET", "/metrics", retry_s=5).text
            except (httpx.HTTPError, GatewayUnavailable):
                continue
            for family in text_string_to_metric_families(text):
                for sample in family.samples:
                    probe = sample.name.startswith("gateway_probe_")
                    name = sample.name.replace("gateway_probe_", "gateway_", 1)
                    if name == "gateway_requests_total":
                        status = sample.labels["status"]
                        kind = "ok" if status.isdigit() and status.startswith("2") else "errors"  # 4xx/5xx, empty,
                        # streams cut midway
                    elif name == "gateway_request_seconds_bucket":
                        kind = f"le={sample.labels['le']}"
                    else:
                        continue
                    key = (gateway, sample.labels["version"], kind, probe)
                    out[key] = out.get(key, 0.0) + sample.value
        return out


def expand_urls(urls: tuple[str, ...] | list[str]) -> list[str]:
    """`dns+http://name:port` -> one `http://<address>:port` per address the name resolves to; others as given."""
    out: list[str] = []
    for url in urls:
        if not url.startswith("dns+"):
            out.append(url.rstrip("/"))
            continue
        parsed = urlsplit(url.removeprefix("dns+"))
        port = parsed.port or (443 if parsed.scheme == "https" else 80)
        try:
            infos = socket.getaddrinfo(parsed.hostname, port, type=socket.SOCK_STREAM)
        except socket.gaierror as exc:
            raise GatewayUnavailable(f"{url}: {parsed.hostname} does not resolve ({exc})") from None
        for address in sorted({info[4][0] for info in infos}):
            host = f"[{address}]" if ":" in address else address
            out.append(f"{parsed.scheme}://{host}:{port}")
    return out
