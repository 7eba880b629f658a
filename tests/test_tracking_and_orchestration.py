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


def test_cli_flows_run_without_heartbeats_unless_the_user_sets_them(monkeypatch):
    """`charforge` runs flows under quiet_flow_heartbeats: no heartbeat thread to join at every flow's end."""
    from prefect.settings import get_current_settings

    from charforge.settings import quiet_flow_heartbeats

    monkeypatch.delenv("PREFECT_FLOWS_HEARTBEAT_FREQUENCY", raising=False)
    monkeypatch.delenv("PREFECT_RUNNER_HEARTBEAT_FREQUENCY", raising=False)
    outside = get_current_settings().flows.heartbeat_frequency
    with quiet_flow_heartbeats():
        assert get_current_settings().flows.heartbeat_frequency is None
    assert get_current_settings().flows.heartbeat_frequency == outside
    monkeypatch.setenv("PREFECT_FLOWS_HEARTBEAT_FREQUENCY", "60")  # a user who watches for zombie runs keeps them
    with quiet_flow_heartbeats():
        assert get_current_settings().flows.heartbeat_frequency == outside
