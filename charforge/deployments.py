"""The Prefect side of `charforge ui`: the local process work pool, `prefect deploy --all` of prefect.yaml, and a
worker, all against a running Prefect server (`api_url`)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from functools import lru_cache
from pathlib import Path

import httpx

from charforge.errors import Unavailable
import yaml

from charforge.settings import REPO_ROOT

PREFECT_FILE = REPO_ROOT / "prefect.yaml"


@lru_cache(maxsize=1)
def work_pool() -> str:
    """The pool every deployment in prefect.yaml uses (definitions.work_pools.local)."""
    return yaml.safe_load(PREFECT_FILE.read_text())["definitions"]["work_pools"]["local"]["name"]


def prefect_env(api_url: str, base: dict | None = None) -> dict[str, str]:
    return {**(base if base is not None else os.environ), "PREFECT_API_URL": api_url}


def prefect_cli(*args: str, api_url: str, env: dict | None = None, timeout: float = 600) -> str:
    """Run the `prefect` command of this environment from the repo root; an error names the command and its output."""
    command = [str(Path(sys.executable).parent / "prefect"), "--no-prompt", *args]
    done = subprocess.run(command, cwd=REPO_ROOT, env=prefect_env(api_url, env), capture_output=True, text=True,
                          timeout=timeout)
    if done.returncode != 0:
        raise Unavailable(f"`prefect {' '.join(args)}` failed ({done.returncode}):\n"
                           f"{(done.stdout + done.stderr)[-3000:]}")
    return done.stdout


def ensure_work_pool(api_url: str) -> None:
    """Create the process work pool unless the server has it (a re-run keeps its settings)."""
    if httpx.get(f"{api_url}/work_pools/{work_pool()}", timeout=10).status_code == 404:
        prefect_cli("work-pool", "create", work_pool(), "--type", "process", api_url=api_url)


def deploy_all(api_url: str, env: dict | None = None) -> list[str]:
    """`prefect deploy --all` from the repo root: every deployment in prefect.yaml; returns `flow/deployment` names."""
    ensure_work_pool(api_url)
    prefect_cli("deploy", "--all", api_url=api_url, env=env)
    show_chain_defaults(api_url)
    response = httpx.post(f"{api_url}/deployments/filter", json={"limit": 200}, timeout=30)
    response.raise_for_status()
    flows = httpx.post(f"{api_url}/flows/filter", json={"limit": 200}, timeout=30).json()
    names = {f["id"]: f["name"] for f in flows}
    return sorted(f"{names.get(d['flow_id'], '?')}/{d['name']}" for d in response.json())


def show_chain_defaults(api_url: str) -> int:
    """The retrain deployments' Run form shows the stage configs of configs/retrain/default.yaml as its defaults.

    The flow's own defaults are empty (it reads the chain file when a run starts, not when its module is imported),
    so they are filled into the deployment's parameter schema here; the deployment's parameters stay empty, so a
    scheduled run reads the chain file as it is that night. Returns how many deployments were updated."""
    from charforge.chain import DEFAULT_CHAIN, load_chain

    defaults = load_chain(DEFAULT_CHAIN).model_dump(mode="json")
    found = httpx.post(f"{api_url}/deployments/filter", json={"flows": {"name": {"any_": ["retrain"]}}}, timeout=30)
    found.raise_for_status()
    for deployment in found.json():
        schema = deployment["parameter_openapi_schema"]
        for name, value in defaults.items():
            if name in schema.get("properties", {}):
                schema["properties"][name]["default"] = value
        httpx.patch(f"{api_url}/deployments/{deployment['id']}", json={"parameter_openapi_schema": schema},
                    timeout=30).raise_for_status()
    return len(found.json())


def worker_command() -> list[str]:
    return [str(Path(sys.executable).parent / "prefect"), "worker", "start", "--pool", work_pool(), "--type",
            "process"]


def worker_online(api_url: str) -> bool:
    try:
        response = httpx.post(f"{api_url}/work_pools/{work_pool()}/workers/filter", json={}, timeout=5)
    except httpx.HTTPError:
        return False
    return response.status_code == 200 and any(w.get("status") == "ONLINE" for w in response.json())


def wait_worker_online(api_url: str, process: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise Unavailable(f"the Prefect worker exited with code {process.returncode}")
        if worker_online(api_url):
            return
        time.sleep(1)
    raise Unavailable(f"no worker of pool {work_pool()} came online within {timeout:.0f} s")
