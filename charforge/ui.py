"""`charforge ui`: a real Prefect server and a real MLflow server on loopback, stopped together on Ctrl-C."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from charforge.errors import Unavailable

from charforge.settings import PlatformConfig


@dataclass
class Service:
    name: str
    command: list[str]
    health_url: str
    env: dict[str, str]
    process: subprocess.Popen | None = None


def build_services(cfg: PlatformConfig) -> list[Service]:
    """The two servers, with their stores under the state directory."""
    bindir = Path(sys.executable).parent
    host, ui = cfg.ui.host, cfg.ui
    env = dict(os.environ, PREFECT_HOME=str(cfg.prefect_home), PREFECT_SERVER_ANALYTICS_ENABLED="false")
    prefect = Service(
        name="Prefect",
        command=[str(bindir / "prefect"), "server", "start", "--host", host, "--port", str(ui.prefect_port)],
        health_url=f"http://{host}:{ui.prefect_port}/api/health",
        env=env,
    )
    artifacts = cfg.artifact_root
    mlflow = Service(
        name="MLflow",
        command=[
            sys.executable, "-m", "mlflow", "server", "--host", host, "--port", str(ui.mlflow_port),
            "--backend-store-uri", cfg.tracking_uri, "--artifacts-destination", artifacts,
            "--workers", "1",
        ],
        health_url=f"http://{host}:{ui.mlflow_port}/health",
        env=env,
    )
    return [prefect, mlflow]


def start(service: Service, log_dir: Path) -> None:
    log_dir.mkdir(parents=True, exist_ok=True)
    log = open(log_dir / f"{service.name.lower()}.log", "ab")
    # Own process group, so stopping kills the server and every worker it forked.
    service.process = subprocess.Popen(
        service.command, env=service.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )


def wait_healthy(service: Service, timeout: float, log_dir: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if service.process.poll() is not None:
            raise Unavailable(
                f"{service.name} server exited with code {service.process.returncode}; "
                f"see {log_dir / (service.name.lower() + '.log')}"
            )
        try:
            if httpx.get(service.health_url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise Unavailable(f"{service.name} not healthy at {service.health_url} after {timeout:.0f} s")


def stop(services: list[Service], grace: float = 15) -> None:
    """SIGTERM each process group, then SIGKILL whatever is still alive after `grace` seconds."""
    running = [s for s in services if s.process is not None and s.process.poll() is None]
    for s in running:
        os.killpg(s.process.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    for s in running:
        try:
            s.process.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            os.killpg(s.process.pid, signal.SIGKILL)
            s.process.wait()


def start_worker(cfg: PlatformConfig, prefect: Service, log_dir: Path) -> Service:
    """Deploy prefect.yaml to the server and start a worker for its pool, so "Run" in the UI executes here."""
    from charforge import deployments

    api = prefect.health_url.removesuffix("/health")
    print("deploying prefect.yaml (prefect deploy --all) ...", flush=True)
    names = deployments.deploy_all(api, prefect.env)
    print(f"deployments: {', '.join(names)}", flush=True)
    worker = Service(name="Worker", command=deployments.worker_command(), health_url=api,
                     env=deployments.prefect_env(api, dict(prefect.env, MLFLOW_TRACKING_URI=cfg.tracking_uri)))
    start(worker, log_dir)
    deployments.wait_worker_online(api, worker.process)
    print(f"worker: pool {deployments.work_pool()} (log: {log_dir / 'worker.log'})", flush=True)
    return worker


def run_ui(cfg: PlatformConfig, timeout: float = 180, deploy: bool = True) -> None:
    """Start both servers (and, with `deploy`, the deployments and a worker), print their URLs, block until
    SIGINT/SIGTERM, then stop everything."""
    services = build_services(cfg)
    log_dir = cfg.state / "logs"
    stopping = False

    def request_stop(signum, frame):
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    try:
        for s in services:
            start(s, log_dir)
        for s in services:
            wait_healthy(s, timeout, log_dir)
        prefect, mlflow = services
        if deploy:
            services.append(start_worker(cfg, prefect, log_dir))
        print(f"Prefect UI: {prefect.health_url.removesuffix('/api/health')}", flush=True)
        print(f"MLflow UI:  {mlflow.health_url.removesuffix('/health')}", flush=True)
        print(
            f"To send flow runs to this Prefect server: export PREFECT_API_URL="
            f"{prefect.health_url.removesuffix('/health')}\nPress Ctrl-C to stop them.",
            flush=True,
        )
        while not stopping:
            for s in services:
                if s.process.poll() is not None:
                    raise Unavailable(f"{s.name} server exited with code {s.process.returncode}")
            time.sleep(0.5)
    finally:
        stop(services)
        print("UIs stopped.", flush=True)
