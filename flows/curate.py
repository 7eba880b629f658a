"""Curation flow: raw seed JSONL -> train/eval/rejected JSONL + manifest, logged to MLflow.

Run it:  charforge curate --input data/raw --out .state/datasets/default

The heavy pass is cached on a fingerprint of everything its output depends on (input bytes, cards, config,
tokenizer, output location); when the files on disk no longer match their manifest, or the folder holds another
dataset (curated since from other inputs), it runs again.
"""

from __future__ import annotations

import json
from pathlib import Path

from prefect import flow

from charforge.results import CuratedDataset
from charforge.schemas.curate import CurateConfig
from charforge.settings import DATA_DIR
from tasks.curate import curate_dataset, log_lineage, plan_curation


@flow(name="curate")
def curate(
    inputs: tuple[str, ...] = ("data/raw",),
    out_dir: str = ".state/datasets/default",
    characters_dir: str = str(DATA_DIR / "characters"),
    config: CurateConfig = CurateConfig(),
) -> CuratedDataset:
    """Curate conversations for training: validate, scrub, filter, deduplicate, balance, split, record lineage."""
    plan = plan_curation(inputs, out_dir, characters_dir, config)
    step = curate_dataset if plan.outputs_intact else curate_dataset.with_options(refresh_cache=True)
    state = step(plan, config, return_state=True)
    if state.name == "Cached" and not holds(state.result()):  # another run curated other inputs into this folder
        state = curate_dataset.with_options(refresh_cache=True)(plan, config, return_state=True)
    return log_lineage(state.result(), cached=state.name == "Cached")


def holds(dataset: CuratedDataset) -> bool:
    """Whether the folder still holds this cached dataset: intact files alone are not enough when two chains (the
    first champion's on files, a nightly one with production data) curate into the same folder."""
    return json.loads(Path(dataset.manifest).read_text()).get("dataset_hash") == dataset.dataset_hash
