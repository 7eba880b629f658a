"""Training flow: curated dataset + base model -> servable LoRA/QLoRA adapter, tracked in one MLflow run.

Run it:  charforge train --config configs/train/smollm2_lora.yaml [--dataset DIR]

A run is identified by (config, dataset hash, base model sha, resolved dtype). Re-running the same identity
resumes from the newest complete checkpoint in the same MLflow run if it was interrupted, and returns the finished
adapter if it was not.
"""

from __future__ import annotations

from prefect import flow

from charforge.results import TrainedAdapter
from charforge.schemas.train import TrainConfig
from tasks.train import export_and_check, finished_adapter, fit, locate_training_run, record_finished, \
    start_training_run


# log_prints stays off: datasets fingerprints functions by disassembling them through print(), which Prefect
# would copy into the run log line by line.
@flow(name="train")
def train(config: TrainConfig, dataset_dir: str | None = None) -> TrainedAdapter:
    """Train a LoRA/QLoRA adapter on a curated dataset and hand back a servable, checksummed artifact."""
    run = locate_training_run(config, dataset_dir)
    done = finished_adapter(run)
    if done is not None:
        return done
    run_id = start_training_run(config, run)
    fitted = fit(config, run, run_id)
    return record_finished(run, export_and_check(config, run, run_id, fitted))
