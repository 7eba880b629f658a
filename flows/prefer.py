"""Prefer flow: preference tuning (DPO or KTO) on top of a finished SFT adapter, on the pairs curation wrote
(`pairs.enabled`) -> one servable adapter of the same rank, tracked in one MLflow run in `charforge-prefer`.

Run it:  charforge prefer --config configs/prefer/smollm2_dpo.yaml [--dataset DIR]

A run is identified by (config, SFT adapter sha, pairs sha, resolved dtype); re-running the same identity resumes
from the newest complete checkpoint if it was interrupted, and returns the finished adapter if it was not.
"""

from __future__ import annotations

from prefect import flow

from charforge.results import TrainedAdapter
from charforge.schemas.prefer import PreferConfig
from charforge.schemas.train import TrainConfig
from tasks.prefer import fit_preference, locate_preference_run, start_preference_run
from tasks.train import export_and_check, finished_adapter, record_finished


@flow(name="prefer")
def prefer(config: PreferConfig, dataset_dir: str | None = None, sft: TrainConfig | None = None) -> TrainedAdapter:
    """Move the SFT adapter towards the chosen replies of the pairs; the frozen SFT adapter is the reference.
    `sft`: the SFT training config itself instead of the file `config.sft` (the retrain chain passes its own)."""
    located = locate_preference_run(config, dataset_dir, sft)
    done = finished_adapter(located.run)
    if done is not None:
        return done
    run_id = start_preference_run(config, located)
    fitted = fit_preference(config, located, run_id)
    adapter = export_and_check(located.sft, located.run, run_id, fitted, located.lineage, "prefer")
    return record_finished(located.run, adapter)
