"""The gateway's decisions as pure functions: which replica, which adapter version, whether a canary step may go
on, and what a failed adapter load means. Table-driven tests live in tests/serving/test_routing.py."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Literal

Strategy = Literal["round_robin", "least_outstanding", "consistent_hash", "adapter_affinity"]


@dataclass(frozen=True)
class Replica:
    name: str
    url: str
    healthy: bool = True
    outstanding: int = 0
    loaded: frozenset[str] = frozenset()  # served model names (base + LoRA names) the replica reports
    adapters: frozenset[str] = frozenset()  # the LoRA names among them (resident adapters)


def _hash(key: str) -> int:
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big")


def eligible(replicas: list[Replica], model: str) -> list[Replica]:
    """Healthy replicas that have `model` loaded: a request never goes to a replica lacking its adapter."""
    return [r for r in replicas if r.healthy and model in r.loaded]


def choose_replica(replicas: list[Replica], model: str, strategy: Strategy, counter: int = 0,
                   user: str | None = None, exclude: frozenset[str] = frozenset(),
                   max_outstanding: int | None = None) -> Replica | None:
    """The replica for one request, or None when no healthy replica serves `model`.

    round_robin: the `counter`-th eligible replica; least_outstanding: fewest in-flight requests (ties by name);
    consistent_hash: rendezvous hashing of the user id, so a user stays on one replica while the set is stable and
    only the users of a removed replica move; adapter_affinity: as least_outstanding here (where a version is not
    resident, `serving.placement.choose` decides). `exclude` holds replicas already tried for this request; replicas
    with `max_outstanding` requests in flight are full (None when every eligible one is).
    """
    pool = [r for r in eligible(replicas, model) if r.name not in exclude
            and (max_outstanding is None or r.outstanding < max_outstanding)]
    if not pool:
        return None
    pool.sort(key=lambda r: r.name)
    if strategy == "round_robin":
        return pool[counter % len(pool)]
    if strategy in ("least_outstanding", "adapter_affinity"):  # affinity: among replicas that hold the model
        return min(pool, key=lambda r: (r.outstanding, r.name))
    if strategy == "consistent_hash":
        key = user if user is not None else str(counter)
        return max(pool, key=lambda r: _hash(f"{key}|{r.name}"))
    raise ValueError(f"unknown routing strategy {strategy!r}; use round_robin, least_outstanding, consistent_hash "
                     f"or adapter_affinity")


def assign_version(weights: dict[str, float], user: str | None, counter: int = 0) -> str:
    """The versioned adapter name for one request, given `{versioned name: weight}` (weights sum to 100).

    A user id maps to a fixed point in [0, 100): with weights 5/95 the same 5% of users see the new version on every
    request, and growing the canary to 25% keeps those users on it (the point does not move, the boundary does).
    Without a user id the request counter spreads requests by the weights.
    """
    live = [(name, w) for name, w in sorted(weights.items(), key=lambda kv: kv[0]) if w > 0]
    if not live:
        raise ValueError("no version has a positive weight")
    point = (_hash(user) % 10_000) / 100 if user is not None else (counter * 37 % 100) + 0.5
    total = sum(w for _, w in live)
    point = point * total / 100
    # Order: the newest version (largest weight share grows from the bottom) is placed first, so a user below the
    # canary boundary stays in the canary as it grows.
    ordered = sorted(live, key=lambda kv: _version_rank(kv[0]), reverse=True)
    edge = 0.0
    for name, weight in ordered:
        edge += weight
        if point < edge:
            return name
    return ordered[-1][0]


def _version_rank(name: str) -> int:
    """`<character>-v<N>` -> N (names without a version rank lowest)."""
    tail = name.rsplit("-v", 1)
    return int(tail[1]) if len(tail) == 2 and tail[1].isdigit() else -1


@dataclass(frozen=True)
class WindowStats:
    """What the gateway measured for one version over a canary step."""

    requests: int
    errors: int
    p95_latency_s: float

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0


@dataclass(frozen=True)
class Gate:
    max_error_rate: float = 0.01          # absolute
    max_error_rate_increase: float = 0.005  # vs the previous version in the same window
    max_latency_ratio: float = 1.5          # p95 new / p95 old
    min_requests: int = 20                  # below this the step is extended, not judged


def gate_decision(new: WindowStats, old: WindowStats | None, gate: Gate) -> tuple[str, str]:
    """("advance" | "wait" | "rollback", why) for one canary step."""
    if new.requests < gate.min_requests:
        return "wait", f"only {new.requests} requests on the new version (< {gate.min_requests}); hold the step"
    if new.error_rate > gate.max_error_rate:
        return "rollback", f"error rate {new.error_rate:.1%} > {gate.max_error_rate:.1%}"
    if old is not None and old.requests:
        if new.error_rate - old.error_rate > gate.max_error_rate_increase:
            return "rollback", (f"error rate {new.error_rate:.1%} vs {old.error_rate:.1%} on the previous version "
                                f"(> +{gate.max_error_rate_increase:.1%})")
        if old.p95_latency_s > 0 and new.p95_latency_s / old.p95_latency_s > gate.max_latency_ratio:
            return "rollback", (f"p95 latency {new.p95_latency_s * 1000:.0f} ms vs {old.p95_latency_s * 1000:.0f} ms "
                                f"(> {gate.max_latency_ratio:g}x)")
    return "advance", f"{new.requests} requests, error rate {new.error_rate:.1%}, p95 {new.p95_latency_s * 1000:.0f} ms"


LoadVerdict = Literal["ok", "already_loaded", "bad_artifact", "bad_replica", "config_error"]


def classify_load(status: int | None, body: str, vllm_error_json: bool) -> LoadVerdict:
    """What a `/v1/load_lora_adapter` answer means for a rollout (vLLM 0.32 semantics).

    - 200: loaded. 400 "already been loaded": fine iff the replica's `root` for the name is our path (checked by
      the caller).
    - 404/500 carrying vLLM's error JSON, or other 400s: the artifact is bad (missing files, rank above the max,
      modules_to_save, bad config) -> abort the rollout everywhere, no retry.
    - no answer (None: connection refused/timeout), 502/503/504: the replica is bad -> out of rotation, retry later.
    - 404 without vLLM's error JSON: runtime LoRA updating is off on that replica -> configuration error.
    """
    if status == 200:
        return "ok"
    if status is None or status in (502, 503, 504):
        return "bad_replica"
    if status == 400 and "already been loaded" in body:
        return "already_loaded"
    if status == 404 and not vllm_error_json:
        return "config_error"
    if status in (400, 404, 500):
        return "bad_artifact"
    return "bad_replica"
