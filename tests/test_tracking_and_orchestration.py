"""Local stores: MLflow on sqlite with a local artifact root; Prefect flows with no server configured."""

from __future__ import annotations

import mlflow
from mlflow import MlflowClient
from prefect import flow, task

from charforge.tracking import use_experiment


def test_runs_are_tracked_in_sqlite_with_local_artifacts(mlflow_store, tmp_path):
    experiment_id = use_experiment("foundation-test")
    note = tmp_path / "note.txt"
    note.write_text("lineage")
    with mlflow.start_run() as run:
        mlflow.log_param("base_model", "smollm2-135m-instruct")
        mlflow.log_metric("loss", 1.25, step=3)
        mlflow.log_artifact(str(note))
    client = MlflowClient(mlflow_store)
    stored = client.get_run(run.info.run_id)
    assert stored.info.experiment_id == experiment_id
    assert stored.data.params["base_model"] == "smollm2-135m-instruct"
    assert stored.data.metrics["loss"] == 1.25
    assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["note.txt"]
    experiment = client.get_experiment(experiment_id)
    assert experiment.name == "charforge-foundation-test"
    assert experiment.artifact_location.startswith((tmp_path / "mlartifacts").as_uri())


@task
def double(x: int) -> int:
    return 2 * x


@flow
def tiny_flow(x: int) -> int:
    return double(x)


def test_flows_run_locally_in_the_prefect_harness(prefect_harness):
    assert tiny_flow(21) == 42


def test_cli_flows_run_without_heartbeats_unless_the_user_sets_them():
    """`charforge` runs flows under quiet_flow_heartbeats: no heartbeat thread to join at every flow's end. A fresh
    process each time, since Prefect reads its settings (environment, profile) once."""
    import os
    import subprocess
    import sys

    probe = ("from prefect.settings import get_current_settings as s\n"
             "from tasks.runtime import quiet_flow_heartbeats\n"
             "before = s().flows.heartbeat_frequency\n"
             "with quiet_flow_heartbeats():\n    inside = s().flows.heartbeat_frequency\n"
             "print(before, inside, s().flows.heartbeat_frequency)")
    env = {k: v for k, v in os.environ.items() if "HEARTBEAT" not in k}

    def frequencies(**extra) -> str:
        run = subprocess.run([sys.executable, "-c", probe], env={**env, **extra}, capture_output=True, text=True,
                             timeout=120)
        assert run.returncode == 0, run.stderr
        return run.stdout.strip()

    assert frequencies() == "180 None 180"  # Prefect's default outside, off for the flows charforge runs
    assert frequencies(PREFECT_FLOWS_HEARTBEAT_FREQUENCY="60") == "60 60 60"  # a user watching for zombie runs
