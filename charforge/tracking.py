"""MLflow wiring: the one client, one experiment per stage, sqlite + local artifacts by default, any tracking server
by config."""

from __future__ import annotations

import os
import time
from pathlib import Path

import mlflow
from mlflow.environment_variables import MLFLOW_HTTP_REQUEST_MAX_RETRIES
from mlflow.exceptions import MlflowException

from charforge.errors import Unavailable
from charforge.settings import platform, redact_credentials


class TrackingUnavailable(Unavailable):
    """The MLflow tracking server does not answer; the message names it (password redacted) and the fix."""


def tracking_unavailable(uri: str, exc: Exception, seconds: float) -> TrackingUnavailable:
    # MLflow's own message quotes the URI with its password; only the kind of failure is kept.
    text = str(exc)
    why = "connection refused" if "refused" in text else "timed out" if "timed out" in text else type(exc).__name__
    return TrackingUnavailable(
        f"MLflow tracking server {redact_credentials(uri)} is unreachable ({why}, "
        f"{MLFLOW_HTTP_REQUEST_MAX_RETRIES.get()} retries in {seconds:.1f} s); start that server, or point "
        f"MLFLOW_TRACKING_URI (or mlflow.tracking_uri in the platform config) at one that runs")


def ensure_sqlite_store(uri: str) -> None:
    """Create an embedded sqlite store whole or not at all.

    MLflow builds a new sqlite database with ~50 schema migrations, several of them ALTER TABLEs that sqlite does not
    roll back; a process killed during those seconds (measured: 4.5-5.5 s after the start of a fresh
    `MlflowClient(...).search_experiments()` here) leaves a database every later run refuses ("duplicate column
    name: step"). So the schema is built in a private file and hard-linked into place, which is atomic and never
    replaces a store another process created meanwhile; a kill leaves at most the private file, removed next time."""
    if not uri.startswith("sqlite:///"):
        return
    path = Path(uri.removeprefix("sqlite:///"))
    if path.exists():
        return
    import logging

    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)  # "Creating initial MLflow database tables"
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{path.name}.init-*"):  # left by a process killed while creating the store
        stale.unlink(missing_ok=True)
    staging = path.with_name(f".{path.name}.init-{os.getpid()}")
    store = SqlAlchemyStore(f"sqlite:///{staging}", (path.parent / "mlartifacts").as_uri())
    store.engine.dispose()
    try:
        os.link(staging, path)
    except FileExistsError:
        pass
    finally:
        staging.unlink(missing_ok=True)


def require_tracking() -> None:
    """Fail before a stage does any work when its tracking server does not answer. MLflow's own retry settings
    bound the wait (MLFLOW_HTTP_REQUEST_MAX_RETRIES, _BACKOFF_FACTOR, _TIMEOUT); the local sqlite store always
    answers (and is created here, whole, on first use)."""
    uri = platform().tracking_uri
    if uri.startswith(("sqlite:", "file:")) or "://" not in uri:
        ensure_sqlite_store(uri)
        return
    started = time.monotonic()
    try:
        mlflow.MlflowClient(uri).search_experiments(max_results=1)
    except MlflowException as exc:  # the REST client's error after its retries; a database URI's error
        raise tracking_unavailable(uri, exc, time.monotonic() - started) from None


def client() -> mlflow.MlflowClient:
    """The one MLflow client of the configured store (tracking and registry); the embedded store is created
    whole on first use."""
    uri = platform().tracking_uri
    ensure_sqlite_store(uri)
    return mlflow.MlflowClient(uri)


def use_experiment(stage: str) -> str:
    """Point MLflow at the configured store and select `<prefix>-<stage>`, creating it if needed."""
    cfg = platform()
    ensure_sqlite_store(cfg.tracking_uri)
    mlflow.set_tracking_uri(cfg.tracking_uri)
    name = f"{cfg.mlflow.experiment_prefix}-{stage}"
    started = time.monotonic()
    try:
        experiment = mlflow.get_experiment_by_name(name)
    except MlflowException as exc:  # the server went away mid-stage: one readable line, not a urllib3 chain
        raise tracking_unavailable(cfg.tracking_uri, exc, time.monotonic() - started) from None
    if experiment is None:
        # A tracking server owns its artifact store; only the embedded sqlite store needs a local root.
        artifact_location = None if cfg.tracking_uri.startswith("http") else f"{cfg.artifact_root}/{name}"
        experiment_id = mlflow.create_experiment(name, artifact_location=artifact_location)
    else:
        experiment_id = experiment.experiment_id
    mlflow.set_experiment(experiment_id=experiment_id)
    return experiment_id


def log_dataset_inputs(dataset_dir: Path, dataset_hash: str) -> None:
    """Record the curated train/eval files as inputs of the active MLflow run, identified by the dataset hash."""
    import warnings

    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    for split in ("train", "eval"):
        with warnings.catch_warnings():  # a local path matches two equivalent source types; either is right
            warnings.simplefilter("ignore", UserWarning)
            source = resolve_dataset_source(str((Path(dataset_dir) / f"{split}.jsonl").resolve()))
        mlflow.log_input(MetaDataset(source=source, name=f"charforge-{split}", digest=dataset_hash[:16]),
                         context=split)
