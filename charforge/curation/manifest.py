"""Reading a curated dataset folder (the curation stage's output contract)."""

from __future__ import annotations

import json
from pathlib import Path

from charforge.errors import InputError


def read_dataset_manifest(dataset_dir: Path) -> dict:
    """The dataset's manifest.json; a missing or empty dataset is a InputError that says how to make one."""
    path = Path(dataset_dir) / "manifest.json"
    if not path.is_file():
        raise InputError(f"{dataset_dir}: no curated dataset here (manifest.json missing); run "
                          f"`charforge curate --input data/raw --out {dataset_dir}` first")
    manifest = json.loads(path.read_text())
    if manifest["rows"]["train"] == 0:
        raise InputError(f"{dataset_dir}: the curated train split is empty; nothing to train on")
    return manifest
