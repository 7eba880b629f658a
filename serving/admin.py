"""The gateway's admin API as its clients use it (a rollout, `charforge rollback`, `serve status`, the chain):
replicas and what they serve, routes and their weights, and the request metrics a canary is judged on."""

from __future__ import annotations

import time
from dataclasses import dataclass

import httpx
from prometheus_client.parser import text_string_to_metric_families

from charforge.errors import Refused, Unavailable
from charforge.http import bearer


class GatewayUnavailable(Unavailable):
    """The gateway does not answer (not started, or down for longer than a restart takes)."""


class GatewayRefused(Refused):
    """The gateway answered an admin call with an error (e.g. a version no healthy replica has loaded)."""


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


# (version, "ok" | "errors" | "le=<bound>") -> value summed over routes: requests by outcome and latency buckets
MetricsSnapshot = dict[tuple[str, str], float]


def gateway_healthy(url: str, timeout: float = 3) -> bool:
    try:
        return httpx.get(f"{url.rstrip('/')}/health", timeout=timeout).status_code == 200
    except httpx.HTTPError:
        return False


class GatewayAdmin:
    def __init__(self, url: str, api_key: str | None) -> None:
        self.url = url.rstrip("/")
        self.headers = bearer(api_key)

    def call(self, method: str, path: str, retry_s: float = 60, **kw) -> httpx.Response:
        """One admin call; a gateway that is restarting (connection refused) is waited for up to `retry_s` — its
        routing table is on disk, so a rollout carries on where it was."""
        deadline = time.monotonic() + retry_s
        while True:
            try:
                r = httpx.request(method, f"{self.url}{path}", headers=self.headers, timeout=30, **kw)
                break
            except httpx.ConnectError as exc:
                if time.monotonic() > deadline:
                    raise GatewayUnavailable(f"gateway {self.url} unreachable for {retry_s:.0f} s: {exc}") from None
                time.sleep(1)
        if r.status_code >= 400:
            raise GatewayRefused(f"gateway {method} {path}: {r.status_code} {r.text}")
        return r

    def replicas(self) -> list[ReplicaState]:
        return [ReplicaState(r["name"], r["url"], r["healthy"], r["outstanding"], tuple(r["loaded"]))
                for r in self.call("GET", "/admin/replicas").json()]

    def routes(self) -> dict[str, RouteState]:
        return {name: RouteState(r["weights"], r.get("system_prompt"), r.get("previous"))
                for name, r in self.call("GET", "/admin/routes").json().items()}

    def set_weights(self, route: str, weights: dict[str, float], system_prompt: str | None = None,
                    previous: dict[str, float] | None = None) -> None:
        self.call("PUT", f"/admin/routes/{route}", json={"weights": weights, "system_prompt": system_prompt,
                                                          "previous": previous})

    def rollback(self, route: str) -> dict[str, float]:
        """Flip a route back to its previous weights; returns the weights now in force."""
        return self.call("POST", f"/admin/routes/{route}/rollback", retry_s=0).json()["weights"]

    def serves_only(self, route: str, served: str) -> bool:
        """Whether `route` sends all its traffic to `served` already."""
        current = self.routes().get(route)
        return current is not None and current.weights == {served: 100.0}

    def replicas_serving(self, served: str) -> list[str]:
        return [r.url for r in self.replicas() if r.healthy and served in r.loaded]

    def metrics(self) -> MetricsSnapshot:
        """Request counts by outcome and latency histogram buckets per version, summed over routes, read with the
        Prometheus client's own parser."""
        out: MetricsSnapshot = {}
        for family in text_string_to_metric_families(self.call("GET", "/metrics").text):
            for sample in family.samples:
                if sample.name == "gateway_requests_total":
                    kind = "ok" if sample.labels["status"].startswith("2") else "errors"
                elif sample.name == "gateway_request_seconds_bucket":
                    kind = f"le={sample.labels['le']}"
                else:
                    continue
                key = (sample.labels["version"], kind)
                out[key] = out.get(key, 0.0) + sample.value
        return out
