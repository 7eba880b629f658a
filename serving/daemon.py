"""`charforge serve up | down | status`: the local fleet and its gateway as one detached, supervised process.

`up` starts `charforge serve run` in its own session (it survives the shell that started it), records its pid in
`<state>/serving/serve.json`, and returns once the gateway answers `/health` (every replica started and its live
adapters restored). `run` writes the replica pids there too, so `down` can stop replicas even if the supervisor was
killed with SIGKILL. `down` sends SIGTERM (the supervisor stops its replicas), waits, then kills what is left. Each
pid is recorded with its process's start time and the boot id: after a reboot or a crash, a pid the kernel gave to
another process is not ours, and `down` never signals it.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import yaml

from charforge.errors import InputError, Unavailable
from charforge.io import write_json_atomic
from charforge.schemas.serving import ServingConfig
from charforge.settings import platform
from serving.admin import GatewayAdmin, ReplicaState, RouteState, gateway_healthy


def state_dir() -> Path:
    return platform().state / "serving"


def record_path() -> Path:
    return state_dir() / "serve.json"


def gateway_url(cfg: ServingConfig) -> str:
    return f"http://{cfg.gateway.host}:{cfg.gateway.port}"


def alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (exited, not yet reaped by its parent) is not alive
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


def identity(pid: int | None) -> str | None:
    """Which process `pid` is: this boot's id and the process's start time (Linux /proc), so that a pid the kernel
    handed to another process after a reboot or a crash is not taken for ours. None where /proc cannot say."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        started = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[19]  # field 22: starttime
    except (OSError, IndexError):
        return None
    return f"{boot}:{started}"


def ours(record: dict, pid: int | None) -> bool:
    """`pid` is alive and is the process the record was written for (its start time matches)."""
    if not alive(pid):
        return False
    recorded = record.get("identity", {}).get(str(pid))
    return recorded is None or recorded == identity(pid)


def identities(*pids: int) -> dict[str, str]:
    return {str(pid): ident for pid in pids if (ident := identity(pid)) is not None}


def read_record() -> dict:
    path = record_path()
    return json.loads(path.read_text()) if path.is_file() else {}


def write_record(record: dict) -> None:
    write_json_atomic(record_path(), record)


def note_replicas(fleet) -> None:
    """Called by `serve run` once its replicas are up, and after each restart: the pids `down` must stop."""
    pids = [s.process.pid for s in fleet.servers if s.process is not None]
    write_record({**read_record(), "supervisor": os.getpid(), "replicas": pids,
                  "identity": identities(os.getpid(), *pids)})


def healthy(url: str) -> bool:
    return gateway_healthy(url, timeout=2)


def port_taken(host: str, port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return True
    return False


def require_free_ports(cfg: ServingConfig, config_path: Path) -> None:
    """Refuse to start when a port of the gateway or of a local replica is taken (a replica that cannot bind would
    be restarted forever and the gateway never becomes healthy)."""
    wanted = [("gateway.port", cfg.gateway.host, cfg.gateway.port)]
    if cfg.fleet.discovery == "local":
        wanted += [(f"fleet.first_port + {i}", "127.0.0.1", cfg.fleet.first_port + i) for i in range(cfg.fleet.replicas)]
    taken = [f"{port} ({key})" for key, host, port in wanted if port_taken(host, port)]
    if taken:
        raise InputError(f"port {', '.join(taken)} already in use by another process; stop it or change the "
                         f"port in {config_path}")


def up(config_path: Path, cfg: ServingConfig, timeout: float = 900,
       progress: Callable[[str], None] = print) -> str:
    """Start the fleet + gateway detached (or find it running); return the gateway URL once it is healthy."""
    url = gateway_url(cfg)
    record = read_record()
    if ours(record, record.get("supervisor")):
        if healthy(record.get("url", url)):
            progress(f"already running (pid {record['supervisor']})")
            return record.get("url", url)
    elif healthy(url):
        raise InputError(f"something else answers on {url}; stop it or change gateway.port in {config_path}")
    log = state_dir() / "logs" / "serve.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    if not ours(record, record.get("supervisor")):
        require_free_ports(cfg, config_path)
        with open(log, "ab") as out:
            proc = subprocess.Popen([sys.executable, "-m", "cli", "serve", "run", "--config",
                                     str(Path(config_path).resolve())],
                                    stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True)
        write_record({"supervisor": proc.pid, "url": url, "config": str(Path(config_path).resolve()),
                      "log": str(log), "started": time.time(), "replicas": [], "identity": identities(proc.pid)})
        pid = proc.pid
    else:
        pid, proc = record["supervisor"], None
    started = time.monotonic()
    next_note = started + 15
    while time.monotonic() - started < timeout:
        if proc is not None and proc.poll() is not None or proc is None and not ours(record, pid):
            tail = log.read_text(errors="replace")[-1500:]
            raise Unavailable(f"the fleet exited while starting; last lines of {log}:\n{tail}")
        if healthy(url):
            return url
        if time.monotonic() > next_note:
            progress(f"waiting for the replicas ({time.monotonic() - started:.0f} s; log: {log})")
            next_note += 15
        time.sleep(1)
    raise Unavailable(f"the gateway at {url} was not healthy after {timeout:.0f} s; see {log}")


def up_from_config(cfg: ServingConfig, progress: Callable[[str], None] = print) -> str:
    """`up` for a serving config that is not in a file (the retrain chain's parameter): `serve run` reads its
    config from a file, so it is written under the state directory first."""
    config_path = state_dir() / "retrain-serving.yaml"
    config_path.parent.mkdir(parents=True, exist_ok=True)
    config_path.write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    return up(config_path, cfg, progress=progress).rstrip("/")


def down(grace: float = 60) -> list[int]:
    """Stop the supervisor (it stops its replicas), then anything of ours still alive. Returns the pids stopped."""
    record = read_record()
    pids = [p for p in [record.get("supervisor"), *record.get("replicas", [])] if ours(record, p)]
    sup = record.get("supervisor")
    if ours(record, sup):
        os.kill(sup, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while ours(record, sup) and time.monotonic() < deadline:
            time.sleep(0.5)
    for pid in [sup, *record.get("replicas", [])]:
        if ours(record, pid):  # the supervisor was killed hard, or did not finish in time (never a stranger)
            try:
                os.killpg(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
    record_path().unlink(missing_ok=True)
    return pids


@dataclass(frozen=True)
class FleetStatus:
    supervisor: int | None
    running: bool
    url: str
    gateway_healthy: bool
    replicas: list[ReplicaState]
    routes: dict[str, RouteState]


def status(cfg: ServingConfig, admin_key: str | None) -> FleetStatus:
    """What is running: supervisor pid, gateway health, replicas (with loaded adapters) and routes."""
    record = read_record()
    url = record.get("url", gateway_url(cfg))
    answering = healthy(url)
    admin = GatewayAdmin(url, admin_key, "charforge serve status")
    return FleetStatus(record.get("supervisor"), ours(record, record.get("supervisor")), url, answering,
                       admin.replicas() if answering else [], admin.routes() if answering else {})
