"""Training flow: curated dataset + base model -> servable LoRA/QLoRA adapter, tracked in one MLflow run.

Run it:  charforge train --config configs/train/smollm2_lora.yaml [--dataset DIR]

A run is identified by (config, dataset hash, base model sha). Re-running the same identity resumes from the
newest checkpoint in the same MLflow run if it was interrupted, and returns the finished adapter if it was not.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import mlflow
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NONE

from charforge.base_models import load_preset, materialize
from charforge.checksums import folder_sha, verify_manifest
from charforge.config import ConfigError
from charforge.curation.manifest import read_dataset_manifest
from charforge.io import write_json_atomic
from charforge.schemas.train import TrainConfig
from charforge.settings import platform, repo_path
from charforge.tracking import flow_run_tags, log_dataset_inputs, use_experiment
from charforge.training.adapters import export_adapter
from charforge.training.servability import check_servable
from charforge.training.trainer import fit_adapter, resolve_dtype


def run_identity(cfg: TrainConfig, dataset_hash: str, base_sha: str) -> str:
    """`dtype: auto` enters as the dtype it resolves to here: the same config trains differently on other hardware."""
    payload = json.dumps([cfg.model_dump(mode="json", exclude={"dataset_dir"}), dataset_hash, base_sha,
                          resolve_dtype(cfg.training)], sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:12]


def training_params(cfg: TrainConfig, base_sha: str, manifest: dict) -> dict:
    """Flat, readable params for MLflow's compare view (the same names for every run)."""
    t, lora = cfg.training, cfg.lora
    return {
        "config_name": cfg.name, "method": cfg.method, "base_model": cfg.base_model, "base_model_sha": base_sha[:16],
        "dataset_hash": manifest["dataset_hash"], "train_rows": manifest["rows"]["train"],
        "eval_rows": manifest["rows"]["eval"], "lora_r": lora.r, "lora_alpha": lora.alpha,
        "lora_dropout": lora.dropout, "target_modules": str(lora.target_modules), "use_rslora": lora.use_rslora,
        "max_steps": t.max_steps, "batch_size": t.batch_size, "grad_accum": t.gradient_accumulation_steps,
        "learning_rate": t.learning_rate, "lr_scheduler": t.lr_scheduler_type, "max_length": t.max_length,
        "packing": t.packing, "padding_free": t.padding_free, "assistant_only_loss": t.assistant_only_loss,
        "dtype": resolve_dtype(t), "dtype_config": t.dtype, "seed": t.seed,
        "quantization": json.dumps(cfg.quantization.model_dump()) if cfg.quantization else "none",
    }


@task(name="start-training-run", cache_policy=NONE, retries=2, retry_delay_seconds=5)
def start_training_run(cfg: TrainConfig, run_dir: Path, identity: str, params: dict, dataset_dir: Path,
                       dataset_hash: str) -> str:
    """The MLflow run for this identity: reused after a crash (from run.json, or found by its identity tag when the
    crash came between creating the run and recording it), created (with params and inputs) otherwise."""
    state_file = run_dir / "run.json"
    state = json.loads(state_file.read_text()) if state_file.is_file() else {}
    experiment_id = use_experiment("train")
    run_id = state.get("mlflow_run_id")
    if not run_id:
        unfinished = f"tags.run_identity = '{identity}' and attributes.status != 'FINISHED'"
        found = mlflow.search_runs([experiment_id], unfinished, output_format="list", max_results=1,
                                   order_by=["attributes.start_time DESC"])
        run_id = found[0].info.run_id if found else None
    if run_id:
        with mlflow.start_run(run_id=run_id):
            mlflow.set_tags(flow_run_tags())
    else:
        with mlflow.start_run(run_name=f"{cfg.name}-{identity}") as run:
            mlflow.set_tags({"stage": "train", "run_identity": identity, "dataset_hash": dataset_hash,
                             **flow_run_tags()})
            mlflow.log_params(params)
            mlflow.log_dict(cfg.model_dump(mode="json"), "train_config.json")
            log_dataset_inputs(dataset_dir, dataset_hash)
        run_id = run.info.run_id
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(state_file, {**state, "mlflow_run_id": run_id, "identity": identity, "status": "running"})
    return run_id


@task(name="fit-adapter", cache_policy=NONE)
def fit(cfg: TrainConfig, base_dir: Path, dataset_dir: Path, run_dir: Path, run_id: str) -> dict:
    """Train or resume; metrics stream into the MLflow run (system metrics too)."""
    use_experiment("train")
    with mlflow.start_run(run_id=run_id, log_system_metrics=True):
        return fit_adapter(cfg, base_dir, dataset_dir, run_dir, logger=get_run_logger())


