"""MLflow and Prefect on PostgreSQL, the way deploy/ runs them: a real PostgreSQL server (Debian's package, which
`make test` installs when missing), an `mlflow server` and a `prefect server start` backed by it, and the pipeline
trains, registers and promotes through them. Connection settings take the deployment's form: no password in
MLflow's URI (libpq reads PGPASSWORD), Prefect's URL with `${PREFECT_SERVER_DATABASE_PASSWORD}` filled in by Prefect.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from charforge import ui
from charforge.settings import REPO_ROOT
from charforge.vllm_server import free_port
from tests.postgres import postgres  # noqa: F401  (the fixture)

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def scenario(tiny_llama_dir: str, dataset_dir: str, policy_file: str) -> dict[str, object]:
    """Run in a fresh process whose MLFLOW_TRACKING_URI and PREFECT_API_URL name the PostgreSQL-backed servers:
    train the tiny adapter, register it with an evaluation's per-probe scores, promote it to champion."""
    import mlflow

    from charforge.checksums import MANIFEST
    from charforge.tracking import use_experiment
    from charforge.registry import register_candidate
    from flows.promote import promote
    from flows.train import train
    from tests.test_promote_flow import per_probe
    from tests.training.test_train_flow import tiny_config

    # started beside the servers, so the imports above overlap their start-up (migrations on a fresh database)
    for health in (os.environ["MLFLOW_TRACKING_URI"] + "/health", os.environ["PREFECT_API_URL"] + "/health"):
        deadline = time.monotonic() + 300
        while not _answers(health) and time.monotonic() < deadline:
            time.sleep(0.5)
    trained = train(config=tiny_config(Path(tiny_llama_dir), Path(dataset_dir), max_steps=2, save_steps=2))
    adapter = Path(trained.adapter_dir)
    lineage = json.loads((adapter / MANIFEST).read_text())["lineage"]
    use_experiment("evaluate")  # the scores an evaluation logs; the policy reads them
    with mlflow.start_run() as run:
        mlflow.log_dict({"candidate": per_probe(0.8, 0.0), "base": per_probe(0.5, 0.0)}, "per_probe.json")
    registered = register_candidate(adapter, lineage, run.info.run_id, "probes-sha")
    decision = promote(candidate=registered.uri, policy_file=policy_file, approve=True,
                       comment="first champion, on PostgreSQL")
    return {"train_run": trained.mlflow_run_id, "registered": registered.model_dump(), "promoted": decision.promoted}


def test_train_register_promote_on_postgres_backed_mlflow_and_prefect(postgres, tiny_llama_dir, curated_project,
                                                                      tmp_path):
    from tests.test_promote_flow import POLICY

    mlflow_port, prefect_port = free_port(), free_port()
    servers = [
        ui.Service("MLflow", [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(mlflow_port),
                              "--workers", "1", "--backend-store-uri",
                              f"postgresql://{postgres.user}@127.0.0.1:{postgres.port}/mlflow",
                              "--artifacts-destination", str(tmp_path / "artifacts"), "--serve-artifacts"],
                   f"http://127.0.0.1:{mlflow_port}/health", {**os.environ, "PGPASSWORD": postgres.password}),
        ui.Service("Prefect", [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port",
                               str(prefect_port), "--no-ui", "--no-services"],
                   f"http://127.0.0.1:{prefect_port}/api/health", {
                       **os.environ, "PREFECT_API_DATABASE_CONNECTION_URL": f"postgresql+asyncpg://{postgres.user}:"
                       f"${{PREFECT_SERVER_DATABASE_PASSWORD}}@127.0.0.1:{postgres.port}/prefect",
                       "PREFECT_SERVER_DATABASE_PASSWORD": postgres.password,
                       "PREFECT_HOME": str(tmp_path / "prefect-home"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}),
    ]
    for server in servers:
        ui.start(server, tmp_path)
    policy = tmp_path / "promotion.yaml"
    policy.write_text(POLICY)
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{mlflow_port}",
           "PREFECT_API_URL": f"http://127.0.0.1:{prefect_port}/api",
           "CHARFORGE_STATE_DIR": str(tmp_path / "state"), "PREFECT_HOME": str(tmp_path / "client-home")}
    code = ("import json, sys; from tests.deploy.test_postgres_stores import scenario; "
            "print(json.dumps(scenario(*sys.argv[1:])))")
    client = subprocess.Popen([sys.executable, "-c", code, str(tiny_llama_dir), str(curated_project[0]), str(policy)],
                              cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for server in servers:
            ui.wait_healthy(server, 300, tmp_path)
        stdout, stderr = client.communicate(timeout=600)
        assert client.returncode == 0, stderr[-4000:]
        result = json.loads(stdout.strip().splitlines()[-1])
        assert result["promoted"]
    finally:
        if client.poll() is None:
            client.kill()
            client.wait()
        ui.stop(servers)

    # what landed in PostgreSQL, read with SQL (not through the servers)
    name = result["registered"]["name"]
    aliases = dict(postgres.query("mlflow", f"SELECT alias, version FROM registered_model_aliases "
                                            f"WHERE name = '{name}'"))
    assert aliases["champion"] == int(result["registered"]["version"])
    tags = dict(postgres.query("mlflow", f"SELECT key, value FROM model_version_tags WHERE name = '{name}'"))
    assert tags["promotion_decision"] == "promote" and tags["train_run_id"] == result["train_run"]
    runs = postgres.query("mlflow", f"SELECT status FROM runs WHERE run_uuid = '{result['train_run']}'")
    assert runs == [("FINISHED",)]
    assert any((tmp_path / "artifacts").rglob("adapter_model.safetensors"))  # artifacts went through the server
    flow_runs = dict(postgres.query("prefect", "SELECT f.name, r.state_type FROM flow_run r "
                                               "JOIN flow f ON f.id = r.flow_id"))
    assert flow_runs.get("train") == "COMPLETED" and flow_runs.get("promote") == "COMPLETED"
