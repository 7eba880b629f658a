"""Training runs: what identifies one, where it lives, its MLflow run, and the finished adapter it leaves.

A run is identified by (config minus its dataset path, dataset hash, base model sha, the dtype `dtype: auto`
resolves to here; an adapter family's run by the hash of its characters' rows instead of the whole dataset's) and
lives in `<state>/training/<name>-<identity>/` with `run.json` (MLflow run id, status and, when finished, the
result), `checkpoints/`, `adapter-raw/`, `adapter/`, `servability.json` and `fit.json`.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import mlflow
from pydantic import BaseModel, ConfigDict

from charforge.base_models import load_preset, prepare_base_model
from charforge.checksums import folder_sha, verify_manifest
from charforge.curation.manifest import read_dataset_manifest
from charforge.errors import InputError
from charforge.io import write_json_atomic
from charforge.results import TrainedAdapter
from charforge.schemas.train import TrainConfig
from charforge.settings import platform, repo_path
from charforge.tracking import log_dataset_inputs, use_experiment
from charforge.training.trainer import FitResult, require_turn_weights, resolve_dtype

__all__ = ["FitResult", "TrainingRun"]


class TrainingRun(BaseModel):
    """Where a (config, dataset, base) training run lives and what it trains on."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    identity: str
    run_dir: str
    dataset_dir: str
    dataset_hash: str
    train_rows: int
    eval_rows: int
    base_model: str
    base_dir: str
    base_sha: str
    architecture: str
    characters: tuple[str, ...] = ()  # an adapter family's characters (empty: every character)
    family_data_hash: str | None = None  # the hash of the rows a family trains on (None: the whole dataset's)

    @property
    def state_file(self) -> Path:
        return Path(self.run_dir) / "run.json"

    def state(self) -> dict[str, object]:
        return json.loads(self.state_file.read_text()) if self.state_file.is_file() else {}

    def lineage(self, cfg: TrainConfig) -> dict[str, str]:
        """What the exported adapter's manifest records about where it came from."""
        family = {"characters": ",".join(self.characters), "family_data_hash": self.family_data_hash or ""}
        return {"base_model": cfg.base_model, "base_model_path": self.base_dir, "base_model_sha": self.base_sha,
                "dataset_hash": self.dataset_hash, "train_config": cfg.name, "run_identity": self.identity,
                **(family if self.characters else {})}


def family_rows(dataset: Path, characters: list[str]) -> tuple[str, dict[str, int]]:
    """The hash of an adapter family's rows in a curated dataset (its characters' lines of train.jsonl and
    eval.jsonl, as written) and their count per split: the family's run identity, so a family whose rows did not
    change keeps its finished run when another family's data changes. A character without training rows is refused."""
    wanted, digest, counts, seen = set(characters), hashlib.sha256(), {}, set()
    for split in ("train", "eval"):
        digest.update(f"[{split}]".encode())
        counts[split] = 0
        for line in (dataset / f"{split}.jsonl").read_bytes().splitlines():
            character = json.loads(line).get("character")
            if character in wanted:
                digest.update(line + b"\n")
                counts[split] += 1
                if split == "train":
                    seen.add(character)
    missing = sorted(wanted - seen)
    if missing:
        raise InputError(f"{dataset}: no training rows for character(s) {', '.join(missing)} of the adapter family "
                         f"(characters in its train split: {', '.join(dataset_characters(dataset))}); fix the "
                         f"training config's `characters` or curate conversations for them")
    return digest.hexdigest(), counts


def dataset_characters(dataset: Path) -> list[str]:
    """The characters a curated dataset's train split has rows for."""
    return sorted({json.loads(line).get("character") or "?"
                   for line in (dataset / "train.jsonl").read_bytes().splitlines()})


def run_identity(cfg: TrainConfig, dataset_hash: str, base_sha: str) -> str:
    """`dtype: auto` enters as the dtype it resolves to here: the same config trains differently on other hardware."""
    unset = {"characters"} if cfg.characters is None else set()  # runs from before families keep their identity
    payload = json.dumps([cfg.model_dump(mode="json", exclude={"dataset_dir"} | unset), dataset_hash, base_sha,
                          resolve_dtype(cfg.training)], sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:12]


