"""MLflow and Prefect on PostgreSQL, the way deploy/ runs them: a real PostgreSQL server (Debian's package, which
`make test` installs when missing), an `mlflow server` and a `prefect server start` backed by it, and the pipeline
trains, registers and promotes through them. Connection settings take the deployment's form: no password in
MLflow's URI (libpq reads PGPASSWORD), Prefect's URL with `${PREFECT_SERVER_DATABASE_PASSWORD}` filled in by Prefect.
"""

from __future__ import annotations

import glob
import json
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest

from charforge import ui
from charforge.settings import REPO_ROOT
from charforge.vllm_server import free_port

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent
INIT_SQL = REPO_ROOT / "deploy" / "compose" / "postgres-init.sql"


def postgres_bindir() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))  # Debian's layout, newest major last
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


class LocalPostgres:
    """A throwaway PostgreSQL cluster on loopback with password (scram) authentication. PostgreSQL refuses to run
    as root, so as root it runs as the `postgres` user the Debian package creates."""

    def __init__(self, bindir: Path) -> None:
        self.bindir, self.port = bindir, free_port()
        self.user, self.password = "charforge", secrets.token_urlsafe(16)
        self.root = Path(tempfile.mkdtemp(prefix="charforge-pg-"))  # not under pytest's root-only tmp dir
        self.run_as = "postgres" if os.geteuid() == 0 else None
        self.process: subprocess.Popen | None = None

    def _run(self, *cmd: str) -> None:
        subprocess.run(cmd, check=True, capture_output=True, user=self.run_as, timeout=120)

    def start(self) -> None:
        pwfile = self.root / "pw"
        pwfile.write_text(self.password)
        if self.run_as:
            owner = pwd.getpwnam(self.run_as)
            for path in (self.root, pwfile):
                os.chown(path, owner.pw_uid, owner.pw_gid)
        self._run(str(self.bindir / "initdb"), "-D", str(self.root / "data"), "-U", self.user, "--pwfile",
                  str(pwfile), "--auth=scram-sha-256", "-E", "UTF8", "--no-sync")
        pwfile.unlink()
        log = open(self.root / "postgres.log", "wb")
        # durability off: a test cluster, thrown away afterwards
        self.process = subprocess.Popen(
            [str(self.bindir / "postgres"), "-D", str(self.root / "data"), "-p", str(self.port),
             "-c", "listen_addresses=127.0.0.1", "-c", f"unix_socket_directories={self.root}",
             "-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off"],
            stdout=log, stderr=subprocess.STDOUT, user=self.run_as, start_new_session=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                self.connect("postgres").close()
                return
            except Exception:
                if self.process.poll() is not None:
                    raise RuntimeError((self.root / "postgres.log").read_text()[-2000:]) from None
                time.sleep(0.3)
        raise RuntimeError("PostgreSQL did not accept connections within 60 s")

    def connect(self, database: str):
        import psycopg

        return psycopg.connect(host="127.0.0.1", port=self.port, user=self.user, password=self.password,
                               dbname=database, connect_timeout=3)

    def run_init_sql(self, path: Path) -> None:
        """The deployment's init script (CREATE DATABASE cannot run inside a transaction: one statement each)."""
        conn = self.connect("postgres")
        conn.autocommit = True
        with conn.cursor() as cur:
            for statement in (s.strip() for s in path.read_text().split(";")):
                lines = [line for line in statement.splitlines() if not line.strip().startswith("--")]
                if "".join(lines).strip():
                    cur.execute("\n".join(lines))
        conn.close()

    def query(self, database: str, sql: str) -> list[tuple]:
        conn = self.connect(database)
        with conn.cursor() as cur:
            cur.execute(sql)
            rows = cur.fetchall()
        conn.close()
        return rows

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)  # "fast" shutdown
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture(scope="module")
def postgres():
    bindir = postgres_bindir()
    if bindir is None:
        message = "PostgreSQL server binaries missing: `make postgres` installs Debian's package"
        pytest.fail(message) if os.environ.get("CI") else pytest.skip(message)
    pg = LocalPostgres(bindir)
    try:
        pg.start()
        pg.run_init_sql(INIT_SQL)
        yield pg
    finally:
        pg.stop()


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
