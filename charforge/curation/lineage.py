"""Dataset lineage in MLflow: one run per curated dataset, found again by its hash instead of logged twice."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
from charforge.tracking import log_dataset_inputs, use_experiment


def manifest_metrics(manifest: dict) -> dict[str, float]:
    metrics = {k: manifest[k] for k in ("rows_read", "rows_kept", "rows_rejected", "duplicates_removed")}
    metrics |= {f"rejected.{k}": v for k, v in manifest["rejected_by_reason"].items()}
    metrics |= {f"pii.{k}": v for k, v in manifest["pii_redactions"].items()}
    metrics |= {f"rows.{k}": v for k, v in manifest["rows"].items()}
    metrics |= {f"production.{k}": v for k, v in manifest.get("production", {}).items()}
    pairs = manifest.get("pairs") or {}
    metrics |= {f"pairs.{split}.{kind}": n for split in ("train", "eval") for kind, n in pairs.get(split, {}).items()}
    metrics |= {f"pairs.dropped.{reason}": n for reason, n in pairs.get("dropped", {}).items()}
    metrics |= {f"tokens.{k}": v for k, v in manifest["token_lengths"].items()}
    return metrics


def log_curated_dataset(out_dir: Path, flow_run: dict | None = None) -> str:
    """Log the dataset (inputs, manifest, counts) once per dataset_hash; return the MLflow run id."""
    manifest = json.loads((out_dir / "manifest.json").read_text())
    experiment_id = use_experiment("curate")
    digest = manifest["dataset_hash"]
    existing = mlflow.search_runs(
        [experiment_id], filter_string=f"tags.dataset_hash = '{digest}'", output_format="list", max_results=1
    )
    if existing:
        return existing[0].info.run_id
    with mlflow.start_run(run_name=f"curate-{digest[:12]}") as run:
        mlflow.set_tags({"dataset_hash": digest, "stage": "curate", **(flow_run or {})})
        mlflow.log_params({"out_dir": str(out_dir), "base_model": manifest["config"]["base_model"],
                           "max_tokens": manifest["config"]["max_tokens"],
                           "near_threshold": manifest["config"]["dedup"]["near_threshold"],
                           "inputs": ",".join(Path(i["path"]).name for i in manifest["inputs"])})
        mlflow.log_metrics(manifest_metrics(manifest))
        log_dataset_inputs(out_dir, digest)
        mlflow.log_artifact(str(out_dir / "manifest.json"))
        mlflow.log_dict(manifest["per_character"], "per_character.json")
    return run.info.run_id