def locate_run(cfg: TrainConfig, dataset_dir: str | None = None) -> TrainingRun:
    """Everything that identifies a training run; evaluation uses it to find the adapter a config + dataset made."""
    dataset = repo_path(dataset_dir or cfg.dataset_dir)
    manifest = read_dataset_manifest(dataset)
    preset = load_preset(cfg.base_model)
    if cfg.base_model_dir is not None:
        base_dir = repo_path(cfg.base_model_dir)
        base_sha = folder_sha(base_dir)
    else:
        base_dir, _ = prepare_base_model(preset)
        base_sha = folder_sha(base_dir) if preset.source == "embedded" else preset.hf_id
    if manifest.get("production", {}).get("kept"):
        require_turn_weights(cfg, base_dir)
    rows, family_hash = manifest["rows"], None
    if cfg.characters:
        family_hash, rows = family_rows(dataset, cfg.characters)
    identity = run_identity(cfg, family_hash or manifest["dataset_hash"], base_sha)
    return TrainingRun(name=cfg.name, identity=identity,
                       run_dir=str(platform().state / "training" / f"{cfg.name}-{identity}"),
                       dataset_dir=str(dataset), dataset_hash=manifest["dataset_hash"],
                       train_rows=rows["train"], eval_rows=rows["eval"],
                       base_model=cfg.base_model, base_dir=str(base_dir), base_sha=base_sha,
                       architecture=preset.architecture, characters=tuple(cfg.characters or ()),
                       family_data_hash=family_hash)


def finished_adapter(run: TrainingRun) -> TrainedAdapter | None:
    """The result a finished run recorded, its adapter's manifest verified; None when the run has not finished."""
    state = run.state()
    adapter_dir = Path(run.run_dir) / "adapter"
    if state.get("status") != "finished" or not adapter_dir.is_dir():
        return None
    verify_manifest(adapter_dir, f"delete {run.run_dir} and train again")
    return TrainedAdapter.model_validate(state["result"])


def trained_adapter(cfg: TrainConfig, dataset_dir: str | None = None) -> Path:
    """The finished adapter of (config, dataset, base); an InputError saying how to train it if there is none."""
    run = locate_run(cfg, dataset_dir)
    if run.state().get("status") != "finished":
        raise InputError(f"{run.run_dir}: no finished training run for config '{cfg.name}' on this dataset (with its "
                         f"dtype '{cfg.training.dtype}' resolved to {resolve_dtype(cfg.training)} on this machine); "
                         f"run `charforge train --config <its file>` first")
    return Path(run.run_dir) / "adapter"


def training_params(cfg: TrainConfig, run: TrainingRun) -> dict[str, str | int | float | bool]:
    """Flat, readable params for MLflow's compare view (the same names for every run)."""
    t, lora = cfg.training, cfg.lora
    return {
        "config_name": cfg.name, "method": cfg.method, "base_model": cfg.base_model, "base_model_sha": run.base_sha[:16],
        "dataset_hash": run.dataset_hash, "train_rows": run.train_rows, "eval_rows": run.eval_rows, "lora_r": lora.r,
        "lora_alpha": lora.alpha, "lora_dropout": lora.dropout, "target_modules": str(lora.target_modules),
        "use_rslora": lora.use_rslora, "max_steps": t.max_steps, "batch_size": t.batch_size,
        "grad_accum": t.gradient_accumulation_steps, "learning_rate": t.learning_rate,
        "lr_scheduler": t.lr_scheduler_type, "max_length": t.max_length, "packing": t.packing,
        "padding_free": t.padding_free, "assistant_only_loss": t.assistant_only_loss, "dtype": resolve_dtype(t),
        "dtype_config": t.dtype, "seed": t.seed,
        "quantization": json.dumps(cfg.quantization.model_dump()) if cfg.quantization else "none",
        "characters": ",".join(run.characters) or "all",
    }


def start_mlflow_run(cfg: TrainConfig, run: TrainingRun, tags: dict[str, str]) -> str:
    """The MLflow run for this identity: reused after a crash (from run.json, or found by its identity tag when the
    crash came between creating the run and recording it), created with params and inputs otherwise."""
    state = run.state()
    experiment_id = use_experiment("train")
    run_id = state.get("mlflow_run_id")
    if not run_id:
        unfinished = f"tags.run_identity = '{run.identity}' and attributes.status != 'FINISHED'"
        found = mlflow.search_runs([experiment_id], unfinished, output_format="list", max_results=1,
                                   order_by=["attributes.start_time DESC"])
        run_id = found[0].info.run_id if found else None
    if run_id:
        with mlflow.start_run(run_id=str(run_id)):
            mlflow.set_tags(tags)
    else:
        with mlflow.start_run(run_name=f"{cfg.name}-{run.identity}") as started:
            mlflow.set_tags({"stage": "train", "run_identity": run.identity, "dataset_hash": run.dataset_hash, **tags})
            mlflow.log_params(training_params(cfg, run))
            mlflow.log_dict(cfg.model_dump(mode="json"), "train_config.json")
            log_dataset_inputs(Path(run.dataset_dir), run.dataset_hash)
        run_id = started.info.run_id
    write_json_atomic(run.state_file, {**state, "mlflow_run_id": run_id, "identity": run.identity,
                                       "status": "running"})
    return str(run_id)


def record_finished(run: TrainingRun, adapter: TrainedAdapter) -> None:
    write_json_atomic(run.state_file, {**run.state(), "mlflow_run_id": adapter.mlflow_run_id,
                                       "identity": run.identity, "status": "finished",
                                       "result": adapter.model_dump(mode="json")})