@task(name="export-and-check-adapter", cache_policy=NONE, retries=2, retry_delay_seconds=5)
def export_and_check(cfg: TrainConfig, run_dir: Path, run_id: str, lineage: dict, architecture: str,
                     fit_result: dict) -> dict:
    """bf16 adapter + manifest, the servability verdict, and both logged to the MLflow run."""
    adapter_dir = run_dir / "adapter"
    dtype = "bfloat16"  # vLLM serves bf16/fp16 adapters; bf16 keeps fp32's range
    template = repo_path(cfg.chat_template) if cfg.chat_template else None
    export_adapter(run_dir / "adapter-raw", adapter_dir, dtype, {**lineage, "mlflow_run_id": run_id}, template)
    reasons = check_servable(adapter_dir, cfg.max_lora_rank, architecture)
    (run_dir / "servability.json").write_text(json.dumps({"servable": not reasons, "reasons": reasons}, indent=2))
    sha = folder_sha(adapter_dir)
    use_experiment("train")
    with mlflow.start_run(run_id=run_id):
        metrics = {k: float(v) for k, v in fit_result["metrics"].items() if isinstance(v, (int, float))}
        mlflow.log_metrics({f"final_{k}": v for k, v in metrics.items()})
        mlflow.log_artifacts(str(adapter_dir), "adapter")
        mlflow.log_artifact(str(run_dir / "servability.json"))
        mlflow.set_tags({"adapter_sha256": sha, "servable": str(not reasons).lower(),
                         "unservable_reasons": "; ".join(reasons)[:4000] or "none",
                         "global_step": fit_result["global_step"]})
    return {"adapter_dir": str(adapter_dir), "adapter_sha256": sha, "servable": not reasons, "reasons": reasons}


def locate_run(cfg: TrainConfig, dataset_dir: str | None = None):
    """Everything that identifies a training run: (dataset dir, dataset manifest, base preset, base dir, base sha,
    identity, run dir). Evaluation uses it to find the adapter a config + dataset produced."""
    dataset = repo_path(dataset_dir or cfg.dataset_dir)
    manifest = read_dataset_manifest(dataset)
    preset = load_preset(cfg.base_model)
    if cfg.base_model_dir is not None:
        base_dir = repo_path(cfg.base_model_dir)
        base_sha = folder_sha(base_dir)
    else:
        base_dir, _ = materialize(preset)
        base_sha = folder_sha(base_dir) if preset.source == "embedded" else preset.hf_id
    identity = run_identity(cfg, manifest["dataset_hash"], base_sha)
    return dataset, manifest, preset, base_dir, base_sha, identity, platform().state / "training" / f"{cfg.name}-{identity}"


def trained_adapter(cfg: TrainConfig, dataset_dir: str | None = None) -> Path:
    """The finished adapter of (config, dataset, base); a ConfigError saying how to train it if there is none."""
    run_dir = locate_run(cfg, dataset_dir)[-1]
    state_file = run_dir / "run.json"
    state = json.loads(state_file.read_text()) if state_file.is_file() else {}
    if state.get("status") != "finished":
        raise ConfigError(f"{run_dir}: no finished training run for config '{cfg.name}' on this dataset (with its "
                          f"dtype '{cfg.training.dtype}' resolved to {resolve_dtype(cfg.training)} on this machine); "
                          f"run `charforge train --config <its file>` first")
    return run_dir / "adapter"


# log_prints stays off: datasets fingerprints functions by disassembling them through print(), which Prefect
# would copy into the run log line by line.
@flow(name="train")
def train(config: TrainConfig, dataset_dir: str | None = None) -> dict:
    """Train a LoRA/QLoRA adapter on a curated dataset and hand back a servable, checksummed artifact."""
    cfg, logger = config, get_run_logger()
    dataset, manifest, preset, base_dir, base_sha, identity, run_dir = locate_run(cfg, dataset_dir)
    state_file = run_dir / "run.json"
    state = json.loads(state_file.read_text()) if state_file.is_file() else {}
    if state.get("status") == "finished" and (run_dir / "adapter").is_dir():
        verify_manifest(run_dir / "adapter", f"delete {run_dir} and train again")
        logger.info(f"adapter for {cfg.name}-{identity} already trained: {run_dir / 'adapter'}")
        return state["result"]
    params = training_params(cfg, base_sha, manifest)
    run_id = start_training_run(cfg, run_dir, identity, params, dataset, manifest["dataset_hash"])
    fit_result = fit(cfg, base_dir, dataset, run_dir, run_id)
    lineage = {"base_model": cfg.base_model, "base_model_path": str(base_dir), "base_model_sha": base_sha,
               "dataset_hash": manifest["dataset_hash"], "train_config": cfg.name, "run_identity": identity}
    result = export_and_check(cfg, run_dir, run_id, lineage, preset.architecture, fit_result)
    result |= {"mlflow_run_id": run_id, "run_dir": str(run_dir), "global_step": fit_result["global_step"],
               "resumed_from": fit_result["resumed_from"], "dataset_hash": manifest["dataset_hash"]}
    write_json_atomic(state_file, {**state, "mlflow_run_id": run_id, "identity": identity, "status": "finished",
                                   "result": result})
    verdict = "servable" if result["servable"] else "NOT servable: " + "; ".join(result["reasons"])
    logger.info(f"adapter {result['adapter_sha256'][:12]} ({verdict}) after {result['global_step']} steps -> "
          f"{result['adapter_dir']}")
    return result
