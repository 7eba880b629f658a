"""MLflow's tracking server down (a closed loopback port) while train, evaluate, promote and curate start: each
fails before any work with one line naming the server and the fix, after MLflow's own bounded retries; the
registry and its aliases are unchanged and nothing falls back to the local store."""

from __future__ import annotations

import os
import re
import subprocess
import time

import mlflow
import pytest
import yaml
from mlflow import MlflowClient

from charforge.settings import DATA_DIR
from charforge.vllm_server import free_port
from tests.test_promote_flow import NAME, POLICY, register
from tests.training.test_train_flow import CHARFORGE, tiny_config

pytestmark = pytest.mark.reliability

RETRIES = 2  # MLflow's own retry settings: 2 retries, backoff 1 s then 2 s
SECRET = "s3cret-tracking-pw"


def registry_snapshot(client: MlflowClient) -> dict:
    model = client.get_registered_model(NAME)
    versions = {v.version: dict(v.tags) for v in client.search_model_versions(f"name = '{NAME}'")}
    runs = sum(len(client.search_runs([e.experiment_id])) for e in client.search_experiments())
    return {"aliases": dict(model.aliases), "tags": dict(model.tags), "versions": versions, "runs": runs}


@pytest.fixture
def down_server(tmp_path, monkeypatch, prefect_harness, curated_project, tiny_llama_dir):
    """A populated registry in the local store, and a tracking URI (with a password) on which nothing listens."""
    state = tmp_path / "state"
    local = f"sqlite:///{state / 'mlflow.db'}"
    state.mkdir()
    monkeypatch.setenv("CHARFORGE_STATE_DIR", str(state))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", local)
    mlflow.set_tracking_uri(local)
    policy = tmp_path / "promotion.yaml"
    policy.write_text(POLICY)
    from flows.promote import promote

    promote(candidate=register(tmp_path, "one", 0.8, 0.0), policy_file=str(policy), approve=True)
    register(tmp_path, "two", 0.9, 0.0)
    train_cfg = tmp_path / "train.yaml"
    train_cfg.write_text(yaml.safe_dump(tiny_config(tiny_llama_dir, curated_project[0]).model_dump(mode="json")))
    url = f"http://ci:{SECRET}@127.0.0.1:{free_port()}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": url, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": str(RETRIES),
           "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}
    env.pop("PREFECT_API_URL", None)
    return {"state": state, "client": MlflowClient(local), "env": env, "url": url, "policy": policy,
            "train_cfg": train_cfg, "dataset": curated_project[0]}


def test_stages_fail_fast_naming_the_server_and_change_nothing(down_server, tmp_path):
    d = down_server
    before = registry_snapshot(d["client"])
    assert {k: str(v) for k, v in before["aliases"].items()} == {"champion": "1", "candidate": "2"}
    stages = {
        "train": ["train", "--config", str(d["train_cfg"])],
        "evaluate": ["evaluate", "--adapter", f"models:/{NAME}@candidate", "--limit", "2"],
        "promote": ["promote", "--candidate", f"models:/{NAME}@candidate", "--policy", str(d["policy"]),
                    "--approve"],
        "curate": ["curate", "--input", str(DATA_DIR / "raw"), "--out", str(tmp_path / "curated")],
    }
    shown = d["url"].replace(SECRET, "***")
    expected = re.compile(
        rf"error: MLflow tracking server {re.escape(shown)} is unreachable \(connection refused, {RETRIES} retries "
        r"in (\d+\.\d) s\); start that server, or point MLFLOW_TRACKING_URI \(or mlflow.tracking_uri in the "
        r"platform config\) at one that runs")
    timings = {}
    for stage, args in stages.items():
        started = time.monotonic()
        result = subprocess.run([CHARFORGE, *args], env=d["env"], capture_output=True, text=True, timeout=120,
                                cwd=tmp_path)
        timings[stage] = (time.monotonic() - started, 0.0)
        assert result.returncode == 4, (stage, result.stderr[-2000:])  # a dependency unavailable
        match = expected.fullmatch(result.stderr.strip())
        assert match, (stage, result.stderr)
        assert 1.0 <= float(match.group(1)) < 10  # the retries ran (backoff 1 s, 2 s, with jitter) and stopped
        timings[stage] = (timings[stage][0], float(match.group(1)))
        assert SECRET not in result.stdout + result.stderr
    print(f"\ntime to fail, whole CLI (of which MLflow's {RETRIES} retries): "
          + ", ".join(f"{k} {total:.1f} s ({retrying:.1f} s)" for k, (total, retrying) in timings.items()))

    assert registry_snapshot(d["client"]) == before  # no alias moved, no version or run added
    assert not (d["state"] / "training").exists() and not (d["state"] / "evals").exists()
    assert not (tmp_path / "curated").exists() and not (tmp_path / "mlruns").exists()  # no local fallback
