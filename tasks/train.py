"""Prefect tasks of the train flow."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
from prefect import get_run_logger, task
from prefect.cache_policies import NONE

from charforge.checksums import folder_sha
from charforge.results import TrainedAdapter
from charforge.schemas.train import TrainConfig
from charforge.settings import repo_path
from charforge.tracking import use_experiment
from charforge.training import runs
from charforge.training.adapters import export_adapter
from charforge.training.runs import FitResult, TrainingRun
from charforge.training.servability import check_servable
from charforge.training.trainer import fit_adapter
from tasks.runtime import TRANSIENT_RETRIES, flow_run_tags


@task(name="locate-training-run", cache_policy=NONE)
def locate_training_run(cfg: TrainConfig, dataset_dir: str | None) -> TrainingRun:
    """The dataset, the base model and the run identity; the folder the run lives in."""
    return runs.locate_run(cfg, dataset_dir)


@task(name="find-finished-adapter", cache_policy=NONE)
def finished_adapter(run: TrainingRun) -> TrainedAdapter | None:
    """The adapter of a finished run with this identity (its manifest verified), or None."""
    adapter = runs.finished_adapter(run)
    if adapter is not None:
        get_run_logger().info(f"adapter for {Path(run.run_dir).name} already trained: {adapter.adapter_dir}")
    return adapter


@task(name="start-training-run", cache_policy=NONE, **TRANSIENT_RETRIES)
def start_training_run(cfg: TrainConfig, run: TrainingRun) -> str:
    """The MLflow run for this identity: reused after a crash, created (with params and inputs) otherwise."""
    return runs.start_mlflow_run(cfg, run, flow_run_tags())


@task(name="fit-adapter", cache_policy=NONE)
def fit(cfg: TrainConfig, run: TrainingRun, run_id: str) -> FitResult:
    """Train or resume; metrics stream into the MLflow run (system metrics too)."""
    use_experiment("train")
    with mlflow.start_run(run_id=run_id, log_system_metrics=True):
        return fit_adapter(cfg, Path(run.base_dir), Path(run.dataset_dir), Path(run.run_dir), logger=get_run_logger())


@task(name="export-and-check-adapter", cache_policy=NONE, **TRANSIENT_RETRIES)
def export_and_check(cfg: TrainConfig, run: TrainingRun, run_id: str, fit_result: FitResult,
                     extra_lineage: dict[str, str] | None = None, stage: str = "train") -> TrainedAdapter:
    """bf16 adapter + manifest, the servability verdict, and both logged to the MLflow run (in the `stage`
    experiment). `extra_lineage`: what the manifest records beyond the SFT lineage (a preference run's parent
    adapter and pairs)."""
    run_dir = Path(run.run_dir)
    adapter_dir = run_dir / "adapter"
    template = repo_path(cfg.chat_template) if cfg.chat_template else None
    export_adapter(run_dir / "adapter-raw", adapter_dir, "bfloat16",  # vLLM serves bf16/fp16; bf16 keeps fp32's range
                   {**run.lineage(cfg), **(extra_lineage or {}), "mlflow_run_id": run_id}, template)
    reasons = check_servable(adapter_dir, cfg.max_lora_rank, run.architecture)
    (run_dir / "servability.json").write_text(json.dumps({"servable": not reasons, "reasons": reasons}, indent=2))
    sha = folder_sha(adapter_dir)
    use_experiment(stage)
    with mlflow.start_run(run_id=run_id):
        mlflow.log_metrics({f"final_{k}": v for k, v in fit_result.metrics.items()})
        mlflow.log_artifacts(str(adapter_dir), "adapter")
        mlflow.log_artifact(str(run_dir / "servability.json"))
        mlflow.set_tags({"adapter_sha256": sha, "servable": str(not reasons).lower(),
                         "unservable_reasons": "; ".join(reasons)[:4000] or "none",
                         "global_step": fit_result.global_step})
    return TrainedAdapter(adapter_dir=str(adapter_dir), adapter_sha256=sha, servable=not reasons,
                          reasons=tuple(reasons), mlflow_run_id=run_id, run_dir=str(run_dir),
                          global_step=fit_result.global_step, resumed_from=fit_result.resumed_from,
                          dataset_hash=run.dataset_hash)


@task(name="record-finished-run", cache_policy=NONE)
def record_finished(run: TrainingRun, adapter: TrainedAdapter) -> TrainedAdapter:
    """run.json says finished (with the result), so the next run of this identity returns it."""
    runs.record_finished(run, adapter)
    verdict = "servable" if adapter.servable else "NOT servable: " + "; ".join(adapter.reasons)
    get_run_logger().info(f"adapter {adapter.adapter_sha256[:12]} ({verdict}) after {adapter.global_step} steps -> "
                          f"{adapter.adapter_dir}")
    return adapter
