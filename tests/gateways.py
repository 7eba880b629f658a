"""The gateway layouts tests and benches start: the app in the test's own process (`running`), gateway processes as
an operator runs them (`charforge gateway`, one per port), and HAProxy in plain TCP mode in front of several.
HAProxy is Debian's package (`make haproxy` installs it)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import uvicorn
import yaml

from charforge.vllm_server import free_port
from serving.gateway import Gateway, create_app

CHARFORGE = Path(sys.executable).parent / "charforge"


@contextmanager
def running(gw: Gateway):
    """The gateway app on a free port, in this process (so the test can read its state)."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(gw), host="127.0.0.1", port=port, log_level="critical"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def wait_healthy(gw: Gateway, n: int = 1) -> None:
    deadline = time.monotonic() + 10
    while sum(r.healthy for r in gw.replicas.values()) < n:
        assert time.monotonic() < deadline, gw.replicas
        time.sleep(0.05)


class GatewayProcess:
    """`charforge gateway --config <config with `gateway` settings> --replica ...` on its own port, with the given
    state directory (gateways given the same one share its routing table) and environment (a None value removes
    that variable)."""

    def __init__(self, work: Path, name: str, replicas: list[str], state: Path, config: dict | None = None,
                 env: dict | None = None, port: int | None = None) -> None:
        self.name, self.port = name, port or free_port()
        cfg = {**(config or {}), "gateway": {**(config or {}).get("gateway", {}), "port": self.port}}
        self.config = work / f"gw-{name}.yaml"
        self.config.write_text(yaml.safe_dump(cfg))
        self.replicas, self.state, self.env, self.work = replicas, state, env or {}, work
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.start()

    def start(self, timeout: float = 120) -> None:
        """Start (or restart, on the same port) and wait until /health answers 200."""
        self.log = open(self.work / f"gw-{self.name}.log", "a")
        self.proc = subprocess.Popen([str(CHARFORGE), "gateway", "--config", str(self.config),
                                      *[a for r in self.replicas for a in ("--replica", r)]],
                                     env={k: v for k, v in {**os.environ, **self.env,
                                                            "CHARFORGE_STATE_DIR": str(self.state)}.items()
                                          if v is not None},
                                     stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while True:
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError(f"gateway {self.name} did not become healthy; see {self.log.name}")
            time.sleep(0.2)

    def rss_mib(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM (the gateway drains, then exits); its exit code."""
        self.proc.terminate()
        code = self.proc.wait(timeout=timeout)
        self.log.close()
        return code

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def haproxy_binary() -> str | None:
    return shutil.which("haproxy") or next((p for p in ("/usr/sbin/haproxy",) if Path(p).exists()), None)


class TCPBalancer:
    """HAProxy in `mode tcp` (it relays connections, it does not read HTTP) round-robin over `backends`, with a
    health check on each gateway's /health every 500 ms (one failure takes it out, two passes bring it back) and a
    failed connect retried on another gateway (`option redispatch`)."""

    def __init__(self, work: Path, backends: list[str]) -> None:
        binary = haproxy_binary()
        if binary is None:
            raise RuntimeError("haproxy is missing: `make haproxy` installs Debian's package")
        self.port = free_port()
        servers = "\n".join(f"    server gw{i} {url.split('://', 1)[1]} check inter 500ms fall 1 rise 2"
                            for i, url in enumerate(backends))
        self.config = work / "haproxy.cfg"
        self.config.write_text(f"""global
    maxconn 4096
defaults
    mode tcp
    timeout connect 2s
    timeout client 10m
    timeout server 10m
    retries 3
    option redispatch
frontend gateways
    bind 127.0.0.1:{self.port}
    default_backend gateways
backend gateways
    balance roundrobin
    option httpchk GET /health
{servers}
""")
        self.log = open(work / "haproxy.log", "w")
        self.proc = subprocess.Popen([binary, "-db", "-f", str(self.config)], stdout=self.log,
                                     stderr=subprocess.STDOUT)
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 30
        while True:
            try:
                httpx.get(f"{self.url}/health", timeout=2)
                return
            except httpx.HTTPError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError(f"haproxy did not start; see {self.log.name}") from None
                time.sleep(0.2)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)
        self.log.close()
