"""A local fleet of vLLM replicas (one base, runtime LoRA loading on), supervised.

Each replica runs under `charforge_vllm.replica` (the command compose and Kubernetes run too): at every start it
loads every adapter of the desired state (`desired.json`: served name -> folder) and reports ready only once it
serves them. The supervisor restarts a replica whose process exited or whose `/health` answers 503 (vLLM's engine
died; the launcher also exits then) and waits for it to be ready again. The gateway only routes a version to
replicas that list it in `/v1/models`, so a restarted replica takes traffic for a version only once that version is
back on it.
"""

from __future__ import annotations

import json
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from charforge.http import bearer
from charforge.io import write_json_atomic
from charforge.vllm_server import VLLMServer, free_port


# The key every replica of the fleet requires on /v1/* (vLLM's VLLM_API_KEY), so no other local process can load or
# unload adapters on it. Unset = replicas without a key (they listen on loopback only).
REPLICA_KEY_ENV = "CHARFORGE_REPLICA_API_KEY"


def replica_key() -> str | None:
    return os.environ.get(REPLICA_KEY_ENV) or None


def replica_headers() -> dict[str, str]:
    """Headers for calls to a replica's /v1 routes (the gateway, the deployer, the supervisor)."""
    return bearer(replica_key())


def load_adapter(url: str, name: str, path: Path, timeout: float = 120) -> tuple[int | None, str, bool]:
    """POST /v1/load_lora_adapter -> (status or None when unreachable, body, body is vLLM's error JSON)."""
    try:
        r = httpx.post(f"{url}/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(path)},
                       headers=replica_headers(), timeout=timeout)
    except httpx.HTTPError as exc:
        return None, f"{type(exc).__name__}: {exc}", False
    try:
        is_vllm_error = "error" in r.json()
    except ValueError:
        is_vllm_error = False
    return r.status_code, r.text, is_vllm_error


def served_roots(url: str) -> dict[str, str]:
    """{LoRA name: root path} a replica reports in /v1/models."""
    data = httpx.get(f"{url}/v1/models", headers=replica_headers(), timeout=5).json()["data"]
    return {m["id"]: m.get("root") for m in data if m.get("parent")}


def desired_path(serving_state: Path) -> Path:
    """`<state>/serving/adapters/desired.json`: in the adapter store, the one folder every replica mounts (compose,
    Kubernetes), so a replica's launcher reads what the deploy flow wrote. A file left at the earlier place
    (`<state>/serving/desired.json`) is moved there."""
    path = serving_state / "adapters" / "desired.json"
    legacy = serving_state / "desired.json"
    if legacy.is_file() and not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        legacy.replace(path)
    return path


def catalogue_path(serving_state: Path) -> Path:
    """`<state>/serving/adapters/catalogue.json`: adapter versions the gateway places on demand (served name ->
    folder), beside the desired state; unlike desired ones, replicas do not load them at start."""
    return serving_state / "adapters" / "catalogue.json"


@dataclass
class DesiredState:
    path: Path
    adapters: dict[str, str] = field(default_factory=dict)  # served name -> folder

    @classmethod
    def load(cls, path: Path) -> "DesiredState":
        return cls(path, json.loads(path.read_text()) if path.is_file() else {})

    def save(self) -> None:
        write_json_atomic(self.path, self.adapters)


class LocalFleet:
    def __init__(self, base_dir: Path, base_name: str, ports: list[int], log_dir: Path, desired_path: Path,
                 on_restart=None, **server_kwargs) -> None:
        self.on_restart = on_restart  # called with the fleet after a replica was restarted (e.g. to record pids)
        server_kwargs.setdefault("api_key", replica_key())
        # each replica runs under `charforge_vllm.replica`, as in compose and Kubernetes: it loads the desired
        # adapters at every start and is ready only once it serves them
        self.servers = [VLLMServer(base_dir, base_name, port, desired=desired_path, ready_port=free_port(),
                                   **server_kwargs) for port in ports]
        self.log_dir, self.desired_path = log_dir, desired_path
        self.restarts = [0] * len(ports)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def urls(self) -> list[str]:
        return [s.url for s in self.servers]

    def start(self, timeout: float = 400) -> None:
        for i, server in enumerate(self.servers):
            server.start(self.log_dir / f"replica-{i}.log")
        for server in self.servers:
            server.wait_ready(timeout)

    def healthy(self, server: VLLMServer) -> bool:
        if server.process is None or server.process.poll() is not None:
            return False
        try:
            return httpx.get(f"{server.url}/health", timeout=5).status_code == 200
        except httpx.HTTPError:
            return True  # busy, not dead: only an exit or a 503 triggers a restart

    def supervise(self, interval: float = 2.0) -> None:
        """Background thread: restart dead replicas and restore their adapters."""
        def loop() -> None:
            while not self._stop.wait(interval):
                for i, server in enumerate(self.servers):
                    if not self.healthy(server):
                        server.stop(grace=5)
                        server.start(self.log_dir / f"replica-{i}.log")
                        try:
                            server.wait_ready(400)  # ready = serving every desired adapter again
                            self.restarts[i] += 1
                            if self.on_restart:
                                self.on_restart(self)
                        except RuntimeError:
                            continue  # tried again next round
        self._thread = threading.Thread(target=loop, name="fleet-supervisor", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=10)
        for server in self.servers:
            server.stop()
