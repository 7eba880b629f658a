"""Prefect tasks of the prefer flow (the finished-run check, export and record are the train flow's own tasks)."""

from __future__ import annotations

from pathlib import Path

import mlflow
from prefect import get_run_logger, task
from prefect.cache_policies import NONE

from charforge.schemas.prefer import PreferConfig
from charforge.schemas.train import TrainConfig
from charforge.tracking import use_experiment
from charforge.training import preference
from charforge.training.preference import PreferenceRun
from charforge.training.runs import FitResult
from tasks.runtime import TRANSIENT_RETRIES, flow_run_tags


@task(name="locate-preference-run", cache_policy=NONE)
def locate_preference_run(cfg: PreferConfig, dataset_dir: str | None, sft: TrainConfig | None) -> PreferenceRun:
    """The SFT adapter, the pairs, the run identity and its folder: every missing input fails here."""
    run, sft_adapter = preference.locate_run(cfg, dataset_dir, sft)
    return PreferenceRun(run=run, sft_adapter=sft_adapter, lineage=preference.lineage(run, sft_adapter),
                         sft=preference.sft_config(cfg, sft))


@task(name="start-preference-run", cache_policy=NONE, **TRANSIENT_RETRIES)
def start_preference_run(cfg: PreferConfig, located: PreferenceRun) -> str:
    return preference.start_mlflow_run(cfg, located.run, located.sft_adapter, flow_run_tags())


@task(name="fit-preference", cache_policy=NONE)
def fit_preference(cfg: PreferConfig, located: PreferenceRun, run_id: str) -> FitResult:
    """DPO or KTO from the SFT adapter; loss, reward margins and accuracies stream into the MLflow run."""
    run = located.run
    use_experiment("prefer")
    with mlflow.start_run(run_id=run_id, log_system_metrics=True):
        return preference.fit_preference(cfg, located.sft, Path(located.sft_adapter),
                                         Path(run.base_dir), Path(run.dataset_dir), Path(run.run_dir),
                                         logger=get_run_logger())
