"""The serving runtime wired from a serving config: the local fleet (supervised vLLM replicas) and the gateway in
front of any fleet (local, static URLs, or ready pods on Kubernetes). `charforge serve run` and `charforge gateway`
are these functions and `serve_gateway` (uvicorn, with a drain on SIGTERM)."""

from __future__ import annotations

import gc
import logging
import os
import signal
import threading
from collections.abc import Callable
from pathlib import Path

import uvicorn

from charforge.characters import load_characters
from charforge.errors import InputError
from charforge.keys import KeyRing
from charforge.schemas.serving import ServingConfig
from charforge.settings import DATA_DIR, platform
from serving import capture, daemon, state_store, store
from serving.fleet import LocalFleet, catalogue_path, desired_path, replica_key
from serving.gateway import AdapterCatalogue, Gateway, RouteTable, create_app

log = logging.getLogger(__name__)


def local_fleet(cfg: ServingConfig, config_name: str) -> LocalFleet:
    """The replicas `serve run` starts and supervises (not started yet); a bad `fleet.checkpoint` fails here."""
    if cfg.fleet.discovery != "local":
        raise InputError(f"{config_name}: fleet.discovery is {cfg.fleet.discovery!r}; `charforge serve` starts a local "
                         f"fleet, use `charforge gateway` in front of a static one")
    state = platform().state / "serving"
    base_dir = store.fleet_weights(cfg.fleet, state / "checkpoints")
    f = cfg.fleet
    return LocalFleet(base_dir, f.base_model, [f.first_port + i for i in range(f.replicas)], state / "logs",
                      desired_path(state), max_model_len=f.max_model_len, max_lora_rank=f.max_lora_rank,
                      max_loras=f.max_loras, max_cpu_loras=f.max_cpu_loras, kv_cache_gib=f.kv_cache_gib,
                      enable_lora=f.enable_lora, on_restart=daemon.note_replicas, extra_args=f.engine_args())


def replica_urls(cfg: ServingConfig, given: list[str] | None = None) -> tuple[list[str], Callable | None]:
    """The replicas a gateway fronts: the URLs given, the config's static URLs, the local fleet's ports, or (on
    Kubernetes) ready vLLM pods, re-read as they change (then also the callable that re-reads them)."""
    if cfg.fleet.discovery == "kubernetes" and not given:
        from serving.discovery_k8s import PodDiscovery

        discover = PodDiscovery(cfg.fleet.kubernetes).replicas
        return list(discover().values()), discover
    return (given or cfg.fleet.urls or [f"http://127.0.0.1:{cfg.fleet.first_port + i}"
                                        for i in range(cfg.fleet.replicas)]), None


def gateway(cfg: ServingConfig, urls: list[str], discover: Callable | None = None) -> Gateway:
    """The gateway with the routing table of the serving store (`platform.serving_store`: files under the state
    directory, or PostgreSQL) and the config's key and policies."""
    g, state = cfg.gateway, platform().state
    url = state_store.store_url(platform().serving_store_url)
    table = RouteTable.load(state_store.route_store(state, url))
    keys = (KeyRing.from_env(g.api_key_env), KeyRing.from_env(g.admin_key_env))
    check_capture_routes(cfg, table)
    capturer = capture.Capturer(cfg.capture, capture.capture_store(state, url),
                                tuple(k for ring in keys for k in ring.keys()) + tuple(filter(None, [replica_key()])))
    catalogue = None
    if g.placement is not None:
        p = g.placement
        catalogue = AdapterCatalogue(Path(p.catalogue) if p.catalogue else catalogue_path(state / "serving"),
                                     desired_path(state / "serving"), p.max_resident, p.spill_outstanding,
                                     p.load_timeout_s, p.room_wait_s)
    return Gateway([] if discover else urls, table,
                   g.strategy, keys[0], g.health_interval_s, g.connect_retries,
                   g.request_timeout_s, discover=discover, admin_key=keys[1],
                   max_request_bytes=g.max_request_bytes, max_inflight_per_replica=g.max_inflight_per_replica,
                   retry_after_s=g.retry_after_s, audit_path=state / "serving" / "audit.jsonl", capture=capturer,
                   catalogue=catalogue)


def check_capture_routes(cfg: ServingConfig, table: RouteTable) -> None:
    """Every captured route is one the gateway can serve: a persona card, a route in the table, or a rollout
    route; a typo would capture nothing, silently."""
    known = set(load_characters(DATA_DIR / "characters")) | set(table.routes) | \
        {r for r in cfg.rollout.routes if r != "characters"}
    for route in cfg.capture.routes:
        if route not in known:
            raise InputError(f"capture.routes: {route!r} is not a route (persona cards, the routing table and "
                             f"rollout.routes have: {', '.join(sorted(known)) or 'none'})")


class DrainingServer(uvicorn.Server):
    """uvicorn, with a drain before its graceful shutdown. On SIGTERM (a rolling update, `serve down`) the gateway
    first drains for `drain_s`: /health answers 503 so a load balancer's check takes it out of rotation, and every
    response carries `Connection: close` so keep-alive clients reconnect through the balancer, to another gateway,
    instead of racing a closing socket; it still answers everything that reaches it. Then uvicorn stops accepting,
    finishes what is in flight and exits. A second signal stops at once."""

    def __init__(self, config: uvicorn.Config, gateway: Gateway, drain_s: float) -> None:
        super().__init__(config)
        self.gateway, self.drain_s = gateway, drain_s

    def handle_exit(self, sig: int, frame) -> None:
        if self.gateway.draining or self.drain_s <= 0 or sig not in (signal.SIGTERM, signal.SIGINT):
            super().handle_exit(sig, frame)
            return
        self.gateway.draining = True
        log.warning("signal %s: draining for %.1f s (health 503, Connection: close), then stopping", sig, self.drain_s)
        timer = threading.Timer(self.drain_s, super().handle_exit, (sig, frame))
        timer.daemon = True
        timer.start()


def serve_gateway(gw: Gateway, cfg: ServingConfig) -> None:
    """Run the gateway in the foreground until a signal, then drain (`DrainingServer`) and exit."""
    g = cfg.gateway
    config = uvicorn.Config(create_app(gw), host=g.host, port=g.port, log_level="warning", loop=g.event_loop,
                            http=g.http_parser)
    if os.environ.get("CHARFORGE_GATEWAY_GC_FREEZE", "1") != "0":
        # Everything built so far (the imported libraries, the app) lives as long as the process: moved out of the
        # collector's sight, each collection no longer walks it. Saturated throughput ~+25% (make bench-capacity);
        # CHARFORGE_GATEWAY_GC_FREEZE=0 turns it off, for comparison.
        gc.collect()
        gc.freeze()
    DrainingServer(config, gw, cfg.gateway.drain_s).run()
